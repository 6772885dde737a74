"""The Shapes-GenEval evaluator on real renders: every prompt of the seen and held-out sets drawn exactly (4 layouts
each, at 32 and 64 px), scored as a model's images would be. The acceptance bar is at least 0.99 in every category.

    python benchmarks/geneval_renders.py [--per-category 100] [--images-per-prompt 4] [--sizes 32,64]

Trains the attribute reader on first use (cached under $GENLAB_CACHE/geneval/). Prints the markdown tables, then
one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from genlab.eval import geneval as G  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--per-category", type=int, default=G.PROMPTS_PER_CATEGORY)
    p.add_argument("--images-per-prompt", type=int, default=G.IMAGES_PER_PROMPT)
    p.add_argument("--sizes", default="32,64")
    p.add_argument("--seed", type=int, default=123, help="layout seed of the renders")
    args = p.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    reader = G.get_reader(progress=True)
    reader_seconds = round(time.time() - t0, 1)
    line: dict = {"benchmark": "geneval_renders", "reader": {k: reader.meta.get(k) for k in (
        "hash", "val_shape_accuracy", "val_color_accuracy", "train_crops", "train_seconds")},
        "reader_load_or_train_seconds": reader_seconds, "scores": {}}
    for size in (int(s) for s in args.sizes.split(",")):
        tables = {}
        for split in G.SPLITS:
            specs = G.expand(G.prompt_specs(split, args.per_category), args.images_per_prompt)
            tables[split] = G.score(G.render_specs(specs, size, seed=args.seed), specs, reader)
            line["scores"][f"{split} {size}px"] = {c: round(v["score"], 4)
                                                   for c, v in tables[split]["categories"].items()}
            line["scores"][f"{split} {size}px"]["overall"] = round(tables[split]["overall"], 4)
            line["scores"][f"{split} {size}px"]["images"] = len(specs)
        print(f"real renders at {size} px\n\n{G.markdown_table(tables)}", flush=True)
    line["min_category"] = min(v for s in line["scores"].values() for k, v in s.items() if k in G.CATEGORIES)
    line["seconds"] = round(time.time() - t0, 1)
    line["threads"] = torch.get_num_threads()
    print(json.dumps(line))


if __name__ == "__main__":
    main()
