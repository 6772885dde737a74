"""Per-pixel likelihoods of 8-bit images in [-1, 1] (level k -> k / 127.5 - 1, bins of width 2 / 255)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from genlab.data.images import DELTA


def to_pixel_levels(x: Tensor) -> Tensor:
    """x in [-1, 1] (or a point inside a level's bin, e.g. dequantized) -> the centre of its 8-bit level."""
    return ((x + 1.0) / DELTA).round().clamp(0, 255) * DELTA - 1.0


def discretized_logistic_log_prob(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """log P(x) per element for x on the 8-bit levels: the mass of a logistic(mean, exp(log_scale)) over the bin
    [x - 1/255, x + 1/255], with the bin of level 0 open to -inf and that of level 255 open to +inf, so the 256
    masses sum to 1 (Salimans et al. 2017, PixelCNN++, eq. 2).

    With a = (x + 1/255 - mean) / s and b = (x - 1/255 - mean) / s, sigmoid(a) - sigmoid(b) is computed as
    sigmoid(a) sigmoid(-b) (1 - exp(b - a)) in log space, which is stable in both tails."""
    inv_s = torch.exp(-log_scale)
    a = (x - mean + DELTA / 2) * inv_s
    b = (x - mean - DELTA / 2) * inv_s
    log_cdf_a = F.logsigmoid(a)  # level 0: P(X <= x + 1/255)
    log_sf_b = F.logsigmoid(-b)  # level 255: P(X > x - 1/255)
    log_mid = log_cdf_a + log_sf_b + torch.log(-torch.expm1(b - a))
    lowest, highest = x < -1.0 + DELTA / 2, x > 1.0 - DELTA / 2
    return torch.where(lowest, log_cdf_a, torch.where(highest, log_sf_b, log_mid))
