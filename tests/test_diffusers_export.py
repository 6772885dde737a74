"""diffusers export: UNet2DModel, DDPMPipeline / DDIMPipeline and AutoencoderKL load the exported folders as they are
and agree with genlab (network outputs to 1e-5, sampled images to 1e-4 on the same noise, encode / decode); a
block that does not map is refused in one line before anything is written."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
import torch
from conftest import randomize_weights
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel

from genlab.cli import main
from genlab.config import to_dict
from genlab.errors import GenlabError
from genlab.models.autoencoder import AutoencoderConfig, AutoencoderKL
from genlab.models.diffusers_export import export_diffusers
from genlab.models.diffusion import DiffusionConfig, DiffusionModel
from genlab.sampling.controls import Guidance

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(image_size=8, channels=1, base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
            attention_resolutions=(4,), head_channels=8, norm_groups=4, timesteps=100)
VARIANTS = {
    "uncond-eps-linear": dict(class_cond=False),
    # attention at both levels, 2 heads of 4 channels, 3 classes (+ null), cosine betas, v-prediction, 2 res blocks
    "class-v-cosine": dict(num_classes=3, attention_resolutions=(8, 4), head_channels=4, schedule="cosine",
                           prediction="v", num_res_blocks=2, channels=2),
    "uncond-x0-sigmoid-noclip": dict(class_cond=False, schedule="sigmoid", prediction="x0", clip_denoised=False,
                                     attention_resolutions=()),
}


def tiny_diffusion(seed: int = 1, **kw: Any) -> DiffusionModel:
    model = DiffusionModel(DiffusionConfig(**{**TINY, **kw})).eval()
    randomize_weights(model, seed)  # zero-initialised output convolutions would make every comparison trivial
    return model


@pytest.fixture(scope="module", params=list(VARIANTS), ids=list(VARIANTS))
def exported(request, tmp_path_factory):
    model = tiny_diffusion(**VARIANTS[request.param])
    out = tmp_path_factory.mktemp("diffusers") / "export"
    export_diffusers(model, out)
    return model, out


def test_unet2dmodel_matches_genlab_unet(exported):
    model, out = exported
    unet = UNet2DModel.from_pretrained(out / "unet").eval()
    g = torch.Generator().manual_seed(0)
    c = model.config.channels
    x, t = torch.randn(4, c, 8, 8, generator=g), torch.tensor([0, 17, 63, 99])
    labels = torch.tensor([0, 1, 2, 3]) if model.num_classes else None  # 3 is the null class
    with torch.no_grad():
        ours = model.net(x, t, labels)
        theirs = unet(x, t, class_labels=labels).sample
    assert ours.abs().max() > 1e-2  # random weights: a real output, not zeros
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)


def test_scheduler_config_matches_genlab_schedule(exported):
    model, out = exported
    sched = DDPMScheduler.from_pretrained(out / "scheduler")
    torch.testing.assert_close(sched.alphas_cumprod, model.alpha_bar, atol=1e-6, rtol=0)
    assert sched.config.clip_sample == model.config.clip_denoised
    assert sched.config.prediction_type == {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}[
        model.config.prediction]


def _genlab_images(model: DiffusionModel, sampler: str, steps: int, labels: Any = None) -> np.ndarray:
    x = model.sample(2, labels, generator=torch.Generator().manual_seed(0), sampler=sampler, steps=steps,
                     guidance=Guidance(1.0))
    return (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def _assert_real_images(images: np.ndarray) -> None:
    inside = ((images > 0.01) & (images < 0.99)).mean()
    assert inside > 0.2, f"only {inside:.0%} of pixels are inside (0, 1): the comparison would be trivial"


@pytest.mark.parametrize(("sampler", "steps"), [("ddim", 10), ("ddpm", 10), ("ddpm", 100)])
def test_diffusers_pipeline_draws_genlab_images(exported, sampler, steps):
    model, out = exported
    if model.num_classes:  # DDPMPipeline / DDIMPipeline pass no class labels: the scheduler loop test covers it
        pytest.skip("class-conditional: see test_scheduler_loop_draws_class_conditional_images")
    pipe_class, kw = (DDIMPipeline, {"use_clipped_model_output": True}) if sampler == "ddim" else (DDPMPipeline, {})
    pipe = pipe_class.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=steps,
                  output_type="np", **kw).images
    ours = _genlab_images(model, sampler, steps)
    _assert_real_images(ours)
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_zero_terminal_snr_maps_to_rescale_betas_zero_snr(tmp_path, sampler):
    """genlab clamps the last alpha_bar to ZERO_SNR_ALPHA_BAR where diffusers keeps 0; leading spacing never visits
    the last timestep, so the images agree."""
    model = tiny_diffusion(class_cond=False, zero_terminal_snr=True, prediction="v")
    export_diffusers(model, tmp_path / "z")
    pipe_class, kw = (DDIMPipeline, {"use_clipped_model_output": True}) if sampler == "ddim" else (DDPMPipeline, {})
    pipe = pipe_class.from_pretrained(tmp_path / "z")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.config.rescale_betas_zero_snr
    theirs = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=10,
                  output_type="np", **kw).images
    ours = _genlab_images(model, sampler, 10)
    _assert_real_images(ours)
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_scheduler_loop_draws_class_conditional_images(exported, sampler):
    model, out = exported
    if not model.num_classes:
        pytest.skip("unconditional: the pipelines test covers it")
    unet = UNet2DModel.from_pretrained(out / "unet").eval()
    scheduler_class = DDIMScheduler if sampler == "ddim" else DDPMScheduler
    sched = scheduler_class.from_config(DDPMScheduler.from_pretrained(out / "scheduler").config)
    sched.set_timesteps(10)
    labels = torch.tensor([2, 0])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, model.config.channels, 8, 8, generator=g)  # as diffusers' randn_tensor draws on the CPU
    kw = {"use_clipped_model_output": True, "eta": 0.0} if sampler == "ddim" else {}
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(unet(x, t, class_labels=labels).sample, t, x, generator=g, **kw).prev_sample
    theirs = (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    ours = _genlab_images(model, sampler, 10, labels)
    _assert_real_images(ours)
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)


@pytest.mark.parametrize("attention", [True, False])
@pytest.mark.parametrize(("eps", "atol"), [(1e-6, 1e-5), (None, 1e-4)], ids=["diffusers-eps", "genlab-eps"])
def test_autoencoder_kl_encode_decode_match(tmp_path, attention, eps, atol):
    """diffusers' Encoder / Decoder hard-code GroupNorm eps = 1e-6 where genlab's norms use torch's 1e-5: with
    genlab's eps set to 1e-6 the two agree to 1e-5 (the mapping is exact), with its own eps to 1e-4."""
    ae = AutoencoderKL(AutoencoderConfig(image_size=8, channels=3, base_channels=8, channel_mults=(2,),
                                         num_res_blocks=2, attention=attention, norm_groups=4, z_channels=3)).eval()
    randomize_weights(ae, 3)
    export_diffusers(ae, tmp_path / "vae")
    vae = DiffusersAutoencoderKL.from_pretrained(tmp_path / "vae").eval()
    if eps is not None:
        for norm in ae.modules():
            if isinstance(norm, torch.nn.GroupNorm):
                norm.eps = eps
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        mean, logvar = ae.encode(x)
        posterior = vae.encode(x).latent_dist
        assert mean.abs().max() > 1e-1
        torch.testing.assert_close(posterior.mean, mean, atol=atol, rtol=0)
        torch.testing.assert_close(posterior.logvar, logvar, atol=atol, rtol=0)
        z = torch.randn(mean.shape, generator=torch.Generator().manual_seed(1))
        ours = ae.decode(z)
        assert ours.abs().max() > 1e-1
        torch.testing.assert_close(vae.decode(z).sample, ours, atol=atol, rtol=0)


