"""Noise schedules of discrete-time diffusion: betas, alpha_bar, and the matching sigmas of the
variance-exploding view x = x0 + sigma * eps (Karras et al. 2022, sec. 2 and app. C.1)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from genlab.errors import GenlabError

SPACINGS = ("leading", "trailing", "linspace")


BETA_SCHEDULES = ("linear", "cosine", "sigmoid")
# alpha_bar at the last step of a zero-terminal-SNR schedule: 0 would make sigma infinite in the x = x0 + sigma * eps
# view the samplers walk, so it is clamped here (as ComfyUI does); sigma_max is then ~4519
ZERO_SNR_ALPHA_BAR = 4.8973451890853435e-08


def make_betas(schedule: str, timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """Per-step betas (float64): "linear" (Ho et al. 2020, sec. 4), "cosine" (Nichol & Dhariwal 2021, eq. 17) or
    "sigmoid", beta_start + (beta_end - beta_start) * sigmoid(linspace(-6, 6)) (Xu et al. 2022, GeoDiff app.)."""
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)
    if schedule == "sigmoid":
        ramp = torch.sigmoid(torch.linspace(-6, 6, timesteps, dtype=torch.float64))
        return beta_start + (beta_end - beta_start) * ramp
    if schedule == "cosine":
        def f(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = [min(1 - f((i + 1) / timesteps) / f(i / timesteps), 0.999) for i in range(timesteps)]
        return torch.tensor(betas, dtype=torch.float64)
    raise GenlabError(f"unknown noise schedule {schedule!r}; choose one of: {', '.join(BETA_SCHEDULES)}")


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Betas whose sqrt(alpha_bar) is shifted to end at 0 and rescaled to keep its first value, so the last step
    has zero SNR (Lin et al. 2024, alg. 1)."""
    sqrt_alpha_bar = alpha_bar_from_betas(betas).sqrt()
    first, last = sqrt_alpha_bar[0].clone(), sqrt_alpha_bar[-1].clone()
    sqrt_alpha_bar = (sqrt_alpha_bar - last) * first / (first - last)
    alpha_bar = sqrt_alpha_bar**2
    return 1 - torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])


def alpha_bar_from_betas(betas: Tensor) -> Tensor:
    """alpha_bar_t = prod_{s<=t} (1 - beta_s) (Ho et al. 2020, eq. 4)."""
    return torch.cumprod(1 - betas, dim=0)


def sigma_from_alpha_bar(alpha_bar: Tensor) -> Tensor:
    """sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t), so that x_t / sqrt(alpha_bar_t) = x0 + sigma_t * eps."""
    return ((1 - alpha_bar) / alpha_bar).sqrt()


def alpha_bar_from_sigma(sigma: Tensor) -> Tensor:
    """The inverse of `sigma_from_alpha_bar`: alpha_bar = 1 / (1 + sigma^2)."""
    return 1 / (1 + sigma**2)


def spaced_timesteps(num_train_timesteps: int, steps: int, spacing: str = "leading") -> Tensor:
    """Descending integer timesteps for a `steps`-step sampler, spaced as diffusers does
    ("leading", "trailing", "linspace"; Lin et al. 2024, table 2)."""
    if not 1 <= steps <= num_train_timesteps:
        raise GenlabError(f"steps={steps} is out of range; use 1..{num_train_timesteps}")
    T = num_train_timesteps
    if spacing == "leading":
        t = torch.arange(steps, dtype=torch.float64) * (T // steps)
    elif spacing == "trailing":
        t = torch.arange(T, 0, -T / steps, dtype=torch.float64).round().flip(0) - 1
    elif spacing == "linspace":
        t = torch.linspace(0, T - 1, steps, dtype=torch.float64).round()
    else:
        raise GenlabError(f"unknown timestep spacing {spacing!r}; choose one of: {', '.join(SPACINGS)}")
    return t.long().flip(0)


def sigmas_for_timesteps(sigmas_train: Tensor, timesteps: Tensor) -> Tensor:
    """The sigmas a sampler walks through: sigma at each timestep, then a final 0 (the clean image)."""
    return torch.cat([sigmas_train[timesteps], sigmas_train.new_zeros(1)])


def sigma_to_t(sigma: Tensor, sigmas_train: Tensor, quantize: bool = True) -> Tensor:
    """The training timestep whose sigma is nearest to `sigma` in log space (k-diffusion's quantized lookup);
    with quantize=False the fractional timestep, linear in log sigma between neighbours (as diffusers'
    `_sigma_to_t` and k-diffusion's DiscreteSchedule)."""
    if quantize:
        dists = (sigma.double().log()[..., None] - sigmas_train.to(sigma.device).log()).abs()
        return dists.argmin(dim=-1)
    log_sigmas = sigmas_train.to(sigma.device).double().log()
    log_sigma = sigma.double().clamp(min=1e-10).log()
    low_idx = ((log_sigma[..., None] - log_sigmas) >= 0).cumsum(dim=-1).argmax(dim=-1).clamp(max=len(log_sigmas) - 2)
    low, high = log_sigmas[low_idx], log_sigmas[low_idx + 1]
    w = ((low - log_sigma) / (low - high)).clamp(0, 1)
    return ((1 - w) * low_idx + w * (low_idx + 1)).to(sigma.dtype)


def t_to_sigma(t: Tensor, sigmas_train: Tensor) -> Tensor:
    """sigma at a fractional timestep, interpolating log sigma linearly (k-diffusion's DiscreteSchedule.t_to_sigma)."""
    log_sigmas = sigmas_train.double().log()
    t = t.double()
    low_idx, high_idx = t.floor().long(), t.ceil().long()
    w = t - low_idx
    return ((1 - w) * log_sigmas[low_idx] + w * log_sigmas[high_idx]).exp()


SCHEDULES = ("karras", "exponential", "uniform", "trailing", "leading", "linspace")


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, then 0
    (Karras et al. 2022, eq. 5)."""
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return torch.cat([(max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho, torch.zeros(1, dtype=torch.float64)])


def exponential_sigmas(steps: int, sigma_min: float, sigma_max: float) -> Tensor:
    """sigmas evenly spaced in log sigma from sigma_max to sigma_min, then 0 (k-diffusion's get_sigmas_exponential)."""
    sigmas = torch.linspace(math.log(sigma_max), math.log(sigma_min), steps, dtype=torch.float64).exp()
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])


