"""`genlab sample MODEL_OR_RUN --n 64 --sampler ddim --steps 50 --cfg 3 [--label 7] --seed 0 --out grid.png`.

Any sampler of `--list-samplers` with its options (`--opt s_churn=1`), a `--schedule`, a `--negative-label`,
`--guidance-rescale`, img2img (`--init-image x.png --strength 0.6`) and inpainting (`--init-image x.png
--mask m.png`, white = generate; `--repaint-jumps 10` resamples as RePaint).

Image i is drawn with its own generator seeded `seed + i`, so any single image can be reproduced alone
(`--n 1 --seed SEED_I --label LABEL_I`); every PNG stores its seed and full parameters in a text chunk.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from genlab.data.images import from_uint8, save_grid, save_png, to_uint8
from genlab.errors import GenlabError
from genlab.registry import SAMPLERS
from genlab.sampling.schedules import SCHEDULES

MAX_N = 10_000


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", help="a model folder (config.json + model.safetensors) or a run folder "
                   "(uses model/)")
    p.add_argument("--list-samplers", action="store_true", help="print the samplers, their options and the "
                   "schedules, then exit")
    p.add_argument("--n", type=int, default=64, help="how many images (1..10000)")
    p.add_argument("--sampler", default="ddim", help="a sampler name (see --list-samplers)")
    p.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                   help="a sampler option, e.g. s_churn=1.0 or order=3 (repeatable; see --list-samplers)")
    p.add_argument("--schedule", default=None, help=f"sigma schedule: {', '.join(SCHEDULES)} "
                   "(default: the --spacing of timesteps)")
    p.add_argument("--steps", type=int, default=50, help="sampling steps")
    p.add_argument("--cfg", type=float, default=3.0, help="classifier-free guidance scale (1 = none)")
    p.add_argument("--eta", type=float, default=None,
                   help="noise of ddim (default 0 = deterministic) and the ancestral / SDE samplers (default 1)")
    p.add_argument("--spacing", default="leading", help="timestep spacing: leading, trailing or linspace")
    p.add_argument("--label", type=int, default=None,
                   help="class to draw (default: cycle through the classes, one grid row per class)")
    p.add_argument("--negative-label", type=int, default=None,
                   help="guide away from this class instead of the unconditional model")
    p.add_argument("--guidance-rescale", type=float, default=0.0, help="guidance rescale phi in [0, 1] (0 = off)")
    p.add_argument("--init-image", default=None, help="start from this image (img2img, or inpainting with --mask)")
    p.add_argument("--strength", type=float, default=None,
                   help="img2img noise level in [0, 1]: 0 keeps the image, 1 ignores it (default 0.8; 1 with --mask)")
    p.add_argument("--mask", default=None, help="inpainting mask image: white = generate, black = keep")
    p.add_argument("--repaint-jumps", type=int, default=1, help="RePaint resampling: times each jump is "
                   "repeated (needs --mask and --sampler ddpm; 1 = off)")
    p.add_argument("--repaint-jump-length", type=int, default=10, help="RePaint: steps per jump back up")
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
    if args.model is None:
        raise GenlabError("give a model folder (or --list-samplers)")
    if (args.strength is not None or args.mask) and not args.init_image:
        raise GenlabError("--strength and --mask need an --init-image")
    if not 0.0 <= args.guidance_rescale <= 1.0:
        raise GenlabError(f"--guidance-rescale {args.guidance_rescale} must be in [0, 1]")


def _parse_opts(pairs: list[str]) -> dict[str, Any]:
    """`--opt key=value` pairs as sampler keyword arguments (ints, floats, or strings)."""
    opts: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise GenlabError(f"--opt {pair!r} must look like key=value, e.g. s_churn=1.0")
        for cast in (int, float, str):
            try:
                opts[key.strip()] = cast(value)
                break
            except ValueError:
                continue
    return opts


def _read_image(path: str, channels: int, size: int, what: str) -> torch.Tensor:
    """An image file as (1, channels, size, size) in [-1, 1] (a mask: "L" in [0, 1], nearest resize)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            mode = "L" if channels == 1 else "RGB"
            im = im.convert(mode).resize((size, size), Image.Resampling.NEAREST if what == "mask"
                                         else Image.Resampling.LANCZOS)
            a = np.asarray(im, dtype=np.uint8)
    except (FileNotFoundError, UnidentifiedImageError, OSError) as e:
        raise GenlabError(f"cannot read --{what} {path} ({e.__class__.__name__}); give a PNG or JPEG file") from None
    if what == "mask":
        return torch.from_numpy(a.copy()).float().div(255.0)[None, None]
    return from_uint8(a[None])


def _list_samplers() -> int:
    from genlab.sampling.solvers import sampler_defaults

    for name in SAMPLERS:
        options = " ".join(f"{k}={v}" for k, v in sampler_defaults(name).items())
        print(f"{name:16s} {options}")
    print(f"schedules: {', '.join(SCHEDULES)}")
    return 0


def run(args: argparse.Namespace) -> int:
    from genlab.models.base import GenerativeModel, resolve_model_dir

    if args.list_samplers:
        return _list_samplers()
    _check_args(args)
    model_dir = resolve_model_dir(args.model)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    model = GenerativeModel.from_pretrained(model_dir, map_location=device).to(device).eval()
    if not hasattr(model, "labels_for"):
        raise GenlabError(f"{model_dir} holds a {model.family} model; `genlab sample` needs a diffusion model")
    labels = model.labels_for(args.n, args.label)
    opts = {"sampler": args.sampler, "steps": args.steps, "cfg": args.cfg, "eta": args.eta, "spacing": args.spacing,
            "schedule": args.schedule, "negative_cond": args.negative_label, "guidance_rescale": args.guidance_rescale,
            **_parse_opts(args.opt)}
    images_in: dict[str, Any] = {}
    if args.init_image:
        ae = model.autoencoder
        c, size = (ae.config.channels, ae.config.image_size) if ae is not None else \
            (model.config.channels, model.config.image_size)
        images_in["init"] = _read_image(args.init_image, c, size, "init-image")
        opts["strength"] = args.strength if args.strength is not None else (1.0 if args.mask else 0.8)
        if args.mask:
            images_in["mask"] = _read_image(args.mask, 1, size, "mask")
            opts.update(repaint_jumps=args.repaint_jumps, repaint_jump_length=args.repaint_jump_length)

    images = []
    for start in tqdm(range(0, args.n, args.batch), desc="sampling", unit="batch", disable=args.n <= args.batch):
        count = min(args.batch, args.n - start)
        gens = [torch.Generator().manual_seed(args.seed + start + i) for i in range(count)]
        cond = labels[start : start + count] if labels is not None else None
        images.append(model.sample(count, cond=cond, generator=gens, progress=args.n <= args.batch, **opts,
                                   **images_in).cpu())
    x = torch.cat(images)

    common = {"model": str(args.model), "family": model.family, **opts, "init_image": args.init_image,
              "mask": args.mask}
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
