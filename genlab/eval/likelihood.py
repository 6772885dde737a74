"""Likelihoods: bits/dim with uniform dequantization, the diffusion variational bound, the probability-flow ODE
likelihood, and perplexity for text models.

Images in genlab are 8-bit pixels mapped to [-1, 1] (level k -> k / 127.5 - 1), so the bin width is
`DELTA = 2 / 255`. Every function returns nats per item unless its name says bits.

Families implement `GenerativeModel.log_likelihood(x, cond)` (continuous density of x in [-1, 1] for image flows and
VAEs, exact token log-likelihood for autoregressive models); `nll_bits_per_dim` dispatches: the diffusion bound (or
its ODE likelihood) for diffusion models, dequantized `log_likelihood` for every other image family.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from genlab.data.images import DELTA, bits_per_dim, dequantize
from genlab.errors import GenlabError
from genlab.models.base import Likelihood

Denoise = Callable[[Tensor, Tensor, Any], Tensor]


def _flat_sum(x: Tensor) -> Tensor:
    return x.flatten(1).sum(1)


def dequantized_nll(log_likelihood: Callable[[Tensor], Tensor], x: Tensor,
                    generator: torch.Generator | None = None) -> Tensor:
    """Upper bound on the discrete NLL of 8-bit images from a continuous density:
    -log P(x) <= -E_u[log p(x + u)] - D log DELTA (Theis et al. 2016, eq. 3-4), one draw of u per image."""
    dims = x[0].numel()
    return -(log_likelihood(dequantize(x, generator)) + dims * math.log(DELTA))


# -- diffusion: the variational bound (Ho et al. 2020, eq. 5) ---------------------------------------------------
def _approx_standard_normal_cdf(x: Tensor) -> Tensor:
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """log of the Gaussian mass of each 8-bit bin of x in [-1, 1], edges open at -1 and 1 (Ho et al. 2020, eq. 13)."""
    inv = torch.exp(-log_scale)
    cdf_plus = _approx_standard_normal_cdf(inv * (x - mean + DELTA / 2))
    cdf_min = _approx_standard_normal_cdf(inv * (x - mean - DELTA / 2))
    mass = torch.where(x < -1 + 1e-3, cdf_plus, torch.where(x > 1 - 1e-3, 1.0 - cdf_min, cdf_plus - cdf_min))
    return torch.log(mass.clamp_min(1e-12))


def _gaussian_log_density(x: Tensor, mean: Tensor, var: Tensor | float) -> Tensor:
    var = torch.as_tensor(var, dtype=x.dtype, device=x.device)
    return -0.5 * (torch.log(2 * math.pi * var) + (x - mean) ** 2 / var)


def _check_estimator(model: Any, method: str) -> None:
    """The model declares `method` among its likelihood estimators (a diffusion model over pixels; a latent one
    declares none, since its bounds would be over latents)."""
    if method not in model.likelihood_estimators:
        offered = ", ".join(model.likelihood_estimators) or "none (a latent model's bound is over latents, not pixels)"
        raise GenlabError(f"this {model.family} model has no {method} likelihood estimate; its estimators: {offered}")


def _x0_hat(model: Any, x_t: Tensor, i: Tensor, cond: Any, clip: bool) -> Tensor:
    """E[x0 | x_t] from the model's denoiser D(x, sigma) in the sigma (VE) form, x = x_t / sqrt(alpha_bar)."""
    ab = model.alpha_bar[i].view(-1, *[1] * (x_t.ndim - 1))
    x0 = model.denoise(x_t / ab.sqrt(), model.sigmas[i], cond)
    return x0.clamp(-1, 1) if clip else x0


