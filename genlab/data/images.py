"""Image tensors <-> PNG files: grids, and per-image parameters in a PNG text chunk."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, PngImagePlugin
from torch import Tensor

from genlab.files import atomic_path

PARAMS_KEY = "genlab"
PROMPT_KEY = "prompt"  # a text-to-image PNG's prompt, also as plain text (iTXt when it is not Latin-1)


def to_uint8(x: Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8."""
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def from_uint8(a: np.ndarray) -> Tensor:
    """(N, H, W) or (N, H, W, C) uint8 -> (N, C, H, W) float in [-1, 1]."""
    t = torch.from_numpy(np.ascontiguousarray(a))
    if t.ndim == 3:
        t = t.unsqueeze(-1)
    return t.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


DELTA = 2.0 / 255.0  # width of one 8-bit level in [-1, 1]


def dequantize(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """x + u, u ~ U(-DELTA/2, DELTA/2): a point in the bin of each 8-bit level (Theis et al. 2016, sec. 3.1)."""
    u = torch.rand(x.shape, generator=generator, dtype=x.dtype, device="cpu").to(x.device)
    return x + (u - 0.5) * DELTA


def bits_per_dim(nll_nats: Tensor, dims: int) -> Tensor:
    """nats per item -> bits per dimension."""
    return nll_nats / (dims * math.log(2.0))


def make_grid(x: Tensor, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile (N, C, H, W) images into one (H', W', C) uint8 array, `nrow` images per row."""
    imgs = to_uint8(x)
    n, h, w, c = imgs.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        y, x0 = pad + r * (h + pad), pad + col * (w + pad)
        grid[y : y + h, x0 : x0 + w] = imgs[i]
    return grid


def _pil(a: np.ndarray) -> Image.Image:
    return Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a)


def save_png(a: np.ndarray, path: str | Path, params: dict[str, Any] | None = None) -> Path:
    """Save an (H, W, C) uint8 array as PNG, with `params` as JSON in a text chunk (and a "prompt" of the params
    in a chunk of its own); atomic."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngImagePlugin.PngInfo()
    if params is not None:
        info.add_text(PARAMS_KEY, json.dumps(params, sort_keys=True))
        if isinstance(params.get(PROMPT_KEY), str):
            info.add_text(PROMPT_KEY, params[PROMPT_KEY])
    with atomic_path(path) as tmp:
        _pil(a).save(tmp, format="PNG", pnginfo=info)
    return path


def save_grid(x: Tensor, path: str | Path, nrow: int | None = None, params: dict[str, Any] | None = None) -> Path:
    return save_png(make_grid(x, nrow=nrow), path, params)


def read_params(path: str | Path) -> dict[str, Any] | None:
    """The parameters genlab stored in a PNG, or None."""
    with Image.open(path) as im:
        raw = im.text.get(PARAMS_KEY) if hasattr(im, "text") else None
    return json.loads(raw) if raw else None
