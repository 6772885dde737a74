"""Likelihoods where the answer is known: Gaussian data under its exact denoiser, uniform dequantization, perplexity."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from genlab.eval import likelihood as L
from genlab.models.base import Likelihood
from genlab.sampling.schedules import alpha_bar_from_betas, make_betas, sigma_from_alpha_bar


class GaussianDiffusion(nn.Module):
    """Data x0 ~ N(mu, diag(s^2)); `denoise` is the exact E[x0 | x0 + sigma n], so every likelihood is analytic."""

    family = "gaussian"
    likelihood = Likelihood.BOUND
    likelihood_estimators = ("vlb", "ode")  # over `denoise`, `alpha_bar` and `sigmas`

    def __init__(self, mu: torch.Tensor, s: torch.Tensor, timesteps: int = 1000) -> None:
        super().__init__()
        self.mu, self.s = mu.double(), s.double()
        self.alpha_bar = alpha_bar_from_betas(make_betas("linear", timesteps, 1e-4, 0.02)).double()
        self.sigmas = sigma_from_alpha_bar(self.alpha_bar).double()

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, cond=None, quantize: bool = True) -> torch.Tensor:
        sigma = sigma.view(-1, *[1] * (x.ndim - 1))
        return self.mu + self.s**2 / (self.s**2 + sigma**2) * (x - self.mu)

    def nll(self, x: torch.Tensor, extra_var: float = 0.0) -> torch.Tensor:
        """Analytic -log N(x; mu, s^2 + extra_var)."""
        var = self.s**2 + extra_var
        return 0.5 * (torch.log(2 * math.pi * var) + (x - self.mu) ** 2 / var).flatten(1).sum(1)


@pytest.fixture
def gaussian():
    mu = torch.tensor([[0.3, -0.2], [0.0, 0.5]]).view(1, 2, 2)
    s = torch.tensor([[0.5, 0.2], [0.3, 0.4]]).view(1, 2, 2)
    model = GaussianDiffusion(mu, s)
    x0 = model.mu + model.s * torch.randn(400, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return model, x0


def test_ode_likelihood_of_gaussian_data_is_analytic():
    # zero-mean data: the N(0, sigma_max^2) prior at the end of the ODE is then exact up to s^2 / sigma_max^2
    model = GaussianDiffusion(torch.zeros(1, 2, 2), torch.tensor([[0.5, 0.2], [0.3, 0.4]]).view(1, 2, 2))
    x0 = model.s * torch.randn(12, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ours = L.diffusion_ode_log_likelihood(model, x0)
    ref = -model.nll(x0, extra_var=float(model.sigmas.min()) ** 2)  # the ODE starts at sigma_min
    torch.testing.assert_close(ours, ref, rtol=0, atol=2e-3)


def test_ode_hutchinson_divergence_is_unbiased(gaussian):
    model, x0 = gaussian
    x = x0[:1].expand(64, -1, -1, -1).contiguous()
    exact = L.diffusion_ode_log_likelihood(model, x[:1])
    est = L.diffusion_ode_log_likelihood(model, x, hutchinson=True, generator=torch.Generator().manual_seed(1))
    assert abs(est.mean() - exact) < 4 * est.std() / 8 + 1e-3


def _expected_bound(mu: np.ndarray, s: np.ndarray, T: int = 1000) -> tuple[float, float]:
    """E[-ELBO] (continuous decoder, reverse variance beta-tilde) and E[-log p] of N(mu, s^2) data, in closed form:
    with the exact denoiser, E||x0 - x0_hat||^2 is the posterior variance s^2 sigma^2 / (s^2 + sigma^2)."""
    beta = np.linspace(1e-4, 0.02, T)
    ab = np.cumprod(1 - beta)
    ab_prev = np.concatenate([[1.0], ab[:-1]])
    sigma2 = (1 - ab) / ab
    post = (s[None] ** 2 * sigma2[:, None] / (s[None] ** 2 + sigma2[:, None])).sum(1)  # (T,)
    prior = 0.5 * np.sum(ab[-1] * (mu**2 + s**2) + (1 - ab[-1]) - 1 - np.log(1 - ab[-1]))
    rec = 0.5 * (len(s) * np.log(2 * np.pi * beta[0]) + post[0] / beta[0])
    coef1 = np.sqrt(ab_prev) * beta / (1 - ab)
    var_post = beta * (1 - ab_prev) / (1 - ab)
    middle = np.sum((coef1**2 * post / (2 * var_post))[1:])
    nll = 0.5 * np.sum(np.log(2 * np.pi * s**2) + 1)
    return float(prior + middle + rec), float(nll)


def test_diffusion_bound_matches_its_closed_form_and_bounds_the_nll(gaussian):
    model, x0 = gaussian
    vlb = L.diffusion_vlb(model, x0, decoder="continuous", clip_denoised=False,
                          generator=torch.Generator().manual_seed(2))
    expected, nll = _expected_bound(model.mu.flatten().numpy(), model.s.flatten().numpy())
    se = float(vlb.std()) / math.sqrt(len(vlb))
    assert abs(float(vlb.mean()) - expected) < 4 * se
    assert expected > nll  # a bound (its gap here comes from the fixed reverse variance at small t)
    assert float(model.nll(x0).mean()) < float(vlb.mean())


def test_monte_carlo_bound_agrees_with_the_exact_sum(gaussian):
    model, x0 = gaussian
    kw = {"decoder": "continuous", "clip_denoised": False}
    exact = L.diffusion_vlb(model, x0, generator=torch.Generator().manual_seed(3), **kw).mean()
    mc = L.diffusion_vlb(model, x0, t_samples=20, generator=torch.Generator().manual_seed(4), **kw)
    assert abs(mc.mean() - exact) < 4 * mc.std() / math.sqrt(len(mc))


def test_discretized_decoder_sums_to_one_over_the_256_levels():
    levels = torch.arange(256, dtype=torch.float64) / 127.5 - 1
    mean, log_scale = torch.tensor(0.1, dtype=torch.float64), torch.tensor(math.log(0.3), dtype=torch.float64)
    p = L.discretized_gaussian_log_likelihood(levels, mean, log_scale).exp()
    assert float(p.sum()) == pytest.approx(1.0, abs=1e-9)
    # an inner bin's mass is the Gaussian CDF difference over [x - delta/2, x + delta/2]
    from scipy.stats import norm

    k = 140
    ref = norm.cdf(levels[k] + L.DELTA / 2, 0.1, 0.3) - norm.cdf(levels[k] - L.DELTA / 2, 0.1, 0.3)
    assert float(p[k]) == pytest.approx(ref, rel=1e-5)


def test_dequantized_bits_per_dim_of_a_uniform_density_is_8_bits():
    """The uniform density on [-1 - delta/2, 1 + delta/2]^D gives every level mass 1/256: exactly 8 bits/dim."""
    x = torch.randint(0, 256, (10, 1, 3, 3)).double() / 127.5 - 1
    width = 2 + L.DELTA
    nll = L.dequantized_nll(lambda z: torch.full((len(z),), -9 * math.log(width), dtype=z.dtype), x)
    torch.testing.assert_close(L.bits_per_dim(nll, 9), torch.full((10,), 8.0, dtype=torch.float64))


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size():
    class Uniform:
        def log_likelihood(self, ids: torch.Tensor) -> torch.Tensor:
            return torch.full((len(ids),), (ids.shape[1] - 1) * -math.log(50))

    out = L.perplexity(Uniform(), torch.randint(0, 50, (5, 9)))
    assert out["perplexity"] == pytest.approx(50.0) and out["tokens"] == 40


def test_perplexity_matches_the_gpt_cross_entropy():
    from genlab.models.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=30, block_size=16, n_layer=1, n_head=2, n_embd=16)).eval()
    ids = torch.randint(0, 30, (3, 12))
    logits = model(ids[:, :-1])
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    assert L.perplexity(model, ids)["perplexity"] == pytest.approx(math.exp(float(ce)), rel=1e-5)


def test_bound_reads_the_diffusion_model_through_its_public_attributes():
    """x0_hat from `denoise` in the sigma parameterization equals (x_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar)
    from the eps network, and the bits/dim of a real (untrained) model are finite and above 0."""
    from genlab.models.diffusion import DiffusionConfig, DiffusionModel

    torch.manual_seed(0)
    cfg = DiffusionConfig(image_size=8, channels=1, class_cond=False, base_channels=8, channel_mults=(1,),
                          num_res_blocks=1, attention_resolutions=(), timesteps=50, norm_groups=4, head_channels=8)
    model = DiffusionModel(cfg).eval()
    x_t, i = torch.randn(3, 1, 8, 8), torch.tensor([0, 17, 49])
    ab = model.alpha_bar[i].view(-1, 1, 1, 1)
    with torch.no_grad():
        ref = (x_t - (1 - ab).sqrt() * model.net(x_t, i, None)) / ab.sqrt()
        ours = L._x0_hat(model, x_t, i, None, clip=False)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    x = torch.randint(0, 256, (4, 1, 8, 8)).float() / 127.5 - 1
    bpd = L.nll_bits_per_dim(model, x, t_samples=2, generator=torch.Generator().manual_seed(0))
    assert bpd.shape == (4,) and torch.isfinite(bpd).all() and (bpd > 0).all()
