"""Parity of genlab's samplers with diffusers' schedulers on the same tiny random eps-network, schedule and noise.

Both sides call the same network: diffusers through its scheduler loop (scale_model_input, step), genlab
through `DiffusionModel.denoise` and a pure sampler. Where diffusers evaluates the network at a fractional
timestep (k-diffusion-style schedulers with Karras sigmas, KDPM2's midpoints), genlab's denoiser does too
(quantize=False); DPM-Solver++ and UniPC round Karras timesteps, which genlab's quantized lookup matches.
"""

from __future__ import annotations

import functools
import itertools

import pytest
import torch
from conftest import randomize_weights

diffusers = pytest.importorskip("diffusers")

from genlab.models.diffusion import DiffusionConfig, DiffusionModel  # noqa: E402
from genlab.registry import SAMPLERS  # noqa: E402
from genlab.sampling.noise import default_noise_sampler  # noqa: E402
from genlab.sampling.schedules import get_sigmas, t_to_sigma  # noqa: E402

T, STEPS, SHAPE = 1000, 8, (2, 1, 8, 8)


class GaussianEpsNet(torch.nn.Module):
    """eps of the exact denoiser of N(0, s^2) data plus a random U-Net's output: a stand-in for a trained network
    whose samples stay O(1), so that 1e-4 is a tight tolerance, while eps still depends on x and t nonlinearly."""

    def __init__(self, unet: torch.nn.Module, sigmas_train: torch.Tensor, s: float = 0.5, scale: float = 0.3) -> None:
        super().__init__()
        self.unet, self.sigmas_train, self.s, self.scale = unet, sigmas_train, s, scale

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        alpha_bar = (1 / (1 + t_to_sigma(t, self.sigmas_train) ** 2)).float().view(-1, 1, 1, 1)
        eps_exact = (1 - alpha_bar).sqrt() * x / (alpha_bar * self.s**2 + 1 - alpha_bar)
        return eps_exact + self.scale * self.unet(x, t, y)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model() -> DiffusionModel:
    """A tiny random U-Net (its zero-initialised output layers randomised too) around the Gaussian eps."""
    torch.manual_seed(0)
    cfg = DiffusionConfig(image_size=8, channels=1, class_cond=False, base_channels=8, channel_mults=(1, 2),
                          num_res_blocks=1, attention_resolutions=(), head_channels=8, norm_groups=4, timesteps=T)
    m = DiffusionModel(cfg).eval()
    g = randomize_weights(m.net)
    with torch.no_grad():
        eps = m.net(torch.randn(SHAPE, generator=g), torch.tensor([500]))
        m.net.conv_out.weight /= eps.std()
        m.net.conv_out.bias /= eps.std()
    # diffusers builds alpha_bar by a float32 cumprod (genlab: float64), which moves sigma_min by ~1e-4 relative;
    # give genlab's model diffusers' table so both walk the same schedule (the tables are compared below)
    alpha_bar = _scheduler("DDIMScheduler").alphas_cumprod
    m.alpha_bar.copy_(alpha_bar)
    m.sigmas.copy_(((1 - alpha_bar) / alpha_bar).sqrt())
    m.net = GaussianEpsNet(m.net, m.sigmas)
    return m


def test_alpha_bar_table_matches_diffusers():
    ours = DiffusionModel(DiffusionConfig(image_size=8, channels=1, class_cond=False, base_channels=8,
                                          channel_mults=(1,), num_res_blocks=1, attention_resolutions=(),
                                          head_channels=8, norm_groups=4, timesteps=T)).alpha_bar
    torch.testing.assert_close(ours, _scheduler("DDIMScheduler").alphas_cumprod, atol=0, rtol=2e-6)


def _scheduler(cls_name: str, **kw):
    cls = getattr(diffusers, cls_name)
    return cls(num_train_timesteps=T, beta_start=1e-4, beta_end=0.02, beta_schedule="linear", **kw)


def _run_diffusers(model: DiffusionModel, sched, noise: torch.Tensor, generator: torch.Generator | None,
                   **step_opts) -> torch.Tensor:
    sched.set_timesteps(STEPS)
    x = noise * sched.init_noise_sigma
    with torch.no_grad():
        for t in sched.timesteps:
            eps = model.net(sched.scale_model_input(x, t), t.expand(x.shape[0]))
            kw = {"generator": generator} if generator is not None else {}
            x = sched.step(eps, t, x, **kw, **step_opts).prev_sample
    return x


def _run_genlab(model: DiffusionModel, sampler: str, schedule: str, noise: torch.Tensor, quantize: bool | str,
                generator: torch.Generator | None, **opts) -> torch.Tensor:
    sigmas = get_sigmas(schedule, model.sigmas, STEPS)
    x = noise * (1 + sigmas[0] ** 2).sqrt()
    denoiser = functools.partial(model.denoise, quantize=quantize)
    if quantize == "alternate":  # KDPM2 with Karras sigmas: rounded t at the schedule, fractional at midpoints
        calls = itertools.count()

        def denoiser(x, sigma, cond):
            return model.denoise(x, sigma, cond, quantize=next(calls) % 2 == 0)
    return SAMPLERS.get(sampler)(denoiser, x, sigmas, noise_sampler=default_noise_sampler(x, generator), **opts)


