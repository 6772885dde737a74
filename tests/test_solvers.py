"""Samplers driven by the exact denoiser of Gaussian data, and the sigma schedules.

For x0 ~ N(mu, s^2) the optimal denoiser is D(x, sigma) = mu + s^2 / (s^2 + sigma^2) (x - mu) and the
probability-flow ODE maps x_T = mu + sqrt(s^2 + sigma_T^2) z to mu + s z exactly (Karras et al. 2022, eq. 1).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from genlab.errors import GenlabError
from genlab.registry import SAMPLERS
from genlab.sampling.noise import BrownianNoiseSampler
from genlab.sampling.schedules import (
    alpha_bar_from_betas,
    get_sigmas,
    karras_sigmas,
    make_betas,
    sigma_from_alpha_bar,
    sigma_to_t,
    t_to_sigma,
)

MU, S = 0.5, 1.0
SIGMA_MIN, SIGMA_MAX = 0.01, 20.0
ALL_SAMPLERS = ("euler", "euler_ancestral", "heun", "dpm_2", "dpm_2_ancestral", "lms", "dpmpp_2m", "dpmpp_2m_sde",
                "dpmpp_3m_sde", "dpmpp_sde", "unipc", "ddim", "ddpm")

pytestmark = pytest.mark.usefixtures("one_thread")


def gaussian_denoiser(mu: float = MU, s: float = S):
    """The exact denoiser E[x0 | x] of N(mu, s^2) data under x = x0 + sigma * eps."""
    def denoise(x: torch.Tensor, sigma: torch.Tensor, cond=None) -> torch.Tensor:
        sigma = sigma.view(-1, *[1] * (x.ndim - 1))
        return mu + s**2 / (s**2 + sigma**2) * (x - mu)

    return denoise


def test_every_issue_sampler_is_registered():
    assert set(ALL_SAMPLERS) <= set(SAMPLERS)


# (sampler, options, steps): first-order and ancestral samplers need more steps for the same bias
MOMENT_CASES = [
    ("euler", {}, 40), ("euler", {"s_churn": 10.0}, 200), ("euler_ancestral", {}, 200), ("heun", {}, 40),
    ("heun", {"s_churn": 10.0}, 40), ("dpm_2", {}, 40), ("dpm_2", {"s_churn": 10.0}, 40), ("dpm_2_ancestral", {}, 40),
    ("lms", {}, 40), ("dpmpp_2m", {}, 40), ("dpmpp_2m_sde", {}, 40), ("dpmpp_2m_sde", {"solver_type": "heun"}, 40),
    ("dpmpp_3m_sde", {}, 40), ("dpmpp_sde", {}, 40), ("unipc", {}, 40), ("unipc", {"order": 3}, 40),
    ("ddim", {}, 40), ("ddim", {"eta": 1.0}, 200), ("ddpm", {}, 200),
]


@pytest.mark.parametrize("name,opts,steps", MOMENT_CASES, ids=[f"{c[0]}-{c[1]}" for c in MOMENT_CASES])
def test_gaussian_moments(name, opts, steps):
    """Every sampler, driven by the exact denoiser, reproduces the data's mean and variance."""
    g = torch.Generator().manual_seed(0)
    sigmas = karras_sigmas(steps, SIGMA_MIN, SIGMA_MAX).float()
    x = MU + torch.randn(4000, 4, generator=g) * math.sqrt(S**2 + SIGMA_MAX**2)
    out = SAMPLERS.get(name)(gaussian_denoiser(), x, sigmas, **opts)
    # sampling error of the variance is ~ sqrt(2 / 16000) = 1.1%; the rest is discretization bias
    assert abs(out.mean().item() - MU) < 0.04 * S
    assert abs(out.var().item() / S**2 - 1) < 0.08


@pytest.mark.parametrize("name,order", [("euler", 1), ("ddim", 1), ("heun", 2), ("dpm_2", 2), ("dpmpp_2m", 2),
                                        ("lms", 3), ("unipc", 3)])
