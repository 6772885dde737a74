"""`genlab sample MODEL_OR_RUN --n 64 --sampler ddim --steps 50 --cfg 3 [--label 7] --seed 0 --out grid.png`.

Any sampler of `--list-samplers` with its options (`--opt s_churn=1`), a `--schedule`, a `--negative-label`,
`--guidance-rescale`, img2img (`--init-image x.png --strength 0.6`) and inpainting (`--init-image x.png
--mask m.png`, white = generate; `--repaint-jumps 10` resamples as RePaint), a `--temperature` of the prior.
Text-to-image models take `--prompt "a red circle left of a blue square" --negative-prompt "green"` (the negative
prompt replaces the unconditional branch of guidance) or `--prompt-file prompts.txt` (one prompt per line, each
drawn `--n` times), with img2img and inpainting too; each PNG records its prompt.
ControlNet models take `--control edges.png --control-scale 1.0` (repeatable: the controls' residuals add up by their
scales).

Any image family: the options a family does not declare it takes (`GenerativeModel.sample_options`,
`conditioning`) are refused with the list of those it does, e.g. a KL autoencoder decodes prior draws and takes
no sampler, steps or guidance.

Image i is drawn with its own generator seeded `seed + i`, so any single image can be reproduced alone
(`--n 1 --seed SEED_I --label LABEL_I`); every PNG stores its seed and full parameters in a text chunk. Under
`torchrun --nproc_per_node N -m genlab.cli sample ...` each process draws its shard of the seeds and rank 0
writes the same files as one process would.
"""

from __future__ import annotations

import argparse
import inspect
from pathlib import Path
from typing import Any

import numpy as np
import torch

from genlab.config import (
    MAX_SAMPLING_STEPS,
    check_device,
    check_int,
    check_number,
    check_output_path,
    check_seed,
)
from genlab.data.images import from_uint8, save_grid, save_png, to_uint8
from genlab.errors import GenlabError
from genlab.models.base import Conditioning, GenerativeModel, Output, SampleOption, resolve_model_dir
from genlab.registry import SAMPLERS
from genlab.sampling.controls import Guidance, Start
from genlab.sampling.schedules import SCHEDULES, SPACINGS
from genlab.sampling.solvers import sampler_options