class _TextDiffusion(DiffusionModel):
    """A diffusion model whose U-Net reads text tokens (the text family's extension point)."""

    def backbone_kwargs(self) -> dict[str, Any]:
        return {"context_dim": 8}


def _latent_diffusion() -> DiffusionModel:
    ae = AutoencoderKL(AutoencoderConfig(image_size=8, channels=1, base_channels=8, channel_mults=(1,),
                                         norm_groups=4, z_channels=2))
    return DiffusionModel(DiffusionConfig(**{**TINY, "channels": 2, "autoencoder_config": to_dict(ae.config),
                                             "latent_scale": 1.0}))


UNMAPPABLE = {
    "edm": (lambda: tiny_diffusion(preconditioning="edm"), "EDM preconditioning"),
    "dit": (lambda: tiny_diffusion(backbone="dit", patch_size=2, hidden_size=16, depth=1, num_heads=2), "dit"),
    "cross-attention": (lambda: _TextDiffusion(DiffusionConfig(**TINY)), "cross-attention"),
    "latent": (_latent_diffusion, "latent diffusion"),
    "odd-size": (lambda: tiny_diffusion(image_size=7, attention_resolutions=()), "upsampling"),
    # an 8-wide attention (one head in genlab) and the 32-wide middle (two 16-wide heads)
    "mixed-heads": (lambda: tiny_diffusion(attention_resolutions=(8,), head_channels=16, channel_mults=(1, 4)),
                    "attention heads"),
    "ae-downsample": (lambda: AutoencoderKL(AutoencoderConfig(image_size=8, channels=1, base_channels=8,
                                                              channel_mults=(1, 1), norm_groups=4)), "Downsample"),
    "ae-patchify": (lambda: AutoencoderKL(AutoencoderConfig(image_size=8, channels=1, base_channels=8,
                                                            channel_mults=(1,), patchify=2, norm_groups=4)),
                    "patchify"),
}


