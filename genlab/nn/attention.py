"""Self-attention over image positions and cross-attention to context tokens, with `scaled_dot_product_attention`."""

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


def key_padding_bias(mask: Tensor | None) -> Tensor | None:
    """A (B, L) key mask (True = a real token) as SDPA's boolean attn_mask broadcast over heads and queries."""
    return None if mask is None else mask[:, None, None, :].bool()


class CrossAttention(nn.Module):
    """Multi-head attention of `dim`-wide queries over `context_dim`-wide context tokens with a key padding mask,
    so padded tokens get no weight (Vaswani et al. 2017, eq. 1; the text cross-attention of Rombach et al. 2022,
    sec. 3.3). Not normalized, not residual: the caller places it."""

    def __init__(self, dim: int, context_dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} must be a multiple of the {heads} heads")
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(context_dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor, mask: Tensor | None = None) -> Tensor:
        """`x` (B, N, dim) queries, `context` (B, L, context_dim), `mask` (B, L) True where a token is real."""
        B, N, C = x.shape
        L, d = context.shape[1], C // self.heads
        q = self.q(x).view(B, N, self.heads, d).transpose(1, 2)
        k, v = self.kv(context).view(B, L, 2, self.heads, d).permute(2, 0, 3, 1, 4)
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=key_padding_bias(mask))
        return self.proj(h.transpose(1, 2).reshape(B, N, C))


class CrossAttention2d(nn.Module):
    """Cross-attention from the H*W positions of a feature map to text tokens, pre-norm and residual, the output
    projection zero-initialized so the block starts as the identity (Rombach et al. 2022, sec. 3.3)."""

    def __init__(self, channels: int, context_dim: int, head_channels: int = 32, norm_groups: int = 8) -> None:
        super().__init__()
        heads = max(1, channels // head_channels)
        if channels % heads:
            raise ValueError(f"channels {channels} must be a multiple of head_channels {head_channels}")
        self.norm = nn.GroupNorm(norm_groups, channels)
        self.attn = CrossAttention(channels, context_dim, heads)
        nn.init.zeros_(self.attn.proj.weight)
        nn.init.zeros_(self.attn.proj.bias)

    def forward(self, x: Tensor, context: Tensor, mask: Tensor | None = None) -> Tensor:
        B, C, H, W = x.shape
        h = self.attn(self.norm(x).flatten(2).transpose(1, 2), context, mask)
        return x + h.transpose(1, 2).reshape(B, C, H, W)


def masked_mean(context: Tensor, mask: Tensor | None) -> Tensor:
    """The mean of the real tokens of `context` (B, L, D) under `mask` (B, L): a pooled text embedding."""
    if mask is None:
        return context.mean(1)
    m = mask.to(context.dtype)[..., None]
    return (context * m).sum(1) / m.sum(1).clamp_min(1.0)
