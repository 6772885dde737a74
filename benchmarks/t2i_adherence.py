"""Prompt adherence of text-to-image models side by side on the same prompts and seeds (e.g. before and after
Diffusion-DPO): Shapes-GenEval's pass rate (all stated attributes right), and finer readings for models that rarely
pass: the share of stated (color, shape) objects found, of stated colors found, of stated shapes found, and of images
with the stated number of objects; per image, the mean of the first three is its partial score, compared pairwise
with the first model's (wins, ties, losses). Prints one JSON line.

    python benchmarks/t2i_adherence.py runs/shapes-t2i runs/shapes-dpo --split heldout --per-category 10 --cfg 3
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from genlab.eval.geneval import (
    CATEGORIES,
    Detection,
    PromptSpec,
    attribute_recall,
    expand,
    get_reader,
    passes,
    prompt_specs,
)
from genlab.eval.report import sample_images
from genlab.models.base import GenerativeModel, resolve_model_dir
from genlab.sampling.controls import Guidance


def readings(spec: PromptSpec, dets: list[Detection]) -> dict[str, float]:
    """Pass, and the recall of the stated objects, colors and shapes, their mean and the count match."""
    return {"pass": float(passes(spec, dets)), **attribute_recall(spec, dets)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+")
    p.add_argument("--split", default="heldout")
    p.add_argument("--per-category", type=int, default=10)
    p.add_argument("--images-per-prompt", type=int, default=2)
    p.add_argument("--cfg", type=float, default=3.0)
    p.add_argument("--sampler", default="dpmpp_2m")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=60)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    args = p.parse_args()
    torch.set_num_threads(max(1, args.threads))
    t0 = time.time()
    specs = expand(prompt_specs(args.split, args.per_category), args.images_per_prompt)
    reader = get_reader()
    rows, partial = {}, {}
    for path in args.models:
        model = GenerativeModel.from_pretrained(resolve_model_dir(path)).eval()
        images = sample_images(model.sample, len(specs), args.seed, batch_size=args.batch,
                               cond=[s.prompt for s in specs], per_item_seeds=True, sampler=args.sampler,
                               steps=args.steps, guidance=Guidance(args.cfg))
        per = [readings(s, d) for s, d in zip(specs, reader.read(images), strict=True)]
        partial[path] = torch.tensor([r["partial"] for r in per])
        row = {k: round(sum(r[k] for r in per) / len(per), 4) for k in per[0]}
        row["pass_by_category"] = {c: round(sum(r["pass"] for r, s in zip(per, specs) if s.category == c)
                                            / sum(s.category == c for s in specs), 4) for c in CATEGORIES}
        row["partial_se"] = round(float(partial[path].std() / len(per) ** 0.5), 4)
        rows[path] = row
    first = args.models[0]
    for path in args.models[1:]:
        d = partial[path] - partial[first]
        rows[path]["vs_first"] = {"wins": int((d > 0).sum()), "ties": int((d == 0).sum()),
                                  "losses": int((d < 0).sum()), "mean_diff": round(float(d.mean()), 4),
                                  "mean_diff_se": round(float(d.std() / len(d) ** 0.5), 4)}
    print(json.dumps({"benchmark": "t2i_adherence", "split": args.split, "images": len(specs), "cfg": args.cfg,
                      "sampler": args.sampler, "steps": args.steps, "models": rows,
                      "seconds": round(time.time() - t0), "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
