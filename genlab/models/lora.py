"""LoRA adapters through peft (Hu et al. 2021, eq. 3: h = W0 x + (alpha / r) B A x, W0 frozen, B = 0 at start).

A family names the layers an adapter goes on (linear and 2D-convolution layers) in its `lora_targets` class
attribute, matched as the last part of a module's name, and may confine them to one submodule (`lora_scope`, e.g. a
diffusion model's backbone `net`, so that a frozen autoencoder or text encoder is never adapted). Adapters are peft's
own: `add_lora` wraps the model with `peft.get_peft_model` (the family's module is adapted in place), the trainer
saves them with `PeftModel.save_pretrained` (`adapter_config.json` + `adapter_model.safetensors`, the base model
folder in `base_model_name_or_path`), `load_adapter` puts a saved adapter on its base with
`PeftModel.from_pretrained`, and `merge_lora` folds W0 + (alpha / r) B A into plain layers.
This module imports no other model module, so `models/base.py` can load adapter folders through it.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path
from typing import Any

from torch import nn

from genlab.config import check_int, check_number
from genlab.errors import GenlabError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MAX_LORA_RANK = 4096


def is_adapter_folder(directory: str | Path) -> bool:
    """A folder that holds a peft adapter (and no model of its own)."""
    d = Path(directory)
    return (d / ADAPTER_CONFIG).is_file() and not (d / "config.json").is_file()


def adapter_base(directory: str | Path) -> Path:
    """The base model folder an adapter was trained on (`base_model_name_or_path` of adapter_config.json)."""
    path = Path(directory) / ADAPTER_CONFIG
    base = check_adapter_config(directory).get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        raise GenlabError(f"{path} names no base model (base_model_name_or_path): set it to the base model folder")
    p = Path(base).expanduser()
    if not p.is_absolute() and not p.exists():
        p = Path(directory) / p  # relative to the adapter folder
    if not p.exists():
        raise GenlabError(f"{path} names base model {base}, which does not exist: copy the base model there or "
                          "edit base_model_name_or_path")
    return p


def check_adapter_config(directory: str | Path) -> dict[str, Any]:
    """adapter_config.json of a LoRA adapter folder, parsed, with one-line errors for a file that is not JSON, not
    a LoRA adapter, or whose rank or alpha is out of range (checked before peft reads it)."""
    path = Path(directory) / ADAPTER_CONFIG
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GenlabError(f"{path} is not valid JSON ({e}): train the adapter again") from None
    if not isinstance(meta, dict):
        raise GenlabError(f"{path} must hold a JSON object: train the adapter again")
    if meta.get("peft_type") != "LORA":
        raise GenlabError(f"{path} holds a {meta.get('peft_type')!r} adapter; genlab loads LoRA adapters only")
    rank, alpha = meta.get("r"), meta.get("lora_alpha")
    if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= MAX_LORA_RANK:
        raise GenlabError(f"{path} has rank r={rank!r}; a LoRA adapter's rank is an integer in 1..{MAX_LORA_RANK}: "
                          "train the adapter again")
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or not math.isfinite(alpha) or alpha <= 0:
        raise GenlabError(f"{path} has lora_alpha={alpha!r}; it must be a finite number > 0: train the adapter again")
    return meta


def target_modules(model_cls: type) -> str | list[str]:
    """peft's `target_modules` for a family: its `lora_targets` as names (matched as a module name's last part),
    or, with a `lora_scope`, one regular expression that peft matches against whole module names."""
    targets = list(model_cls.lora_targets)
    scope = getattr(model_cls, "lora_scope", "")
    if not scope:
        return targets
    return rf"{re.escape(scope)}\.(?:.*\.)?(?:{'|'.join(targets)})"


def layer_rank_bound(layer: nn.Module) -> int:
    """The largest rank an update of `layer`'s weight can have: min(out, in) for a linear layer, min(out,
    in / groups x kernel area) for a convolution (peft's conv LoRA: A a convolution to r channels, B a 1x1 one)."""
    if isinstance(layer, nn.Conv2d):
        return min(layer.out_channels, layer.in_channels // layer.groups * math.prod(layer.kernel_size))
    return min(layer.out_features, layer.in_features)


def check_lora(lora: Any, family: type, config: Any) -> None:
    """One-line errors for `adapt.lora.*` values, and for adapters on a family without `lora_targets` or on a
    model that is not loaded from a folder (`config.init_from`), before anything is loaded."""
    check_int("adapt.lora.rank", lora.rank, 0, MAX_LORA_RANK)
    check_number("adapt.lora.alpha", lora.alpha, 0.0, None, low_open=True)
    check_number("adapt.lora.dropout", lora.dropout, 0.0, 1.0, high_open=True)
    if lora.rank and not getattr(family, "lora_targets", ()):
        raise GenlabError(f"the {family.family} family has no layers for LoRA; set adapt.lora.rank=0")
    if lora.rank and not getattr(config, "init_from", None):
        raise GenlabError("adapt.lora.rank > 0 adapts a trained model: set model.init_from to its folder")


def add_lora(model: nn.Module, lora: Any) -> Any:
    """Freeze `model` and put rank-`lora.rank` adapters on its `lora_targets` (in place); returns the PeftModel
    that saves them. The base is the folder the model was loaded from (`model.config.init_from`)."""
    from peft import LoraConfig, get_peft_model

    check_lora(lora, type(model), model.config)
    config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=target_modules(type(model)))
    peft_model = get_peft_model(model, config)
    bound = min(layer_rank_bound(layer.get_base_layer()) for _, layer in lora_layers(model))
    if lora.rank > bound:
        raise GenlabError(f"adapt.lora.rank={lora.rank} is above {bound}, the largest rank an update of the "
                          f"smallest adapted layer can have (a higher rank adds parameters, not expressiveness): "
                          f"set adapt.lora.rank <= {bound}")
    base = Path(model.config.init_from).expanduser().resolve()
    peft_model.peft_config["default"].base_model_name_or_path = str(base)
    return peft_model


def load_adapter(model: nn.Module, directory: str | Path) -> nn.Module:
    """`model` (the base) with the adapter saved in `directory` put on it by peft; the model, adapted in place."""
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors import SafetensorError, safe_open

    check_adapter_config(directory)
    weights = Path(directory) / ADAPTER_WEIGHTS
    try:
        with safe_open(str(weights), framework="pt") as f:
            saved = set(f.keys())
        with warnings.catch_warnings():  # peft warns of keys that do not fit; they are checked below
            warnings.simplefilter("ignore")
            peft_model = PeftModel.from_pretrained(model, str(directory))
    except (ValueError, KeyError, RuntimeError, OSError, SafetensorError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GenlabError(f"the adapter in {directory} does not fit its base model, a {model.family} model "
                          f"({first[:200]}): give the base it was trained on (base_model_name_or_path)") from None
    placed = set(get_peft_model_state_dict(peft_model, save_embedding_layers=False))
    if saved != placed:
        odd = min(saved ^ placed)
        raise GenlabError(f"the adapter in {directory} does not fit its base model, a {model.family} model: "
                          f"{len(saved - placed)} of its {len(saved)} tensors have no layer there and "
                          f"{len(placed - saved)} adapted layers no tensor (e.g. {odd}); give the base it was trained "
                          "on (base_model_name_or_path)")
    return model


def lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The adapted layers of `model` (peft tuner layers), by name."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every adapted layer by its base layer with W0 + (alpha / r) B A folded in (in place); a model
    without adapters is returned as it is."""
    for name, layer in lora_layers(model):
        layer.merge()
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, layer.get_base_layer())
    return model