MAX_N = 10_000


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", help="a model folder (config.json + model.safetensors) or a run folder "
                   "(uses model/)")
    p.add_argument("--list-samplers", action="store_true", help="print the samplers, their options and the "
                   "schedules, then exit")
    p.add_argument("--n", type=int, default=64, help="how many images (1..10000)")
    p.add_argument("--sampler", default=None, help="a sampler name (see --list-samplers; default ddim)")
    p.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                   help="a sampler option, e.g. s_churn=1.0 or order=3 (repeatable; see --list-samplers)")
    p.add_argument("--schedule", default=None, help=f"sigma schedule: {', '.join(SCHEDULES)} "
                   "(default: the --spacing of timesteps)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default 50)")
    p.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale (1 = none; default 3)")
    p.add_argument("--eta", type=float, default=None,
                   help="noise of ddim (default 0 = deterministic) and the ancestral / SDE samplers (default 1)")
    p.add_argument("--temperature", type=float, default=None, help="scale of the prior's standard deviation "
                   "(families that declare it; 1 = the model's own density)")
    p.add_argument("--spacing", default=None, help="timestep spacing: leading (default), trailing or linspace")
    p.add_argument("--label", type=int, default=None,
                   help="class to draw (default: cycle through the classes, one grid row per class)")
    p.add_argument("--negative-label", type=int, default=None,
                   help="guide away from this class instead of the unconditional model")
    p.add_argument("--guidance-rescale", type=float, default=None, help="guidance rescale phi in [0, 1] (0 = off)")
    p.add_argument("--prompt", default=None, help="text-to-image models: what to draw, e.g. \"a red circle left of "
                   "a blue square\"")
    p.add_argument("--negative-prompt", default=None, help="text-to-image models: guide away from this prompt (it "
                   "replaces the unconditional branch of guidance)")
    p.add_argument("--prompt-file", default=None, help="text-to-image models: a UTF-8 file of prompts, one per line, "
                   "each drawn --n times (image i of prompt j has seed seed + j * n + i)")
    p.add_argument("--init-image", default=None, help="start from this image (img2img, or inpainting with --mask)")
    p.add_argument("--strength", type=float, default=None,
                   help="img2img noise level in [0, 1]: 0 keeps the image, 1 ignores it (default 0.8; 1 with --mask)")
    p.add_argument("--mask", default=None, help="inpainting mask image: white = generate, black = keep")
    p.add_argument("--repaint-jumps", type=int, default=None, help="RePaint resampling: times each jump is "
                   "repeated (needs --mask and --sampler ddpm; 1 = off)")
    p.add_argument("--repaint-jump-length", type=int, default=None, help="RePaint: steps per jump back up "
                   "(default 10)")
    p.add_argument("--control", action="append", default=[], help="ControlNet models: a control image (e.g. an edge "
                   "map, white = edge); repeatable, the controls' residuals add up by their --control-scale")
    p.add_argument("--control-scale", type=float, action="append", default=[], help="ControlNet models: the weight "
                   "of each --control (one for all, or one per control; default 1.0)")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    p.add_argument("--out", default=None, help="grid PNG (default grid.png unless --out-dir is given)")
    p.add_argument("--out-dir", default=None, help="also write one PNG per image into this folder")
    p.add_argument("--batch", type=int, default=250, help="images per forward batch")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")


def check_drawing_args(args: argparse.Namespace) -> None:
    """The options `genlab sample` and `genlab eval` share: counts, seed, device, steps and guidance."""
    check_int("--n", args.n, 1, MAX_N)
    check_int("--batch", args.batch, 1)
    check_seed("--seed", args.seed, args.n)
    check_device("--device", args.device)
    if args.steps is not None:
        check_int("--steps", args.steps, 1, MAX_SAMPLING_STEPS)
    if args.cfg is not None:
        check_number("--cfg", args.cfg, 0, hint="1 = no guidance")


def _check_args(args: argparse.Namespace) -> None:
    """Every option on its own and against the others, before the model is loaded or anything is written."""
    check_drawing_args(args)
    if args.guidance_rescale is not None:
        check_number("--guidance-rescale", args.guidance_rescale, 0, 1, hint="0 = off")
    if args.strength is not None:
        check_number("--strength", args.strength, 0, 1, hint="0 keeps the image, 1 ignores it")
    if args.eta is not None:
        check_number("--eta", args.eta, 0, 1)
    if args.temperature is not None:
        check_number("--temperature", args.temperature, 0, 10, hint="1 = the model's own density")
    for flag, value in (("--repaint-jumps", args.repaint_jumps), ("--repaint-jump-length", args.repaint_jump_length)):
        if value is not None:
            check_int(flag, value, 1, MAX_SAMPLING_STEPS)
    opts = _parse_opts(args.opt)
    if args.eta is not None and "eta" in opts:
        raise GenlabError("--eta and --opt eta=... both set eta; give it once")
    sampler_options(args.sampler or "ddim", eta=args.eta, **opts)  # name, eta and --opt values
    if args.schedule is not None and args.schedule not in SCHEDULES:
        raise GenlabError(f"--schedule {args.schedule} is unknown; choose one of: {', '.join(SCHEDULES)}")
    if args.spacing is not None and args.spacing not in SPACINGS:
        raise GenlabError(f"--spacing {args.spacing} is unknown; choose one of: {', '.join(SPACINGS)}")
    if args.spacing is not None and args.schedule is not None:
        raise GenlabError("--spacing does nothing with --schedule (the schedule sets the sigmas); give one of them")
    if args.model is None:
        raise GenlabError("give a model folder (or --list-samplers)")
    if (args.strength is not None or args.mask) and not args.init_image:
        raise GenlabError("--strength and --mask need an --init-image")
    if (args.repaint_jumps is not None or args.repaint_jump_length is not None) and not args.mask:
        raise GenlabError("--repaint-jumps and --repaint-jump-length resample an inpainting: give --mask (and "
                          "--init-image)")
    if (args.repaint_jumps or 1) > 1 and args.sampler != "ddpm":
        raise GenlabError("--repaint-jumps resamples with ddpm steps: add --sampler ddpm")
    unguided = [flag for flag, value in (("--negative-label", args.negative_label),
                                         ("--negative-prompt", args.negative_prompt),
                                         ("--guidance-rescale", args.guidance_rescale)) if value is not None]
    if args.cfg == 1 and unguided:
        raise GenlabError(f"{' and '.join(unguided)} act through guidance and do nothing with --cfg 1; raise --cfg")
    _check_prompts(args)
    _check_controls(args)
    if args.out is not None or args.out_dir is None:
        check_output_path(args.out or "grid.png", "--out", suffix=".png")
    if args.out_dir is not None:
        check_output_path(args.out_dir, "--out-dir", folder=True)


