"""Run configuration: dataclasses, YAML recipes and `--set key=value` overrides.

Every key is checked before any work starts; an unknown or mistyped key fails with
its dotted name and the valid choices.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from genlab.errors import GenlabError
from genlab.registry import MODELS

C = TypeVar("C")


@dataclass
class DataConfig:
    """Which dataset to read and how: a built-in name, an image folder or a text file."""

    name: str = "mnist"
    split: str = "train"
    image_size: int | None = None  # resize images to this side; None keeps the dataset's own
    label: str | None = None  # which annotation is the class label (e.g. "category" for emoji)
    caption: str | None = None  # which annotation is the caption text
    max_items: int | None = None  # take only the first N items (quick runs, tests)


@dataclass
class TrainConfig:
    """The family-agnostic trainer's settings (optimizer, schedule, logging, checkpoints)."""

    steps: int = 1000
    batch_size: int = 64  # global batch of one optimizer step (split over processes and grad_accum)
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 100
    lr_schedule: str = "cosine"  # cosine | constant
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    grad_accum: int = 1
    ema_decay: float = 0.999
    ema_warmup: bool = True
    mixed_precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16
    seed: int = 0
    log_every: int = 25
    sample_every: int = 0  # 0: only at the end
    ckpt_every: int = 500
    keep_last: int = 2
    eval_every: int = 0
    eval_n: int = 0  # images generated for KID/FID at each evaluation (image families; 0: validation loss only)
    max_minutes: float | None = None  # stop (with a checkpoint) after this wall-clock time
    dist_timeout_minutes: float = 60.0  # how long a process waits for the others (e.g. while rank 0 hashes)
    compile: bool = False
    channels_last: bool = False


@dataclass
class SampleConfig:
    """Defaults for sample grids written during and after training."""

    sampler: str = "ddim"
    steps: int = 50
    cfg: float = 1.0
    eta: float = 0.0
    n: int = 64
    seed: int = 0


@dataclass
class LoraSection:
    """LoRA (Hu et al. 2021): train h = W0 x + (alpha / r) B A x with W0 frozen; rank 0 trains the whole model."""

    rank: int = 0  # r; > 0 needs model.init_from (the frozen base)
    alpha: float = 16.0  # the update is scaled by alpha / r
    dropout: float = 0.0  # dropout on the adapter's input


@dataclass
class AdaptConfig:
    """How a trained model (`model.init_from`) is adapted."""

    lora: LoraSection = field(default_factory=LoraSection)


