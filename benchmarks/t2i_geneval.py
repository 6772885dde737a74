"""Prompt adherence of a text-to-image model: Shapes-GenEval (genlab/eval/geneval.py) at several guidance scales on
the seen and held-out prompt sets, CLIP score against a CLIP model, and the negative-prompt test ("a circle" with and
without the negative prompt "red": the share of images with a red circle). Prints one JSON line; writes
geneval.json / geneval.md into --out.

    python benchmarks/t2i_geneval.py runs/shapes-t2i --cfg 1,3,5 --per-category 100 --images-per-prompt 4 \
        --clip runs/shapes-clip --out runs/shapes-t2i/geneval
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from genlab.eval.geneval import CATEGORIES, expand, get_reader, prompt_specs, render_specs, score, write_geneval
from genlab.eval.report import sample_images
from genlab.models.base import GenerativeModel, resolve_model_dir
from genlab.sampling.controls import Guidance


def draw(model: GenerativeModel, prompts: list[str], cfg: float, args: argparse.Namespace,
         negative: str | None = None) -> torch.Tensor:
    """One image per prompt, image i seeded `seed + i`, with guidance `cfg` (and a negative prompt)."""
    return sample_images(model.sample, len(prompts), args.seed, batch_size=args.batch, cond=prompts,
                         per_item_seeds=True, sampler=args.sampler, steps=args.steps,
                         guidance=Guidance(cfg, negative=negative))


def red_circle_share(images: torch.Tensor) -> float:
    """The share of images in which the Shapes-GenEval reader finds a red circle."""
    dets = get_reader().read(images)
    return sum(any(d.shape == "circle" and d.color == "red" for d in ds) for ds in dets) / len(dets)


def red_pixel_share(images: torch.Tensor, rgb: tuple[int, int, int] = (220, 30, 30), tol: int = 60) -> float:
    """The share of pixels within `tol` levels (every channel) of the red of `shapes`: a cruder reading of "red"
    than the reader's, that needs no recognizable shape."""
    x = ((images.clamp(-1, 1) + 1) * 127.5).round()
    return float(((x - torch.tensor(rgb).view(1, 3, 1, 1)).abs().amax(1) <= tol).float().mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--cfg", default="1,3,5", help="guidance scales, comma-separated")
    p.add_argument("--splits", default="seen,heldout")
    p.add_argument("--per-category", type=int, default=100)
    p.add_argument("--images-per-prompt", type=int, default=4)
    p.add_argument("--sampler", default="dpmpp_2m")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--negative-n", type=int, default=100, help="images of 'a circle' with and without 'red' (0: skip)")
    p.add_argument("--clip", default=None, help="a CLIP model (or run) folder for CLIP score")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    model = GenerativeModel.from_pretrained(resolve_model_dir(args.model)).eval()
    clip = GenerativeModel.from_pretrained(resolve_model_dir(args.clip)).eval() if args.clip else None
    scales = [float(s) for s in args.cfg.split(",")]
    results: dict[str, dict] = {}
    clip_scores: dict[str, float] = {}
    clip_cosines: dict[str, float] = {}
    for split in args.splits.split(","):
        specs = expand(prompt_specs(split, args.per_category), args.images_per_prompt)
        prompts = [s.prompt for s in specs]
        real = render_specs(specs, model.image_shape[-1], seed=args.seed).float() / 127.5 - 1  # the reference row
        for cfg in [None, *scales]:
            images = real if cfg is None else draw(model, prompts, cfg, args)
            key = f"{split} real renders" if cfg is None else f"{split} cfg {cfg:g}"
            results[key] = score(images, specs)
            if clip is not None:  # CLIP score clamps the mean cosine at 0; the raw mean shows a trend below it
                from genlab.eval.clip import clip_score, embed_images, embed_texts

                with torch.no_grad():
                    image_emb, text_emb = embed_images(clip, images), embed_texts(clip, prompts)
                clip_scores[key] = clip_score(image_emb, text_emb)
                clip_cosines[key] = 100 * float(torch.cosine_similarity(image_emb, text_emb, dim=-1).mean())
            print(json.dumps({key: round(results[key]["overall"], 4), "clip_score": clip_scores.get(key),
                              "clip_cosine_x100": clip_cosines.get(key), "seconds": round(time.time() - t0)}),
                  flush=True)
    circle, cfg_neg = ["a circle"] * args.negative_n, max(scales)
    plain_images = draw(model, circle, cfg_neg, args) if circle else None
    negative_images = draw(model, circle, cfg_neg, args, negative="red") if circle else None
    plain = red_circle_share(plain_images) if circle else None
    negative = red_circle_share(negative_images) if circle else None
    red_pixels = [round(red_pixel_share(x), 4) for x in (plain_images, negative_images)] if circle else None
    line = {
        "benchmark": "t2i_geneval", "model": args.model, "sampler": args.sampler, "steps": args.steps,
        "per_category": args.per_category, "images_per_prompt": args.images_per_prompt,
        "overall": {k: round(v["overall"], 4) for k, v in results.items()},
        "categories": {k: {c: round(v["categories"][c]["score"], 4) for c in CATEGORIES if c in v["categories"]}
                       for k, v in results.items()},
        "clip_score": {k: round(v, 2) for k, v in clip_scores.items()},
        "clip_cosine_x100": {k: round(v, 2) for k, v in clip_cosines.items()},
        "negative_prompt": {"prompt": "a circle", "negative": "red", "cfg": cfg_neg, "n": args.negative_n,
                            "red_circle_share": plain, "with_negative": negative,
                            "red_pixel_share": red_pixels and red_pixels[0], "red_pixels_with_negative":
                            red_pixels and red_pixels[1]},
        "seconds": round(time.time() - t0),
        "threads": torch.get_num_threads(),
    }
    if args.out:
        write_geneval(results, args.out, extra={k: v for k, v in line.items() if k not in ("overall", "categories")})
    print(json.dumps(line))


if __name__ == "__main__":
    main()
