"""Name -> class registries shared by configs, the CLI and the HTTP API.

Each registry knows, as data, the modules that register into it and imports them on first use, so a lookup
sees every name whatever was imported before (and `genlab --help` does not import every family).
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from genlab.errors import GenlabError

T = TypeVar("T")


class Registry(Generic[T]):
    """A named mapping whose lookups fail with the valid choices and the closest match.

    `modules` names the modules whose import registers the entries; a name not yet registered imports them in
    order until it appears, and listing imports them all. A plugin adds its module to `modules`.
    """

    def __init__(self, kind: str, modules: list[str]) -> None:
        self.kind = kind
        self.modules = modules
        self._items: dict[str, T] = {}
        self._imported: set[str] = set()

    def register(self, name: str) -> Callable[[T], T]:
        def wrap(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._items[name] = obj
            return obj

        return wrap

    def _load(self, name: str | None = None) -> None:
        """Import registering modules until `name` is registered (every module when `name` is None)."""
        for module in self.modules:
            if name is not None and name in self._items:
                return
            if module not in self._imported:
                importlib.import_module(module)
                self._imported.add(module)

    def get(self, name: str) -> T:
        if name not in self:
            close = difflib.get_close_matches(name, self._items, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise GenlabError(f"unknown {self.kind} {name!r}{hint}; choose one of: {', '.join(sorted(self))}")
        return self._items[name]

    def __contains__(self, name: object) -> bool:
        if isinstance(name, str) and name not in self._items:
            self._load(name)
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        self._load()
        return iter(list(self._items))

    def items(self) -> list[tuple[str, T]]:
        self._load()
        return list(self._items.items())


MODELS: Registry[type] = Registry("model family", [
    "genlab.models.diffusion", "genlab.models.autoencoder", "genlab.models.gpt", "genlab.models.vae",
    "genlab.models.flow", "genlab.models.gan",
    "genlab.models.flow_matching", "genlab.models.pixel_ar", "genlab.models.vq", "genlab.models.tarflow",
    "genlab.models.clip", "genlab.models.t2i",
    "genlab.models.captioner", "genlab.adapt.dpo", "genlab.models.controlnet",
    "genlab.adapt.diffusion_dpo",
    "genlab.models.consistency", "genlab.models.shortcut", "genlab.adapt.dreambooth"])
DATASETS: Registry[Callable] = Registry("dataset", ["genlab.data.builtin", "genlab.data.stacked_mnist",
                                                  "genlab.data.shapes"])
SAMPLERS: Registry[Callable] = Registry("sampler", ["genlab.sampling.solvers"])
BACKBONES: Registry[type] = Registry("backbone", ["genlab.nn.unet", "genlab.nn.dit"])
