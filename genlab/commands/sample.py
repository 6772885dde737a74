"""`genlab sample MODEL_OR_RUN --n 64 --sampler ddim --steps 50 --cfg 3 [--label 7] --seed 0 --out grid.png`.

Image i is drawn with its own generator seeded `seed + i`, so any single image can be reproduced alone
(`--n 1 --seed SEED_I --label LABEL_I`); every PNG stores its seed and full parameters in a text chunk.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tqdm.auto import tqdm

from genlab.data.images import save_grid, save_png, to_uint8
from genlab.errors import GenlabError
from genlab.registry import SAMPLERS

MAX_N = 10_000


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a model folder (config.json + model.safetensors) or a run folder (uses model/)")
    p.add_argument("--n", type=int, default=64, help="how many images (1..10000)")
    p.add_argument("--sampler", default="ddim", help="ddim or ddpm")
    p.add_argument("--steps", type=int, default=50, help="sampling steps")
    p.add_argument("--cfg", type=float, default=3.0, help="classifier-free guidance scale (1 = none)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM noise (0 = deterministic, 1 = DDPM-like)")
    p.add_argument("--spacing", default="leading", help="timestep spacing: leading, trailing or linspace")
    p.add_argument("--label", type=int, default=None,
                   help="class to draw (default: cycle through the classes, one grid row per class)")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    p.add_argument("--out", default=None, help="grid PNG (default grid.png unless --out-dir is given)")
    p.add_argument("--out-dir", default=None, help="also write one PNG per image into this folder")
    p.add_argument("--batch", type=int, default=250, help="images per forward batch")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")


def _check_args(args: argparse.Namespace) -> None:
    if not 1 <= args.n <= MAX_N:
        raise GenlabError(f"--n {args.n} is out of range; use 1..{MAX_N}")
    if args.steps < 1:
        raise GenlabError(f"--steps {args.steps} must be at least 1")
    if args.cfg < 0:
        raise GenlabError(f"--cfg {args.cfg} must be >= 0 (1 = no guidance)")
    if args.batch < 1:
        raise GenlabError(f"--batch {args.batch} must be at least 1")
    if args.seed < 0:
        raise GenlabError(f"--seed {args.seed} must be >= 0")
    SAMPLERS.get(args.sampler)


def run(args: argparse.Namespace) -> int:
    import genlab.sampling.diffusion  # noqa: F401  (registers the samplers)
    from genlab.models.base import GenerativeModel
    from genlab.train import resolve_model_dir

    _check_args(args)
    model_dir = resolve_model_dir(args.model)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    model = GenerativeModel.from_pretrained(model_dir, map_location=device).to(device).eval()
    if not hasattr(model, "labels_for"):
        raise GenlabError(f"{model_dir} holds a {model.family} model; `genlab sample` needs a diffusion model")
    labels = model.labels_for(args.n, args.label)
    opts = {"sampler": args.sampler, "steps": args.steps, "cfg": args.cfg, "eta": args.eta, "spacing": args.spacing}

    images = []
    for start in tqdm(range(0, args.n, args.batch), desc="sampling", unit="batch", disable=args.n <= args.batch):
        count = min(args.batch, args.n - start)
        gens = [torch.Generator().manual_seed(args.seed + start + i) for i in range(count)]
        cond = labels[start : start + count] if labels is not None else None
        images.append(model.sample(count, cond=cond, generator=gens, progress=args.n <= args.batch, **opts).cpu())
    x = torch.cat(images)

    common = {"model": str(args.model), "family": model.family, **opts}
    if args.out_dir:
        for i, img in enumerate(to_uint8(x)):
            params = {**common, "seed": args.seed + i, "label": int(labels[i]) if labels is not None else None}
            save_png(img, Path(args.out_dir) / f"{i:05d}_seed{args.seed + i}.png", params)
        print(f"wrote {args.n} images to {args.out_dir}")
    if args.out or not args.out_dir:
        nrow = None
        if labels is not None and args.label is None:
            nrow = -(-args.n // model.num_classes)
        params = {**common, "seed": args.seed, "seeds": f"seed + i for image i (row-major), i < {args.n}",
                  "n": args.n, "labels": labels.tolist() if labels is not None else None}
        print(f"wrote {save_grid(x, args.out or 'grid.png', nrow=nrow, params=params)}")
    return 0
