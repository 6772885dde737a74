"""Timestep and class-label embeddings for diffusion backbones."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps (Vaswani et al. 2017, sec. 3.5; Ho et al. 2020)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


class TimestepEmbedding(nn.Module):
    """Sinusoidal features followed by a two-layer SiLU MLP, as in the DDPM U-Net (Ho et al. 2020, app. B)."""

    def __init__(self, freq_dim: int, emb_dim: int) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(timestep_embedding(t, self.freq_dim))


class LabelEmbedding(nn.Module):
    """Class labels plus an extra null class (index `num_classes`) for classifier-free guidance (Ho & Salimans 2022)."""

    def __init__(self, num_classes: int, emb_dim: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.embed = nn.Embedding(num_classes + 1, emb_dim)

    @property
    def null_class(self) -> int:
        return self.num_classes

    def drop(self, y: Tensor, p: float, generator: torch.Generator | None = None) -> Tensor:
        """Replace each label by the null class with probability `p` (training-time condition dropout)."""
        if p <= 0:
            return y
        mask = torch.rand(y.shape, device=y.device, generator=generator) < p
        return torch.where(mask, torch.full_like(y, self.null_class), y)

    def forward(self, y: Tensor) -> Tensor:
        return self.embed(y)
