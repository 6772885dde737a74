"""Diversity and memorization of samples: class shares and their KL to uniform, Stacked-MNIST mode counts, and the
share of samples closer to a training image than real held-out images are.

- KL(p || uniform) over K classes = sum_k p_k log(K p_k) (nats; 0 for a uniform p, log K for a single class);
- Stacked-MNIST modes (Metz et al. 2017, sec. 3.3.2): each channel classified by the MNIST classifier, the mode is
  100 d_R + 10 d_G + d_B; reported as the modes hit out of 1,000 and the KL of the mode histogram to uniform;
- memorization rate: the share of samples whose nearest training item is closer than the `quantile` (1%) of the
  test items' nearest-training-item distances (a real held-out image is that close only 1% of the time).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from genlab.data.stacked_mnist import NUM_MODES
from genlab.errors import GenlabError


def kl_to_uniform(counts: Tensor) -> float:
    """KL(p || U_K) in nats of the histogram `counts` over K bins (empty bins contribute 0)."""
    counts = torch.as_tensor(counts, dtype=torch.float64)
    total = counts.sum()
    if total <= 0:
        raise GenlabError("the KL to uniform needs at least one count")
    p = counts / total
    nz = p > 0
    return float((p[nz] * torch.log(p[nz] * len(p))).sum())


def class_shares(classes: Tensor, num_classes: int) -> dict[str, Any]:
    """The share of each predicted class and the KL of those shares to uniform."""
    counts = torch.bincount(torch.as_tensor(classes, dtype=torch.long), minlength=num_classes)[:num_classes]
    return {"class_shares": (counts.double() / max(1, len(classes))).tolist(), "class_kl": kl_to_uniform(counts)}


def stacked_mnist_modes(images: Tensor, classify: Callable[[Tensor], Tensor]) -> dict[str, Any]:
    """Modes of (N, 3, H, W) Stacked-MNIST samples: `classify` (the MNIST digit classifier, on (N, 1, H, W) images
    in [-1, 1]) labels each channel; returns the modes hit (of 1,000), the mode histogram's KL to uniform, n."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise GenlabError(f"Stacked-MNIST samples are (N, 3, H, W), got {tuple(images.shape)}")
    digits = torch.stack([torch.as_tensor(classify(images[:, c : c + 1])).long() for c in range(3)], dim=1)
    modes = 100 * digits[:, 0] + 10 * digits[:, 1] + digits[:, 2]
    counts = torch.bincount(modes, minlength=NUM_MODES)
    return {"modes": int((counts > 0).sum()), "modes_kl": kl_to_uniform(counts), "modes_n": len(images)}


def nearest_distances(queries: Tensor, keys: Tensor, chunk: int = 1024) -> Tensor:
    """Euclidean distance from each query row to its nearest key row (flattened), in float64 chunks."""
    q, k = queries.flatten(1).double(), keys.flatten(1).double()
    return torch.cat([torch.cdist(q[i : i + chunk], k).min(1).values for i in range(0, len(q), chunk)])


def memorization_rate(samples: Tensor, train: Tensor, test: Tensor, quantile: float = 0.01) -> dict[str, float]:
    """The share of samples nearer to a training item than the `quantile` of test-to-train nearest distances."""
    if not 0 < quantile < 1:
        raise GenlabError(f"quantile must be in (0, 1), got {quantile}")
    threshold = float(torch.quantile(nearest_distances(test, train), quantile))
    d = nearest_distances(samples, train)
    return {"memorization": float((d < threshold).double().mean()), "memorization_threshold": threshold}
