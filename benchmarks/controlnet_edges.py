"""Edge agreement of a ControlNet model (Zhang et al. 2023): for held-out test images, the Sobel edge map is the
control; each is drawn with and without it (same label, same seed), and the output's edge map is compared with the
control's by edge F1 (`genlab.eval.edges`, at 0 and 1 pixel of tolerance). A chance floor: the F1 of another test
digit of the same class (the next one in the split) against the control. The `thin` figures compare edges thinned by
non-maximum suppression (`thin_edges`) of the control's source digit and of the output, at the same threshold.

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
from genlab.nn.controlnet import thin_edges
from genlab.sampling.controls import Guidance


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--n", type=int, default=100, help="held-out test images (the first n of the test split)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--sampler", default="dpmpp_2m")
    p.add_argument("--cfg", type=float, default=3.0)
    p.add_argument("--tolerance", type=int, nargs="+", default=[0, 1], help="pixel tolerances of the F1")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data", default="mnist", help="the dataset whose test split gives the held-out controls")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = GenerativeModel.from_pretrained(resolve_model_dir(args.model)).eval()
    ds = load_dataset(args.data, split="test")
    batch = ds.get_batch(list(range(args.n)))
    rest = ds.get_batch(list(range(args.n, min(len(ds), 20 * args.n))))
    others = [int((rest["label"] == y).nonzero()[0]) for y in batch["label"]]  # same class, another digit
    x, labels = batch["x"], batch["label"]
    controls = control_of(x, model.config)  # (n, 1, H, W) in {0, 1}
    def thin(images: torch.Tensor) -> torch.Tensor:
        return thin_edges(images, model.config.edge_threshold)

    opts = dict(sampler=args.sampler, steps=args.steps, guidance=Guidance(args.cfg))
    rows = {}
    for name, control in (("with control", Control(controls[None], (1.0,))), ("without control", None)):
        gens = [torch.Generator().manual_seed(i) for i in range(args.n)]
        t0 = time.perf_counter()
        out = model.sample(args.n, labels, gens, control=control, **opts)
        rows[name] = {**_f1(control_of(out, model.config), controls, args.tolerance),
                      **_f1(thin(out), thin(x), args.tolerance, "thin_"),
                      "seconds": round(time.perf_counter() - t0, 1)}
    other = rest["x"][others]
    rows["another real digit of the class"] = {**_f1(control_of(other, model.config), controls, args.tolerance),
                                               **_f1(thin(other), thin(x), args.tolerance, "thin_")}
    print(json.dumps({"model": args.model, "n": args.n, **{k: v for k, v in vars(args).items() if k != "model"},
                      **rows}, indent=2))


def _f1(edges: torch.Tensor, controls: torch.Tensor, tolerances: list[int], prefix: str = "") -> dict[str, float]:
    """Mean edge F1 and its standard error at each tolerance."""
    row = {}
    for tol in tolerances:
        f1 = edge_f1(edges, controls, tol)
        row[f"{prefix}edge_f1_tol{tol}"] = round(float(f1.mean()), 4)
        row[f"{prefix}edge_f1_tol{tol}_se"] = round(float(f1.std() / len(f1) ** 0.5), 4)
    return row


if __name__ == "__main__":
    main()