@torch.no_grad()
def diffusion_vlb(model: Any, x0: Tensor, cond: Any = None, t_samples: int | None = None,
                  generator: torch.Generator | None = None, decoder: str = "discrete", clip_denoised: bool = True,
                  ) -> Tensor:
    """-ELBO = L_T + sum_{t>=2} L_{t-1} + L_0 in nats per image (Ho et al. 2020, eq. 5), reverse variance beta-tilde.

    Uses the model's public `alpha_bar` (T,), `sigmas` (T,) and `denoise(x, sigma, cond)`. The middle sum is exact
    over all T-1 steps (`t_samples=None`) or an unbiased Monte Carlo estimate from `t_samples` uniform steps per image.
    `decoder="discrete"` is the 8-bit decoder of eq. 13 (bits/dim of images); "continuous" a Gaussian density.
    """
    _check_estimator(model, "vlb")
    if decoder not in ("discrete", "continuous"):
        raise GenlabError(f"decoder={decoder!r}: use discrete or continuous")
    ab = model.alpha_bar.to(x0.dtype)
    T, B, dev = len(ab), x0.shape[0], x0.device
    ab_prev = torch.cat([ab.new_ones(1), ab[:-1]])
    beta = 1 - ab / ab_prev
    coef1 = ab_prev.sqrt() * beta / (1 - ab)  # weight of x0 in the posterior mean q(x_{t-1} | x_t, x0)
    var_post = beta * (1 - ab_prev) / (1 - ab)

    def noisy(i: Tensor) -> Tensor:
        eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device="cpu").to(dev)
        a = ab[i].view(-1, *[1] * (x0.ndim - 1))
        return a.sqrt() * x0 + (1 - a).sqrt() * eps

    # L_T = KL(q(x_T | x0) || N(0, I))
    aT = ab[-1]
    prior = 0.5 * _flat_sum(aT * x0**2 + (1 - aT) - 1 - torch.log(1 - aT))
    # L_0 = -log p(x0 | x1), mean = x0_hat, variance beta_1
    i0 = torch.zeros(B, dtype=torch.long, device=dev)
    x0_hat = _x0_hat(model, noisy(i0), i0, cond, clip_denoised)
    if decoder == "discrete":
        rec = -_flat_sum(discretized_gaussian_log_likelihood(x0, x0_hat, 0.5 * torch.log(beta[0])))
    else:
        rec = -_flat_sum(_gaussian_log_density(x0, x0_hat, beta[0]))
    # L_{t-1} = KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) = coef1^2 ||x0 - x0_hat||^2 / (2 var_post), t >= 2

    def term(i: Tensor) -> Tensor:
        err = _flat_sum((x0 - _x0_hat(model, noisy(i), i, cond, clip_denoised)) ** 2)
        return coef1[i] ** 2 * err / (2 * var_post[i])

    if t_samples is None:
        middle = sum(term(torch.full((B,), i, dtype=torch.long, device=dev)) for i in range(1, T))
    else:
        draws = [term(torch.randint(1, T, (B,), generator=generator).to(dev)) for _ in range(t_samples)]
        middle = (T - 1) * torch.stack(draws).mean(0)
    return prior + middle + rec


