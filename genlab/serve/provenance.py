"""Where a served image came from: genlab's name and version and a hash of the model folder, written with the seed
and every sampling parameter into each PNG's text chunk (`genlab data info IMAGE.png` prints them)."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Any

HASH_CHARS = 16  # hex digits of the model folder's SHA-256 kept (64 bits)


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


@functools.lru_cache(maxsize=64)
def _hash(folder: str, stamp: tuple[tuple[str, int, int], ...]) -> str:
    h = hashlib.sha256()
    root = Path(folder)
    for name, _, _ in stamp:
        h.update(name.encode() + b"\0")
        with open(root / name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()[:HASH_CHARS]


def model_hash(folder: str | Path) -> str:
    """SHA-256 over the model folder's files (relative names and contents, sorted by name), first 16 hex digits;
    computed once per state of the folder (names, sizes, modification times)."""
    root = Path(folder)
    stamp = tuple((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in _files(root))
    return _hash(str(root.resolve()), stamp)


def generator_info() -> dict[str, Any]:
    """genlab's name and version, as stored with every served image."""
    from genlab import __version__

    return {"generator": "genlab", "genlab_version": __version__}
