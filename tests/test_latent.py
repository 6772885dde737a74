"""Latent diffusion: the latent scale from data, latents as training data, decoding, and a self-contained
model folder."""

from __future__ import annotations

import shutil

import pytest
import torch

from genlab.config import DataConfig, RunConfig, TrainConfig
from genlab.data import load_dataset
from genlab.errors import GenlabError
from genlab.models.autoencoder import AutoencoderConfig, AutoencoderKL
from genlab.models.base import GenerativeModel
from genlab.models.diffusion import DiffusionConfig, DiffusionModel
from genlab.sampling.controls import Guidance
from genlab.train import train

DIT = dict(backbone="dit", hidden_size=32, depth=1, num_heads=2, patch_size=2)


@pytest.fixture(scope="module")
def data():
    return load_dataset(DataConfig(name="twemoji", image_size=16, max_items=24))


@pytest.fixture
def ae_dir(tmp_path):
    torch.manual_seed(0)
    ae = AutoencoderKL(AutoencoderConfig(image_size=16, channels=3, base_channels=8, channel_mults=(1, 2),
                                         norm_groups=4, z_channels=2))
    return ae.save_pretrained(tmp_path / "ae"), ae


def test_build_scales_latents_to_unit_std_and_trains_on_them(data, ae_dir):
    path, ae = ae_dir
    model = DiffusionModel.build(DiffusionConfig(autoencoder=str(path), **DIT), data)
    assert (model.config.channels, model.config.image_size) == (2, 8)
    assert model.config.num_classes == data.info.num_classes
    means = ae.encode(data.get_batch(torch.arange(len(data)))["x"])[0]  # all 24 items set the scale
    assert model.config.latent_scale == pytest.approx(1 / means.std().item(), rel=1e-4)
    latents = model.prepare_data(data)
    assert len(latents) == len(data) and latents.latents.std().item() == pytest.approx(1.0, abs=1e-4)
    batch = latents.get_batch([0, 5])
    torch.testing.assert_close(batch["x"], means[[0, 5]] * model.config.latent_scale, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(batch["label"], data.labels[[0, 5]])
    assert not any(p.requires_grad for p in model.autoencoder.parameters())
    model.training_losses(batch)["loss"].backward()
    assert all(p.grad is None for p in model.autoencoder.parameters())
    # sampling runs in latent space and returns the decoded images
    decoded = []
    decode = model.autoencoder.decode
    model.autoencoder.decode = lambda z: decoded.append(z) or decode(z)
    x = model.sample(2, cond=[0, 1], generator=torch.Generator().manual_seed(0), steps=2, guidance=Guidance(1.0))
    assert x.shape == (2, 3, 16, 16) and decoded[0].shape == (2, 2, 8, 8)
    torch.testing.assert_close(x, ae.decode(decoded[0]).clamp(-1, 1))


def test_model_folder_is_self_contained(data, ae_dir, tmp_path):
    """Saved, the latent model reloads (with the autoencoder's own folder gone) and samples the same images."""
    path, _ = ae_dir
    model = DiffusionModel.build(DiffusionConfig(autoencoder=str(path), latent_scale=0.5, **DIT), data)
    assert model.config.latent_scale == 0.5  # a set scale is kept
    model.save_pretrained(tmp_path / "ldm")
    shutil.rmtree(path)
    loaded = GenerativeModel.from_pretrained(tmp_path / "ldm")
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    kw = dict(cond=[1, 2], steps=3, guidance=Guidance(2.0))
    assert torch.equal(model.sample(2, generator=torch.Generator().manual_seed(1), **kw),
                       loaded.sample(2, generator=torch.Generator().manual_seed(1), **kw))


def test_wrong_autoencoder_is_a_one_line_error(data, ae_dir, tmp_path):
    path, _ = ae_dir
    with pytest.raises(GenlabError, match="set data.image_size=16"):
        DiffusionModel.build(DiffusionConfig(autoencoder=str(path), **DIT),
                             load_dataset(DataConfig(name="twemoji", image_size=32, max_items=4)))
    pixel = DiffusionModel(DiffusionConfig(image_size=8, channels=1, **DIT)).save_pretrained(tmp_path / "px")
    with pytest.raises(GenlabError, match="autoencoder_kl"):
        DiffusionModel.build(DiffusionConfig(autoencoder=str(pixel), **DIT), data)
    with pytest.raises(GenlabError, match="neither a model folder"):
        DiffusionModel.build(DiffusionConfig(autoencoder=str(tmp_path / "nowhere"), **DIT), data)


def test_trainer_runs_latent_diffusion_from_an_autoencoder_run(ae_dir, tmp_path):
    """model.autoencoder may name the autoencoder's run folder; the run exports a latent model folder."""
    path, _ = ae_dir
    run = tmp_path / "ae-run"
    shutil.copytree(path, run / "model")
    cfg = RunConfig(name="ldm", family="diffusion", out_dir=str(tmp_path),
                    data=DataConfig(name="twemoji", image_size=16, max_items=16),
                    model={"autoencoder": str(run), **DIT},
                    train=TrainConfig(steps=2, batch_size=4, warmup_steps=1, log_every=1))
    run_dir = train(cfg)
    model = GenerativeModel.from_pretrained(run_dir / "model")
    assert model.autoencoder is not None and model.config.latent_scale > 0
    assert (run_dir / "samples" / "step_0000002.png").is_file()
