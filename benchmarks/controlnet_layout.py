"""Layout adherence of a box-layout ControlNet (family text_controlnet, model.control=boxes; Zhang et al. 2023): for
held-out `shapes` scenes (the test split), the layout of the scene's object boxes is the control and its caption the
prompt; each is drawn with and without the control (same prompt, same seed), and the output's segmented objects are
compared with the control boxes (`genlab.eval.layout`: best box IoU per control box, and the IoU of the masks). Floor:
the real render of another scene against this scene's layout; ceiling: the scene's own render.

    python benchmarks/controlnet_layout.py runs/shapes-layout --n 100 --steps 20 --cfg 3
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from genlab.config import DataConfig
from genlab.data import load_dataset
from genlab.eval.layout import layout_iou
from genlab.models.base import GenerativeModel, resolve_model_dir
from genlab.models.controlnet import BoxLayoutData, Control
from genlab.sampling.controls import Guidance


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--n", type=int, default=100, help="held-out scenes (the first n of the shapes test split)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--sampler", default="dpmpp_2m")
    p.add_argument("--cfg", type=float, default=3.0)
    p.add_argument("--batch", type=int, default=25)
    args = p.parse_args()
    torch.set_num_threads(1)
    model = GenerativeModel.from_pretrained(resolve_model_dir(args.model)).eval()
    ds = load_dataset(DataConfig(name="shapes", image_size=model.config.image_size), split="test")
    data = BoxLayoutData(ds)
    batch = data.get_batch(list(range(args.n + 1)))
    layouts = [[o.box for o in ds.objects(i)] for i in range(args.n)]
    prompts, controls = batch["text"][: args.n], batch["control"][: args.n]
    opts = dict(sampler=args.sampler, steps=args.steps, guidance=Guidance(args.cfg))
    rows = {}
    for name, use in (("with control", True), ("without control", False)):
        t0, out = time.perf_counter(), []
        for s in range(0, args.n, args.batch):
            e = min(args.n, s + args.batch)
            gens = [torch.Generator().manual_seed(i) for i in range(s, e)]
            control = Control(controls[None, s:e], (1.0,)) if use else None
            out.append(model.sample(e - s, prompts[s:e], gens, control=control, **opts) if use
                       else model.sample(e - s, prompts[s:e], gens, **opts))
        rows[name] = {**_summary(layout_iou(torch.cat(out), layouts)), "seconds": round(time.perf_counter() - t0, 1)}
    rows["another real scene (floor)"] = _summary(layout_iou(batch["x"][1: args.n + 1], layouts))
    rows["the scene's own render (ceiling)"] = _summary(layout_iou(batch["x"][: args.n], layouts))
    print(json.dumps({"benchmark": "controlnet_layout", "model": args.model, "n": args.n, "steps": args.steps,
                      "sampler": args.sampler, "cfg": args.cfg, **rows, "threads": torch.get_num_threads()}))


def _summary(scores: dict[str, torch.Tensor]) -> dict[str, float]:
    """Mean and standard error of each score."""
    row = {}
    for k, v in scores.items():
        row[k] = round(float(v.mean()), 4)
        row[k + "_se"] = round(float(v.std() / len(v) ** 0.5), 4)
    return row


if __name__ == "__main__":
    main()