# (genlab sampler, options, diffusers scheduler, its options, genlab schedule, quantized t lookup)
CASES = [
    ("ddim", {}, "DDIMScheduler", {"clip_sample": False, "timestep_spacing": "leading"}, "leading", True),
    ("ddim", {}, "DDIMScheduler", {"clip_sample": False, "timestep_spacing": "trailing"}, "trailing", True),
    ("euler", {}, "EulerDiscreteScheduler", {"timestep_spacing": "trailing"}, "trailing", False),
    ("euler", {}, "EulerDiscreteScheduler", {"timestep_spacing": "leading"}, "leading", False),
    ("euler", {}, "EulerDiscreteScheduler", {"use_karras_sigmas": True}, "karras", False),
    ("euler", {}, "EulerDiscreteScheduler", {"use_exponential_sigmas": True}, "exponential", False),
    ("heun", {}, "HeunDiscreteScheduler", {"timestep_spacing": "trailing"}, "trailing", False),
    ("heun", {}, "HeunDiscreteScheduler", {"use_karras_sigmas": True}, "karras", False),
    ("dpm_2", {}, "KDPM2DiscreteScheduler", {"timestep_spacing": "trailing"}, "trailing", False),
    ("dpm_2", {}, "KDPM2DiscreteScheduler", {"use_karras_sigmas": True}, "karras", "alternate"),
    ("lms", {}, "LMSDiscreteScheduler", {"timestep_spacing": "trailing"}, "trailing", False),
    ("lms", {}, "LMSDiscreteScheduler", {"use_karras_sigmas": True}, "karras", False),
    ("dpmpp_2m", {}, "DPMSolverMultistepScheduler", {"timestep_spacing": "trailing"}, "trailing", True),
    ("dpmpp_2m", {}, "DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, "karras", True),
    ("unipc", {}, "UniPCMultistepScheduler", {"timestep_spacing": "trailing"}, "trailing", True),
    ("unipc", {}, "UniPCMultistepScheduler", {"use_karras_sigmas": True}, "karras", True),
    ("unipc", {"order": 3}, "UniPCMultistepScheduler", {"solver_order": 3, "use_karras_sigmas": True}, "karras", True),
]

# stochastic samplers whose noise draws come in the same order as diffusers' (one N(0, I) per step)
STOCHASTIC_CASES = [
    ("ddim", {"eta": 1.0}, "DDIMScheduler", {"clip_sample": False, "timestep_spacing": "trailing"}, "trailing", True,
     {"eta": 1.0}),
    ("ddpm", {}, "DDPMScheduler", {"clip_sample": False, "timestep_spacing": "leading"}, "leading", True, {}),
    ("euler_ancestral", {}, "EulerAncestralDiscreteScheduler", {"timestep_spacing": "trailing"}, "trailing", False, {}),
    ("dpmpp_2m_sde", {}, "DPMSolverMultistepScheduler",
     {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True}, "karras", True, {}),
    ("dpmpp_2m_sde", {}, "DPMSolverMultistepScheduler",
     {"algorithm_type": "sde-dpmsolver++", "timestep_spacing": "trailing"}, "trailing", True, {}),
    ("dpm_2_ancestral", {}, "KDPM2AncestralDiscreteScheduler", {"timestep_spacing": "trailing"}, "trailing", False,
     {}),
    ("dpm_2_ancestral", {}, "KDPM2AncestralDiscreteScheduler", {"use_karras_sigmas": True}, "karras", "alternate",
     {}),
    ("dpmpp_2m_sde", {"solver_type": "heun"}, "DPMSolverMultistepScheduler",
     {"algorithm_type": "sde-dpmsolver++", "solver_type": "heun", "use_karras_sigmas": True}, "karras", True, {}),
]
# Not parity targets (checked on Gaussian data in test_solvers.py): dpmpp_sde (diffusers' DPMSolverSDE needs
# torchsde's Brownian tree), dpmpp_3m_sde (diffusers' third-order sde-dpmsolver++ weights D2 by
# (1 - e^{-2h} - 2h) / (2h)^2 - 0.5, which tends to -1 as h -> 0; k-diffusion's -phi_3(2h) tends to 0) and
# churn (diffusers' Euler evaluates the network before the churn noise, not at sigma_hat).


def _ids(cases):
    return [f"{c[0]}{c[1] or ''}-{c[4]}" for c in cases]


@pytest.mark.parametrize("sampler,opts,sched_name,sched_opts,schedule,quantize", CASES, ids=_ids(CASES))
def test_deterministic_parity(model, sampler, opts, sched_name, sched_opts, schedule, quantize):
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    ours = _run_genlab(model, sampler, schedule, noise, quantize, None, **opts)
    theirs = _run_diffusers(model, _scheduler(sched_name, **sched_opts), noise, None)
    assert theirs.abs().max() > 0.1  # a real image, not a degenerate one
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("sampler,opts,sched_name,sched_opts,schedule,quantize,step_opts", STOCHASTIC_CASES,
                         ids=_ids(STOCHASTIC_CASES))
def test_stochastic_parity_same_draws(model, sampler, opts, sched_name, sched_opts, schedule, quantize, step_opts):
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    ours = _run_genlab(model, sampler, schedule, noise, quantize, torch.Generator().manual_seed(3), **opts)
    theirs = _run_diffusers(model, _scheduler(sched_name, **sched_opts), noise, torch.Generator().manual_seed(3),
                            **step_opts)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
