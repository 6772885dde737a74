"""Image encoders for CLIP: a small Vision Transformer (Dosovitskiy et al. 2021) and a small residual CNN.

Both map images (B, C, H, W) in [-1, 1] to `(pooled, patches)`: one vector per image (B, width) and one per
image region (B, N, width), so a contrastive head and a captioner's projector read either the same way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genlab.nn.dit import Attention, sincos_pos_embed_2d
from genlab.nn.resnet import Downsample
from genlab.nn.transformer import RMSNorm, SwiGLU


class ViTBlock(nn.Module):
    """Pre-norm bidirectional transformer block: x + attn(norm(x)), then x + mlp(norm(x)) (Vaswani et al. 2017)."""

    def __init__(self, width: int, heads: int, hidden: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(width, eps)
        self.attn = Attention(width, heads)
        self.mlp_norm = RMSNorm(width, eps)
        self.mlp = SwiGLU(width, hidden)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class ViT(nn.Module):
    """z_0 = [x_cls; x_p^1 E; ...; x_p^N E] + E_pos, transformer blocks, LN(z_L) (Dosovitskiy et al. 2021, eq. 1-4).

    Patches are embedded by a stride-p convolution; positions are fixed 2D sine-cosine tables (the class token has
    a learned one). Returns the normed class token (B, width) and the normed patch tokens (B, N, width).
    """

    def __init__(self, image_size: int, channels: int, patch_size: int, width: int, depth: int, heads: int,
                 hidden: int = 0, eps: float = 1e-5) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image size {image_size} must be a multiple of the patch size {patch_size}")
        self.grid = image_size // patch_size
        self.patch = nn.Conv2d(channels, width, patch_size, stride=patch_size)
        self.cls = nn.Parameter(torch.zeros(1, 1, width))
        self.register_buffer("pos", sincos_pos_embed_2d(width, self.grid)[None], persistent=False)
        hidden = hidden or 4 * width
        self.blocks = nn.ModuleList(ViTBlock(width, heads, hidden, eps) for _ in range(depth))
        self.norm = RMSNorm(width, eps)
        nn.init.normal_(self.cls, std=0.02)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z = self.patch(x).flatten(2).transpose(1, 2) + self.pos  # (B, N, width)
        z = torch.cat([self.cls.expand(len(z), -1, -1).to(z.dtype), z], dim=1)
        for block in self.blocks:
            z = block(z)
        z = self.norm(z)
        return z[:, 0], z[:, 1:]


class ConvBlock(nn.Module):
    """x + conv(silu(GN(conv(silu(GN(x)))))): a pre-activation residual block (He et al. 2016, eq. 1)."""

    def __init__(self, channels: int, groups: int = 8) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return x + self.conv2(F.silu(self.norm2(h)))


class ConvEncoder(nn.Module):
    """A residual CNN (He et al. 2016): a 3x3 stem, then stages of residual blocks that halve the resolution and
    double the channels; the last feature map's positions are the "patches" (projected to `width`), their mean
    (normed) is the pooled vector."""

    def __init__(self, image_size: int, channels: int, base_channels: int, stages: int, width: int,
                 blocks_per_stage: int = 1, groups: int = 8, eps: float = 1e-5) -> None:
        super().__init__()
        if image_size % 2 ** (stages - 1):
            raise ValueError(f"image size {image_size} must be divisible by 2^(stages-1) = {2 ** (stages - 1)}")
        self.stem = nn.Conv2d(channels, base_channels, 3, padding=1)
        layers: list[nn.Module] = []
        ch = base_channels
        for s in range(stages):
            if s:
                layers += [Downsample(ch), nn.Conv2d(ch, 2 * ch, 1)]
                ch *= 2
            layers += [ConvBlock(ch, groups) for _ in range(blocks_per_stage)]
        self.stages = nn.Sequential(*layers)
        self.out_norm = nn.GroupNorm(groups, ch)
        self.proj = nn.Linear(ch, width)
        self.norm = RMSNorm(width, eps)
        self.grid = image_size // 2 ** (stages - 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = F.silu(self.out_norm(self.stages(self.stem(x))))
        patches = self.proj(h.flatten(2).transpose(1, 2))  # (B, h*w, width)
        return self.norm(patches.mean(1)), self.norm(patches)
