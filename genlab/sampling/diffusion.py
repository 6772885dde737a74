"""Diffusion samplers as pure functions over a denoiser, k-diffusion style (Karras et al. 2022).

A denoiser is `D(x, sigma, cond) -> x0_hat` for the variance-exploding view `x = x0 + sigma * eps`
(a variance-preserving `x_t` is `x / sqrt(1 + sigma^2)`). A sampler walks `x` through `sigmas`
(descending, ending in 0) and never sees the network. Noise for ancestral steps comes from
`noise_sampler(sigma, sigma_next) -> Tensor`, so a caller can replay exact draws.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from genlab.registry import SAMPLERS

Denoiser = Callable[[Tensor, Tensor, Any], Tensor]
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
        both = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([cond, null_cond]))
        d_cond, d_null = both.chunk(2)
        d_guided = d_null + scale * (d_cond - d_null)
        return rescale_guidance(x, sigma, d_guided, d_cond, rescale) if rescale else d_guided

    return guided


@SAMPLERS.register("ddim")
@torch.no_grad()
def sample_ddim(denoiser: Denoiser, x: Tensor, sigmas: Tensor, cond: Any = None, eta: float = 0.0,
                noise_sampler: NoiseSampler | None = None, callback: Callable[[dict], None] | None = None,
                progress: bool = False) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12) in sigma form; eta = 0 is deterministic (Euler on the ODE), eta = 1 is DDPM.

    With sigma_up = eta * sigma_next * sqrt(1 - sigma_next^2 / sigma^2) (eq. 16), a step is
    x_next = x0_hat + sqrt(sigma_next^2 - sigma_up^2) * eps_hat + sigma_up * z.
    """
    noise_sampler = noise_sampler or default_noise_sampler(x)
    s_in = x.new_ones(x.shape[0])
    for i in tqdm(range(len(sigmas) - 1), disable=not progress, desc="ddim"):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma * s_in, cond)
        if callback is not None:
            callback({"i": i, "x": x, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        eps = to_d(x, sigma, denoised)
        sigma_up = eta * sigma_next * (1 - sigma_next**2 / sigma**2).clamp(min=0).sqrt()
        x = denoised + (sigma_next**2 - sigma_up**2).sqrt() * eps
        if eta > 0 and sigma_next > 0:
            x = x + sigma_up * noise_sampler(sigma, sigma_next)
    return x


@SAMPLERS.register("ddpm")
@torch.no_grad()
def sample_ddpm(denoiser: Denoiser, x: Tensor, sigmas: Tensor, cond: Any = None,
                noise_sampler: NoiseSampler | None = None, callback: Callable[[dict], None] | None = None,
                progress: bool = False) -> Tensor:
    """Ancestral DDPM (Ho et al. 2020, alg. 2): draw from the posterior q(x_prev | x, x0_hat) (eqs. 6-7).

    In sigma form the posterior is N(x0_hat + (sigma_next / sigma)^2 (x - x0_hat),
    sigma_next^2 (1 - sigma_next^2 / sigma^2)), the "fixed small" variance beta_tilde.
    """
    noise_sampler = noise_sampler or default_noise_sampler(x)
    s_in = x.new_ones(x.shape[0])
    for i in tqdm(range(len(sigmas) - 1), disable=not progress, desc="ddpm"):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma * s_in, cond)
        if callback is not None:
            callback({"i": i, "x": x, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        ratio = sigma_next**2 / sigma**2
        x = denoised + ratio * (x - denoised)
        if sigma_next > 0:
            x = x + sigma_next * (1 - ratio).sqrt() * noise_sampler(sigma, sigma_next)
    return x
