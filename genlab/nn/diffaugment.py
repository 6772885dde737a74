"""Differentiable augmentation (DiffAugment, Zhao et al. 2020, sec. 3 and their code): random translation and
cutout, applied to every image the discriminator sees (real and generated alike), so gradients flow through the
augmentation to the generator and the discriminator cannot memorise a small training set."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

POLICIES = ("translation", "cutout")


def translate(x: Tensor, shifts: Tensor) -> Tensor:
    """Shift image b by shifts[b] = (dy, dx) whole pixels, filling what enters the frame with zeros:
    out[b, :, i, j] = x[b, :, i - dy, j - dx] (0 where that lies outside the image)."""
    B, _, H, W = x.shape
    pad = int(shifts.abs().max()) if shifts.numel() else 0
    xp = F.pad(x, [pad, pad, pad, pad])
    rows = torch.arange(H, device=x.device)[None, :] - shifts[:, :1] + pad  # (B, H)
    cols = torch.arange(W, device=x.device)[None, :] - shifts[:, 1:] + pad  # (B, W)
    b = torch.arange(B, device=x.device)[:, None, None]
    return xp.permute(0, 2, 3, 1)[b, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def cutout(x: Tensor, corners: Tensor, size: int) -> Tensor:
    """Zero a `size` x `size` square whose top-left corner in image b is corners[b] = (top, left) (clipped where
    it reaches past the border)."""
    _, _, H, W = x.shape
    i = torch.arange(H, device=x.device)[None, :]
    j = torch.arange(W, device=x.device)[None, :]
    top, left = corners[:, :1], corners[:, 1:]
    inside_rows = (i >= top) & (i < top + size)  # (B, H)
    inside_cols = (j >= left) & (j < left + size)  # (B, W)
    keep = ~(inside_rows[:, :, None] & inside_cols[:, None, :])
    return x * keep[:, None].to(x.dtype)


def diff_augment(x: Tensor, generator: torch.Generator | None = None, translation_ratio: float = 0.125,
                 cutout_ratio: float = 0.5) -> Tensor:
    """Random translation by up to `translation_ratio` of the side, then a cutout square of `cutout_ratio` of the
    side at a uniform position, each drawn independently for every image (Zhao et al. 2020, app. A: "translation"
    and "cutout" policies)."""
    B, _, H, W = x.shape
    s = int(min(H, W) * translation_ratio + 0.5)
    shifts = torch.randint(-s, s + 1, (B, 2), generator=generator, device=x.device)
    x = translate(x, shifts)
    size = int(min(H, W) * cutout_ratio + 0.5)
    corners = torch.randint(-(size // 2), min(H, W) - size // 2, (B, 2), generator=generator, device=x.device)
    return cutout(x, corners, size)
