"""EDM preconditioning (Karras et al. 2022): the design properties of table 1's scalings, the exact denoiser of
Gaussian data, log-normal training sigmas, the unit-weight loss, and parity with diffusers' EDM Euler scheduler."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from genlab.models.diffusion import DiffusionConfig, DiffusionModel
from genlab.models.parameterization import edm_loss_weight, edm_scalings, edm_training_sigmas
from genlab.registry import SAMPLERS

pytestmark = pytest.mark.usefixtures("one_thread")

SIGMA_DATA = 0.5
TINY = dict(image_size=8, channels=1, class_cond=False, base_channels=8, channel_mults=(1,), num_res_blocks=1,
            attention_resolutions=(), head_channels=8, norm_groups=4, preconditioning="edm", sigma_data=SIGMA_DATA)
SIGMAS = torch.tensor([0.002, 0.05, 0.5, 2.0, 80.0], dtype=torch.float64)


class ZeroNet(torch.nn.Module):
    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return torch.zeros_like(x)


def test_scalings_give_unit_variance_inputs_and_targets():
    """Karras et al. 2022, app. B.6: for data of std sigma_data, c_in makes the network input unit-variance, c_out
    makes the effective target (x0 - c_skip x) / c_out unit-variance, lambda = 1 / c_out^2, c_noise = ln(sigma)/4."""
    c_skip, c_out, c_in, c_noise = edm_scalings(SIGMAS, SIGMA_DATA)
    torch.testing.assert_close(c_in**2 * (SIGMA_DATA**2 + SIGMAS**2), torch.ones_like(SIGMAS))
    target_var = ((1 - c_skip) ** 2 * SIGMA_DATA**2 + c_skip**2 * SIGMAS**2) / c_out**2
    torch.testing.assert_close(target_var, torch.ones_like(SIGMAS))
    torch.testing.assert_close(edm_loss_weight(SIGMAS, SIGMA_DATA) * c_out**2, torch.ones_like(SIGMAS))
    torch.testing.assert_close(c_noise, torch.tensor([math.log(s) / 4 for s in SIGMAS.tolist()], dtype=torch.float64))


def test_zero_output_is_the_exact_denoiser_of_gaussian_data():
    """For x0 ~ N(0, sigma_data^2), E[x0 | x0 + sigma n] = sigma_data^2 / (sigma_data^2 + sigma^2) x: an EDM model whose
    network outputs 0 is exactly that, at every sigma."""
    m = DiffusionModel(DiffusionConfig(**TINY))
    m.net = ZeroNet()
    x = torch.randn(5, 1, 8, 8) * 10
    sigma = SIGMAS.float()
    expected = SIGMA_DATA**2 / (SIGMA_DATA**2 + sigma.view(-1, 1, 1, 1) ** 2) * x
    torch.testing.assert_close(m.denoise(x, sigma), expected)


def test_training_sigmas_are_log_normal():
    g = torch.Generator().manual_seed(0)
    sigma = edm_training_sigmas(4000, -1.2, 1.2, generator=g)
    assert stats.kstest(sigma.log().numpy(), "norm", args=(-1.2, 1.2)).pvalue > 0.01


def test_loss_is_the_unit_weight_loss_on_the_effective_target():
    """lambda(sigma) ||D - x0||^2 = ||F(c_in x, c_noise) - (x0 - c_skip x) / c_out||^2 (Karras et al. 2022, eq. 8),
    with the network seeing the continuous c_noise = ln(sigma) / 4."""
    torch.manual_seed(0)
    m = DiffusionModel(DiffusionConfig(**TINY))
    with torch.no_grad():
        m.net.conv_out.weight.normal_(0, 0.1)
    x0 = torch.rand(6, 1, 8, 8) * 2 - 1
    torch.manual_seed(1)
    loss = m.training_losses({"x": x0})["loss"]
    torch.manual_seed(1)
    sigma = (-1.2 + 1.2 * torch.randn(6)).exp()
    x = x0 + sigma.view(-1, 1, 1, 1) * torch.randn_like(x0)
    c_skip, c_out, c_in, c_noise = (c.view(-1, 1, 1, 1) for c in edm_scalings(sigma, SIGMA_DATA))
    F = m.net(c_in * x, c_noise.flatten(), None)
    torch.testing.assert_close(loss, ((F - (x0 - c_skip * x) / c_out) ** 2).mean(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backbone", ["unet", "dit"])
def test_continuous_sigma_reaches_the_backbone(backbone):
    """The timestep embeddings take float c_noise: nearby sigmas give nearby, distinct outputs (no rounding to t)."""
    torch.manual_seed(0)
    m = DiffusionModel(DiffusionConfig(**TINY, backbone=backbone, hidden_size=32, depth=1, num_heads=2))
    with torch.no_grad():
        for p in m.net.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(1, 1, 8, 8)
    with torch.no_grad():
        a, b = m.denoise(x, torch.tensor([1.0])), m.denoise(x, torch.tensor([1.001]))
        c = m.denoise(x, torch.tensor([3.0]))
    assert 0 < (a - b).abs().max() < 0.05 * (a - c).abs().max()


def test_euler_matches_diffusers_edm_euler_scheduler():
    """genlab's euler over the model's sampling sigmas = diffusers' EDMEulerScheduler (Karras sigmas, rho = 7, same
    c_skip / c_out / c_in / c_noise) driving the same random network."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    m = DiffusionModel(DiffusionConfig(**TINY)).eval()
    with torch.no_grad():
        for p in m.net.parameters():
            p.normal_(0, 0.2)
    steps, noise = 8, torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    sched = diffusers.EDMEulerScheduler(sigma_min=0.002, sigma_max=80.0, sigma_data=SIGMA_DATA)
    sched.set_timesteps(steps)
    x = noise * sched.init_noise_sigma
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(m.net(sched.scale_model_input(x, t), t.expand(2).float()), t, x).prev_sample
        sigmas = m.sampling_sigmas(steps)
        torch.testing.assert_close(sigmas.double(), sched.sigmas.double(), rtol=1e-6, atol=0)
        ours = SAMPLERS.get("euler")(m.denoise, noise * (1 + sigmas[0] ** 2).sqrt(), sigmas)
    assert x.abs().max() > 0.1
    torch.testing.assert_close(ours, x, atol=1e-3 * float(x.abs().max()), rtol=0)