@pytest.mark.parametrize("case", list(UNMAPPABLE), ids=list(UNMAPPABLE))
def test_unmappable_blocks_are_refused_in_one_line(tmp_path, case):
    build, block = UNMAPPABLE[case]
    with pytest.raises(GenlabError) as e:
        export_diffusers(build(), tmp_path / "out")
    message = str(e.value)
    assert "\n" not in message and block in message and "does not map" in message, message
    assert not (tmp_path / "out").exists()


def test_mapped_class_count_and_heads():
    """num_class_embeds counts the null class; one head per block when every attention is narrower than a head."""
    model = tiny_diffusion(num_classes=5, head_channels=32)
    from genlab.models.diffusers_export import unet_config

    cfg = unet_config(model)
    assert cfg["num_class_embeds"] == 6 and cfg["attention_head_dim"] is None
    assert cfg["down_block_types"] == ["DownBlock2D", "AttnDownBlock2D"]
    assert cfg["up_block_types"] == ["AttnUpBlock2D", "UpBlock2D"]


def test_cli_exports_a_run_and_refuses_edm(tmp_path, capsys):
    model = tiny_diffusion(class_cond=False)
    model.save_pretrained(tmp_path / "run" / "model")
    assert main(["export", str(tmp_path / "run"), "--to", "diffusers"]) == 0
    pipe = DDIMPipeline.from_pretrained(tmp_path / "run-diffusers")
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=5,
                  output_type="np", use_clipped_model_output=True).images
    np.testing.assert_allclose(theirs, _genlab_images(model, "ddim", 5), atol=1e-4, rtol=0)

    edm = dataclasses.replace(model.config, preconditioning="edm")
    DiffusionModel(edm).save_pretrained(tmp_path / "edm")
    capsys.readouterr()
    assert main(["export", str(tmp_path / "edm"), "--to", "diffusers", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "EDM preconditioning" in err[0], err
    assert not (tmp_path / "x").exists()
