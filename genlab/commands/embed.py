"""`genlab embed MODEL --text "a red circle" --image a.png ... [--output out.npy|out.json]`: texts and images to
vectors in a model's shared embedding space (a CLIP), unit length.

Without --output, one JSON object per input is printed ({"text" or "image", "embedding"}); with texts and images
both, the cosine of every image with every text follows. `.npy` holds the (N, D) float32 matrix, texts first then
images, in the order given; `.json` holds the inputs, the model and the embeddings.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from genlab.commands.sample import _read_image
from genlab.config import MAX_SAMPLES, check_device, check_int, check_output_path
from genlab.errors import GenlabError
from genlab.files import atomic_path, write_atomic
from genlab.models.base import GenerativeModel, Output, resolve_model_dir

OUTPUT_SUFFIXES = (".npy", ".json")
MAX_TEXT_CHARS = 100_000  # a caption is cut to the model's context anyway; this bounds tokenizing time


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a CLIP model folder or run folder")
    p.add_argument("--text", action="append", default=[], help="a text to embed (repeatable)")
    p.add_argument("--image", action="append", default=[], help="an image file to embed (repeatable)")
    p.add_argument("--output", default=None, help="write the embeddings to a .npy (N x D float32) or .json file")
    p.add_argument("--batch", type=int, default=64, help="inputs per forward pass")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")


def _check_args(args: argparse.Namespace) -> None:
    if not args.text and not args.image:
        raise GenlabError("nothing to embed: give --text \"...\" and/or --image FILE")
    check_int("--text and --image count", len(args.text) + len(args.image), 1, MAX_SAMPLES,
              "inputs held in memory at once")
    for t in args.text:
        if len(t) > MAX_TEXT_CHARS:
            raise GenlabError(f"--text of {len(t):,} characters is too long: at most {MAX_TEXT_CHARS:,}")
    for f in args.image:
        if not Path(f).is_file():
            raise GenlabError(f"--image {f} is not a file; give a PNG or JPEG file")
    check_int("--batch", args.batch, 1, 4096)
    check_device("--device", args.device)
    if args.output is not None:
        suffix = Path(args.output).suffix.lower()
        if suffix not in OUTPUT_SUFFIXES:
            raise GenlabError(f"--output {args.output} must end in .npy or .json")
        check_output_path(args.output, "--output", suffix=suffix)


def run(args: argparse.Namespace) -> int:
    from genlab.sampling.distributed import local_device

    _check_args(args)
    model_dir = resolve_model_dir(args.model)
    device = local_device(args.device)
    model = GenerativeModel.from_pretrained(model_dir, map_location=device).to(device).eval()
    if model.output is not Output.EMBEDDING:
        raise GenlabError(f"{model_dir} holds a {model.family} model, which outputs {model.output.value}; "
                          "`genlab embed` takes a model that outputs embeddings (train one with family: clip)")
    C, H, _ = model.image_shape
    images = torch.cat([_read_image(f, C, H, "image") for f in args.image]) if args.image else None
    with torch.no_grad():
        parts = [model.encode_text(args.text[i: i + args.batch]).float().cpu()
                 for i in range(0, len(args.text), args.batch)]
        if images is not None:
            parts += [model.encode_image(images[i: i + args.batch].to(device)).float().cpu()
                      for i in range(0, len(images), args.batch)]
    emb = torch.cat(parts).numpy()
    inputs: list[dict[str, Any]] = [{"text": t} for t in args.text] + [{"image": f} for f in args.image]
    _write(args, model, inputs, emb)
    return 0


def _write(args: argparse.Namespace, model: GenerativeModel, inputs: list[dict[str, Any]], emb: np.ndarray) -> None:
    n_text = len(args.text)
    cosine = (emb[n_text:] @ emb[:n_text].T).astype(np.float64).round(6).tolist() if args.text and args.image else None
    if args.output is None:
        for item, e in zip(inputs, emb):
            print(json.dumps({**item, "embedding": [round(float(v), 6) for v in e]}))
        if cosine is not None:
            print(json.dumps({"cosine": cosine, "rows": "images", "columns": "texts"}))
        return
    out = Path(args.output)
    if out.suffix.lower() == ".npy":
        with atomic_path(out) as tmp, open(tmp, "wb") as f:
            np.save(f, emb.astype(np.float32))
    else:
        doc = {"model": str(args.model), "family": model.family, "dim": int(emb.shape[1]), "inputs": inputs,
               "embeddings": emb.astype(np.float64).round(6).tolist()}
        if cosine is not None:
            doc["cosine"] = cosine
        write_atomic(out, json.dumps(doc))
    print(f"wrote {len(emb)} embeddings of {emb.shape[1]} dimensions to {out}")
