"""Run configuration: dataclasses, YAML recipes and `--set key=value` overrides.

Every key is checked before any work starts; an unknown or mistyped key fails with
its dotted name and the valid choices.
"""

from __future__ import annotations

import dataclasses
import difflib
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
class RunConfig:
    """A whole recipe: one model family trained on one dataset."""

    name: str = "run"
    family: str = "diffusion"
    out_dir: str = "runs"
    data: DataConfig = field(default_factory=DataConfig)
    model: dict[str, Any] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)


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
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise GenlabError(f"config key {key!r} must be a number, got {value!r}")
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
