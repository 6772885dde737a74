"""Noise draws for samplers: per-image generators, and noise samplers `(sigma, sigma_next) -> Tensor`.

A sampler takes its stochastic steps' noise from a noise sampler, so a caller can replay exact draws, give each
image its own generator, or drive the SDE solvers with one Brownian path.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

NoiseSampler = Callable[[Tensor, Tensor], Tensor]
Generators = torch.Generator | list[torch.Generator] | None


def randn(shape: tuple[int, ...], generator: Generators = None, device: torch.device | str = "cpu",
          dtype: torch.dtype = torch.float32) -> Tensor:
    """Standard normal draws; with a list of generators, item i comes from generator i alone (per-image seeds)."""
    if isinstance(generator, list):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
        draws = [torch.randn(shape[1:], generator=g, device=g.device, dtype=dtype) for g in generator]
        return torch.stack(draws).to(device)
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device, dtype=dtype).to(device)


def default_noise_sampler(x: Tensor, generator: Generators = None) -> NoiseSampler:
    """Fresh standard normal noise shaped like `x` at every call."""
    def sample(sigma: Tensor, sigma_next: Tensor) -> Tensor:
        return randn(tuple(x.shape), generator, x.device, x.dtype)

    return sample


class BrownianNoiseSampler:
    """Increments of one Brownian path W(sigma), normalised: (W(s1) - W(s0)) / sqrt(|s1 - s0|).

    Points are drawn lazily; a point between two known ones comes from the Brownian bridge, so
    sub-steps (dpmpp_sde's midpoints) stay consistent with whole steps (Kidger et al. 2021, the
    Brownian-interval idea behind k-diffusion's BrownianTreeNoiseSampler).
    """

    def __init__(self, x: Tensor, generator: Generators = None) -> None:
        self.shape, self.device, self.dtype, self.generator = tuple(x.shape), x.device, x.dtype, generator
        self.points: dict[float, Tensor] = {0.0: torch.zeros(self.shape, device=x.device, dtype=x.dtype)}

    def _z(self) -> Tensor:
        return randn(self.shape, self.generator, self.device, self.dtype)

    def w(self, t: float) -> Tensor:
        """W(t): known, bridged between the nearest known points, or extended beyond the largest."""
        if t in self.points:
            return self.points[t]
        below = max((s for s in self.points if s < t), default=None)
        above = min((s for s in self.points if s > t), default=None)
        if above is None:
            value = self.points[below] + math.sqrt(t - below) * self._z()
        else:
            lo = below if below is not None else 0.0
            frac = (t - lo) / (above - lo)
            mean = self.points[lo] + frac * (self.points[above] - self.points[lo])
            value = mean + math.sqrt((t - lo) * (above - t) / (above - lo)) * self._z()
        self.points[t] = value
        return value

    def __call__(self, sigma: Tensor, sigma_next: Tensor) -> Tensor:
        t0, t1 = float(sigma), float(sigma_next)
        return (self.w(t1) - self.w(t0)) / math.sqrt(abs(t1 - t0))