MAX_CONTROLS = 8


def _check_controls(args: argparse.Namespace) -> None:
    """--control / --control-scale: counts and ranges (the model checks the images against itself)."""
    if args.control_scale and not args.control:
        raise GenlabError("--control-scale weighs a --control image; give --control edges.png")
    check_int("the number of --control images", len(args.control), 0, MAX_CONTROLS)
    if len(args.control_scale) not in (0, 1, len(args.control)):
        raise GenlabError(f"{len(args.control_scale)} --control-scale values for {len(args.control)} --control "
                          "images; give one for all or one per control")
    for v in args.control_scale:
        check_number("--control-scale", v, 0, 10, hint="1 = as trained, 0 = off")


MAX_PROMPT_CHARS = 2000  # a prompt longer than this is a mistake whatever the model's token limit


def _check_prompts(args: argparse.Namespace) -> None:
    """--prompt / --prompt-file / --negative-prompt on their own (the model checks their length in tokens)."""
    if args.prompt is not None and args.prompt_file is not None:
        raise GenlabError("--prompt and --prompt-file both give prompts; give one of them")
    for flag, text in (("--prompt", args.prompt), ("--negative-prompt", args.negative_prompt)):
        if text is not None and len(text) > MAX_PROMPT_CHARS:
            raise GenlabError(f"{flag} has {len(text)} characters; keep it under {MAX_PROMPT_CHARS}")
    if args.prompt_file is not None:
        prompts = read_prompt_file(args.prompt_file)
        check_int("--n x the prompts of --prompt-file", args.n * len(prompts), 1, MAX_N)