# -- diffusion: the probability-flow ODE (Song et al. 2021, eq. 13 and app. D.2) -------------------------------
def _divergence(g: Callable[[Tensor], Tensor], x: Tensor, v: Tensor | None) -> tuple[Tensor, Tensor]:
    """g(x) and div_x g: exact (one backward per dimension) when v is None, else Hutchinson's v^T J v (v fixed)."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        out = g(x)
        if v is not None:
            (vjp,) = torch.autograd.grad(out, x, v)
            return out.detach(), _flat_sum(vjp * v)
        flat_out, div = out.flatten(1), torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        for j in range(flat_out.shape[1]):
            (grad,) = torch.autograd.grad(flat_out[:, j].sum(), x, retain_graph=True)
            div = div + grad.flatten(1)[:, j]
        return out.detach(), div


def ode_log_likelihood(denoise: Denoise, x: Tensor, sigma_min: float, sigma_max: float, cond: Any = None,
                       hutchinson: bool | None = None, generator: torch.Generator | None = None,
                       rtol: float = 1e-5, atol: float = 1e-5) -> Tensor:
    """log p_{sigma_min}(x) in nats per item along the probability-flow ODE dx/d(log sigma) = x - D(x, sigma)
    (Karras et al. 2022, eq. 4 in log sigma), by the instantaneous change of variables
    log p_min(x) = log N(x(sigma_max); 0, sigma_max^2 I) + int div_x (x - D) d(log sigma) (Chen et al. 2018, eq. 4).

    The divergence is exact for items of at most 64 dimensions, else Hutchinson's estimator with one Rademacher
    vector per item (Grathwohl et al. 2019), unless `hutchinson` says otherwise. Solved with RK45 in float64.
    """
    from scipy.integrate import solve_ivp

    shape, dims = x.shape, x[0].numel()
    hutchinson = dims > 64 if hutchinson is None else hutchinson
    v = None
    if hutchinson:
        v = (torch.randint(0, 2, shape, generator=generator, device="cpu") * 2 - 1).to(x.dtype).to(x.device)

    def rhs(s: float, y: np.ndarray) -> np.ndarray:
        xs = torch.from_numpy(y[: -shape[0]]).to(x.dtype).to(x.device).view(shape)
        sigma = torch.full((shape[0],), math.exp(s), dtype=x.dtype, device=x.device)
        dx, div = _divergence(lambda z: z - denoise(z, sigma, cond), xs, v)
        return np.concatenate([dx.double().cpu().numpy().ravel(), div.double().cpu().numpy()])

    y0 = np.concatenate([x.detach().double().cpu().numpy().ravel(), np.zeros(shape[0])])
    sol = solve_ivp(rhs, (math.log(sigma_min), math.log(sigma_max)), y0, method="RK45", rtol=rtol, atol=atol)
    if not sol.success:
        raise GenlabError(f"the probability-flow ODE solver failed ({sol.message}); loosen rtol/atol")
    y = torch.from_numpy(sol.y[:, -1])
    x_end, integral = y[: -shape[0]].view(shape[0], -1), y[-shape[0] :]
    prior = (-0.5 * (math.log(2 * math.pi * sigma_max**2) + x_end**2 / sigma_max**2)).sum(1)
    return (prior + integral).to(x.dtype).to(x.device)


def diffusion_ode_log_likelihood(model: Any, x0: Tensor, cond: Any = None, generator: torch.Generator | None = None,
                                 **kw: Any) -> Tensor:
    """log p(x0) of a diffusion model's probability-flow ODE between its smallest and largest training sigma,
    with t(sigma) interpolated (not rounded to the nearest training step)."""
    _check_estimator(model, "ode")

    def denoise(x: Tensor, sigma: Tensor, c: Any) -> Tensor:
        return model.denoise(x, sigma, c, quantize=False)

    s = model.sigmas
    return ode_log_likelihood(denoise, x0, float(s.min()), float(s.max()), cond, generator=generator, **kw)


# -- dispatch over families, and text ----------------------------------------------------------------------------
def nll_bits_per_dim(model: Any, x: Tensor, cond: Any = None, method: str | None = None, t_samples: int | None = 50,
                     generator: torch.Generator | None = None, batch_size: int = 100, progress: bool = False
                     ) -> Tensor:
    """Bits/dim of 8-bit images x in [-1, 1] under a model, per image: with one of the estimators the family declares
    (`likelihood_estimators`), the diffusion bound (`method="vlb"`, the default there) or ODE likelihood (`"ode"`,
    dequantized), or one of the family's own (`model.log_likelihood(x, cond, estimator=method)`, e.g. an
    importance-weighted bound); for a family that declares none, its own `log_likelihood`; the last two on
    dequantized pixels."""
    if model.likelihood is Likelihood.NONE:
        raise GenlabError(f"this {model.family} model has no likelihood (nor a bound on it) to measure")
    estimators = model.likelihood_estimators
    method = method or (estimators[0] if estimators else None)
    if method is not None:
        _check_estimator(model, method)
    dims, out = x[0].numel(), []
    own = {"estimator": method} if method is not None else {}
    bar = tqdm(total=len(x), desc=f"likelihood ({method or 'log_likelihood'})", unit="img", disable=not progress)
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size]
        cb = cond[i : i + batch_size] if isinstance(cond, Tensor) else cond
        if method == "vlb":
            nll = diffusion_vlb(model, xb, cb, t_samples=t_samples, generator=generator)
        elif method == "ode":
            nll = dequantized_nll(lambda z, c=cb: diffusion_ode_log_likelihood(model, z, c, generator), xb, generator)
        else:  # the family's log_likelihood; an estimator of its own (not vlb or ode) is passed by name
            with torch.no_grad():
                nll = dequantized_nll(lambda z, c=cb: model.log_likelihood(z, c, **own), xb, generator)
        out.append(bits_per_dim(nll, dims).cpu())
        bar.update(len(xb))
    bar.close()
    return torch.cat(out)


@torch.no_grad()
def perplexity(model: Any, ids: Tensor, batch_size: int = 16) -> dict[str, float]:
    """exp(mean next-token NLL) over (B, L) token blocks, from `model.log_likelihood` (nats per block, L-1 tokens)."""
    if ids.ndim != 2 or ids.shape[1] < 2:
        raise GenlabError(f"perplexity needs (B, L) token ids with L >= 2, got shape {tuple(ids.shape)}")
    total = 0.0
    for i in range(0, len(ids), batch_size):
        total -= float(model.log_likelihood(ids[i : i + batch_size]).double().sum())
    tokens = ids.shape[0] * (ids.shape[1] - 1)
    nll = total / tokens
    return {"nll_per_token": nll, "perplexity": math.exp(min(nll, 50.0)), "tokens": tokens}
