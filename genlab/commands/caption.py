"""`genlab caption MODEL image.png [more.png ...]`: describe images with an image-to-text model (greedy by default)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from genlab.config import MAX_SAMPLES, check_int
from genlab.errors import GenlabError

MAX_IMAGE_BYTES = 64 * 2**20  # a PNG of a few hundred pixels a side is kilobytes; refuse to read huge files


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="an image-to-text model folder or run folder (e.g. runs/shapes-captioner)")
    p.add_argument("images", nargs="+", help="PNG or JPEG files of the model's image size")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")


def read_image(path: str, shape: tuple[int, int, int], what: str = "image") -> torch.Tensor:
    """An image file as (1, C, H, W) in [-1, 1]; a missing, unreadable or wrongly sized file is a one-line error."""
    from PIL import Image, UnidentifiedImageError

    from genlab.data.images import from_uint8

    p = Path(path)
    if not p.is_file():
        raise GenlabError(f"{what} {path}: no such file")
    if p.stat().st_size > MAX_IMAGE_BYTES:
        raise GenlabError(f"{what} {path} is larger than {MAX_IMAGE_BYTES >> 20} MiB; give a small PNG or JPEG")
    C, H, W = shape
    try:
        with Image.open(p) as im:
            if im.size != (W, H):
                raise GenlabError(f"{what} {path} is {im.size[0]}x{im.size[1]} px but this model reads {W}x{H}; "
                                  "resize it first")
            a = np.array(im.convert("L" if C == 1 else "RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise GenlabError(f"cannot read {what} {path} ({e.__class__.__name__}): give a PNG or JPEG file") from None
    return from_uint8(a[None])


def _check_args(args: argparse.Namespace) -> None:
    from genlab.sampling.text import GenerationConfig

    check_int("images", len(args.images), 1, MAX_SAMPLES)
    check_int("--threads", args.threads, 0)
    GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                     seed=args.seed).check(flags=True)
    if args.temperature == 0 and args.top_p != 1.0:
        raise GenlabError("--top-p filters what is sampled; with --temperature 0 (greedy) it does nothing")


def load_image_model(path: str):
    """A model folder (or run folder) whose family takes images and outputs text."""
    from genlab.models.base import Conditioning, GenerativeModel, Output, resolve_model_dir

    model = GenerativeModel.from_pretrained(resolve_model_dir(path)).eval()
    if Conditioning.IMAGE not in model.conditioning or model.output is not Output.TEXT:
        raise GenlabError(f"{path} holds a {model.family} model, which does not describe images ({model.takes()}; "
                          f"outputs {model.output.value}); give an image-to-text model such as a captioner")
    return model


def run(args: argparse.Namespace) -> int:
    from genlab.data.instructions import CAPTION_PROMPT
    from genlab.sampling.text import GenerationConfig, generate

    _check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_image_model(args.model)
    images = torch.cat([read_image(p, model.image_shape) for p in args.images])
    t0 = time.perf_counter()
    prompt = model.image_prompt(images, [CAPTION_PROMPT] * len(images))
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                           seed=args.seed)
    out = generate(prompt.model, prompt.prompts, cfg, prefix=prompt.prefix)
    for path, ids in zip(args.images, out.tokens):
        text = model.tokenizer.decode(ids).strip()
        print(text if len(args.images) == 1 else f"{path}: {text}")
    n = sum(len(t) for t in out.tokens)
    dt = time.perf_counter() - t0
    print(f"[{len(images)} images, {n} tokens in {dt:.2f}s]", file=sys.stderr)
    return 0