def read_prompt_file(path: str) -> list[str]:
    """The non-empty lines of a UTF-8 prompt file, each stripped; one-line errors for a missing, binary, empty or
    overlong file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
        raise GenlabError(f"cannot read --prompt-file {path} ({e.__class__.__name__}); give a text file") from None
    except UnicodeDecodeError:
        raise GenlabError(f"--prompt-file {path} is not UTF-8 text; give one prompt per line") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise GenlabError(f"--prompt-file {path} has no prompts; write one prompt per line")
    long = [p for p in prompts if len(p) > MAX_PROMPT_CHARS]
    if long:
        raise GenlabError(f"--prompt-file {path} has a prompt of {len(long[0])} characters; keep each under "
                          f"{MAX_PROMPT_CHARS}")
    return prompts


def _prompts(args: argparse.Namespace) -> list[str] | None:
    """One prompt per image from --prompt or --prompt-file (each of its prompts --n times), or None."""
    if args.prompt_file is not None:
        return [p for p in read_prompt_file(args.prompt_file) for _ in range(args.n)]
    return [args.prompt] * args.n if args.prompt is not None else None


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _given(args: argparse.Namespace, dest: str) -> bool:
    return getattr(args, dest) not in (None, [])


def check_family_takes(model: GenerativeModel, args: argparse.Namespace,
                       flags: dict[SampleOption | Conditioning, tuple[str, ...]]) -> None:
    """One-line error when a command is given an option (`flags`: option -> argparse dests) that the model's family
    does not declare it takes, listing the ones it does."""
    taken = model.sample_options | model.conditioning
    allowed = [d for opt, dests in flags.items() if opt in taken for d in dests]
    bad = [d for dests in flags.values() for d in dests if d not in allowed and _given(args, d)]
    if bad:
        takes = ", ".join(_flag(d) for d in dict.fromkeys(allowed)) or "none of these options"
        raise GenlabError(f"the {model.family} family does not take {', '.join(_flag(d) for d in bad)}; it takes "
                          f"{takes} ({model.takes()})")


# the options of `genlab sample` beyond --n / --seed / --out / --out-dir / --batch / --device, by what they need
FLAGS: dict[SampleOption | Conditioning, tuple[str, ...]] = {
    Conditioning.CLASS_LABEL: ("label",),
    Conditioning.TEXT: ("prompt", "negative_prompt", "prompt_file"),
    Conditioning.CONTROL_IMAGE: ("control", "control_scale"),
    SampleOption.SAMPLER: ("sampler", "opt", "eta", "schedule", "spacing"),
    SampleOption.STEPS: ("steps",),
    SampleOption.GUIDANCE: ("cfg", "negative_label", "guidance_rescale"),
    SampleOption.START: ("init_image", "strength", "mask", "repaint_jumps", "repaint_jump_length"),
    SampleOption.TEMPERATURE: ("temperature",),
}


def _sample_kwargs(model: GenerativeModel, args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of `model.sample` from the options given (the family's defaults fill the rest)."""
    kw: dict[str, Any] = {k: getattr(args, k) for k in ("sampler", "steps", "eta", "spacing", "schedule", "temperature")
                          if _given(args, k)}
    kw |= _parse_opts(args.opt)
    guidance = {k: getattr(args, d) for k, d in (("scale", "cfg"), ("negative", "negative_label"),
                                                  ("negative", "negative_prompt"),
                                                  ("rescale", "guidance_rescale")) if _given(args, d)}
    if guidance:
        kw["guidance"] = Guidance(**guidance)
    if args.init_image:
        c, size, _ = model.image_shape
        mask = _read_image(args.mask, 1, size, "mask") if args.mask else None
        repaint = {k: getattr(args, k) for k in ("repaint_jumps", "repaint_jump_length") if _given(args, k)}
        kw["start"] = Start(_read_image(args.init_image, c, size, "init-image"), strength=args.strength, mask=mask,
                            **repaint)
    if args.control:
        from genlab.models.controlnet import Control

        _, size, _ = model.image_shape
        images = torch.cat([_read_image(path, 1, size, "control") for path in args.control])
        scales = args.control_scale * len(args.control) if len(args.control_scale) == 1 else args.control_scale
        kw["control"] = Control(images, tuple(scales or [1.0] * len(args.control)))
    return kw


