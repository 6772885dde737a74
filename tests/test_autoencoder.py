"""KL autoencoder family: KL and ELBO against torch.distributions, reparameterization, PSNR against torchmetrics,
latent scaling, shapes, and a short run through the trainer."""

from __future__ import annotations

import json

import pytest
import torch
from scipy import stats
from torch.distributions import Laplace, Normal, kl_divergence
from torchmetrics.image import PeakSignalNoiseRatio

from genlab.config import DataConfig, RunConfig, TrainConfig
from genlab.data import load_dataset
from genlab.errors import GenlabError
from genlab.models.autoencoder import (
    AutoencoderConfig,
    AutoencoderKL,
    encode_dataset,
    kl_standard_normal,
    latent_scaling_factor,
    psnr,
)
from genlab.models.base import GenerativeModel
from genlab.train import train


def tiny(**kw) -> AutoencoderKL:
    cfg = dict(image_size=16, channels=3, base_channels=8, channel_mults=(1, 2), norm_groups=4, z_channels=2)
    return AutoencoderKL(AutoencoderConfig(**{**cfg, **kw}))


def test_kl_matches_closed_form_of_torch_distributions():
    mean, logvar = torch.randn(4, 2, 3, 3), torch.randn(4, 2, 3, 3)
    ref = kl_divergence(Normal(mean, (0.5 * logvar).exp()), Normal(0.0, 1.0))
    torch.testing.assert_close(kl_standard_normal(mean, logvar), ref)


def test_reparameterization_draws_from_the_posterior():
    """z = mean + exp(logvar / 2) eps is N(mean, exp(logvar)) (KS test per coordinate), and differentiable."""
    mean = torch.tensor([1.5, -2.0]).requires_grad_()
    logvar = torch.tensor([0.0, -3.0]).requires_grad_()
    z = AutoencoderKL.reparameterize(mean.expand(20000, 2), logvar.expand(20000, 2), torch.Generator().manual_seed(0))
    for j in range(2):
        sd = (0.5 * logvar[j]).exp().item()
        assert stats.kstest(z[:, j].detach().numpy(), "norm", args=(mean[j].item(), sd)).pvalue > 1e-3
    z.sum().backward()
    assert torch.allclose(mean.grad, torch.full((2,), 20000.0))


def test_shapes_and_downsampling():
    for mults, patchify, side in [((1, 2), 1, 8), ((1, 2, 2), 1, 4), ((1, 1, 2, 2), 1, 2), ((1, 2), 2, 4)]:
        ae = tiny(channel_mults=mults, patchify=patchify)
        assert ae.latent_shape == (2, side, side)
        mean, logvar = ae.encode(torch.randn(3, 3, 16, 16))
        assert mean.shape == logvar.shape == (3, 2, side, side)
        assert ae.decode(mean).shape == (3, 3, 16, 16)
    with pytest.raises(GenlabError, match="downsampling factor"):
        tiny(image_size=18, channel_mults=(1, 2, 2))
    with pytest.raises(GenlabError, match="model.reconstruction"):
        tiny(reconstruction="l3")


@pytest.mark.parametrize("rec", ["l1", "l2"])
def test_loss_and_elbo_match_their_definitions(rec):
    torch.manual_seed(0)
    ae = tiny(reconstruction=rec, kl_weight=0.01, decoder_scale=0.2)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    mean, logvar = ae.encode(x)
    torch.manual_seed(5)
    out = ae.training_losses({"x": x})
    torch.manual_seed(5)
    x_hat = ae.decode(AutoencoderKL.reparameterize(mean, logvar))
    err = (x_hat - x).abs() if rec == "l1" else (x_hat - x) ** 2
    kl = kl_divergence(Normal(mean, (0.5 * logvar).exp()), Normal(0.0, 1.0))
    torch.testing.assert_close(out["loss"], err.mean() + 0.01 * kl.mean())
    torch.manual_seed(5)
    elbo = ae.log_likelihood(x)
    decoder = Laplace(x_hat, 0.2) if rec == "l1" else Normal(x_hat, 0.2)
    ref = decoder.log_prob(x).flatten(1).sum(1) - kl.flatten(1).sum(1)
    torch.testing.assert_close(elbo, ref)


