"""The models a server offers: every model folder (or run folder with `model/`, or LoRA adapter folder, served as
its base with the adapter on it) directly inside `--models DIR`, named by its folder name, loaded on first use and
unloaded least-recently-used once the loaded weights pass a memory budget."""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from genlab.errors import GenlabError
from genlab.models.base import (
    WEIGHTS_NAME,
    Conditioning,
    GenerativeModel,
    SampleOption,
    read_model_meta,
    resolve_model_dir,
)
from genlab.models.lora import adapter_base, is_adapter_folder
from genlab.registry import MODELS

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class ModelEntry:
    """A servable model folder and what its family declares (read from config.json, before any weights load)."""

    name: str
    path: Path
    family: str
    cls: type[GenerativeModel]
    size_bytes: int
    created: int

    def describe(self) -> dict[str, Any]:
        """`GET /v1/models` item: OpenAI's model object plus the family and its declared capabilities."""
        c = self.cls
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "genlab",
                "family": self.family,
                "capabilities": {
                    "output": c.output.value,
                    "conditioning": sorted(x.value for x in c.conditioning),
                    "likelihood": c.likelihood.value,
                    "sample_options": sorted(x.value for x in c.sample_options),
                    "per_item_seeds": c.per_item_seeds,
                    "text_prompt": Conditioning.TEXT in c.conditioning,
                    "class_label": Conditioning.CLASS_LABEL in c.conditioning,
                    "start_image": SampleOption.START in c.sample_options,
                }}


def scan(models_dir: Path) -> dict[str, ModelEntry]:
    """The servable folders of `models_dir` (a folder that is neither a model nor a finished run is skipped)."""
    found: dict[str, ModelEntry] = {}
    for sub in sorted(p for p in models_dir.iterdir() if p.is_dir() and NAME.match(p.name)):
        try:
            d = resolve_model_dir(sub)
            model_dir = resolve_model_dir(adapter_base(d)) if is_adapter_folder(d) else d  # an adapter's base
            _, meta = read_model_meta(model_dir)
            family = meta.get("family")
            cls = MODELS.get(family) if isinstance(family, str) else None
        except GenlabError:
            continue
        if cls is None:
            continue
        size = sum(f.stat().st_size for f in (model_dir / WEIGHTS_NAME, d / "adapter_model.safetensors")
                   if f.is_file())
        found[sub.name] = ModelEntry(sub.name, d, family, cls, size, int(d.stat().st_mtime))
    return found


class ModelPool:
    """Loaded models by name, least recently used first; thread-safe. Models are used read-only (eval mode, no
    state kept between `sample` calls), so one loaded copy serves every request."""

    def __init__(self, models_dir: str | Path, memory_budget_mb: float = 4096, device: str = "cpu") -> None:
        self.models_dir = Path(models_dir)
        if not self.models_dir.is_dir():
            raise GenlabError(f"--models {models_dir} is not a folder; give the folder that holds model folders")
        self.budget = int(memory_budget_mb * 2**20)
        self.device = device
        self.entries = scan(self.models_dir)
        self._loaded: OrderedDict[str, GenerativeModel] = OrderedDict()
        self._locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    def entry(self, name: str) -> ModelEntry:
        """The entry of a model name; unknown names (a folder added since start is picked up) give a GenlabError."""
        if not isinstance(name, str) or not NAME.match(name):
            raise GenlabError("model must be the name of a served model (see GET /v1/models)")
        e = self.entries.get(name)
        if e is None:
            self.entries = scan(self.models_dir)
            e = self.entries.get(name)
        if e is None:
            choices = ", ".join(self.entries) or "none"
            raise GenlabError(f"model {name!r} is not served here; choose one of: {choices}")
        return e

    def get(self, name: str) -> GenerativeModel:
        """The loaded model (loading it on first use), now the most recently used."""
        entry = self.entry(name)
        with self._lock:
            if name in self._loaded:
                self._loaded.move_to_end(name)
                return self._loaded[name]
            lock = self._locks.setdefault(name, threading.Lock())
        with lock:  # one load per model, others wait for it
            with self._lock:
                if name in self._loaded:
                    return self._loaded[name]
            model = GenerativeModel.from_pretrained(entry.path, map_location=self.device).eval()
            model.requires_grad_(False)
            with self._lock:
                self._loaded[name] = model
                self._evict(keep=name)
            return model

    def loaded(self) -> list[str]:
        with self._lock:
            return list(self._loaded)

    def _evict(self, keep: str) -> None:
        """Unload least-recently-used models until the loaded weights fit the budget (the newest always stays).
        A model still in use by a running batch stays alive until that batch drops it."""
        def total() -> int:
            return sum(self.entries[n].size_bytes for n in self._loaded if n in self.entries)

        for name in list(self._loaded):
            if total() <= self.budget:
                break
            if name != keep:
                del self._loaded[name]
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
