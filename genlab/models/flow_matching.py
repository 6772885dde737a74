"""Flow matching / rectified flow (Lipman et al. 2022; Liu et al. 2022): a velocity network on the linear
interpolant x_t = (1 - t) x0 + t eps, sampled by every diffusion sampler through the one denoiser view.

Dividing the interpolant by 1 - t gives the variance-exploding x = x_t / (1 - t) = x0 + sigma eps with
sigma = t / (1 - t); so t = sigma / (1 + sigma), x_t = x / (1 + sigma) and, since x0 = x_t - t (eps - x0),
D(x, sigma, y) = x_t - t v_theta(x_t, t, y). Euler on this D is exactly Euler in t, x_t + (t_next - t) v
(both are the step x0_hat + sigma_next eps_hat), which is what diffusers' FlowMatchEulerDiscreteScheduler does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from genlab.errors import GenlabError
from genlab.models.base import Likelihood
from genlab.models.diffusion import DiffusionConfig, DiffusionModel
from genlab.models.parameterization import FLOW_T_SAMPLINGS, denoised, flow_scalings, flow_training_times
from genlab.registry import MODELS
from genlab.sampling.noise import Generators
from genlab.sampling.schedules import exponential_sigmas, flow_sigmas, karras_sigmas

# the first-order samplers, whose step from t = 1 (sigma = FLOW_SIGMA_MAX) is x0_hat + sigma_next eps_hat, exactly a
# step in t; the others (Heun, DPM-Solver, LMS, UniPC, ancestral) combine derivatives or denoised values across that
# unbounded first interval in sigma (measured on Gaussian data: dpmpp_2m's variance 15% off at 40 steps, the SDE
# solvers' diverging) and default to the Karras schedule over [sigma_min, sigma_max]
FROM_PURE_NOISE = ("euler", "ddim", "ddpm")
FLOW_SCHEDULES = ("flow", "karras", "exponential")
# DiffusionConfig keys of the vp / edm noise processes, which a flow does not have
_NOT_FLOW_KEYS = ("schedule", "beta_start", "beta_end", "zero_terminal_snr", "prediction", "preconditioning",
                  "min_snr_gamma", "sigma_data", "P_mean", "P_std")


@dataclass
class FlowMatchingConfig(DiffusionConfig):
    """A flow-matching model: the diffusion backbone and data options, the training-time distribution and the
    sampling shift. `timesteps` scales t for the backbone's time embedding (it sees 1000 t, as diffusers' SD3);
    `sigma_min` / `sigma_max` bound the karras and exponential schedules."""

    t_sampling: str = "logit_normal"  # uniform | logit_normal (Esser et al. 2024, sec. 3.1)
    logit_mean: float = 0.0  # logit_normal: logit(t) ~ N(logit_mean, logit_std^2)
    logit_std: float = 1.0
    shift: float = 1.0  # sampling: t -> shift t / (1 + (shift - 1) t) (Esser et al. 2024, eq. 23)


def _check_flow(cfg: FlowMatchingConfig) -> None:
    defaults = DiffusionConfig()
    changed = [k for k in _NOT_FLOW_KEYS if getattr(cfg, k) != getattr(defaults, k)]
    if changed:
        raise GenlabError(f"model.{changed[0]} belongs to the diffusion family's noise process; a flow_matching "
                          "model has none: drop it")
    if cfg.t_sampling not in FLOW_T_SAMPLINGS:
        raise GenlabError(f"model.t_sampling={cfg.t_sampling!r} is unknown; choose one of: "
                          f"{', '.join(FLOW_T_SAMPLINGS)}")
    if not cfg.logit_std > 0 or not cfg.shift > 0:
        raise GenlabError("model.logit_std and model.shift must be positive")


@MODELS.register("flow_matching")
class FlowMatchingModel(DiffusionModel):
    """Conditional flow matching with the rectified-flow path: ||v_theta(x_t, t, y) - (eps - x0)||^2 for
    x_t = (1 - t) x0 + t eps (Lipman et al. 2022, eq. 23 with sigma_min = 0; Liu et al. 2022, eq. 1), class labels
    with a null class for classifier-free guidance; the diffusion family's backbones, guidance, img2img and
    samplers through D(x, sigma, y) = x_t - t v."""

    family = "flow_matching"
    config_class = FlowMatchingConfig
    likelihood = Likelihood.NONE
    likelihood_estimators = ()

    def __init__(self, config: FlowMatchingConfig) -> None:
        _check_flow(config)
        super().__init__(config)
        # the training grid t = 1/T .. (T-1)/T as VE sigmas (what the diffusion tables mean for a flow)
        t = torch.arange(1, config.timesteps, dtype=torch.float64) / config.timesteps
        sigmas = t / (1 - t)
        self.sigmas = sigmas.float().to(self.sigmas.device)
        self.alpha_bar = (1 / (1 + sigmas**2)).float().to(self.alpha_bar.device)

    # -- training -----------------------------------------------------------------------
    def training_losses(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """||v_theta(x_t, t, y) - (eps - x0)||^2 with x_t = (1 - t) x0 + t eps (Lipman et al. 2022, eq. 23;
        Liu et al. 2022, eq. 1), t uniform or logit-normal (Esser et al. 2024, sec. 3.1)."""
        x0 = batch["x"]
        cfg = self.config
        t = flow_training_times(x0.shape[0], cfg.t_sampling, cfg.logit_mean, cfg.logit_std, x0.device)
        eps = torch.randn_like(x0)
        t_ = t.view(-1, *[1] * (x0.ndim - 1))
        x_t = (1 - t_) * x0 + t_ * eps
        v = self.net(x_t, t * cfg.timesteps, self.training_labels(batch, x0.device))
        return {"loss": F.mse_loss(v, eps - x0)}

    # -- sampling -----------------------------------------------------------------------
    def denoise(self, x: Tensor, sigma: Tensor, cond: Tensor | None = None, quantize: bool = True) -> Tensor:
        """D(x, sigma, y) = x_t - t v_theta(x_t, t, y), x_t = x / (1 + sigma), t = sigma / (1 + sigma) (the VE view
        of the interpolant; see the module docstring); time is continuous, so `quantize` does nothing."""
        c_skip, c_out, c_in, t = flow_scalings(sigma)
        return denoised(x, self.net(x * c_in.view(-1, 1, 1, 1), t * self.config.timesteps, cond), c_skip, c_out)

    def sampling_sigmas(self, steps: int, spacing: str = "leading", schedule: str | None = None) -> Tensor:
        """The sigmas of a `steps`-step sampler, ending in 0: "flow" (default), diffusers' FlowMatchEuler steps
        evenly spaced in t from t = 1 with `model.shift`; or karras / exponential over [sigma_min, sigma_max].
        The diffusion family's timestep `spacing` has no meaning here."""
        cfg = self.config
        if schedule in (None, "flow"):
            sigmas = flow_sigmas(steps, cfg.timesteps, cfg.shift)
        elif schedule == "karras":
            sigmas = karras_sigmas(steps, cfg.sigma_min, cfg.sigma_max)
        elif schedule == "exponential":
            sigmas = exponential_sigmas(steps, cfg.sigma_min, cfg.sigma_max)
        else:
            raise GenlabError(f"schedule={schedule!r}: a flow_matching model samples {', '.join(FLOW_SCHEDULES)}")
        return sigmas.to(self.sigmas)

    @torch.no_grad()
    def sample(self, n: int, cond: Any = None, generator: Generators = None, *, sampler: str = "euler",
               schedule: str | None = None, **opts: Any) -> Tensor:
        """The diffusion family's `sample` (guidance, start images, every sampler) from x_1 ~ N(0, I); samplers
        not in FROM_PURE_NOISE default to the karras schedule, which starts at sigma_max rather than t = 1."""
        if schedule is None and sampler not in FROM_PURE_NOISE:
            schedule = "karras"
        return super().sample(n, cond, generator, sampler=sampler, schedule=schedule, **opts)
