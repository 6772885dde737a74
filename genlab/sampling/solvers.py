"""Every diffusion sampler as a pure function over a denoiser `D(x, sigma, cond)`: DDIM, DDPM and the
k-diffusion / A1111 samplers, each registered in `SAMPLERS` under its k-diffusion name.

Every sampler walks `x` through descending `sigmas` (ending in 0) of the variance-exploding view
x = x0 + sigma * eps, following k-diffusion's `sampling.py` (Song et al. 2021; Ho et al. 2020; Karras et al. 2022;
Lu et al. 2022; Zhao et al. 2023). Stochastic steps take their noise from `noise_sampler(sigma, sigma_next)`;
`callback` receives one dict per step with `i`, `x`, `sigma`, `sigma_hat` and `denoised` (the preview).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from scipy import integrate
from torch import Tensor
from tqdm.auto import tqdm

from genlab.config import check_int, check_number
from genlab.errors import GenlabError
from genlab.registry import SAMPLERS
from genlab.sampling.denoiser import Denoiser, to_d
from genlab.sampling.noise import BrownianNoiseSampler, Generators, NoiseSampler, default_noise_sampler

Callback = Callable[[dict[str, Any]], None]

# arguments every sampler takes from the caller, not from the user
_CALLER_ARGS = ("denoiser", "x", "sigmas", "cond", "noise_sampler", "callback", "progress")


# the ranges of the samplers' numeric options, k-diffusion's meanings: churn and noise scales, the sigma window of
# churn, the dpmpp_sde step ratio r, the multistep order
OPTION_RANGES: dict[str, tuple[float, float | None]] = {
    "s_churn": (0, None), "s_tmin": (0, None), "s_tmax": (0, None), "s_noise": (0, None), "r": (0, 1), "order": (1, 4),
}


def sampler_defaults(name: str) -> dict[str, Any]:
    """The user options of a registered sampler with their defaults (what `genlab sample --list-samplers` shows)."""
    params = inspect.signature(SAMPLERS.get(name)).parameters
    return {k: p.default for k, p in params.items() if k not in _CALLER_ARGS}


def sampler_options(name: str, eta: float | None = None, **opts: Any) -> dict[str, Any]:
    """Check options against the sampler's signature; `eta` is passed only when given (ddim's default is 0, the
    ancestral and SDE samplers' 1)."""
    known = sampler_defaults(name)
    if eta is not None:
        check_number("eta", eta, 0, 1)
        if "eta" in known:
            opts["eta"] = eta
        elif eta:
            raise GenlabError(f"eta applies to ddim and the ancestral / SDE samplers, not to {name}; leave it at 0")
    for key, value in opts.items():
        if key not in known:
            raise GenlabError(f"the {name} sampler has no option {key!r}; its options: {', '.join(known) or 'none'}")
        if key in OPTION_RANGES and not (key == "s_tmax" and value == math.inf):  # s_tmax=inf: no upper bound
            low, high = OPTION_RANGES[key]
            if isinstance(known[key], int):
                check_int(key, value, low, high)
            else:
                check_number(key, value, low, high)
    return opts


def _steps(sigmas: Tensor, progress: bool, name: str) -> Iterable[int]:
    return tqdm(range(len(sigmas) - 1), disable=not progress, desc=name)


def get_ancestral_step(sigma_from: Tensor, sigma_to: Tensor, eta: float = 1.0) -> tuple[Tensor, Tensor]:
    """Split a step into a deterministic move to sigma_down and fresh noise sigma_up, with
    sigma_down^2 + sigma_up^2 = sigma_to^2 (k-diffusion; Song et al. 2021, eq. 16 for eta)."""
    if not eta:
        return sigma_to, sigma_to.new_zeros(())
    sigma_up = torch.minimum(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2).sqrt())
    return (sigma_to**2 - sigma_up**2).sqrt(), sigma_up


BROWNIAN_SAMPLERS = ("dpmpp_sde", "dpmpp_2m_sde", "dpmpp_3m_sde")


