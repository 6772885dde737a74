"""Edge agreement between a control's edge map and a generated image's (the measure of Zhang et al. 2023, sec. 4.3,
as F1 of edge pixels): precision = share of the output's edge pixels within `tolerance` pixels (Chebyshev) of a
control edge, recall = share of the control's edge pixels within `tolerance` of an output edge, F1 their harmonic
mean."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _dilate(edges: Tensor, tolerance: int) -> Tensor:
    """Binary dilation of (B, 1, H, W) maps by a (2 tolerance + 1)^2 square."""
    if tolerance == 0:
        return edges
    return F.max_pool2d(edges, 2 * tolerance + 1, stride=1, padding=tolerance)


def edge_f1(output_edges: Tensor, control_edges: Tensor, tolerance: int = 1) -> Tensor:
    """Per-image F1 (B,) of binary edge maps (B, 1, H, W); an image where both maps are empty scores 1, one where
    only one is empty scores 0."""
    out, ctl = (output_edges > 0.5).float(), (control_edges > 0.5).float()
    dims = (1, 2, 3)
    n_out, n_ctl = out.sum(dims), ctl.sum(dims)
    precision = (out * _dilate(ctl, tolerance)).sum(dims) / n_out.clamp(min=1)
    recall = (ctl * _dilate(out, tolerance)).sum(dims) / n_ctl.clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    both_empty = (n_out == 0) & (n_ctl == 0)
    return torch.where(both_empty, torch.ones_like(f1), f1)
