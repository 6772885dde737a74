"""Image preference pairs as a folder (the data of Diffusion-DPO, Wallace et al. 2023): `pairs.jsonl` holds one
`{"prompt": ..., "chosen": "chosen/0.png", "rejected": "rejected/0.png"}` per line, image paths relative to the folder.

`genlab train` reads such a folder as the dataset when `data.name` points at it (a folder with `pairs.jsonl`);
`write_image_pairs` writes one (what `benchmarks/diffusion_dpo_pairs.py` ranks with Shapes-GenEval), and a user may
write their own: any RGB images of one size, any prompts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from genlab.data.base import DatasetInfo
from genlab.data.images import save_png
from genlab.errors import GenlabError
from genlab.files import jsonl_records, write_atomic

PAIRS_FILE = "pairs.jsonl"
PAIR_KEYS = ("prompt", "chosen", "rejected")
MAX_PAIRS = 200_000


@dataclass
class ImagePairs:
    """Preference pairs in memory: `chosen` and `rejected` uint8 (N, 3, H, W), one prompt each, and the records'
    other fields (`extra`, e.g. how each pair was ranked)."""

    prompts: list[str]
    chosen: Tensor
    rejected: Tensor
    info: DatasetInfo
    extra: list[dict[str, Any]]

    def __len__(self) -> int:
        return len(self.prompts)


def is_pair_folder(path: str | Path) -> bool:
    return (Path(path).expanduser() / PAIRS_FILE).is_file()


def _read_image(root: Path, name: Any, line: int, key: str) -> np.ndarray:
    if not isinstance(name, str) or not name:
        raise GenlabError(f"line {line} of {PAIRS_FILE} needs {key!r}: an image path relative to the pair folder")
    path = (root / name).resolve()
    if not path.is_relative_to(root.resolve()):
        raise GenlabError(f"line {line} of {PAIRS_FILE}: {key} {name!r} is outside the pair folder; keep the images "
                          "inside it")
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise GenlabError(f"line {line} of {PAIRS_FILE}: {key} image {name!r} does not exist") from None
    except (UnidentifiedImageError, OSError) as e:
        raise GenlabError(f"line {line} of {PAIRS_FILE}: {key} image {name!r} is not a readable image ({e})") from None


def load_image_pairs(path: str | Path) -> ImagePairs:
    """The pairs of a folder; every image must have one and the same square size, and chosen differ from rejected."""
    root = Path(path).expanduser()
    if not is_pair_folder(root):
        raise GenlabError(f"{root} holds no {PAIRS_FILE}; a pair folder has one line per pair "
                          '{"prompt": ..., "chosen": "chosen/0.png", "rejected": "rejected/0.png"}')
    text = (root / PAIRS_FILE).read_text(encoding="utf-8", errors="replace")
    prompts, chosen, rejected, extra = [], [], [], []
    shape = None
    for n, record in jsonl_records(text, PAIRS_FILE, '{"prompt": ..., "chosen": ..., "rejected": ...}'):
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise GenlabError(f"line {n} of {PAIRS_FILE} needs a string field prompt and image paths chosen, rejected")
        if len(prompts) >= MAX_PAIRS:
            raise GenlabError(f"{PAIRS_FILE} holds more than {MAX_PAIRS} pairs; split it")
        w, l_ = (_read_image(root, record.get(k), n, k) for k in ("chosen", "rejected"))
        for key, img in (("chosen", w), ("rejected", l_)):
            shape = shape or img.shape
            if img.shape != shape or shape[0] != shape[1]:
                raise GenlabError(f"line {n} of {PAIRS_FILE}: the {key} image is {img.shape[1]}x{img.shape[0]}, but "
                                  f"every image must be square and of one size (the first is {shape[1]}x{shape[0]})")
        if np.array_equal(w, l_):
            raise GenlabError(f"line {n} of {PAIRS_FILE} has identical chosen and rejected images: drop the line")
        prompts.append(record["prompt"])
        chosen.append(w)
        rejected.append(l_)
        extra.append({k: v for k, v in record.items() if k not in PAIR_KEYS})
    if not prompts:
        raise GenlabError(f"{root / PAIRS_FILE} holds no pairs")
    assert shape is not None
    stack = lambda imgs: torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()  # noqa: E731
    info = DatasetInfo(name=root.name, kind="image_pairs", size=len(prompts), license="user data",
                       attribution=f"preference pairs from {root.name}", channels=3, image_size=int(shape[0]))
    return ImagePairs(prompts, stack(chosen), stack(rejected), info, extra)


def write_image_pairs(path: str | Path, prompts: list[str], chosen: Tensor, rejected: Tensor,
                      extra: list[dict[str, Any]] | None = None) -> Path:
    """A pair folder: chosen/<i>.png, rejected/<i>.png (images in [-1, 1] or uint8, (N, 3, H, W)) and pairs.jsonl
    with each pair's prompt, paths and `extra` fields; written last, so a folder with pairs.jsonl is complete."""
    root = Path(path).expanduser()
    if not (len(prompts) == len(chosen) == len(rejected)) or (extra is not None and len(extra) != len(prompts)):
        raise GenlabError("give one prompt, one chosen and one rejected image per pair")
    lines = []
    for i, prompt in enumerate(prompts):
        row: dict[str, Any] = {"prompt": prompt}
        for key, images in (("chosen", chosen), ("rejected", rejected)):
            x = images[i]
            if x.dtype != torch.uint8:
                x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            save_png(x.permute(1, 2, 0).cpu().numpy(), root / key / f"{i}.png")
            row[key] = f"{key}/{i}.png"
        lines.append(json.dumps({**row, **(extra[i] if extra else {})}))
    return write_atomic(root / PAIRS_FILE, "\n".join(lines) + "\n")
