"""LoRA adapters through peft (Hu et al. 2021, eq. 3: h = W0 x + (alpha / r) B A x, W0 frozen, B = 0 at start).

A family names the linear layers an adapter goes on in its `lora_targets` class attribute. Adapters are peft's
own: `add_lora` wraps the model with `peft.get_peft_model` (the family's module is adapted in place), the trainer
saves them with `PeftModel.save_pretrained` (`adapter_config.json` + `adapter_model.safetensors`, the base model
folder in `base_model_name_or_path`), `load_adapter` puts a saved adapter on its base with
`PeftModel.from_pretrained`, and `merge_lora` folds W0 + (alpha / r) B A into plain layers.
This module imports no other model module, so `models/base.py` can load adapter folders through it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from genlab.config import check_int, check_number
from genlab.errors import GenlabError

ADAPTER_CONFIG = "adapter_config.json"
MAX_LORA_RANK = 4096


def is_adapter_folder(directory: str | Path) -> bool:
    """A folder that holds a peft adapter (and no model of its own)."""
    d = Path(directory)
    return (d / ADAPTER_CONFIG).is_file() and not (d / "config.json").is_file()


def adapter_base(directory: str | Path) -> Path:
    """The base model folder an adapter was trained on (`base_model_name_or_path` of adapter_config.json)."""
    path = Path(directory) / ADAPTER_CONFIG
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GenlabError(f"{path} is not valid JSON ({e}): train the adapter again") from None
    base = meta.get("base_model_name_or_path") if isinstance(meta, dict) else None
    if not isinstance(base, str) or not base:
        raise GenlabError(f"{path} names no base model (base_model_name_or_path): set it to the base model folder")
    p = Path(base).expanduser()
    if not p.is_absolute() and not p.exists():
        p = Path(directory) / p  # relative to the adapter folder
    if not p.exists():
        raise GenlabError(f"{path} names base model {base}, which does not exist: copy the base model there or "
                          "edit base_model_name_or_path")
    return p


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
                        target_modules=list(model.lora_targets))
    peft_model = get_peft_model(model, config)
    base = Path(model.config.init_from).expanduser().resolve()
    peft_model.peft_config["default"].base_model_name_or_path = str(base)
    return peft_model


def load_adapter(model: nn.Module, directory: str | Path) -> nn.Module:
    """`model` (the base) with the adapter saved in `directory` put on it by peft; the model, adapted in place."""
    from peft import PeftModel

    try:
        PeftModel.from_pretrained(model, str(directory))
    except (ValueError, KeyError, RuntimeError) as e:
        raise GenlabError(f"the adapter in {directory} does not fit its base model ({e})") from None
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
