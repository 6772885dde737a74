"""Self-attention over image positions with `scaled_dot_product_attention`."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class SelfAttention2d(nn.Module):
    """Multi-head self-attention over the H*W positions of a feature map, pre-norm and residual
    (Vaswani et al. 2017, eq. 1; placed at low resolution as in Ho et al. 2020)."""

    def __init__(self, channels: int, head_channels: int = 32, norm_groups: int = 8) -> None:
        super().__init__()
        self.heads = max(1, channels // head_channels)
        if channels % self.heads:
            raise ValueError(f"channels {channels} must be a multiple of head_channels {head_channels}")
        self.norm = nn.GroupNorm(norm_groups, channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        q, k, v = self.qkv(h).view(B, H * W, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, heads, HW, d)
        h = self.proj(h.transpose(1, 2).reshape(B, H * W, C))
        return x + h.transpose(1, 2).reshape(B, C, H, W)
