"""The Diffusion Transformer (DiT, Peebles & Xie 2023): patchify, transformer blocks with adaLN-Zero
conditioning on timestep + label, a final adaptive layer norm and a linear unpatchify; optionally cross-attention
to text tokens in every block, as PixArt-alpha does (Chen et al. 2023, sec. 2.3 and fig. 4), and U-ViT's long skip
connections and output 3x3 convolution (Bao et al. 2023, sec. 3.1 and fig. 1)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genlab.errors import GenlabError
from genlab.nn.attention import CrossAttention, masked_mean
from genlab.nn.embeddings import LabelEmbedding, TimestepEmbedding
from genlab.registry import BACKBONES


def sincos_pos_embed_2d(dim: int, grid: int) -> Tensor:
    """Fixed 2D sine-cosine position embedding (grid*grid, dim): half the channels encode the row, half the
    column, each as sin/cos of position * 10000^(-2i/(dim/2)) (Vaswani et al. 2017, sec. 3.5; MAE / DiT layout)."""
    if dim % 4:
        raise ValueError(f"hidden size {dim} must be divisible by 4 for the 2D sin-cos position embedding")
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
    pos = np.arange(grid, dtype=np.float64)
    rows, cols = np.meshgrid(pos, pos, indexing="ij")  # token k = (row k // grid, column k % grid)

    def encode(p: np.ndarray) -> np.ndarray:
        out = np.outer(p.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return torch.from_numpy(np.concatenate([encode(cols), encode(rows)], axis=1)).float()


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """Adaptive layer norm's affine part: x * (1 + scale) + shift, per sample (Peebles & Xie 2023, sec. 3.2)."""
    return x * (1 + scale[:, None]) + shift[:, None]


