"""Flow matching: parity with diffusers' FlowMatchEulerDiscreteScheduler on the same network and noise, every
sampler on the exact velocity of Gaussian data, the training target, the model folder and the commands.

For x0 ~ N(mu, s^2) and x_t = (1 - t) x0 + t eps, x_t ~ N((1 - t) mu, (1 - t)^2 s^2 + t^2) =: N(m_t, var_t), and
the optimal velocity E[eps - x0 | x_t] = (t - (1 - t) s^2) / var_t (x_t - m_t) - mu: the flow's ODE then carries
N(0, 1) at t = 1 to N(mu, s^2) at t = 0.
"""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_weights, tiny_feature_network

from genlab.cli import main
from genlab.eval import features as F
from genlab.eval import report as R
from genlab.models.base import GenerativeModel
from genlab.models.flow_matching import FlowMatchingConfig, FlowMatchingModel
from genlab.registry import SAMPLERS

pytestmark = pytest.mark.usefixtures("one_thread")

T, STEPS, SHAPE = 1000, 8, (2, 1, 8, 8)
TINY = dict(image_size=8, channels=1, class_cond=False, base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
            attention_resolutions=(), head_channels=8, norm_groups=4, timesteps=T)


def gaussian_velocity(x_t: torch.Tensor, t: torch.Tensor, mu: float, s: float) -> torch.Tensor:
    """E[eps - x0 | x_t] for x0 ~ N(mu, s^2) (module docstring)."""
    t = t.view(-1, *[1] * (x_t.ndim - 1))
    var = (1 - t) ** 2 * s**2 + t**2
    return (t - (1 - t) * s**2) / var * (x_t - (1 - t) * mu) - mu


class GaussianVelocityNet(torch.nn.Module):
    """The exact velocity of N(mu, s^2) data plus `scale` x a network's output; it reads t from 1000 t."""

    def __init__(self, mu: float, s: float, net: torch.nn.Module | None = None, scale: float = 0.0) -> None:
        super().__init__()
        self.mu, self.s, self.net, self.scale = mu, s, net, scale

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        v = gaussian_velocity(x, c_noise / T, self.mu, self.s)
        return v + self.scale * self.net(x, c_noise, y) if self.net is not None else v


def tiny(**kw) -> FlowMatchingModel:
    torch.manual_seed(0)
    return FlowMatchingModel(FlowMatchingConfig(**{**TINY, **kw})).eval()


# -- parity with diffusers ------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampler", ["euler", "ddim"])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_parity_with_diffusers_flow_match_euler(sampler, shift):
    """genlab's sampler on D(x, sigma) = x_t - t v over the flow schedule equals diffusers' FlowMatchEuler loop
    (x_t + (t_next - t) v at timesteps 1000 t) on the same random U-Net and noise, to 1e-4."""
    diffusers = pytest.importorskip("diffusers")
    model = tiny(shift=shift)
    unet = model.net
    g = randomize_weights(unet)
    with torch.no_grad():
        out = unet(torch.randn(SHAPE, generator=g), torch.tensor([500.0]))
        unet.conv_out.weight /= out.std()
        unet.conv_out.bias /= out.std()
    model.net = GaussianVelocityNet(0.0, 0.5, unet, scale=0.3)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))

    sched = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, shift=shift)
    sched.set_timesteps(STEPS)
    x = noise
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(model.net(x, t.expand(x.shape[0])), t, x).prev_sample
    sigmas = model.sampling_sigmas(STEPS)
    torch.testing.assert_close((sigmas / (1 + sigmas))[1:-1], sched.sigmas[1:-1], atol=1e-6, rtol=0)
    ours = SAMPLERS.get(sampler)(model.denoise, noise * (1 + sigmas[0] ** 2).sqrt(), sigmas)
    assert x.abs().max() > 0.1
    torch.testing.assert_close(ours, x, atol=1e-4, rtol=0)


# -- the exact Gaussian velocity -------------------------------------------------------------------------------
MU, S = 0.1, 0.25
GAUSSIAN_CASES = [("euler", 200), ("ddim", 200), ("ddpm", 200), ("heun", 40), ("dpm_2", 40), ("lms", 40),
                  ("dpmpp_2m", 40), ("unipc", 40), ("dpmpp_3m_sde", 40), ("euler_ancestral", 200)]


@pytest.mark.parametrize("sampler,steps", GAUSSIAN_CASES)
def test_exact_velocity_samples_the_gaussian(sampler, steps):
    """Each sampler, on its default flow schedule, turns the exact velocity of N(mu, s^2) into its moments."""
    model = tiny(clip_denoised=False)
    model.net = GaussianVelocityNet(MU, S)
    out = model.sample(250, generator=torch.Generator().manual_seed(0), sampler=sampler, steps=steps)
    assert abs(out.mean().item() - MU) < 0.04 * S  # 16,000 numbers: sampling error of the std ~0.6%
    assert abs(out.var().item() / S**2 - 1) < 0.08