def test_ode_convergence_order(name, order):
    """Error at the end vs steps on a log-log fit: euler ~1, heun / dpm_2 / dpmpp_2m ~2, lms / unipc(2) ~3+."""
    mu, s, z = 0.3, 0.5, torch.linspace(-2, 2, 5, dtype=torch.float64).view(5, 1)
    denoiser = gaussian_denoiser(mu, s)
    steps, errors = [16, 32, 64, 128], []
    for n in steps:
        sigmas = karras_sigmas(n, 0.002, 80.0)
        out = SAMPLERS.get(name)(denoiser, mu + z * math.sqrt(s**2 + 80.0**2), sigmas)
        errors.append((out - (mu + z * s)).abs().max().item())
    slope = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
    assert order - 0.25 < slope < order + 1.0, (errors, slope)


def test_brownian_noise_sampler_is_one_path():
    """A whole step's increment equals the sum of its two halves, and increments are standard normal."""
    x = torch.zeros(20000)
    ns = BrownianNoiseSampler(x, torch.Generator().manual_seed(0))
    a, m, b = torch.tensor(5.0), torch.tensor(2.0), torch.tensor(0.5)
    whole = ns(a, b) * math.sqrt(4.5)
    halves = ns(a, m) * math.sqrt(3.0) + ns(m, b) * math.sqrt(1.5)
    torch.testing.assert_close(whole, halves, atol=1e-4, rtol=0)
    first, second = ns(a, m), ns(m, b)
    assert abs(first.var().item() - 1) < 0.05 and abs(second.var().item() - 1) < 0.05
    assert abs(torch.corrcoef(torch.stack([first, second]))[0, 1].item()) < 0.05


def test_karras_and_exponential_schedules_closed_form():
    sigmas = karras_sigmas(10, 0.1, 10.0, rho=7.0)
    assert sigmas[-1] == 0 and len(sigmas) == 11
    torch.testing.assert_close(sigmas[[0, 9]], torch.tensor([10.0, 0.1], dtype=torch.float64))
    inv_rho = sigmas[:-1] ** (1 / 7)
    torch.testing.assert_close(inv_rho.diff(), inv_rho.diff()[:1].expand(9))  # linear in sigma^(1/rho)
    train = sigma_from_alpha_bar(alpha_bar_from_betas(make_betas("linear", 1000))).float()
    exp = get_sigmas("exponential", train, 8)
    torch.testing.assert_close(exp[:-1].log().diff(), exp[:-1].log().diff()[:1].expand(7))
    torch.testing.assert_close(exp[[0, 7]], train[[-1, 0]])


def test_uniform_schedule_hits_training_sigmas():
    """With T steps, the uniform schedule walks every training sigma exactly (t = T-1, ..., 0)."""
    train = sigma_from_alpha_bar(alpha_bar_from_betas(make_betas("cosine", 50))).float()
    torch.testing.assert_close(get_sigmas("uniform", train, 50)[:-1], train.flip(0))
    trailing = get_sigmas("trailing", train, 5)
    torch.testing.assert_close(trailing[:-1], train[[49, 39, 29, 19, 9]])


def test_sigma_to_t_interpolation_inverts_t_to_sigma():
    train = sigma_from_alpha_bar(alpha_bar_from_betas(make_betas("linear", 1000)))
    t = torch.tensor([0.0, 3.25, 500.5, 998.9, 999.0], dtype=torch.float64)
    torch.testing.assert_close(sigma_to_t(t_to_sigma(t, train), train, quantize=False), t)
    sigma = torch.rand(200, dtype=torch.float64) * 100 + 0.02
    assert torch.equal(sigma_to_t(sigma, train), sigma_to_t(sigma, train, quantize=False).round().long())


def test_unknown_schedule_is_a_user_error():
    with pytest.raises(GenlabError, match="karras"):
        get_sigmas("karas", torch.linspace(0.1, 10, 10), 5)
