"""ControlNet (Zhang et al. 2023): a trainable copy of a U-Net's encoder (down path + middle) that reads a control
image through a small hint encoder and feeds the frozen U-Net one residual per skip and one for the middle, each
through a zero-initialised 1x1 convolution, so that at initialisation the base model's output is unchanged
(sec. 3.1, eqs. 1-2); the Sobel edge map the edge control is made of, and the box layout of the layout control."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genlab.nn.unet import UNet

SOBEL_X = ((-1.0, 0.0, 1.0), (-2.0, 0.0, 2.0), (-1.0, 0.0, 1.0))


def zero_conv(channels: int) -> nn.Conv2d:
    """A 1x1 convolution with weight and bias at zero (Zhang et al. 2023, eq. 2: Z(.; Theta_z))."""
    conv = nn.Conv2d(channels, channels, 1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


def sobel_gradient(images: Tensor) -> Tensor:
    """(d/dx, d/dy) of the grey level of images (B, C, H, W) in [-1, 1], grey mapped to [0, 1], by the 3x3 Sobel
    filters (replicate padding): (B, 2, H, W)."""
    grey = (images.float().mean(dim=1, keepdim=True) + 1.0) / 2.0
    kx = torch.tensor(SOBEL_X, dtype=grey.dtype, device=grey.device)
    kernels = torch.stack([kx, kx.T])[:, None]  # (2, 1, 3, 3): d/dx, d/dy
    return F.conv2d(F.pad(grey, (1, 1, 1, 1), mode="replicate"), kernels)


def sobel_magnitude(images: Tensor) -> Tensor:
    """|grad| of the grey level (`sobel_gradient`): (B, 1, H, W), at most 4 * sqrt(2)."""
    return sobel_gradient(images).pow(2).sum(dim=1, keepdim=True).sqrt()


def thin_edges(images: Tensor, threshold: float = 1.0) -> Tensor:
    """Sobel edges thinned by non-maximum suppression (Canny 1986): a pixel stays where its magnitude exceeds
    `threshold` and is at least both neighbours' along the gradient direction (quantised to 0, 45, 90, 135 degrees;
    outside the image counts as 0): (B, 1, H, W) in {0, 1}."""
    g = sobel_gradient(images)
    mag = g.pow(2).sum(dim=1, keepdim=True).sqrt()
    angle = torch.rad2deg(torch.atan2(g[:, 1:], g[:, :1])) % 180.0
    sector = ((angle + 22.5) // 45.0).long() % 4  # 0: along x, 1: 45 degrees, 2: along y, 3: 135 degrees
    padded = F.pad(mag, (1, 1, 1, 1))
    H, W = mag.shape[-2:]

    def shifted(di: int, dj: int) -> Tensor:
        return padded[..., 1 + di : 1 + di + H, 1 + dj : 1 + dj + W]

    keep = torch.zeros_like(mag, dtype=torch.bool)
    for k, (di, dj) in enumerate(((0, 1), (1, 1), (1, 0), (1, -1))):  # (row, column) steps; y grows downwards
        local_max = (mag >= shifted(di, dj)) & (mag >= shifted(-di, -dj))
        keep |= (sector == k) & local_max
    return (keep & (mag > threshold)).float()


def sobel_edges(images: Tensor, threshold: float = 1.0) -> Tensor:
    """The edge map of images (B, C, H, W) in [-1, 1]: 1 where the Sobel gradient magnitude exceeds `threshold`,
    else 0, as (B, 1, H, W) floats (the edge control; Zhang et al. 2023 use Canny, sec. 4)."""
    return (sobel_magnitude(images) > threshold).float()


def box_layout(boxes: Sequence[Sequence[float]], image_size: int) -> Tensor:
    """The layout control of boxes (x0, y0, x1, y1) in continuous pixel coordinates (pixel (i, j) spans
    [j, j + 1) x [i, i + 1), as `shapes` renders): 1 at every pixel a box overlaps, else 0, as (1, H, W) floats, so
    that each object lies inside its mask (a layout of filled boxes, as Zhang et al. 2023 condition on
    segmentation maps, sec. 4)."""
    lo = torch.arange(image_size, dtype=torch.float64)
    out = torch.zeros(image_size, image_size, dtype=torch.bool)
    for x0, y0, x1, y1 in boxes:
        cols = (lo + 1 > x0) & (lo < x1)
        rows = (lo + 1 > y0) & (lo < y1)
        out |= rows[:, None] & cols[None, :]
    return out.float()[None]


class HintEncoder(nn.Module):
    """The control image to base_channels features at full resolution, its last convolution zero-initialised
    (Zhang et al. 2023, sec. 3.2: the tiny network E(.) whose output is added after the copy's conv_in)."""

    def __init__(self, control_channels: int, channels: int, hidden: int = 16) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(control_channels, hidden, 3, padding=1), nn.SiLU(),
                                  nn.Conv2d(hidden, hidden, 3, padding=1), nn.SiLU())
        self.out = nn.Conv2d(hidden, channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, control: Tensor) -> Tensor:
        return self.out(self.body(control))


class ControlNet(nn.Module):
    """A trainable copy of `unet`'s timestep/label embeddings, conv_in, down path and middle (initialised from its
    weights), a hint encoder and zero convolutions; `forward` gives the residuals `UNet.forward(residuals=...)`
    adds: y_c = F(x; Theta) + Z(F(x + Z(c; Theta_z1); Theta_c); Theta_z2) (Zhang et al. 2023, eq. 2)."""

    def __init__(self, unet: UNet, control_channels: int = 1) -> None:
        super().__init__()
        self.encoder = copy.deepcopy(unet)
        for name in ("up", "upsample", "norm_out", "conv_out"):  # the decoder stays in the frozen base only
            delattr(self.encoder, name)
        self.encoder.requires_grad_(True)
        self.hint = HintEncoder(control_channels, unet.conv_in.out_channels)
        self.zero_convs = nn.ModuleList(zero_conv(c) for c in self.skip_channels(unet))
        self.mid_zero_conv = zero_conv(unet.mid_res2.conv2.out_channels)

    @staticmethod
    def skip_channels(unet: UNet) -> list[int]:
        """The channels of each skip the encoder keeps (conv_in, every ResNet block, every downsample)."""
        chans = [unet.conv_in.out_channels]
        for i, level in enumerate(unet.down):
            chans += [res.conv2.out_channels for res in level.res]
            if i < len(unet.downsample):
                chans.append(unet.downsample[i].conv.out_channels)
        return chans

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None, control: Tensor, context: Tensor | None = None,
                context_mask: Tensor | None = None) -> tuple[list[Tensor], Tensor]:
        """Residuals for the skips and the middle from noisy `x`, timesteps `t`, labels `y` and `control`
        (B, control_channels, H, W)."""
        enc = self.encoder
        emb = enc.embedding(x, t, y, context, context_mask)
        h, hs = enc.encode(enc.conv_in(x) + self.hint(control), emb, context, context_mask)
        return [z(s) for z, s in zip(self.zero_convs, hs, strict=True)], self.mid_zero_conv(h)


def combine_residuals(parts: list[tuple[list[Tensor], Tensor]], scales: list[float]) -> tuple[list[Tensor], Tensor]:
    """sum_k scale_k * residuals_k over several controls (diffusers' MultiControlNet with conditioning scales)."""
    skips = [sum(s * p[0][i] for p, s in zip(parts, scales)) for i in range(len(parts[0][0]))]
    return skips, sum(s * p[1] for p, s in zip(parts, scales))
