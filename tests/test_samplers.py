"""DDIM and DDPM samplers against diffusers' schedulers on the same tiny U-Net, schedule and noise."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from genlab.models.diffusion import DiffusionConfig, DiffusionModel
from genlab.registry import SAMPLERS
from genlab.sampling.controls import Guidance
from genlab.sampling.schedules import spaced_timesteps
from genlab.sampling.solvers import sample_ddpm

DIFFUSERS_SCHEDULE = {"linear": "linear", "cosine": "squaredcos_cap_v2"}


def tiny_model(schedule: str = "linear", clip: bool = False) -> DiffusionModel:
    torch.manual_seed(0)
    cfg = DiffusionConfig(image_size=8, channels=1, num_classes=3, base_channels=8, channel_mults=(1, 2),
                          num_res_blocks=1, attention_resolutions=(4,), head_channels=8, norm_groups=4,
                          schedule=schedule, clip_denoised=clip)
    model = DiffusionModel(cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():  # make the zero-initialised output conv predict something
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def guided_eps(model: DiffusionModel, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, cfg: float):
    """The guided noise prediction computed the textbook way: two separate forwards."""
    tt = t.expand(x.shape[0])
    eps_c = model.net(x, tt, labels)
    if cfg == 1.0:
        return eps_c
    eps_u = model.net(x, tt, torch.full_like(labels, model.num_classes))
    return eps_u + cfg * (eps_c - eps_u)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("cfg,clip", [(1.0, False), (3.0, True)])
def test_ddim_eta0_matches_diffusers(schedule, cfg, clip):
    model = tiny_model(schedule, clip)
    labels = torch.tensor([0, 1, 2, 1])
    steps = 10
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule=DIFFUSERS_SCHEDULE[schedule],
                          clip_sample=clip, set_alpha_to_one=True, timestep_spacing="leading")
    sched.set_timesteps(steps)
    assert torch.equal(sched.timesteps, spaced_timesteps(1000, steps, "leading"))
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        for t in sched.timesteps:
            eps = guided_eps(model, x, t, labels, cfg)
            x = sched.step(eps, t, x, eta=0.0, use_clipped_model_output=True).prev_sample
    ours = model.sample(4, cond=labels, generator=torch.Generator().manual_seed(7), sampler="ddim", steps=steps,
                        guidance=Guidance(cfg), eta=0.0)
    assert (ours - x.clamp(-1, 1)).abs().max() < 1e-4


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_ddpm_matches_diffusers_with_the_same_noise_draws(schedule):
    model = tiny_model(schedule, clip=True)
    labels = torch.tensor([2, 0, 1])
    steps, cfg = 20, 2.0
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule=DIFFUSERS_SCHEDULE[schedule], clip_sample=True)
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 1, 8, 8, generator=g)
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(guided_eps(model, x, t, labels, cfg), t, x, generator=g).prev_sample
    ours = model.sample(3, cond=labels, generator=torch.Generator().manual_seed(3), sampler="ddpm", steps=steps,
                        guidance=Guidance(cfg))
    assert (ours - x.clamp(-1, 1)).abs().max() < 1e-4


def test_ddpm_takes_explicit_noise_draws_and_ddim_eta1_is_ddpm():
    model = tiny_model()
    sigmas = model.sampling_sigmas(8)
    x = torch.randn(2, 1, 8, 8) * (1 + sigmas[0] ** 2).sqrt()
    draws = [torch.randn(2, 1, 8, 8) for _ in range(len(sigmas) - 2)]  # none for the last step (to sigma 0)

    def replay():
        it = iter(draws)
        return lambda sigma, sigma_next: next(it)

    denoiser = model.guided_denoiser()
    a = sample_ddpm(denoiser, x, sigmas, noise_sampler=replay())
    b = SAMPLERS.get("ddim")(denoiser, x, sigmas, eta=1.0, noise_sampler=replay())
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    c = sample_ddpm(denoiser, x, sigmas, noise_sampler=lambda s, sn: torch.zeros_like(x))
    assert (a - c).abs().max() > 1e-3  # the draws are used


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [1, 7, 50, 1000])
def test_timestep_spacing_matches_diffusers(spacing, steps):
    sched = DDIMScheduler(num_train_timesteps=1000, timestep_spacing=spacing)
    sched.set_timesteps(steps)
    assert torch.equal(spaced_timesteps(1000, steps, spacing), sched.timesteps)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_alpha_bar_matches_diffusers(schedule):
    model = tiny_model(schedule)
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule=DIFFUSERS_SCHEDULE[schedule]).alphas_cumprod
    torch.testing.assert_close(model.alpha_bar, ref, atol=1e-6, rtol=1e-5)
