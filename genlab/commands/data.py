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
