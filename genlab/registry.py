"""Name -> class registries shared by configs, the CLI and the HTTP API."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from genlab.errors import GenlabError

T = TypeVar("T")


class Registry(Generic[T]):
    """A named mapping whose lookups fail with the valid choices and the closest match."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def wrap(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._items[name] = obj
            return obj

        return wrap

    def get(self, name: str) -> T:
        if name not in self._items:
            close = difflib.get_close_matches(name, self._items, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise GenlabError(f"unknown {self.kind} {name!r}{hint}; choose one of: {', '.join(sorted(self))}")
        return self._items[name]

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def items(self) -> list[tuple[str, T]]:
        return list(self._items.items())


MODELS: Registry[type] = Registry("model family")
DATASETS: Registry[Callable] = Registry("dataset")
SAMPLERS: Registry[Callable] = Registry("sampler")
BACKBONES: Registry[type] = Registry("backbone")
