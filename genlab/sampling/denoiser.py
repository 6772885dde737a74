"""The denoiser every sampler calls, `D(x, sigma, cond) -> x0_hat`, and the wrappers that guide it.

The view is variance-exploding, `x = x0 + sigma * eps` (a variance-preserving `x_t` is `x / sqrt(1 + sigma^2)`),
as in Karras et al. 2022; the network and the sampler never know of each other.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

Denoiser = Callable[[Tensor, Tensor, Any], Tensor]


@runtime_checkable
class BatchedCondition(Protocol):
    """A condition a family defines beyond a tensor of labels (e.g. text token embeddings with their mask): a
    batch of `len(cond)` items that concatenates with another of its kind; guidance batches the conditional and
    null (or negative) halves with it, and never looks inside."""

    def __len__(self) -> int: ...

    def cat(self, other: Any) -> Any: ...


def cat_conditions(cond: Any, other: Any) -> Any:
    """One batch of two conditions of the same kind: label tensors concatenate, a `BatchedCondition` concatenates
    itself."""
    if isinstance(cond, Tensor):
        return torch.cat([cond, other])
    if isinstance(cond, BatchedCondition):
        return cond.cat(other)
    raise TypeError(f"cannot batch a condition of type {type(cond).__name__}")


def to_d(x: Tensor, sigma: Tensor, denoised: Tensor) -> Tensor:
    """dx/dsigma of the probability-flow ODE, i.e. the predicted eps (Karras et al. 2022, eq. 4 with s = 1)."""
    return (x - denoised) / sigma


def rescale_guidance(x: Tensor, sigma: Tensor, d_guided: Tensor, d_cond: Tensor, rescale: float) -> Tensor:
    """Guidance rescale: scale the guided eps to the per-image std of the conditional eps, mixed by `rescale`
    (Lin et al. 2024, eqs. 15-16, applied to eps as diffusers' rescale_noise_cfg)."""
    s = sigma.view(-1, *[1] * (x.ndim - 1))
    eps_guided, eps_cond = (x - d_guided) / s, (x - d_cond) / s
    dims = list(range(1, x.ndim))
    eps_rescaled = eps_guided * (eps_cond.std(dim=dims, keepdim=True) / eps_guided.std(dim=dims, keepdim=True))
    return x - s * (rescale * eps_rescaled + (1 - rescale) * eps_guided)


def classifier_free_guidance(denoiser: Denoiser, scale: float, null_cond: Any, rescale: float = 0.0) -> Denoiser:
    """D_null + scale * (D_cond - D_null), one batched call (Ho & Salimans 2022, eq. 6 with scale = 1 + w);
    `null_cond` is the null class or a negative condition, `rescale` > 0 applies guidance rescale."""
    def guided(x: Tensor, sigma: Tensor, cond: Any) -> Tensor:
        both = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), cat_conditions(cond, null_cond))
        d_cond, d_null = both.chunk(2)
        d_guided = d_null + scale * (d_cond - d_null)
        return rescale_guidance(x, sigma, d_guided, d_cond, rescale) if rescale else d_guided

    return guided
