"""Image preference pairs for Diffusion-DPO ranked by Shapes-GenEval: `k` samples of each seen-split prompt (drawn
with a prompt seed the evaluation never uses), a correct one chosen and an incorrect one rejected by the evaluator;
writes a pair folder (pairs.jsonl + chosen/ + rejected/) and prints one JSON line (pass rate, pairs).

    python benchmarks/diffusion_dpo_pairs.py runs/shapes-t2i runs/shapes-dpo-pairs --per-category 20 --k 4 --cfg 3
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from genlab.adapt.diffusion_dpo import CHOSEN_SOURCES, RANKINGS, geneval_pairs
from genlab.config import check_int, check_number, check_output_path
from genlab.data.image_pairs import write_image_pairs
from genlab.eval.geneval import CATEGORIES, prompt_specs
from genlab.models.base import GenerativeModel, resolve_model_dir
from genlab.sampling.controls import Guidance


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="a text_diffusion model or run folder")
    p.add_argument("out", help="the pair folder to write")
    p.add_argument("--per-category", type=int, default=20, help="seen-split prompts per category")
    p.add_argument("--categories", default=",".join(CATEGORIES))
    p.add_argument("--k", type=int, default=4, help="samples per prompt")
    p.add_argument("--prompt-seed", type=int, default=1, help="seed of the prompt set (evaluation uses 0)")
    p.add_argument("--seed", type=int, default=10_000, help="image i is seeded seed + i")
    p.add_argument("--chosen", choices=CHOSEN_SOURCES, default="sample")
    p.add_argument("--rank", choices=RANKINGS, default="pass", help="partial: also rank failures by attribute recall")
    p.add_argument("--cfg", type=float, default=3.0)
    p.add_argument("--sampler", default="dpmpp_2m")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=64)
    args = p.parse_args()
    torch.set_num_threads(1)
    check_int("--per-category", args.per_category, 1, 100)
    check_int("--k", args.k, 2, 64)
    check_number("--cfg", args.cfg, 0.0, 50.0)
    check_output_path(args.out, "the pair folder", folder=True)
    cats = args.categories.split(",")
    specs = [s for s in prompt_specs("seen", args.per_category, seed=args.prompt_seed) if s.category in cats]
    model = GenerativeModel.from_pretrained(resolve_model_dir(args.model)).eval()
    t0 = time.monotonic()
    prompts, chosen, rejected, extra, summary = geneval_pairs(
        model, specs, args.k, seed=args.seed, chosen=args.chosen, rank=args.rank, batch_size=args.batch,
        sampler=args.sampler, steps=args.steps, guidance=Guidance(args.cfg))
    write_image_pairs(args.out, prompts, chosen, rejected, extra)
    print(json.dumps({"benchmark": "diffusion_dpo_pairs", "model": args.model, "cfg": args.cfg, "steps": args.steps,
                      "sampler": args.sampler, "chosen": args.chosen, **summary,
                      "seconds": round(time.monotonic() - t0), "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
