"""Prediction targets and preconditionings: every network output F becomes the same denoiser
D(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma)) (Karras et al. 2022, eq. 7, table 1),
in the variance-exploding view x = x0 + sigma * eps that the samplers walk.

A discrete VP model sees x_t = x / sqrt(1 + sigma^2) (alpha_t = 1 / sqrt(1 + sigma^2), sigma_t^VP = sigma alpha_t)
and predicts eps, v = alpha_t eps - sigma_t^VP x0 (Salimans & Ho 2022, sec. 4) or x0; EDM's preconditioning
(Karras et al. 2022, sec. 5) scales a network that takes continuous c_noise = ln(sigma) / 4.
"""

from __future__ import annotations

import torch
from torch import Tensor

from genlab.errors import GenlabError

PREDICTIONS = ("eps", "v", "x0")
PRECONDITIONINGS = ("vp", "edm")
FLOW_T_SAMPLINGS = ("uniform", "logit_normal")


def _view(sigma: Tensor, like: Tensor) -> Tensor:
    return sigma.to(like.dtype).view(-1, *[1] * (like.ndim - 1))


def vp_scalings(sigma: Tensor, prediction: str) -> tuple[Tensor, Tensor, Tensor]:
    """(c_skip, c_out, c_in) of a VP network predicting eps, v or x0 (Karras et al. 2022, table 1 "VP" column;
    k-diffusion's VDenoiser for v): D = x - sigma eps, x / (1 + sigma^2) - sigma / sqrt(1 + sigma^2) v, or x0."""
    c_in = (1 + sigma**2).rsqrt()
    if prediction == "eps":
        return torch.ones_like(sigma), -sigma, c_in
    if prediction == "v":
        return c_in**2, -sigma * c_in, c_in
    if prediction == "x0":
        return torch.zeros_like(sigma), torch.ones_like(sigma), c_in
    raise GenlabError(f"unknown prediction {prediction!r}; choose one of: {', '.join(PREDICTIONS)}")


def edm_scalings(sigma: Tensor, sigma_data: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(c_skip, c_out, c_in, c_noise) of EDM's preconditioning (Karras et al. 2022, table 1):
    sigma_data^2 / (sigma^2 + sigma_data^2), sigma sigma_data / sqrt(sigma^2 + sigma_data^2),
    1 / sqrt(sigma^2 + sigma_data^2), ln(sigma) / 4."""
    total = sigma**2 + sigma_data**2
    return sigma_data**2 / total, sigma * sigma_data * total.rsqrt(), total.rsqrt(), sigma.log() / 4


def denoised(x: Tensor, out: Tensor, c_skip: Tensor, c_out: Tensor) -> Tensor:
    """D(x, sigma) = c_skip x + c_out F (Karras et al. 2022, eq. 7), the scalings given per batch item."""
    return _view(c_skip, x) * x + _view(c_out, x) * out


def vp_target(x0: Tensor, eps: Tensor, sigma: Tensor, prediction: str) -> Tensor:
    """What a VP network learns to output for x = x0 + sigma eps: eps, v = alpha eps - sigma^VP x0
    (Salimans & Ho 2022, sec. 4) or x0."""
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    if prediction == "v":
        alpha = _view((1 + sigma**2).rsqrt(), x0)
        return alpha * eps - _view(sigma, x0) * alpha * x0
    raise GenlabError(f"unknown prediction {prediction!r}; choose one of: {', '.join(PREDICTIONS)}")


def min_snr_weight(sigma: Tensor, gamma: float, prediction: str) -> Tensor:
    """Min-SNR-gamma loss weight of an eps, v or x0 target: min(SNR, gamma) / SNR, min(SNR, gamma) / (SNR + 1)
    or min(SNR, gamma), with SNR = alpha_bar / (1 - alpha_bar) = 1 / sigma^2 (Hang et al. 2023, eq. 9 and sec. 3.4),
    so that each equals min(SNR, gamma) ||x0_hat - x0||^2."""
    snr = sigma.double() ** -2
    clipped = snr.clamp(max=gamma)
    if prediction == "eps":
        weight = clipped / snr
    elif prediction == "v":
        weight = clipped / (snr + 1)
    elif prediction == "x0":
        weight = clipped
    else:
        raise GenlabError(f"unknown prediction {prediction!r}; choose one of: {', '.join(PREDICTIONS)}")
    return weight.to(sigma.dtype)


def edm_loss_weight(sigma: Tensor, sigma_data: float) -> Tensor:
    """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 = 1 / c_out^2 (Karras et al. 2022, table 1)."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def edm_training_sigmas(n: int, P_mean: float, P_std: float, device: torch.device | str = "cpu",
                        generator: torch.Generator | None = None) -> Tensor:
    """ln(sigma) ~ N(P_mean, P_std^2), the log-normal noise levels of EDM training (Karras et al. 2022, table 1)."""
    return (P_mean + P_std * torch.randn(n, device=device, generator=generator)).exp()


def flow_scalings(sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(c_skip, c_out, c_in, t) of a velocity network on the linear interpolant x_t = (1 - t) x0 + t eps
    (Lipman et al. 2022, eq. 22 with sigma_min = 0; Liu et al. 2022, eq. 1): dividing by 1 - t gives the
    variance-exploding x = x0 + sigma eps with sigma = t / (1 - t), so t = sigma / (1 + sigma), x_t = x / (1 + sigma)
    and, as x0 = x_t - t (eps - x0), D = x_t - t v: c_skip = c_in = 1 / (1 + sigma), c_out = -t."""
    c_in = 1 / (1 + sigma)
    t = sigma * c_in
    return c_in, -t, c_in, t


def flow_training_times(n: int, sampling: str, mean: float = 0.0, std: float = 1.0,
                        device: torch.device | str = "cpu", generator: torch.Generator | None = None) -> Tensor:
    """Training times t in (0, 1): uniform (Liu et al. 2022) or logit-normal, t = sigmoid(m + s u) with
    u ~ N(0, 1) (Esser et al. 2024, sec. 3.1, eq. 19)."""
    if sampling == "uniform":
        return torch.rand(n, device=device, generator=generator)
    if sampling == "logit_normal":
        return torch.sigmoid(mean + std * torch.randn(n, device=device, generator=generator))
    raise GenlabError(f"unknown t_sampling {sampling!r}; choose one of: {', '.join(FLOW_T_SAMPLINGS)}")
