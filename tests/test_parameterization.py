"""eps / v / x0 prediction over one denoiser D(x, sigma): closed-form conversions, diffusers parity of v-models,
sigmoid and zero-terminal-SNR schedules, and Min-SNR-gamma weights."""

from __future__ import annotations

import dataclasses

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from test_parity import SHAPE, _run_diffusers, _run_genlab, _scheduler, model  # noqa: E402,F401

from genlab.errors import GenlabError  # noqa: E402
from genlab.models.diffusion import DiffusionConfig, DiffusionModel  # noqa: E402
from genlab.models.parameterization import denoised, min_snr_weight, vp_scalings, vp_target  # noqa: E402
from genlab.sampling.schedules import ZERO_SNR_ALPHA_BAR, make_betas, rescale_zero_terminal_snr, t_to_sigma  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(image_size=8, channels=1, class_cond=False, base_channels=8, channel_mults=(1,), num_res_blocks=1,
            attention_resolutions=(), head_channels=8, norm_groups=4)


class FixedNet(torch.nn.Module):
    """A stand-in network that returns a fixed output and records what it was called with."""

    def __init__(self, out: torch.Tensor) -> None:
        super().__init__()
        self.out, self.calls = out, []

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        self.calls.append((x, t))
        return self.out


def _vp(prediction: str, **kw) -> DiffusionModel:
    return DiffusionModel(DiffusionConfig(**TINY, prediction=prediction, **kw))


