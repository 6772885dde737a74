"""Invertible layers of normalizing flows over images (B, C, H, W).

`forward(x) -> (y, logdet)` with logdet = log |det dy/dx| per item (B,), and `inverse(y) -> x`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ActNorm(nn.Module):
    """y = (x + bias) * exp(logs) per channel; log|det| = H W sum(logs) (Kingma & Dhariwal 2018, sec. 3.1, table 1).

    Data-dependent initialization: the first batch seen by `forward` (or given to `initialize`) sets bias and logs
    so that its output has zero mean and unit variance per channel. The `initialized` buffer is saved with the
    weights, so a resumed run or a loaded model folder never initializes again. The log-scale is stored divided by
    `logscale_factor` (3 in Glow's code), so it learns that many times faster.
    """

    def __init__(self, channels: int, eps: float = 1e-6, logscale_factor: float = 3.0) -> None:
        super().__init__()
        self.eps = eps
        self.logscale_factor = logscale_factor
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.logs_scaled = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        """bias = -mean, logs = -log(std) per channel of `x`."""
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        std = x.std(dim=(0, 2, 3), keepdim=True, unbiased=False)
        self.bias.copy_(-mean)
        self.logs_scaled.copy_(-torch.log(std + self.eps) / self.logscale_factor)
        self.initialized.fill_(True)

    @property
    def logs(self) -> Tensor:
        """The per-channel log-scale (1, C, 1, 1)."""
        return self.logs_scaled * self.logscale_factor

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if not bool(self.initialized):
            self.initialize(x)
        y = (x + self.bias) * torch.exp(self.logs)
        logdet = x.shape[2] * x.shape[3] * self.logs.sum()
        return y, logdet.expand(x.shape[0])

    def inverse(self, y: Tensor) -> Tensor:
        return y * torch.exp(-self.logs) - self.bias


class InvConv1x1(nn.Module):
    """An invertible 1x1 convolution with W = P L (U + diag(sign(s) exp(log|s|))): P a fixed permutation, L unit
    lower-triangular, U strictly upper-triangular; log|det| = H W sum(log|s|) (Kingma & Dhariwal 2018, sec. 3.2,
    eq. 10). Initialized from a random rotation."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        w = torch.linalg.qr(torch.randn(channels, channels))[0]
        perm, lower, upper = torch.linalg.lu(w)
        s = torch.diagonal(upper)
        self.register_buffer("perm", perm)
        self.register_buffer("sign_s", torch.sign(s))
        self.lower = nn.Parameter(torch.tril(lower, -1))
        self.upper = nn.Parameter(torch.triu(upper, 1))
        self.log_s = nn.Parameter(torch.log(s.abs()))

    def weight(self) -> Tensor:
        """W (C_out, C_in) from its LU factors."""
        eye = torch.eye(self.log_s.shape[0], dtype=self.log_s.dtype, device=self.log_s.device)
        lower = torch.tril(self.lower, -1) + eye
        upper = torch.triu(self.upper, 1) + torch.diag(self.sign_s * torch.exp(self.log_s))
        return self.perm @ lower @ upper

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        y = F.conv2d(x, self.weight()[:, :, None, None])
        logdet = x.shape[2] * x.shape[3] * self.log_s.sum()
        return y, logdet.expand(x.shape[0])

    def inverse(self, y: Tensor) -> Tensor:
        return F.conv2d(y, torch.linalg.inv(self.weight())[:, :, None, None])


class ZeroConv2d(nn.Conv2d):
    """A 3x3 convolution initialized to zero, so a coupling or prior starts as the identity / N(0, I)
    (Kingma & Dhariwal 2018, sec. 3.3)."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__(in_ch, out_ch, 3, padding=1)
        nn.init.zeros_(self.weight)
        nn.init.zeros_(self.bias)


def checkerboard_mask(channels: int, size: int, parity: int) -> Tensor:
    """(1, C, size, size) with 1 where (i + j + parity) is even: the spatial mask of Dinh et al. 2017, fig. 3 left."""
    i, j = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return ((i + j + parity) % 2 == 0).float().expand(1, channels, size, size).clone()


def channel_mask(channels: int, parity: int) -> Tensor:
    """(1, C, 1, 1) with 1 on the first half of the channels (parity 0) or the second (parity 1): the channel-wise
    mask of Dinh et al. 2017, fig. 3 right (Glow's split, Kingma & Dhariwal 2018, table 1)."""
    half = torch.arange(channels) < channels // 2
    return (half if parity == 0 else ~half).float().view(1, channels, 1, 1)


class AffineCoupling(nn.Module):
    """y = b x + (1 - b) (x exp(log_s) + t) with (log_s, t) = NN(b x); log|det| = sum (1 - b) log_s
    (Dinh et al. 2017, eq. 7-9). The log-scale is bounded: log_s = scale * tanh(h) (RealNVP) or
    log_s = log sigmoid(h + 2) (Glow's stable scale, Kingma & Dhariwal 2018, table 1 and its code).

    NN is Glow's coupling network: 3x3 conv, ReLU, 1x1 conv, ReLU, zero-initialized 3x3 conv (so each coupling
    starts near the identity)."""

    def __init__(self, channels: int, hidden: int, mask: Tensor, scale: str) -> None:
        super().__init__()
        if scale not in ("tanh", "sigmoid"):
            raise ValueError(f"scale={scale!r}: use tanh or sigmoid")
        self.scale = scale
        self.register_buffer("mask", mask, persistent=False)
        self.net = nn.Sequential(nn.Conv2d(channels, hidden, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(hidden, hidden, 1), nn.ReLU(), ZeroConv2d(hidden, 2 * channels))
        if scale == "tanh":
            self.log_scale_max = nn.Parameter(torch.ones(1, channels, 1, 1))

    def _log_s_t(self, x_kept: Tensor) -> tuple[Tensor, Tensor]:
        h, t = self.net(x_kept).chunk(2, dim=1)
        log_s = self.log_scale_max * torch.tanh(h) if self.scale == "tanh" else F.logsigmoid(h + 2.0)
        free = 1.0 - self.mask
        return log_s * free, t * free

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        log_s, t = self._log_s_t(x * self.mask)
        return x * torch.exp(log_s) + t, log_s.flatten(1).sum(1)

    def inverse(self, y: Tensor) -> Tensor:
        log_s, t = self._log_s_t(y * self.mask)
        return (y - t) * torch.exp(-log_s)


class Squeeze(nn.Module):
    """(C, H, W) -> (4C, H/2, W/2), each 2x2 block to channels (Dinh et al. 2017, sec. 3.6); log|det| = 0."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return F.pixel_unshuffle(x, 2), x.new_zeros(x.shape[0])

    def inverse(self, y: Tensor) -> Tensor:
        return F.pixel_shuffle(y, 2)