def sampling_params(model: GenerativeModel, kw: dict[str, Any]) -> dict[str, Any]:
    """The sampling parameters of `kw` (keyword arguments of `model.sample`) with the family's defaults, as plain
    values for a PNG's text or a JSON report."""
    defaults = {k: p.default for k, p in inspect.signature(model.sample).parameters.items()
                if p.default is not inspect.Parameter.empty and k not in ("cond", "generator", "callback", "progress")}
    params = {**defaults, **kw}
    guidance, start = params.pop("guidance", None), params.pop("start", None)
    if (control := params.pop("control", None)) is not None:
        params["control_scale"] = list(control.scales)
    if guidance is not None:
        negative = "negative_prompt" if isinstance(guidance.negative, str) else "negative_label"
        params |= {"cfg": guidance.scale, negative: guidance.negative, "guidance_rescale": guidance.rescale}
    if start is not None:
        params |= {"strength": start.resolved_strength, "repaint_jumps": start.repaint_jumps,
                   "repaint_jump_length": start.repaint_jump_length}
    return params


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
    """An image file as (1, channels, size, size) in [-1, 1] (a mask or control: "L" in [0, 1], nearest resize)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            mode = "L" if channels == 1 else "RGB"
            im = im.convert(mode).resize((size, size), Image.Resampling.NEAREST if what in ("mask", "control")
                                         else Image.Resampling.LANCZOS)
            a = np.asarray(im, dtype=np.uint8)
    except (FileNotFoundError, UnidentifiedImageError, OSError) as e:
        raise GenlabError(f"cannot read --{what} {path} ({e.__class__.__name__}); give a PNG or JPEG file") from None
    if what in ("mask", "control"):
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
    from genlab.eval.report import sample_images
    from genlab.sampling.distributed import end, init_from_env, local_device

    if args.list_samplers:
        return _list_samplers()
    _check_args(args)
    model_dir = resolve_model_dir(args.model)
    rank, world = init_from_env()  # under torchrun / accelerate launch: each process draws its shard
    try:
        device = local_device(args.device)
        model = GenerativeModel.from_pretrained(model_dir, map_location=device).to(device).eval()
        if model.output is not Output.IMAGE:
            raise GenlabError(f"{model_dir} holds a {model.family} model, which outputs {model.output.value}; "
                              f"`genlab sample` draws images (use `genlab generate` for text)")
        check_family_takes(model, args, FLAGS)
        prompts = _prompts(args)
        n = len(prompts) if prompts is not None else args.n
        labels = model.labels_for(n, prompts if prompts is not None else args.label)
        kw = _sample_kwargs(model, args)
        x = sample_images(model.sample, n, args.seed, batch_size=args.batch, cond=labels, progress=True,
                          per_item_seeds=model.per_item_seeds, **kw)
        if rank == 0:
            _write(args, model, x, None if prompts is not None else labels, sampling_params(model, kw), prompts)
    finally:
        if world > 1:
            end()
    return 0


def _write(args: argparse.Namespace, model: GenerativeModel, x: torch.Tensor, labels: Any,
           params: dict[str, Any], prompts: list[str] | None = None) -> None:
    """The grid (one row per class when cycling classes, one per prompt of a prompt file) and, with --out-dir, one
    PNG per image; each PNG's text chunk holds its prompt(s)."""
    common = {"model": str(args.model), "family": model.family, **params, "init_image": args.init_image,
              "mask": args.mask, "control": args.control or None}
    n = len(x)
    if args.out_dir:
        for i, img in enumerate(to_uint8(x)):
            p = {**common, "seed": args.seed + i, "label": int(labels[i]) if labels is not None else None}
            if prompts is not None:
                p["prompt"] = prompts[i]
            save_png(img, Path(args.out_dir) / f"{i:05d}_seed{args.seed + i}.png", p)
        print(f"wrote {n} images to {args.out_dir}")
    if args.out or not args.out_dir:
        nrow = int((labels == labels[0]).sum()) if labels is not None and args.label is None else None
        p = {**common, "seed": args.seed, "seeds": f"seed + i for image i (row-major), i < {n}",
             "n": n, "labels": labels.tolist() if labels is not None else None}
        if prompts is not None:
            distinct = list(dict.fromkeys(prompts))
            p |= {"prompt": distinct[0]} if len(distinct) == 1 else {"prompts": prompts}
            nrow = args.n if args.prompt_file is not None else None
        print(f"wrote {save_grid(x, args.out or 'grid.png', nrow=nrow, params=p)}")