def test_denoiser_is_the_posterior_mean_in_the_ve_view():
    """D(x0 + sigma eps, sigma) with the exact velocity equals E[x0 | x] = mu + s^2 / (s^2 + sigma^2) (x - mu)."""
    model = tiny()
    model.net = GaussianVelocityNet(MU, S)
    x = torch.randn(5, 1, 8, 8)
    sigma = torch.tensor([0.01, 0.3, 1.0, 7.0, 200.0])
    want = MU + S**2 / (S**2 + sigma.view(-1, 1, 1, 1) ** 2) * (x - MU)
    torch.testing.assert_close(model.denoise(x, sigma), want, atol=1e-5, rtol=1e-5)


# -- the training target ----------------------------------------------------------------------------------------
class OracleNet(torch.nn.Module):
    """Knows x0 and answers (x_t - x0) / t, which is eps - x0 exactly when x_t = (1 - t) x0 + t eps; records t."""

    def __init__(self, x0: torch.Tensor, bias: float = 0.0) -> None:
        super().__init__()
        self.x0, self.bias, self.t = x0, bias, []

    def forward(self, x_t, c_noise, y=None):
        t = (c_noise / T).double()
        self.t.append(t)
        return ((x_t.double() - self.x0) / t.view(-1, 1, 1, 1) + self.bias).float()


@pytest.mark.parametrize("t_sampling", ["uniform", "logit_normal"])
def test_loss_is_velocity_regression_on_the_linear_interpolant(t_sampling):
    model = tiny(t_sampling=t_sampling, logit_mean=0.5, logit_std=0.7)
    x0 = torch.rand(4000, 1, 8, 8) * 2 - 1
    model.net = OracleNet(x0.double())
    assert model.training_losses({"x": x0})["loss"].item() < 1e-8
    model.net = OracleNet(x0.double(), bias=0.1)
    assert model.training_losses({"x": x0})["loss"].item() == pytest.approx(0.01, rel=1e-3)
    t = torch.cat(model.net.t)
    if t_sampling == "uniform":
        assert abs(t.mean().item() - 0.5) < 0.02 and abs(t.var().item() - 1 / 12) < 0.005
    else:
        logit = torch.logit(t)
        assert abs(logit.mean().item() - 0.5) < 0.05 and abs(logit.std().item() - 0.7) < 0.03


def test_diffusion_keys_and_unknown_t_sampling_are_refused():
    from genlab.errors import GenlabError

    with pytest.raises(GenlabError, match="prediction"):
        tiny(prediction="v")
    with pytest.raises(GenlabError, match="logit_normal"):
        tiny(t_sampling="beta")
    with pytest.raises(GenlabError, match="flow"):
        tiny().sampling_sigmas(4, schedule="leading")


# -- the model folder and the commands --------------------------------------------------------------------------
def test_model_folder_round_trip(tmp_path):
    model = tiny(class_cond=True, num_classes=3)
    randomize_weights(model.net)
    again = GenerativeModel.from_pretrained(model.save_pretrained(tmp_path / "fm")).eval()
    assert isinstance(again, FlowMatchingModel) and again.config == model.config
    kw = dict(cond=[0, 2], steps=4, sampler="heun")
    a = model.sample(2, generator=torch.Generator().manual_seed(3), **kw)
    b = again.sample(2, generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(a, b) and a.std() > 0


@pytest.fixture(scope="module")
def tiny_fnet():
    return tiny_feature_network()


def test_train_sample_eval_commands(tmp_path, tiny_fnet, monkeypatch):
    monkeypatch.setenv("GENLAB_CACHE", str(tmp_path / "cache"))
    for module in (F, R):  # the tiny network stands in for the cached MNIST one
        monkeypatch.setattr(module, "get_feature_network", lambda *a, **k: tiny_fnet)
    (tmp_path / "fm.yaml").write_text(
        "name: fm\nfamily: flow_matching\nout_dir: runs\ndata: {name: mnist, max_items: 16}\n"
        "model: {base_channels: 8, channel_mults: [1, 2], num_res_blocks: 1, attention_resolutions: [], "
        "head_channels: 8, norm_groups: 4, shift: 2.0}\n"
        "train: {steps: 2, batch_size: 4, warmup_steps: 1, log_every: 1, ckpt_every: 0}\n"
        "sample: {n: 10, steps: 2, sampler: euler}\n")
    monkeypatch.chdir(tmp_path)
    assert main(["train", "fm.yaml"]) == 0
    run = tmp_path / "runs" / "fm"
    assert main(["sample", str(run), "--n", "4", "--label", "3", "--steps", "3", "--cfg", "2",
                 "--out", str(tmp_path / "grid.png")]) == 0
    assert (tmp_path / "grid.png").is_file()
    assert main(["eval", str(run), "--metrics", "fid,kid,prc", "--n", "8", "--steps", "2",
                 "--out", str(tmp_path / "ev")]) == 0