class Attention(nn.Module):
    """Bidirectional multi-head self-attention over tokens with SDPA (Vaswani et al. 2017, eq. 1)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        h = F.scaled_dot_product_attention(q, k, v)
        return self.proj(h.transpose(1, 2).reshape(B, N, C))


class DiTBlock(nn.Module):
    """x + gate_msa * attn(modulate(LN(x))), then x + gate_mlp * mlp(modulate(LN(x))), with the six shifts,
    scales and gates regressed from the conditioning c and zero-initialized, so the block starts as the identity
    (adaLN-Zero, Peebles & Xie 2023, sec. 3.2). With `context_dim`, x + cross_attn(LN(x), text) sits between the
    two, unmodulated, its output projection zero-initialized (PixArt-alpha, Chen et al. 2023, sec. 2.3)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, context_dim: int = 0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.cross = CrossAttention(dim, context_dim, num_heads) if context_dim else None
        self.norm_cross = nn.LayerNorm(dim, eps=1e-6) if context_dim else None
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: Tensor, c: Tensor, context: Tensor | None = None, context_mask: Tensor | None = None
                ) -> Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa[:, None] * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        if self.cross is not None:
            x = x + self.cross(self.norm_cross(x), context, context_mask)
        return x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """Adaptive layer norm, then a linear map of each token to its p*p*C output patch (Peebles & Xie 2023, sec. 3.2)."""

    def __init__(self, dim: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


@BACKBONES.register("dit")
class DiT(nn.Module):
    """A Diffusion Transformer predicting eps(x_t, t, y) (Peebles & Xie 2023, fig. 3): patch embedding plus
    fixed 2D sin-cos positions, `depth` adaLN-Zero blocks conditioned on timestep + label embedding (the label
    embedding's extra null class serves classifier-free guidance), final adaptive norm and linear unpatchify.
    With `context_dim` > 0 every block cross-attends to text tokens (PixArt-alpha) and their masked mean joins
    the timestep embedding (Saharia et al. 2022, app. E)."""

    def __init__(self, in_channels: int = 4, image_size: int = 32, patch_size: int = 2, hidden_size: int = 384,
                 depth: int = 12, num_heads: int = 6, mlp_ratio: float = 4.0, num_classes: int = 0,
                 out_channels: int | None = None, context_dim: int = 0, long_skip: bool = False,
                 final_conv: bool = False) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image size {image_size} must be divisible by patch size {patch_size}")
        self.in_channels = in_channels
        self.out_channels = out_channels or in_channels
        self.patch_size = patch_size
        self.grid = image_size // patch_size
        self.num_classes = num_classes
        self.x_embedder = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(hidden_size, self.grid)[None], persistent=False)
        self.t_embedder = TimestepEmbedding(256, hidden_size)
        self.label_embed = LabelEmbedding(num_classes, hidden_size) if num_classes > 0 else None
        self.context_dim = context_dim
        self.context_pool = nn.Linear(context_dim, hidden_size) if context_dim else None
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio, context_dim) for _ in range(depth))
        # U-ViT: block depth-1-i reads Linear([h, output of block i]) for the first (depth - 1) // 2 blocks i
        self.skip_linears = nn.ModuleList(nn.Linear(2 * hidden_size, hidden_size) for _ in range((depth - 1) // 2)) \
            if long_skip else None
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.final_conv = nn.Conv2d(self.out_channels, self.out_channels, 3, padding=1) if final_conv else None
        self._init_weights()

    @classmethod
    def from_config(cls, config: Any, num_classes: int, context_dim: int = 0) -> DiT:
        """Build from a `DiffusionConfig` (keys channels, image_size, patch_size, hidden_size, depth, num_heads,
        mlp_ratio); a size that does not fit raises GenlabError naming the key."""
        if config.patch_size < 1 or config.image_size % config.patch_size:
            raise GenlabError(f"model.patch_size={config.patch_size} must divide the input side {config.image_size}")
        if config.depth < 1 or config.num_heads < 1 or config.hidden_size % (4 * config.num_heads):
            raise GenlabError(f"model.hidden_size={config.hidden_size} must be a multiple of 4 x model.num_heads="
                              f"{config.num_heads} (and model.depth >= 1)")
        return cls(in_channels=config.channels, image_size=config.image_size, patch_size=config.patch_size,
                   hidden_size=config.hidden_size, depth=config.depth, num_heads=config.num_heads,
                   mlp_ratio=config.mlp_ratio, num_classes=num_classes, context_dim=context_dim,
                   long_skip=config.long_skip, final_conv=config.final_conv)

    def _init_weights(self) -> None:
        """Xavier-uniform linears, patch embedding as a linear, N(0, 0.02) embeddings, and zero for every adaLN
        regression and the output layer (adaLN-Zero; Peebles & Xie 2023, sec. 3.2 and the reference code)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if self.label_embed is not None:
            nn.init.normal_(self.label_embed.embed.weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
            if block.cross is not None:  # each cross-attention starts as the identity (PixArt-alpha's zero init)
                nn.init.zeros_(block.cross.proj.weight)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        if self.skip_linears is not None:  # each long skip starts by passing h through: the plain DiT at init
            for skip in self.skip_linears:
                nn.init.eye_(skip.weight)
        if self.final_conv is not None:  # the output conv starts as the identity (a random 3x3 filter is ill-
            nn.init.dirac_(self.final_conv.weight)  # conditioned to invert: eps has every frequency)
            nn.init.zeros_(self.final_conv.bias)

    def unpatchify(self, x: Tensor) -> Tensor:
        """(B, grid*grid, p*p*C) tokens -> (B, C, grid*p, grid*p) image."""
        B, p, g, C = x.shape[0], self.patch_size, self.grid, self.out_channels
        x = x.view(B, g, g, p, p, C)
        return torch.einsum("bhwpqc->bchpwq", x).reshape(B, C, g * p, g * p)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None, context: Tensor | None = None,
                context_mask: Tensor | None = None) -> Tensor:
        """Predict eps for `x` (B, C, H, W) at timesteps `t` (B,) with labels `y` (B,) (None: the null class), and
        with `context_dim`, text tokens `context` (B, L, context_dim) under `context_mask` (B, L; True = real)."""
        h = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed  # (B, N, D)
        c = self.t_embedder(t.expand(x.shape[0]))
        if self.label_embed is not None:
            if y is None:
                y = torch.full((x.shape[0],), self.label_embed.null_class, device=x.device, dtype=torch.long)
            c = c + self.label_embed(y)
        if self.context_pool is not None:
            if context is None:
                raise ValueError("this DiT reads text tokens: pass context (and context_mask)")
            c = c + self.context_pool(masked_mean(context, context_mask))
        return self.output(self.run_blocks(h, c, context, context_mask), c)

    def run_blocks(self, h: Tensor, c: Tensor, context: Tensor | None = None, context_mask: Tensor | None = None
                   ) -> Tensor:
        """The blocks over tokens h (B, N, D); with long skips, block depth-1-i first mixes in block i's output
        (h = Linear([h, skip_i]), U-ViT, Bao et al. 2023, sec. 3.1)."""
        depth, skips = len(self.blocks), []
        for i, block in enumerate(self.blocks):
            if self.skip_linears is not None and i >= depth - len(self.skip_linears):
                h = self.skip_linears[depth - 1 - i](torch.cat([h, skips.pop()], dim=-1))
            h = block(h, c, context, context_mask)
            if self.skip_linears is not None and i < len(self.skip_linears):
                skips.append(h)
        return h

    def output(self, h: Tensor, c: Tensor) -> Tensor:
        """Final adaptive norm, linear unpatchify, and with `final_conv` a 3x3 convolution (U-ViT's output conv)."""
        out = self.unpatchify(self.final_layer(h, c))
        return out if self.final_conv is None else self.final_conv(out)
