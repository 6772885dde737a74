"""The diffusion U-Net: ResNet blocks, low-resolution self-attention, skips, timestep and class conditioning
(Ronneberger et al. 2015; Ho et al. 2020, app. B; Dhariwal & Nichol 2021), and optional cross-attention to text
tokens (Rombach et al. 2022, sec. 3.3)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genlab.nn.attention import CrossAttention2d, SelfAttention2d, masked_mean
from genlab.nn.embeddings import LabelEmbedding, TimestepEmbedding
from genlab.nn.resnet import Downsample, ResBlock, Upsample
from genlab.registry import BACKBONES


class _Level(nn.Module):
    """One resolution of the U-Net: ResNet blocks, each optionally followed by self-attention (and, with a
    `context_dim`, cross-attention to the context tokens)."""

    def __init__(self, chans: list[tuple[int, int]], emb_dim: int, attention: bool, dropout: float,
                 head_channels: int, norm_groups: int, context_dim: int = 0) -> None:
        super().__init__()
        self.res = nn.ModuleList(ResBlock(i, o, emb_dim, dropout, norm_groups) for i, o in chans)
        self.attn = nn.ModuleList(
            SelfAttention2d(o, head_channels, norm_groups) if attention else nn.Identity() for _, o in chans
        )
        self.cross = nn.ModuleList(
            CrossAttention2d(o, context_dim, head_channels, norm_groups) if attention and context_dim else None
            for _, o in chans
        )


@BACKBONES.register("unet")
class UNet(nn.Module):
    """A U-Net predicting the noise `eps(x_t, t, y)` (Ho et al. 2020, eq. 14), with an optional label
    embedding whose extra null class serves classifier-free guidance (Ho & Salimans 2022). With `context_dim` > 0
    it reads text tokens (B, L, context_dim) with a key padding mask: cross-attention after every self-attention
    (Rombach et al. 2022, sec. 3.3) and their masked mean added to the timestep embedding (Saharia et al. 2022,
    sec. 2.2 / app. E: the pooled text embedding)."""

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int | None = None,
        image_size: int = 28,
        base_channels: int = 32,
        channel_mults: tuple[int, ...] = (1, 2, 2),
        num_res_blocks: int = 2,
        attention_resolutions: tuple[int, ...] = (7,),
        dropout: float = 0.0,
        num_classes: int = 0,
        head_channels: int = 32,
        norm_groups: int = 8,
        context_dim: int = 0,
    ) -> None:
        super().__init__()
        out_channels = out_channels or in_channels
        emb_dim = 4 * base_channels
        self.num_classes = num_classes
        self.context_dim = context_dim
        self.time_embed = TimestepEmbedding(base_channels, emb_dim)
        self.label_embed = LabelEmbedding(num_classes, emb_dim) if num_classes > 0 else None
        self.context_pool = nn.Linear(context_dim, emb_dim) if context_dim else None
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        common = dict(emb_dim=emb_dim, dropout=dropout, head_channels=head_channels, norm_groups=norm_groups,
                      context_dim=context_dim)

        skips = [base_channels]
        ch, res = base_channels, image_size
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        for level, mult in enumerate(channel_mults):
            chans = []
            for _ in range(num_res_blocks):
                chans.append((ch, base_channels * mult))
                ch = base_channels * mult
                skips.append(ch)
            self.down.append(_Level(chans, attention=res in attention_resolutions, **common))
            if level < len(channel_mults) - 1:
                self.downsample.append(Downsample(ch))
                skips.append(ch)
                res = (res + 1) // 2
        self.mid_res1 = ResBlock(ch, ch, emb_dim, dropout, norm_groups)
        self.mid_attn = SelfAttention2d(ch, head_channels, norm_groups)
        self.mid_cross = CrossAttention2d(ch, context_dim, head_channels, norm_groups) if context_dim else None
        self.mid_res2 = ResBlock(ch, ch, emb_dim, dropout, norm_groups)
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mults))):
            chans = []
            for _ in range(num_res_blocks + 1):
                chans.append((ch + skips.pop(), base_channels * mult))
                ch = base_channels * mult
            self.up.append(_Level(chans, attention=res in attention_resolutions, **common))
            if level > 0:
                self.upsample.append(Upsample(ch))
                res = res * 2
        self.norm_out = nn.GroupNorm(norm_groups, ch)
        self.conv_out = nn.Conv2d(ch, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    @classmethod
    def from_config(cls, config: Any, num_classes: int, context_dim: int = 0) -> UNet:
        """Build from a `DiffusionConfig` (its channels, image_size and U-Net size keys)."""
        return cls(in_channels=config.channels, image_size=config.image_size, base_channels=config.base_channels,
                   channel_mults=tuple(config.channel_mults), num_res_blocks=config.num_res_blocks,
                   attention_resolutions=tuple(config.attention_resolutions), dropout=config.dropout,
                   num_classes=num_classes, head_channels=config.head_channels, norm_groups=config.norm_groups,
                   context_dim=context_dim)

    def embedding(self, x: Tensor, t: Tensor, y: Tensor | None = None, context: Tensor | None = None,
                  context_mask: Tensor | None = None) -> Tensor:
        """The conditioning vector every ResNet block reads: timestep + label (+ pooled text) embeddings."""
        emb = self.time_embed(t.expand(x.shape[0]))
        if self.label_embed is not None:
            if y is None:
                y = torch.full((x.shape[0],), self.label_embed.null_class, device=x.device, dtype=torch.long)
            emb = emb + self.label_embed(y)
        if self.context_pool is not None:
            if context is None:
                raise ValueError("this U-Net reads text tokens: pass context (and context_mask)")
            emb = emb + self.context_pool(masked_mean(context, context_mask))
        return emb

    @staticmethod
    def _attend(attn: nn.Module, cross: nn.Module | None, h: Tensor, context: Tensor | None,
                context_mask: Tensor | None) -> Tensor:
        h = attn(h)
        return cross(h, context, context_mask) if cross is not None else h

    def encode(self, h: Tensor, emb: Tensor, context: Tensor | None = None,
               context_mask: Tensor | None = None) -> tuple[Tensor, list[Tensor]]:
        """The down path and the middle from the output of `conv_in`: the middle's output and the skips."""
        hs = [h]
        for i, level in enumerate(self.down):
            for res, attn, cross in zip(level.res, level.attn, level.cross):
                h = self._attend(attn, cross, res(h, emb), context, context_mask)
                hs.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
                hs.append(h)
        h = self.mid_res2(self._attend(self.mid_attn, self.mid_cross, self.mid_res1(h, emb), context, context_mask),
                          emb)
        return h, hs

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None, context: Tensor | None = None,
                context_mask: Tensor | None = None, residuals: tuple[list[Tensor], Tensor] | None = None) -> Tensor:
        """Predict eps for images `x` (B, C, H, W) at timesteps `t` (B,), labels `y` (B,) (null class allowed), and
        with `context_dim`, text tokens `context` (B, L, context_dim) under `context_mask` (B, L; True = real).
        `residuals` (one per skip, and the middle's) are added to the encoder's features (a ControlNet's,
        Zhang et al. 2023, eq. 4)."""
        emb = self.embedding(x, t, y, context, context_mask)
        h, hs = self.encode(self.conv_in(x), emb, context, context_mask)
        if residuals is not None:
            skip_res, mid_res = residuals
            hs = [s + r for s, r in zip(hs, skip_res, strict=True)]
            h = h + mid_res
        for i, level in enumerate(self.up):
            for res, attn, cross in zip(level.res, level.attn, level.cross):
                h = self._attend(attn, cross, res(torch.cat([h, hs.pop()], dim=1), emb), context, context_mask)
            if i < len(self.upsample):
                h = self.upsample[i](h, hs[-1].shape[-2:])
        return self.conv_out(F.silu(self.norm_out(h)))