def test_denoisers_match_closed_form_conversions():
    """For one fixed network output per parameterization, D(x, sigma) is the x0 of the VP closed forms:
    x0 = (x_t - sqrt(1 - a) eps) / sqrt(a), x0 = sqrt(a) x_t - sqrt(1 - a) v (Salimans & Ho 2022, eq. 7), x0 = F;
    and outputs converted from one another give the same denoised image."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 8, 8, generator=g) * 3
    t = torch.tensor([0, 250, 600, 999])
    models = {p: _vp(p) for p in ("eps", "v", "x0")}
    sigma = models["eps"].sigmas[t]
    a = models["eps"].alpha_bar[t].double().view(-1, 1, 1, 1)
    x_t = x.double() * a.sqrt()  # the VP input the network sees
    eps = torch.randn(x.shape, generator=g, dtype=torch.float64)
    x0 = (x_t - (1 - a).sqrt() * eps) / a.sqrt()
    v = a.sqrt() * eps - (1 - a).sqrt() * x0
    outs = {"eps": eps, "v": v, "x0": x0}
    for prediction, m in models.items():
        m.net = FixedNet(outs[prediction].float())
        d = m.denoise(x, sigma)
        torch.testing.assert_close(d.double(), x0, atol=2e-4 * float(sigma.max()), rtol=1e-4)
        seen_x, seen_t = m.net.calls[-1]
        torch.testing.assert_close(seen_x.double(), x_t, atol=1e-5, rtol=1e-5)
        assert torch.equal(seen_t, t)


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_training_target_is_what_the_denoiser_inverts(prediction):
    """Outputting the training target exactly gives D(x0 + sigma eps, sigma) = x0."""
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(5, 1, 4, 4, generator=g, dtype=torch.float64), torch.randn(5, 1, 4, 4, generator=g,
                                                                                     dtype=torch.float64)
    sigma = torch.tensor([0.01, 0.3, 1.0, 5.0, 80.0], dtype=torch.float64)
    c_skip, c_out, _ = vp_scalings(sigma, prediction)
    x = x0 + sigma.view(-1, 1, 1, 1) * eps
    torch.testing.assert_close(denoised(x, vp_target(x0, eps, sigma, prediction), c_skip, c_out), x0)


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
@pytest.mark.parametrize("gamma", [1.0, 5.0])
def test_min_snr_weights_equal_clipped_snr_times_x0_error(prediction, gamma):
    """w ||F - target||^2 = min(SNR, gamma) ||D - x0||^2 for any output F (Hang et al. 2023, sec. 3.4), with the SNR
    of diffusers' `compute_snr`."""
    from diffusers.training_utils import compute_snr

    m = _vp(prediction)
    t = torch.tensor([0, 10, 100, 300, 500, 999])
    sigma = m.sigmas[t].double()
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    snr = compute_snr(sched, t).double()
    torch.testing.assert_close(snr, sigma**-2, rtol=5e-4, atol=0)  # diffusers: float32 cumprod
    g = torch.Generator().manual_seed(2)
    x0, eps, out = (torch.randn(6, 1, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    c_skip, c_out, _ = vp_scalings(sigma, prediction)
    x = x0 + sigma.view(-1, 1, 1, 1) * eps
    lhs = min_snr_weight(sigma, gamma, prediction) * ((out - vp_target(x0, eps, sigma, prediction)) ** 2).sum((1, 2, 3))
    rhs = snr.clamp(max=gamma) * ((denoised(x, out, c_skip, c_out) - x0) ** 2).sum((1, 2, 3))
    torch.testing.assert_close(lhs, rhs, rtol=1e-4, atol=0)


def test_min_snr_loss_trains_and_bad_configs_fail():
    torch.manual_seed(0)
    m = _vp("v", min_snr_gamma=5.0)
    loss = m.training_losses({"x": torch.rand(4, 1, 8, 8) * 2 - 1})["loss"]
    loss.backward()
    assert torch.isfinite(loss) and m.net.conv_out.weight.grad is not None
    for bad in (dict(prediction="eps", zero_terminal_snr=True), dict(prediction="noise"), dict(schedule="quad"),
                dict(min_snr_gamma=-1.0), dict(preconditioning="edm", min_snr_gamma=5.0)):
        with pytest.raises(GenlabError):
            DiffusionModel(DiffusionConfig(**{**TINY, **bad}))


def test_sigmoid_and_zero_terminal_snr_schedules_match_diffusers():
    from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr as diffusers_rescale

    ours = make_betas("sigmoid", 1000, 1e-4, 0.02)
    theirs = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="sigmoid").betas
    torch.testing.assert_close(ours.float(), theirs, rtol=1e-5, atol=0)
    for schedule in ("linear", "cosine"):
        betas = make_betas(schedule, 1000)
        torch.testing.assert_close(rescale_zero_terminal_snr(betas), diffusers_rescale(betas.clone()))
    m = _vp("v", zero_terminal_snr=True)
    ref = _scheduler("DDIMScheduler", rescale_betas_zero_snr=True).alphas_cumprod
    assert ref[-1] == 0 and float(m.alpha_bar[-1]) == pytest.approx(ZERO_SNR_ALPHA_BAR)
    torch.testing.assert_close(m.alpha_bar[:-1], ref[:-1], rtol=2e-5, atol=1e-9)


class GaussianVNet(torch.nn.Module):
    """v of the exact denoiser of N(0, s^2) data plus a random U-Net's output (the v-model twin of test_parity's
    GaussianEpsNet): x0_hat = sqrt(a) s^2 x_t / (a s^2 + 1 - a), v = sqrt(a) eps_hat - sqrt(1 - a) x0_hat."""

    def __init__(self, unet: torch.nn.Module, alpha_bar: torch.Tensor, s: float = 0.5, scale: float = 0.3) -> None:
        super().__init__()
        self.unet, self.alpha_bar, self.s, self.scale = unet, alpha_bar, s, scale

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        sigmas = ((1 - self.alpha_bar.double()) / self.alpha_bar.double()).sqrt()
        a = (1 / (1 + t_to_sigma(t, sigmas) ** 2)).float().view(-1, 1, 1, 1)
        a = torch.where(t.view(-1, 1, 1, 1) >= len(sigmas) - 1, self.alpha_bar[-1], a)  # exact at a zero-SNR end
        x0 = a.sqrt() * self.s**2 * x / (a * self.s**2 + 1 - a)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        return a.sqrt() * eps - (1 - a).sqrt() * x0 + self.scale * self.unet(x, t, y)


def _v_model(eps_model: DiffusionModel, alpha_bar: torch.Tensor, **kw) -> DiffusionModel:
    """The parity fixture's random U-Net inside a v-model on diffusers' alpha_bar table."""
    m = DiffusionModel(dataclasses.replace(eps_model.config, prediction="v", **kw)).eval()
    ours = alpha_bar.clone()
    if kw.get("zero_terminal_snr"):
        ours[-1] = ZERO_SNR_ALPHA_BAR
    m.alpha_bar.copy_(ours)
    m.sigmas.copy_(((1 - ours.double()) / ours.double()).sqrt().float())
    m.net = GaussianVNet(eps_model.net.unet, alpha_bar)
    return m


V_CASES = [
    ("ddim", "DDIMScheduler", {"clip_sample": False, "timestep_spacing": "leading"}, "leading", True),
    ("ddim", "DDIMScheduler", {"clip_sample": False, "timestep_spacing": "trailing"}, "trailing", True),
    ("euler", "EulerDiscreteScheduler", {"timestep_spacing": "trailing"}, "trailing", False),
    ("dpmpp_2m", "DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, "karras", True),
    ("unipc", "UniPCMultistepScheduler", {"timestep_spacing": "trailing"}, "trailing", True),
]


@pytest.mark.parametrize("sampler,sched_name,sched_opts,schedule,quantize", V_CASES,
                         ids=[f"{c[0]}-{c[3]}" for c in V_CASES])
def test_v_model_parity_with_diffusers(model, sampler, sched_name, sched_opts, schedule, quantize):  # noqa: F811
    sched = _scheduler(sched_name, prediction_type="v_prediction", **sched_opts)
    v_model = _v_model(model, sched.alphas_cumprod)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    ours = _run_genlab(v_model, sampler, schedule, noise, quantize, None)
    theirs = _run_diffusers(v_model, sched, noise, None)
    assert theirs.abs().max() > 0.1
    torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=0)


def test_zero_terminal_snr_v_model_ddim_parity(model):  # noqa: F811
    """Lin et al. 2024's recipe (zero terminal SNR, v-prediction, trailing steps) against diffusers' DDIM; genlab's
    last alpha_bar is ZERO_SNR_ALPHA_BAR instead of 0, which moves the first x0 by ~sqrt(ZERO_SNR_ALPHA_BAR) x_T."""
    sched = _scheduler("DDIMScheduler", prediction_type="v_prediction", rescale_betas_zero_snr=True, clip_sample=False,
                       timestep_spacing="trailing")
    v_model = _v_model(model, sched.alphas_cumprod, zero_terminal_snr=True)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    ours = _run_genlab(v_model, "ddim", "trailing", noise, True, None)
    theirs = _run_diffusers(v_model, sched, noise, None)
    assert theirs.abs().max() > 0.1
    torch.testing.assert_close(ours, theirs, atol=2e-3, rtol=0)
