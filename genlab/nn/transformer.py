"""Decoder-only transformer blocks in the Llama layout: RMSNorm, RoPE, causal SDPA attention, SwiGLU.

The parameter layout differs from Llama only by fusing q/k/v into one projection and gate/up into another
(fewer kernel launches per decoded token); `genlab.models.hf_export` splits them on export.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (Zhang & Sennrich 2019, eq. 4): x / sqrt(mean(x^2) + eps) * g."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype != torch.float32:  # normalize in float32, as Llama does
            return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)  # one fused kernel instead of six ops


def rope_tables(head_dim: int, max_len: int, theta: float = 10000.0) -> tuple[Tensor, Tensor]:
    """cos and sign-folded sin tables (max_len, head_dim) for RoPE (Su et al. 2021, eq. 34).

    Frequencies theta^(-2i/d) are laid out in two halves (the "rotate_half" convention of GPT-NeoX and
    Llama); the sin table carries the minus sign of the first half, so `apply_rope` needs no negation.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = torch.arange(max_len, dtype=torch.int64).float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    sign = torch.cat((-torch.ones(head_dim // 2), torch.ones(head_dim // 2)))
    return emb.cos(), emb.sin() * sign


def apply_rope(x: Tensor, cos: Tensor, sin_signed: Tensor) -> Tensor:
    """x * cos + rotate_half(x) * sin over the last dim; `cos`, `sin_signed` broadcast against x (..., T, H, D)."""
    D = x.shape[-1]
    swapped = x.unflatten(-1, (2, D // 2)).flip(-2).flatten(-2)
    return x * cos + swapped * sin_signed


class KVCache:
    """Preallocated keys and values (layers, batch, kv_heads, max_len, head_dim); `length` positions are filled.

    Writes are in-place copies into `narrow` views; rolling back (speculative decoding) is setting `length`.
    """

    def __init__(self, n_layer: int, batch: int, n_kv_head: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        shape = (n_layer, batch, n_kv_head, max_len, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.length = 0
        self.max_len = max_len

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v (B, Hkv, T, D) after the filled positions; return all keys and values so far."""
        start, T = self.length, k.shape[2]
        k_all, v_all = self.k[layer], self.v[layer]
        k_all.narrow(2, start, T).copy_(k)
        v_all.narrow(2, start, T).copy_(v)
        return k_all.narrow(2, 0, start + T), v_all.narrow(2, 0, start + T)

    def reorder(self, index: Tensor) -> None:
        """Keep batch rows `index` (beam search)."""
        self.k = self.k.index_select(1, index)
        self.v = self.v.index_select(1, index)


class Attention(nn.Module):
    """Multi-head causal self-attention (Vaswani et al. 2017, eq. 1) with grouped KV heads (Ainslie et al. 2023)."""

    def __init__(self, n_embd: int, n_head: int, n_kv_head: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, n_embd // n_head
        self.wqkv = nn.Linear(n_embd, (n_head + 2 * n_kv_head) * self.head_dim, bias=False)
        self.wo = nn.Linear(n_head * self.head_dim, n_embd, bias=False)
        self.dropout = dropout

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, cache: KVCache | None,
                layer: int) -> Tensor:
        B, T, _ = x.shape
        H, Hkv = self.n_head, self.n_kv_head
        qkv = self.wqkv(x).view(B, T, H + 2 * Hkv, self.head_dim)
        qk = apply_rope(qkv[:, :, : H + Hkv], cos, sin)
        q = qk[:, :, :H].transpose(1, 2)
        k = qk[:, :, H:].transpose(1, 2)
        v = qkv[:, :, H + Hkv:].transpose(1, 2)
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.update(layer, k, v)
        if T == 1 and cache is not None:  # one new token: plain matmuls beat SDPA's setup cost on CPU
            y = _decode_attention(q, k, v, mask, Hkv)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None and past == 0 and T > 1,
                dropout_p=self.dropout if self.training else 0.0, enable_gqa=H != Hkv,
            )
        return self.wo(y.transpose(1, 2).reshape(B, T, H * self.head_dim))


def _decode_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, n_kv_head: int) -> Tensor:
    """softmax(q k^T / sqrt(d)) v for one query per row; query heads grouped over their shared KV head."""
    B, H, _, D = q.shape
    G, Tk = H // n_kv_head, k.shape[2]
    qg = q.reshape(B * n_kv_head, G, D)
    scores = torch.bmm(qg, k.reshape(B * n_kv_head, Tk, D).transpose(1, 2)).mul_(D**-0.5)
    if mask is not None:
        scores = scores.view(B, n_kv_head, G, Tk).masked_fill(~mask, float("-inf")).view(B * n_kv_head, G, Tk)
    return torch.bmm(scores.softmax(-1), v.reshape(B * n_kv_head, Tk, D)).view(B, H, 1, D)


class SwiGLU(nn.Module):
    """Feed-forward W2 (silu(x W1) * x W3) (Shazeer 2020, eq. 6); W1 and W3 are one fused projection."""

    def __init__(self, n_embd: int, hidden: int) -> None:
        super().__init__()
        self.w13 = nn.Linear(n_embd, 2 * hidden, bias=False)
        self.w2 = nn.Linear(hidden, n_embd, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, n_embd: int, n_head: int, n_kv_head: int, hidden: int, eps: float, dropout: float) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(n_embd, eps)
        self.attn = Attention(n_embd, n_head, n_kv_head, dropout)
        self.mlp_norm = RMSNorm(n_embd, eps)
        self.mlp = SwiGLU(n_embd, hidden)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, cache: KVCache | None,
                layer: int) -> Tensor:
        h = self.attn(self.attn_norm(x), cos, sin, mask, cache, layer)
        x = x + (self.drop(h) if self.training else h)
        h = self.mlp(self.mlp_norm(x))
        return x + (self.drop(h) if self.training else h)


def attention_mask(key_mask: Tensor | None, q_len: int, past: int, device: torch.device | str = "cpu"
                   ) -> Tensor | None:
    """Boolean (B, 1, Tq, Tk) mask: causal over Tk = past + Tq and padding from `key_mask` (B, Tk), True = keep.

    None when plain causal attention suffices (no padding, and either a fresh sequence or one query).
    Every query also sees itself, so rows of padding never have all keys masked (which gives NaN).
    """
    total = past + q_len
    if key_mask is None and (past == 0 or q_len == 1):
        return None
    q_pos = torch.arange(past, total, device=device)[:, None]
    k_pos = torch.arange(total, device=device)[None, :]
    mask = (k_pos <= q_pos)[None, None]
    if key_mask is not None:
        mask = (mask & key_mask[:, None, None, :total].to(torch.bool)) | (k_pos == q_pos)[None, None]
    return mask