def uniform_sigmas(steps: int, sigmas_train: Tensor) -> Tensor:
    """sigmas at timesteps evenly spaced in continuous t from T-1 to 0, then 0 (k-diffusion's
    DiscreteSchedule.get_sigmas, A1111's "Uniform")."""
    t = torch.linspace(len(sigmas_train) - 1, 0, steps, dtype=torch.float64, device=sigmas_train.device)
    return torch.cat([t_to_sigma(t, sigmas_train), torch.zeros(1, dtype=torch.float64)])


def get_sigmas(schedule: str, sigmas_train: Tensor, steps: int, rho: float = 7.0) -> Tensor:
    """The descending sigmas (ending in 0) of a `steps`-step sampler: a continuous schedule over the training
    range ("karras", "exponential", "uniform") or a timestep spacing ("trailing", "leading", "linspace")."""
    if steps < 1:
        raise GenlabError(f"steps={steps} must be at least 1")
    sigma_min, sigma_max = float(sigmas_train[0]), float(sigmas_train[-1])
    if schedule == "karras":
        sigmas = karras_sigmas(steps, sigma_min, sigma_max, rho)
    elif schedule == "exponential":
        sigmas = exponential_sigmas(steps, sigma_min, sigma_max)
    elif schedule == "uniform":
        sigmas = uniform_sigmas(steps, sigmas_train)
    elif schedule in SPACINGS:
        return sigmas_for_timesteps(sigmas_train, spaced_timesteps(len(sigmas_train), steps, schedule))
    else:
        raise GenlabError(f"unknown sigma schedule {schedule!r}; choose one of: {', '.join(SCHEDULES)}")
    return sigmas.to(sigmas_train.device, sigmas_train.dtype)


FLOW_SIGMA_MAX = 2.0**24  # a flow's t = 1 (pure noise) in the VE view: t = sigma / (1 + sigma) rounds to 1 in float32


def time_shift(t: Tensor, shift: float) -> Tensor:
    """t' = shift t / (1 + (shift - 1) t), which moves steps toward t = 1 for shift > 1 (Esser et al. 2024,
    sec. 5.3.2, eq. 23 with shift = sqrt(m / n))."""
    return shift * t / (1 + (shift - 1) * t)


def flow_sigmas(steps: int, timesteps: int, shift: float = 1.0) -> Tensor:
    """The sigmas (ending in 0) of diffusers' FlowMatchEulerDiscreteScheduler as a VE schedule: t evenly spaced
    from 1 to shift(1 / T), shifted (so its last step is shifted twice, as diffusers does), sigma = t / (1 - t)
    with t = 1 at FLOW_SIGMA_MAX."""
    if steps < 1:
        raise GenlabError(f"steps={steps} must be at least 1")
    t_min = time_shift(torch.tensor(1 / timesteps, dtype=torch.float64), shift)
    t = time_shift(torch.linspace(1.0, float(t_min), steps, dtype=torch.float64), shift)
    sigmas = (t / (1 - t)).clamp(max=FLOW_SIGMA_MAX)
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])
