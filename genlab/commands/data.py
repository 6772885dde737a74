"""`genlab data list` and `genlab data show NAME --out grid.png`."""

from __future__ import annotations

import argparse

import torch

from genlab.config import DataConfig
from genlab.data import DATASETS, ImageDataset, load_dataset
from genlab.data.images import save_grid
from genlab.errors import GenlabError


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="data_command", required=True)
    sub.add_parser("list", help="built-in datasets: name, kind, size, license")
    show = sub.add_parser("show", help="write a contact sheet of a dataset (or print a text sample)")
    show.add_argument("name", help="a built-in dataset, an image folder or a text file")
    show.add_argument("--split", default="train")
    show.add_argument("--n", type=int, default=100, help="how many images")
    show.add_argument("--image-size", type=int, default=None)
    show.add_argument("--seed", type=int, default=0)
    show.add_argument("--out", default="grid.png")


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
    ds = load_dataset(DataConfig(name=args.name, split=args.split, image_size=args.image_size))
    if not isinstance(ds, ImageDataset):
        print(ds.text[:1000])
        return 0
    if not 1 <= args.n <= 10_000:
        raise GenlabError(f"--n {args.n} is out of range; use 1..10000")
    g = torch.Generator().manual_seed(args.seed)
    idx = torch.randperm(len(ds), generator=g)[: args.n]
    batch = ds.get_batch(idx)
    path = save_grid(batch["x"], args.out, params={"dataset": args.name, "split": args.split, "seed": args.seed})
    print(f"wrote {path} ({len(idx)} of {len(ds)} images; {ds.info.attribution})")
    return 0