def noise_sampler_for(name: str, x: Tensor, generator: Generators = None) -> NoiseSampler:
    """The noise a sampler draws by default: one Brownian path for the SDE solvers (as k-diffusion), independent
    N(0, I) draws per step otherwise; `generator` may be a list (one per image)."""
    return BrownianNoiseSampler(x, generator) if name in BROWNIAN_SAMPLERS else default_noise_sampler(x, generator)


def _churn(x: Tensor, sigma: Tensor, steps: int, s_churn: float, s_tmin: float, s_tmax: float, s_noise: float,
           noise_sampler: NoiseSampler) -> tuple[Tensor, Tensor]:
    """Raise sigma to sigma_hat = (1 + gamma) sigma by adding noise (Karras et al. 2022, alg. 2 lines 4-6)."""
    gamma = min(s_churn / steps, 2**0.5 - 1) if s_tmin <= float(sigma) <= s_tmax else 0.0
    sigma_hat = sigma * (gamma + 1)
    if gamma > 0:
        x = x + noise_sampler(sigma, sigma_hat) * s_noise * (sigma_hat**2 - sigma**2).sqrt()
    return x, sigma_hat


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
    for i in _steps(sigmas, progress, "ddim"):
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
    for i in _steps(sigmas, progress, "ddpm"):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma * s_in, cond)
        if callback is not None:
            callback({"i": i, "x": x, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        ratio = sigma_next**2 / sigma**2
        x = denoised + ratio * (x - denoised)
        if sigma_next > 0:
            x = x + sigma_next * (1 - ratio).sqrt() * noise_sampler(sigma, sigma_next)
    return x


@SAMPLERS.register("euler")
@torch.no_grad()
def sample_euler(denoiser: Denoiser, x: Tensor, sigmas: Tensor, cond: Any = None, s_churn: float = 0.0,
                 s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
                 noise_sampler: NoiseSampler | None = None, callback: Callback | None = None,
                 progress: bool = False) -> Tensor:
    """Euler on the probability-flow ODE with optional churn (Karras et al. 2022, alg. 2 without the 2nd order)."""
    noise_sampler = noise_sampler or default_noise_sampler(x)
    s_in = x.new_ones(x.shape[0])
    for i in _steps(sigmas, progress, "euler"):
        x, sigma_hat = _churn(x, sigmas[i], len(sigmas) - 1, s_churn, s_tmin, s_tmax, s_noise, noise_sampler)
        denoised = denoiser(x, sigma_hat * s_in, cond)
        if callback is not None:
            callback({"i": i, "x": x, "sigma": sigmas[i], "sigma_hat": sigma_hat, "denoised": denoised})
        # x + d (sigma_next - sigma_hat) written as x0_hat + d sigma_next: no cancellation when sigma_hat is huge
        x = denoised + to_d(x, sigma_hat, denoised) * sigmas[i + 1]
    return x


@SAMPLERS.register("euler_ancestral")
@torch.no_grad()
def sample_euler_ancestral(denoiser: Denoiser, x: Tensor, sigmas: Tensor, cond: Any = None, eta: float = 1.0,
                           s_noise: float = 1.0, noise_sampler: NoiseSampler | None = None,
                           callback: Callback | None = None, progress: bool = False) -> Tensor:
    """Euler to sigma_down, then fresh noise sigma_up (k-diffusion's ancestral Euler; Song et al. 2021, eq. 16)."""
    noise_sampler = noise_sampler or default_noise_sampler(x)
    s_in = x.new_ones(x.shape[0])
    for i in _steps(sigmas, progress, "euler_ancestral"):
        denoised = denoiser(x, sigmas[i] * s_in, cond)
        if callback is not None:
            callback({"i": i, "x": x, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        if sigmas[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


@SAMPLERS.register("heun")
@torch.no_grad()
def sample_heun(denoiser: Denoiser, x: Tensor, sigmas: Tensor, cond: Any = None, s_churn: float = 0.0,
                s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
                noise_sampler: NoiseSampler | None = None, callback: Callback | None = None,
                progress: bool = False) -> Tensor:
    """Heun's 2nd-order method with churn; Euler on the last step to sigma = 0 (Karras et al. 2022, alg. 2)."""
    noise_sampler = noise_sampler or default_noise_sampler(x)
    s_in = x.new_ones(x.shape[0])
    for i in _steps(sigmas, progress, "heun"):
        x, sigma_hat = _churn(x, sigmas[i], len(sigmas) - 1, s_churn, s_tmin, s_tmax, s_noise, noise_sampler)
        denoised = denoiser(x, sigma_hat * s_in, cond)
        if callback is not None:
            callback({"i": i, "x": x, "sigma": sigmas[i], "sigma_hat": sigma_hat, "denoised": denoised})
        d = to_d(x, sigma_hat, denoised)
        dt = sigmas[i + 1] - sigma_hat
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = to_d(x_2, sigmas[i + 1], denoiser(x_2, sigmas[i + 1] * s_in, cond))
            x = x + (d + d_2) / 2 * dt
    return x


@SAMPLERS.register("dpm_2")
@torch.no_grad()
def sample_dpm_2(denoiser: Denoiser, x: Tensor, sigmas: Tensor, cond: Any = None, s_churn: float = 0.0,
                 s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
                 noise_sampler: NoiseSampler | None = None, callback: Callback | None = None,
                 progress: bool = False) -> Tensor:
    """DPM-Solver-2 as k-diffusion writes it: a midpoint step at the log-midpoint sigma (Lu et al. 2022, alg. 1)."""
    noise_sampler = noise_sampler or default_noise_sampler(x)
    s_in = x.new_ones(x.shape[0])
    for i in _steps(sigmas, progress, "dpm_2"):
        x, sigma_hat = _churn(x, sigmas[i], len(sigmas) - 1, s_churn, s_tmin, s_tmax, s_noise, noise_sampler)
        denoised = denoiser(x, sigma_hat * s_in, cond)
        if callback is not None:
            callback({"i": i, "x": x, "sigma": sigmas[i], "sigma_hat": sigma_hat, "denoised": denoised})
        d = to_d(x, sigma_hat, denoised)
        if sigmas[i + 1] == 0:
            x = x + d * (sigmas[i + 1] - sigma_hat)
        else:
            sigma_mid = sigma_hat.log().lerp(sigmas[i + 1].log(), 0.5).exp()
            x_2 = x + d * (sigma_mid - sigma_hat)
            d_2 = to_d(x_2, sigma_mid, denoiser(x_2, sigma_mid * s_in, cond))
            x = x + d_2 * (sigmas[i + 1] - sigma_hat)
    return x


@SAMPLERS.register("dpm_2_ancestral")
@torch.no_grad()
def sample_dpm_2_ancestral(denoiser: Denoiser, x: Tensor, sigmas: Tensor, cond: Any = None, eta: float = 1.0,
                           s_noise: float = 1.0, noise_sampler: NoiseSampler | None = None,
                           callback: Callback | None = None, progress: bool = False) -> Tensor:
    """DPM-Solver-2 to sigma_down, then fresh noise sigma_up (k-diffusion; Lu et al. 2022, alg. 1)."""
    noise_sampler = noise_sampler or default_noise_sampler(x)
    s_in = x.new_ones(x.shape[0])
    for i in _steps(sigmas, progress, "dpm_2_ancestral"):
        denoised = denoiser(x, sigmas[i] * s_in, cond)
        if callback is not None:
            callback({"i": i, "x": x, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        d = to_d(x, sigmas[i], denoised)
        if sigma_down == 0:
            x = x + d * (sigma_down - sigmas[i])
        else:
            sigma_mid = sigmas[i].log().lerp(sigma_down.log(), 0.5).exp()
            x_2 = x + d * (sigma_mid - sigmas[i])
            d_2 = to_d(x_2, sigma_mid, denoiser(x_2, sigma_mid * s_in, cond))
            x = x + d_2 * (sigma_down - sigmas[i])
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


def linear_multistep_coeff(order: int, t: Any, i: int, j: int) -> float:
    """Integral over [t_i, t_{i+1}] of the j-th Lagrange basis polynomial through t_i, ..., t_{i-order+1}."""
    def fn(tau: float) -> float:
        prod = 1.0
        for k in range(order):
            if j != k:
                prod *= (tau - t[i - k]) / (t[i - j] - t[i - k])
        return prod

    return integrate.quad(fn, t[i], t[i + 1], epsrel=1e-4)[0]


@SAMPLERS.register("lms")
@torch.no_grad()
def sample_lms(denoiser: Denoiser, x: Tensor, sigmas: Tensor, cond: Any = None, order: int = 4,
               noise_sampler: NoiseSampler | None = None, callback: Callback | None = None,
               progress: bool = False) -> Tensor:
    """Linear multistep (Adams-Bashforth over sigma) of the given order (Karras et al. 2022, k-diffusion's lms)."""
    sigmas_cpu = sigmas.detach().double().cpu().numpy()
    s_in = x.new_ones(x.shape[0])
    ds: list[Tensor] = []
    for i in _steps(sigmas, progress, "lms"):
        denoised = denoiser(x, sigmas[i] * s_in, cond)
        if callback is not None:
            callback({"i": i, "x": x, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        ds = [*ds[-(order - 1):], to_d(x, sigmas[i], denoised)] if order > 1 else [to_d(x, sigmas[i], denoised)]
        cur_order = min(i + 1, order)
        coeffs = [linear_multistep_coeff(cur_order, sigmas_cpu, i, j) for j in range(cur_order)]
        x = x + sum(coeff * d for coeff, d in zip(coeffs, reversed(ds)))
    return x


@SAMPLERS.register("dpmpp_2m")
@torch.no_grad()
def sample_dpmpp_2m(denoiser: Denoiser, x: Tensor, sigmas: Tensor, cond: Any = None,
                    noise_sampler: NoiseSampler | None = None, callback: Callback | None = None,
                    progress: bool = False) -> Tensor:
    """DPM-Solver++(2M) in lambda = -log(sigma) (Lu et al. 2022b, alg. 2); first order on the first and last step."""
    s_in = x.new_ones(x.shape[0])
    old_denoised = None
    for i in _steps(sigmas, progress, "dpmpp_2m"):
        denoised = denoiser(x, sigmas[i] * s_in, cond)
        if callback is not None:
            callback({"i": i, "x": x, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = sigmas[i].log() - sigmas[i + 1].log()
            denoised_d = denoised
            if old_denoised is not None:
                r = (sigmas[i - 1].log() - sigmas[i].log()) / h
                denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigmas[i + 1] / sigmas[i]) * x - (-h).expm1() * denoised_d
        old_denoised = denoised
    return x


@SAMPLERS.register("dpmpp_2m_sde")
@torch.no_grad()
def sample_dpmpp_2m_sde(denoiser: Denoiser, x: Tensor, sigmas: Tensor, cond: Any = None, eta: float = 1.0,
                        s_noise: float = 1.0, solver_type: str = "midpoint",
                        noise_sampler: NoiseSampler | None = None, callback: Callback | None = None,
                        progress: bool = False) -> Tensor:
    """SDE-DPM-Solver++(2M) (Lu et al. 2022b, app. D; k-diffusion's dpmpp_2m_sde); eta = 0 is the ODE solver."""
    if solver_type not in ("midpoint", "heun"):
        raise GenlabError(f"solver_type={solver_type!r}; use midpoint or heun")
    noise_sampler = noise_sampler or BrownianNoiseSampler(x)
    s_in = x.new_ones(x.shape[0])
    old_denoised, h_last = None, None
    for i in _steps(sigmas, progress, "dpmpp_2m_sde"):
        denoised = denoiser(x, sigmas[i] * s_in, cond)
        if callback is not None:
            callback({"i": i, "x": x, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = sigmas[i].log() - sigmas[i + 1].log()
            eta_h = eta * h
            x = sigmas[i + 1] / sigmas[i] * (-eta_h).exp() * x + (-h - eta_h).expm1().neg() * denoised
            if old_denoised is not None:
                r = h_last / h
                if solver_type == "heun":
                    x = x + ((-h - eta_h).expm1().neg() / (-h - eta_h) + 1) * (1 / r) * (denoised - old_denoised)
                else:
                    x = x + 0.5 * (-h - eta_h).expm1().neg() * (1 / r) * (denoised - old_denoised)
            if eta:
                x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (-2 * eta_h).expm1().neg().sqrt() \
                    * s_noise
            h_last = h
        old_denoised = denoised
    return x


@SAMPLERS.register("dpmpp_3m_sde")
@torch.no_grad()
def sample_dpmpp_3m_sde(denoiser: Denoiser, x: Tensor, sigmas: Tensor, cond: Any = None, eta: float = 1.0,
                        s_noise: float = 1.0, noise_sampler: NoiseSampler | None = None,
                        callback: Callback | None = None, progress: bool = False) -> Tensor:
    """SDE-DPM-Solver++(3M) (Lu et al. 2022b, eq. 14 with three past outputs; k-diffusion's dpmpp_3m_sde)."""
    noise_sampler = noise_sampler or BrownianNoiseSampler(x)
    s_in = x.new_ones(x.shape[0])
    denoised_1, denoised_2, h_1, h_2 = None, None, None, None
    for i in _steps(sigmas, progress, "dpmpp_3m_sde"):
        denoised = denoiser(x, sigmas[i] * s_in, cond)
        if callback is not None:
            callback({"i": i, "x": x, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = sigmas[i].log() - sigmas[i + 1].log()
            h_eta = h * (eta + 1)
            x = torch.exp(-h_eta) * x + (-h_eta).expm1().neg() * denoised
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                phi_3 = phi_2 / h_eta - 0.5
                x = x + phi_2 * d1 - phi_3 * d2
            elif h_1 is not None:
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                x = x + phi_2 * (denoised - denoised_1) / (h_1 / h)
            if eta:
                x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (-2 * h * eta).expm1().neg().sqrt() \
                    * s_noise
            h_1, h_2 = h, h_1
        denoised_1, denoised_2 = denoised, denoised_1
    return x


@SAMPLERS.register("dpmpp_sde")
@torch.no_grad()
def sample_dpmpp_sde(denoiser: Denoiser, x: Tensor, sigmas: Tensor, cond: Any = None, eta: float = 1.0,
                     s_noise: float = 1.0, r: float = 0.5, noise_sampler: NoiseSampler | None = None,
                     callback: Callback | None = None, progress: bool = False) -> Tensor:
    """DPM-Solver++ (stochastic, 2 evaluations per step at lambda and lambda + r h) with Brownian noise
    (Lu et al. 2022b, alg. 1 made ancestral; k-diffusion's dpmpp_sde)."""
    noise_sampler = noise_sampler or BrownianNoiseSampler(x)
    s_in = x.new_ones(x.shape[0])
    for i in _steps(sigmas, progress, "dpmpp_sde"):
        denoised = denoiser(x, sigmas[i] * s_in, cond)
        if callback is not None:
            callback({"i": i, "x": x, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        if sigmas[i + 1] == 0:
            x = x + to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
            continue
        t, t_next = -sigmas[i].log(), -sigmas[i + 1].log()
        s = t + (t_next - t) * r
        fac = 1 / (2 * r)
        sigma_s = s.neg().exp()
        sd, su = get_ancestral_step(sigmas[i], sigma_s, eta)
        x_2 = (sd / sigmas[i]) * x + (sd.log() + t).expm1().neg() * denoised
        x_2 = x_2 + noise_sampler(sigmas[i], sigma_s) * s_noise * su
        denoised_2 = denoiser(x_2, sigma_s * s_in, cond)
        sd, su = get_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        denoised_d = (1 - fac) * denoised + fac * denoised_2
        x = (sd / sigmas[i]) * x + (sd.log() + t).expm1().neg() * denoised_d
        x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * su
    return x


def _unipc_coefficients(rks: Tensor, hh: Tensor, order: int) -> tuple[Tensor, Tensor, Tensor]:
    """R (Vandermonde in r_k) and b (phi-function moments over B(h)) of UniPC's linear system, bh2 variant
    (Zhao et al. 2023, alg. 2 and eq. 9 with B(h) = e^h - 1)."""
    h_phi_1 = torch.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    B_h = torch.expm1(hh)
    factorial_i = 1
    R, b = [], []
    for i in range(1, order + 1):
        R.append(rks ** (i - 1))
        b.append(h_phi_k * factorial_i / B_h)
        factorial_i *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial_i
    return torch.stack(R), torch.stack(b), B_h


@SAMPLERS.register("unipc")
@torch.no_grad()
def sample_unipc(denoiser: Denoiser, x: Tensor, sigmas: Tensor, cond: Any = None, order: int = 2,
                 noise_sampler: NoiseSampler | None = None, callback: Callback | None = None,
                 progress: bool = False) -> Tensor:
    """UniPC-bh2 with data prediction: UniP predictor of `order`, UniC corrector after every model call but the
    last (Zhao et al. 2023, alg. 2-3), warm-up and final steps at lower order as diffusers' UniPCMultistep."""
    if order < 1:
        raise GenlabError(f"order={order} must be at least 1")
    s_in = x.new_ones(x.shape[0])
    lambdas = -sigmas.log()
    n = len(sigmas) - 1
    outputs: list[Tensor] = []  # denoised at the previous steps, newest last
    last_x, last_order = None, 0
    for i in _steps(sigmas, progress, "unipc"):
        denoised = denoiser(x, sigmas[i] * s_in, cond)
        if callback is not None:
            callback({"i": i, "x": x, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        if last_x is not None:  # UniC: correct x_i using the model output at x_i
            x = _unipc_update(last_x, outputs, lambdas, sigmas, i - 1, last_order, denoised)
        outputs = [*outputs[-(order - 1):], denoised] if order > 1 else [denoised]
        last_order = min(order, n - i, len(outputs))
        last_x = x
        x = _unipc_update(x, outputs, lambdas, sigmas, i, last_order, None)
    return x


def _unipc_update(x: Tensor, outputs: list[Tensor], lambdas: Tensor, sigmas: Tensor, i: int, order: int,
                  model_t: Tensor | None) -> Tensor:
    """One UniP step from sigma_i to sigma_{i+1} (model_t None) or the UniC correction of it with the model output
    model_t at sigma_{i+1}, in the variance-exploding form of diffusers' multistep_uni_{p,c}_bh_update."""
    m0 = outputs[-1]
    h = lambdas[i + 1] - lambdas[i]
    predictor = model_t is None
    rks, D1s = [], []
    for k in range(1, order):
        rk = (lambdas[i - k] - lambdas[i]) / h
        rks.append(rk)
        D1s.append((outputs[-(k + 1)] - m0) / rk)
    rks.append(torch.ones_like(h))
    hh = -h
    R, b, B_h = _unipc_coefficients(torch.stack(rks), hh, order)
    x_t = sigmas[i + 1] / sigmas[i] * x - torch.expm1(hh) * m0
    if predictor:
        if not D1s:
            return x_t
        rhos = torch.tensor([0.5], dtype=x.dtype, device=x.device) if order == 2 else \
            torch.linalg.solve(R[:-1, :-1], b[:-1]).to(x.dtype)
        return x_t - B_h * sum(rho * d for rho, d in zip(rhos, D1s))
    rhos_c = torch.tensor([0.5], dtype=x.dtype, device=x.device) if order == 1 else \
        torch.linalg.solve(R, b).to(x.dtype)
    corr = sum(rho * d for rho, d in zip(rhos_c[:-1], D1s)) if D1s else 0
    return x_t - B_h * (corr + rhos_c[-1] * (model_t - m0))
