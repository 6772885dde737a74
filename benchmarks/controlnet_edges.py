"""Edge agreement of a ControlNet model (Zhang et al. 2023): for held-out test images, the Sobel edge map is the
control; each is drawn with and without it (same label, same seed), and the output's edge map is compared with the
control's by edge F1 (`genlab.eval.edges`, 1-pixel tolerance).

    python benchmarks/controlnet_edges.py runs/mnist-controlnet --n 100 --steps 20 --cfg 3
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from genlab.data import load_dataset
from genlab.eval.edges import edge_f1
from genlab.models.base import GenerativeModel, resolve_model_dir
from genlab.models.controlnet import Control, control_of
from genlab.sampling.controls import Guidance


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--n", type=int, default=100, help="held-out test images (the first n of the test split)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--sampler", default="dpmpp_2m")
    p.add_argument("--cfg", type=float, default=3.0)
    p.add_argument("--tolerance", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data", default="mnist", help="the dataset whose test split gives the held-out controls")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = GenerativeModel.from_pretrained(resolve_model_dir(args.model)).eval()
    ds = load_dataset(args.data, split="test")
    batch = ds.get_batch(list(range(args.n)))
    x, labels = batch["x"], batch["label"]
    controls = control_of(x, model.config)  # (n, 1, H, W) in {0, 1}
    opts = dict(sampler=args.sampler, steps=args.steps, guidance=Guidance(args.cfg))
    rows = {}
    for name, control in (("with control", Control(controls[None], (1.0,))), ("without control", None)):
        gens = [torch.Generator().manual_seed(i) for i in range(args.n)]
        t0 = time.perf_counter()
        out = model.sample(args.n, labels, gens, control=control, **opts)
        f1 = edge_f1(control_of(out, model.config), controls, args.tolerance)
        rows[name] = {"edge_f1": round(float(f1.mean()), 4), "edge_f1_se": round(float(f1.std() / args.n ** 0.5), 4),
                      "seconds": round(time.perf_counter() - t0, 1)}
    real = edge_f1(control_of(x, model.config), controls, args.tolerance).mean()
    print(json.dumps({"model": args.model, "n": args.n, **{k: v for k, v in vars(args).items() if k != "model"},
                      "real_images_edge_f1": round(float(real), 4), **rows}, indent=2))


if __name__ == "__main__":
    main()
