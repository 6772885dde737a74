"""Training checkpoints: atomic folders of safetensors weights + small state, with RNG capture and resume.

A checkpoint is `checkpoints/step_XXXXXXX/` holding `<name>.safetensors` per weight group (model, ema),
`state.pt` (optimizer, LR schedule, step, data position, RNG states; plain tensors and numbers, loaded
with `torch.load(weights_only=True)`) and `checkpoint.json` (size and SHA-256 of every file). It is written
into a temporary folder, fsynced, then renamed into place, so a kill during a save never damages the
previous checkpoint; a checkpoint that fails its manifest is reported and skipped at resume.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import Tensor

from genlab.errors import GenlabError
from genlab.files import fsync_path
from genlab.models.base import load_weights

MANIFEST = "checkpoint.json"
STATE = "state.pt"
STEP_DIR = re.compile(r"^step_(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


# -- RNG states as plain tensors (loadable with weights_only=True) ----------------------------------------------
def rng_state(device: torch.device | str | None = None) -> dict[str, Any]:
    """Python, NumPy, torch CPU and, when `device` is a GPU, that GPU's generator states of this process.

    Only the process's own GPU is saved (not every visible one by index), so a checkpoint resumes on a
    machine with another number of visible GPUs.
    """
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": (version, torch.tensor(internal, dtype=torch.int64), gauss),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
    }
    if device is not None and torch.device(device).type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device | str | None = None) -> None:
    """Inverse of `rng_state`: the saved GPU state goes to `device` (the GPU this process trains on now)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal.tolist()), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device is not None and torch.device(device).type == "cuda":
        cuda = state["cuda"]
        if isinstance(cuda, list):  # older checkpoints held every visible GPU's state, by index
            index = torch.device(device).index or 0
            if index >= len(cuda):
                return
            cuda = cuda[index]
        torch.cuda.set_rng_state(cuda, device)


# -- writing ---------------------------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_checkpoint(root: Path, step: int, weights: dict[str, dict[str, Tensor]], state: dict[str, Any]) -> Path:
    """Write `root/step_XXXXXXX/` atomically (temp folder, fsync, rename) and return it."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    for name, sd in weights.items():
        save_file({k: v.detach().contiguous().cpu() for k, v in sd.items()}, str(tmp / f"{name}.safetensors"))
    torch.save(state, tmp / STATE)
    files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(tmp.iterdir())}
    (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": files}, indent=1))
    for p in tmp.iterdir():
        fsync_path(p)
    fsync_path(tmp)
    if final.exists():  # the same step saved again (e.g. after a resume): swap, then drop the old one
        old = root / f".old-{final.name}-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old)
    else:
        os.rename(tmp, final)
    fsync_path(root)
    return final


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every finished checkpoint, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return sorted(found)


def prune(root: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` checkpoints, and temp folders left by killed saves."""
    for _, path in list_checkpoints(root)[:-keep_last]:
        doomed = root / f".old-{path.name}-{os.getpid()}"
        os.rename(path, doomed)  # gone from the checkpoint list at once, even if the deletion is cut short
        shutil.rmtree(doomed, ignore_errors=True)
    remove_leftovers(root, keep_pid=os.getpid())


def remove_leftovers(root: Path, keep_pid: int | None = None) -> None:
    """Remove `.tmp-*` / `.old-*` folders of interrupted saves (not those of process `keep_pid`)."""
    if not root.is_dir():
        return
    for p in root.iterdir():
        if p.name.startswith((".tmp-", ".old-")) and not p.name.endswith(f"-{keep_pid}"):
            shutil.rmtree(p, ignore_errors=True)


# -- reading ---------------------------------------------------------------------------------------------------
def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> tuple[dict[str, dict[str, Tensor]],
                                                                                      dict[str, Any]]:
    """Verify the manifest of `path` and read it; a missing, truncated or altered file raises GenlabError."""
    manifest_path = path / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        raise GenlabError(f"{manifest_path} is missing or unreadable") from None
    for name, meta in files.items():
        p = path / name
        if not p.is_file():
            raise GenlabError(f"{p} is missing")
        if p.stat().st_size != meta["bytes"] or _sha256(p) != meta["sha256"]:
            raise GenlabError(f"{p} is truncated or altered (size or checksum differs from {MANIFEST})")
    weights = {n.removesuffix(".safetensors"): load_weights(path / n, map_location)
               for n in files if n.endswith(".safetensors")}
    try:
        state = torch.load(path / STATE, map_location=map_location, weights_only=True)
    except Exception as e:  # any unpickling failure means an unusable file
        raise GenlabError(f"{path / STATE} cannot be read ({type(e).__name__})") from None
    return weights, state


def load_latest(root: Path, log: Callable[[str], None] = print, map_location: str | torch.device = "cpu"
                ) -> tuple[Path | None, dict[str, dict[str, Tensor]], dict[str, Any], list[Path]]:
    """The newest checkpoint under `root` that loads, its contents, and the newer damaged ones it skipped.

    Returns (None, {}, {}, []) when there are no checkpoints; raises GenlabError when all are damaged.
    """
    broken: list[Path] = []
    for _, path in reversed(list_checkpoints(root)):
        try:
            weights, state = load_checkpoint(path, map_location)
        except GenlabError as e:
            log(f"checkpoint {path.name} is unusable ({e}); falling back to the previous one")
            broken.append(path)
            continue
        return path, weights, state, broken
    if broken:
        raise GenlabError(f"no usable checkpoint in {root} ({', '.join(p.name for p in broken)} damaged): "
                          "start over with --no-resume or use a new run name")
    return None, {}, {}, []


def quarantine(path: Path) -> Path:
    """Rename a damaged checkpoint out of the way (`step_XXXXXXX.broken`) so it is neither resumed nor counted."""
    target = path.with_name(path.name + ".broken")
    if target.exists():
        shutil.rmtree(target)
    os.rename(path, target)
    return target