@dataclass
class RunConfig:
    """A whole recipe: one model family trained on one dataset."""

    name: str = "run"
    family: str = "diffusion"
    out_dir: str = "runs"
    data: DataConfig = field(default_factory=DataConfig)
    model: dict[str, Any] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    adapt: AdaptConfig = field(default_factory=AdaptConfig)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting YAML scalars where it is lossless."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except GenlabError as e:
                errors.append(str(e))
        raise GenlabError(errors[0] if errors else f"config key {key!r} may not be null")
    if origin in (list, tuple):
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, list | tuple):
            raise GenlabError(f"config key {key!r} must be a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise GenlabError(f"config key {key!r} must have {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, key) for v, a in zip(value, args))
        inner = args[0] if args else Any
        seq = [_coerce(v, inner, key) for v in value]
        return tuple(seq) if origin is tuple else seq
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise GenlabError(f"config key {key!r} must be a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise GenlabError(f"config key {key!r} must be a mapping, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise GenlabError(f"config key {key!r} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise GenlabError(f"config key {key!r} must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(float(value)) if float(value).is_integer() else int(value)
            except ValueError:
                pass
        raise GenlabError(f"config key {key!r} must be an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, int | float) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None or not math.isfinite(number):
            raise GenlabError(f"config key {key!r} must be a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        hint = " (YAML reads bare yes/no/on/off as booleans: quote the value)" if isinstance(value, bool) else ""
        raise GenlabError(f"config key {key!r} must be a string, got {value!r}{hint}")
    raise GenlabError(f"config key {key!r} has unsupported type {_type_name(tp)}")


def _unknown_key(key: str, valid: list[str], prefix: str) -> GenlabError:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean {prefix + close[0]!r}?)" if close else ""
    return GenlabError(f"unknown config key {prefix + key!r}{hint}; valid keys: {', '.join(valid)}")


def from_dict(cls: type[C], d: dict[str, Any], prefix: str = "") -> C:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and wrong types by name."""
    if d is None:
        d = {}
    if not isinstance(d, dict):
        raise GenlabError(f"config section {prefix.rstrip('.') or 'root'!r} must be a mapping, got {d!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in d.items():
        if key not in fields:
            raise _unknown_key(str(key), list(fields), prefix)
        kwargs[key] = _coerce(value, hints[key], prefix + key)
    return cls(**kwargs)


def to_dict(obj: Any) -> dict[str, Any]:
    """A dataclass as plain YAML/JSON-safe data (tuples become lists)."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple | list):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(obj))


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=1e-4` -> (["train", "lr"], 0.0001); the value is read as YAML."""
    if "=" not in text:
        raise GenlabError(f"--set expects key=value (e.g. train.lr=1e-4), got {text!r}")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise GenlabError(f"--set expects key=value, got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `--set` overrides onto a raw (not yet validated) config mapping."""
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise GenlabError(f"--set {text!r}: {part!r} is not a section")
        node[path[-1]] = value
    return raw


def resolve_recipe(path_or_name: str) -> Path:
    """A recipe path, or the name of one under `configs/` (e.g. `mnist-ddpm`)."""
    p = Path(path_or_name)
    if p.is_file():
        return p
    for root in (Path.cwd() / "configs", Path(__file__).resolve().parent.parent / "configs"):
        for cand in (root / path_or_name, root / f"{path_or_name}.yaml"):
            if cand.is_file():
                return cand
    raise GenlabError(f"no recipe {path_or_name!r}: give a YAML file or a name from configs/")


def load_run_config(path_or_name: str | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML recipe, apply overrides and validate every key, including the family's model keys."""
    raw: dict[str, Any] = {}
    if path_or_name:
        path = resolve_recipe(path_or_name)
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise GenlabError(f"recipe {path} is not valid YAML{where}: fix the syntax there") from None
        if not isinstance(raw, dict):
            raise GenlabError(f"recipe {path} must be a YAML mapping at the top level")
    raw = apply_overrides(raw, overrides or [])
    cfg = from_dict(RunConfig, raw)
    validate_model_config(cfg)
    return cfg


def validate_model_config(cfg: RunConfig) -> Any:
    """Check the `model:` section against its family's config dataclass; return that dataclass."""
    return from_dict(MODELS.get(cfg.family).config_class, cfg.model, prefix="model.")


# -- value checks shared by the CLI, recipes and model folders: one line that names the option and its range --------
MAX_SAMPLES = 10_000  # images (or texts) one command draws: 10,000 is the usual FID sample size
MAX_SAMPLING_STEPS = 10_000  # no sampler improves measurably past ~1,000 steps; 10,000 would take hours
MAX_SEED = 2**64 - 1  # torch generators take unsigned 64-bit seeds
# sizes in a recipe or a model folder's config.json, refused before anything is allocated
MAX_IMAGE_SIZE = 1024  # pixels a side: activations grow with its square (a 1024 px U-Net batch already takes GBs)
MAX_WIDTH = 16_384  # channels or embedding width: one 16k x 16k layer alone holds 268M weights
MAX_DEPTH = 1_024  # layers or blocks
MAX_TIMESTEPS = 100_000  # diffusion steps: their noise tables are built when the model is
MAX_CONTEXT = 1_048_576  # tokens: position tables of this length are built when the model is
MAX_VOCAB = 1_048_576  # tokens in a vocabulary


def _shown(what: str, value: Any) -> str:
    """`--cfg nan` for a command-line flag, `train.lr=nan` for a config key."""
    return f"{what} {value}" if what.startswith("-") else f"{what}={value}"


def check_number(what: str, value: float, low: float | None = None, high: float | None = None, *,
                 low_open: bool = False, high_open: bool = False, hint: str = "") -> float:
    """`value` when it is a finite number in the range (each end closed unless `*_open`); else a one-line error
    naming `what` (a flag or a config key), the range and the `hint`."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if ok:
        return value
    if low is not None and high is not None:
        rng = f" in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    elif low is not None:
        rng = f" {'>' if low_open else '>='} {low:g}"
    elif high is not None:
        rng = f" {'<' if high_open else '<='} {high:g}"
    else:
        rng = ""
    raise GenlabError(f"{_shown(what, value)} must be a finite number{rng}{f' ({hint})' if hint else ''}")


def check_int(what: str, value: int, low: int, high: int | None = None, why: str = "") -> int:
    """`value` when it is an integer in [low, high]; else a one-line error with the limit and `why` it is there."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise GenlabError(f"{_shown(what, value)} must be a whole number")
    if value < low:
        raise GenlabError(f"{_shown(what, value)} must be at least {low}")
    if high is not None and value > high:
        raise GenlabError(f"{_shown(what, value)} is too large: at most {high:,}{f' ({why})' if why else ''}")
    return value


def check_seed(what: str, seed: int, count: int = 1) -> int:
    """A seed such that seed, seed + 1, ..., seed + count - 1 are all valid generator seeds."""
    return check_int(what, seed, 0, MAX_SEED - max(count - 1, 0), "generators take unsigned 64-bit seeds, "
                     "and item i uses seed + i")


def check_output_path(path: str | Path, what: str, folder: bool = False, suffix: str | None = None) -> Path:
    """Refuse, before any work, an output that cannot be written: an existing folder where a file is written, an
    existing file where a folder is made, a place under a file or not writable, or a file not ending in `suffix`."""
    p = Path(path).expanduser()
    if suffix is not None and p.suffix.lower() != suffix:
        raise GenlabError(f"{what} {p} must name a {suffix} file")
    if folder and p.exists() and not p.is_dir():
        raise GenlabError(f"{what} {p} is a file, not a folder; give a folder name")
    if not folder and p.is_dir():
        raise GenlabError(f"{what} {p} is a folder; give a file name inside it, e.g. {p / 'out.png'}")
    parent = p if folder else p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise GenlabError(f"cannot write {what} {p}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise GenlabError(f"cannot write {what} {p}: {parent} is not writable; choose another place")
    return p


def check_device(what: str, device: str) -> str:
    """auto, cpu, cuda or cuda:N."""
    kind, _, index = device.partition(":")
    if device not in ("auto", "cpu") and not (kind == "cuda" and (not index or index.isdigit())):
        raise GenlabError(f"{what} {device} is unknown; use auto, cpu, cuda or cuda:N")
    return device
