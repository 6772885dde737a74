"""`genlab data list` and `genlab data show NAME --out grid.png`."""

from __future__ import annotations

import argparse

import torch

from genlab.config import MAX_IMAGE_SIZE, MAX_SAMPLES, DataConfig, check_int, check_output_path, check_seed
from genlab.data import DATASETS, ImageDataset, load_dataset
from genlab.data.images import save_grid
from genlab.errors import GenlabError

N, OUT = 100, "grid.png"  # the defaults of --n and --out


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="data_command", required=True)
    sub.add_parser("list", help="built-in datasets: name, kind, size, license")
    show = sub.add_parser("show", help="write a contact sheet of a dataset (or print a text sample)")
    show.add_argument("name", help="a built-in dataset, an image folder or a text file")
    show.add_argument("--split", default="train")
    show.add_argument("--n", type=int, default=N, help=f"how many images (1..{MAX_SAMPLES})")
    show.add_argument("--image-size", type=int, default=None)
    show.add_argument("--seed", type=int, default=0)
    show.add_argument("--out", default=OUT)
    info = sub.add_parser("info", help="where a PNG written by genlab came from: its stored parameters")
    info.add_argument("image", help="a PNG written by genlab (sample, serve)")


def run(args: argparse.Namespace) -> int:
    if args.data_command == "list":
        rows = []
        for name in DATASETS:
            ds = DATASETS.get(name)(split="train")
            size = f"{len(ds)} images" if ds.info.kind == "image" else f"{len(ds):,} chars"
            extra = f"{ds.info.image_size}px x{ds.info.channels}, {ds.info.num_classes} classes" \
                if ds.info.kind == "image" else ""
            rows.append((name, ds.info.kind, f"{size} (train)", extra, ds.info.license))
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        print("  ".join(h.ljust(w) for h, w in zip(("name", "kind", "size", "shape", "license"), widths)))
        for r in rows:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
        return 0
    if args.data_command == "info":
        return _info(args.image)
    check_int("--n", args.n, 1, MAX_SAMPLES)
    check_seed("--seed", args.seed)
    if args.image_size is not None:
        check_int("--image-size", args.image_size, 4, MAX_IMAGE_SIZE)
    ds = load_dataset(DataConfig(name=args.name, split=args.split, image_size=args.image_size))
    if not isinstance(ds, ImageDataset):
        given = [f for f, on in (("--n", args.n != N), ("--image-size", args.image_size is not None),
                                 ("--out", args.out != OUT)) if on]
        if given:
            raise GenlabError(f"{', '.join(given)} apply to image datasets; {args.name} is text (its start is printed)")
        print(ds.text[:1000])
        return 0
    check_output_path(args.out, "--out", suffix=".png")
    g = torch.Generator().manual_seed(args.seed)
    idx = torch.randperm(len(ds), generator=g)[: args.n]
    batch = ds.get_batch(idx)
    path = save_grid(batch["x"], args.out, params={"dataset": args.name, "split": args.split, "seed": args.seed})
    print(f"wrote {path} ({len(idx)} of {len(ds)} images; {ds.info.attribution})")
    return 0


def _info(image: str) -> int:
    """Print the parameters genlab stored in a PNG, the generator and model hash first."""
    import json
    from pathlib import Path

    from PIL import UnidentifiedImageError

    from genlab.data.images import read_params

    if not Path(image).is_file():
        raise GenlabError(f"{image} is not a file; give a PNG written by genlab")
    try:
        params = read_params(image)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise GenlabError(f"{image} is not a readable PNG with genlab's parameters ({e.__class__.__name__})") from None
    if not isinstance(params, dict):
        raise GenlabError(f"{image} carries no genlab parameters (no 'genlab' PNG text chunk)")
    first = ("generator", "genlab_version", "model", "model_hash", "family", "seed")
    if params.get("generator"):
        print(f"{image}: drawn by {params['generator']} {params.get('genlab_version', '?')} with model "
              f"{params.get('model', '?')} (folder hash {params.get('model_hash', '?')}), seed {params.get('seed')}")
    for key in [k for k in first if k in params] + sorted(k for k in params if k not in first):
        print(f"  {key}: {json.dumps(params[key])}")
    return 0