def test_psnr_matches_torchmetrics():
    """Validation PSNR is the mean of per-image PSNR on [0, 1] images."""
    torch.manual_seed(0)
    ae = tiny()
    data = load_dataset(DataConfig(name="twemoji", split="test", image_size=16, max_items=6))
    got = ae.validation_metrics(data, batch_size=4)["psnr"]
    x = data.get_batch(torch.arange(6))["x"]
    metric = PeakSignalNoiseRatio(data_range=1.0, reduction="elementwise_mean", dim=(1, 2, 3))
    ref = metric((ae.reconstruct(x) + 1) / 2, (x + 1) / 2).item()
    assert got == pytest.approx(ref, abs=1e-4)
    assert psnr(torch.tensor(0.01)).item() == pytest.approx(20.0)


def test_latent_scaling_gives_unit_std_on_its_data():
    torch.manual_seed(0)
    ae = tiny()
    data = load_dataset(DataConfig(name="twemoji", image_size=16, max_items=40))
    raw = encode_dataset(ae, data, batch_size=16)
    assert raw.latents.shape == (40, 2, 8, 8)
    torch.testing.assert_close(raw.labels, data.labels)
    scale = latent_scaling_factor(raw.latents)
    scaled = encode_dataset(ae, data, scale=scale).latents
    assert scaled.std().item() == pytest.approx(1.0, abs=1e-5)
    assert scale == pytest.approx(1 / raw.latents.double().std().item(), rel=1e-5)
    with pytest.raises(GenlabError, match="retrain"):
        latent_scaling_factor(torch.zeros(3, 2))


def test_trains_with_the_trainer_and_round_trips(tmp_path):
    """Two trainer steps write a model folder that reloads to the same reconstructions, previews and metrics."""
    cfg = RunConfig(name="vae", family="autoencoder_kl", out_dir=str(tmp_path),
                    data=DataConfig(name="twemoji", image_size=16, max_items=16),
                    model={"base_channels": 8, "channel_mults": [1, 2], "norm_groups": 4, "z_channels": 2},
                    train=TrainConfig(steps=2, batch_size=4, warmup_steps=1, log_every=1, eval_every=2))
    run_dir = train(cfg)
    assert (run_dir / "samples" / "step_0000002_recon.png").is_file()
    assert any('"psnr"' in line for line in (run_dir / "metrics.jsonl").read_text().splitlines())
    model = GenerativeModel.from_pretrained(run_dir / "model")
    assert isinstance(model, AutoencoderKL) and model.config.image_size == 16
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    again = GenerativeModel.from_pretrained(run_dir / "model")
    assert torch.equal(model.reconstruct(x), again.reconstruct(x))
    s = model.sample(3, generator=torch.Generator().manual_seed(0))
    assert s.shape == (3, 3, 16, 16) and s.abs().max() <= 1
    with pytest.raises(GenlabError, match="unconditional"):
        model.sample(2, cond=1)


def test_patch_discriminator_joins_after_disc_start(tmp_path):
    """With disc_weight > 0 the family steps two optimizers: reconstruction alone for disc_start steps, then the
    generator term -E[D(x_hat)] and the discriminator's hinge loss (checked against its formula)."""
    from genlab.nn.discriminator import hinge_d_loss

    logits_real, logits_fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.0])
    ref = 0.5 * (torch.tensor([0.0, 0.5, 2.0]).mean() + torch.tensor([0.0, 1.0, 2.0]).mean())
    torch.testing.assert_close(hinge_d_loss(logits_real, logits_fake), ref)

    cfg = RunConfig(name="vaegan", family="autoencoder_kl", out_dir=str(tmp_path),
                    data=DataConfig(name="twemoji", image_size=16, max_items=8),
                    model={"base_channels": 8, "channel_mults": [1, 2], "norm_groups": 4, "z_channels": 2,
                           "disc_weight": 0.5, "disc_start": 1, "disc_channels": 8},
                    train=TrainConfig(steps=3, batch_size=4, warmup_steps=1, log_every=1, ema_decay=0.0))
    run_dir = train(cfg)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_recs = [r for r in records if r["split"] == "train"]
    assert "d_loss" not in train_recs[0] and "g_loss" not in train_recs[0]
    assert all("d_loss" in r and "g_loss" in r for r in train_recs[1:])
    model = GenerativeModel.from_pretrained(run_dir / "model")
    assert model.discriminator is not None and int(model.steps_done) == 3
    torch.manual_seed(cfg.train.seed)  # the trainer's initial weights
    untrained = AutoencoderKL(model.config)
    assert not torch.equal(model.discriminator.net[0].weight, untrained.discriminator.net[0].weight)
