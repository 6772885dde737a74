"""The pixel-space VAE: its discretized-logistic likelihood is a distribution over the 256 levels, the Gaussian KL
matches its closed form and a Monte Carlo estimate, the ELBO sits below the importance-weighted bound, bits/dim
match a hand computation, the model folder round-trips, and the CLI trains, samples and evaluates it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import randomize_weights
from test_eval import _trained_tiny_fnet, tiny_fnet  # noqa: F401  (the tiny MNIST feature network fixture)

from genlab.cli import main
from genlab.data.images import DELTA, dequantize
from genlab.errors import GenlabError
from genlab.eval.likelihood import nll_bits_per_dim
from genlab.models.autoencoder import kl_standard_normal
from genlab.models.base import GenerativeModel, Likelihood
from genlab.models.vae import VAE, VAEConfig
from genlab.nn.distributions import discretized_logistic_log_prob

pytestmark = pytest.mark.usefixtures("one_thread")
RECIPE = Path(__file__).resolve().parent.parent / "configs" / "mnist-vae.yaml"
LEVELS = torch.arange(256, dtype=torch.float64) / 127.5 - 1.0


def tiny(decoder: str = "logistic", **kw) -> VAE:
    torch.manual_seed(0)
    model = VAE(VAEConfig(image_size=8, channels=1, base_channels=8, channel_mults=(1, 2), norm_groups=4,
                          z_channels=1, decoder=decoder, **kw)).double().eval()
    randomize_weights(model)  # a posterior that depends on x, and decoder scales away from 1
    return model


def test_discretized_logistic_masses_sum_to_one_over_the_256_levels():
    g = torch.Generator().manual_seed(0)
    mean = torch.cat([torch.rand(200, generator=g, dtype=torch.float64) * 3 - 1.5, torch.tensor([-1.0, 1.0, 0.0])])
    log_scale = torch.cat([torch.rand(200, generator=g, dtype=torch.float64) * 9 - 8,
                           torch.tensor([-7.0, -7.0, 3.0], dtype=torch.float64)])
    logp = discretized_logistic_log_prob(LEVELS[:, None], mean[None], log_scale[None])  # (256, 203)
    torch.testing.assert_close(logp.exp().sum(0), torch.ones(203, dtype=torch.float64), rtol=0, atol=1e-10)
    # an inner level against the plain CDF difference, where that is accurate
    s = log_scale.exp()
    k = 100
    direct = torch.sigmoid((LEVELS[k] + DELTA / 2 - mean) / s) - torch.sigmoid((LEVELS[k] - DELTA / 2 - mean) / s)
    ok = direct > 1e-8
    torch.testing.assert_close(logp[k][ok], direct[ok].log(), rtol=1e-8, atol=1e-10)
    assert torch.isfinite(logp).all()


def test_gaussian_kl_matches_closed_form_and_monte_carlo():
    g = torch.Generator().manual_seed(1)
    mean, logvar = torch.randn(5, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    q = torch.distributions.Normal(mean, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros(5, dtype=torch.float64), torch.ones(5, dtype=torch.float64))
    ours = kl_standard_normal(mean, logvar)
    torch.testing.assert_close(ours, torch.distributions.kl_divergence(q, p))
    z = q.sample((200_000,))
    mc = (q.log_prob(z) - p.log_prob(z)).mean(0)
    torch.testing.assert_close(ours, mc, rtol=0, atol=0.03)


@pytest.mark.parametrize("decoder", ["logistic", "gaussian"])
def test_elbo_is_below_the_importance_weighted_bound(decoder):
    """k = 1 is the ELBO in expectation; k = 16 is higher on average (Burda et al. 2016, thm. 1)."""
    model = tiny(decoder)
    x = (torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 255).round()
    x = (x / 127.5 - 1).expand(400, -1, -1, -1)  # one image, 400 independent draws
    torch.manual_seed(3)
    elbo = model.log_likelihood(x, estimator="elbo")
    iwae1 = model.log_likelihood(x, estimator="iwae", samples=1)
    iwae16 = model.log_likelihood(x[:100], estimator="iwae", samples=16)
    se = math.hypot(elbo.std().item(), iwae1.std().item()) / math.sqrt(400)
    assert abs(elbo.mean().item() - iwae1.mean().item()) < 4 * se
    assert iwae16.mean().item() > elbo.mean().item() + 4 * se
    assert model.config.iwae_samples == 64 and model.likelihood_estimators[0] == "iwae"


@pytest.mark.parametrize("decoder,extra", [("logistic", {}), ("gaussian", {"gaussian_std": 0.3})])
def test_bits_per_dim_of_the_elbo_match_a_hand_computation(decoder, extra):
    """The evaluator's bits/dim (dequantized pixels) against -(log P(x|z) - KL) / (D ln 2) computed here: the
    logistic mass of each level by sigmoid differences, or the Gaussian density times the bin width."""
    model = tiny(decoder, **extra)
    x = (torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 255).round()
    x = x / 127.5 - 1
    x[0, 0, 0, :2] = torch.tensor([-1.0, 1.0])  # the two open-ended levels
    torch.manual_seed(5)
    bpd = nll_bits_per_dim(model, x, method="elbo", generator=torch.Generator().manual_seed(6))
    torch.manual_seed(5)
    xd = dequantize(x, torch.Generator().manual_seed(6))
    with torch.no_grad():
        mean, logvar = model.encode(xd)
        z = mean + (0.5 * logvar).exp() * torch.randn_like(mean)
        loc, log_scale = model.decode(z)
    kl = (0.5 * (mean**2 + logvar.exp() - 1 - logvar)).flatten(1).sum(1)
    if decoder == "logistic":
        s = log_scale.exp()
        upper = torch.where(x > 0.999, 1.0, torch.sigmoid((x + 1 / 255 - loc) / s))
        lower = torch.where(x < -0.999, 0.0, torch.sigmoid((x - 1 / 255 - loc) / s))
        log_p = (upper - lower).log().flatten(1).sum(1)
    else:
        dens = torch.exp(-0.5 * ((xd - loc) / 0.3) ** 2) / (0.3 * math.sqrt(2 * math.pi))
        log_p = (dens * (2 / 255)).log().flatten(1).sum(1)
    torch.testing.assert_close(bpd, -(log_p - kl) / (64 * math.log(2)), rtol=1e-9, atol=1e-9)


def test_bernoulli_models_binarized_pixels_and_declares_no_8bit_likelihood():
    model = tiny("bernoulli")
    assert model.likelihood is Likelihood.NONE and model.likelihood_estimators == ()
    assert VAE.likelihood is Likelihood.BOUND  # the class keeps its declaration
    x = torch.tensor([-1.0, -0.2, 0.2, 1.0], dtype=torch.float64).view(1, 1, 2, 2).repeat(1, 1, 4, 4)
    with torch.no_grad():
        z = torch.zeros(1, *model.latent_shape, dtype=torch.float64)
        logit = model.decode(z)[0]
        p = torch.sigmoid(logit)
        want = torch.where(x > 0, p, 1 - p).log().flatten(1).sum(1)
        torch.testing.assert_close(model.log_px(x, z), want)
        torch.testing.assert_close(model.decoder_mean(z), 2 * p - 1)
    with pytest.raises(GenlabError, match="binarized"):
        model.log_likelihood(x)


def test_class_conditional_vae_takes_labels_and_marginalizes_them_without_one(tmp_path):
    """With class_cond, samples depend on the label; log_likelihood without a label is
    log (1/K) sum_y exp(bound(x | y)), computed here from the per-label bounds under the same random draws."""
    model = tiny(class_cond=True, num_classes=3)
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(2)]  # noqa: E731
    a, b = model.sample(2, cond=0, generator=gens()), model.sample(2, cond=2, generator=gens())
    assert not torch.allclose(a, b)
    torch.testing.assert_close(model.labels_for(6), torch.tensor([0, 0, 1, 1, 2, 2]))
    x = (torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(8), dtype=torch.float64) * 255).round()
    x = x / 127.5 - 1
    for estimator in ("elbo", "iwae"):
        torch.manual_seed(9)
        marginal = model.log_likelihood(x, estimator=estimator, samples=3)
        torch.manual_seed(9)
        per = torch.stack([model.log_likelihood(x, cond=y, estimator=estimator, samples=3) for y in range(3)])
        torch.testing.assert_close(marginal, torch.logsumexp(per, 0) - math.log(3))
    again = GenerativeModel.from_pretrained(model.float().save_pretrained(tmp_path / "cvae"))
    assert again.num_classes == 3 and torch.equal(again.sample(2, cond=1, generator=gens()),
                                                  model.sample(2, cond=1, generator=gens()))
    with pytest.raises(GenlabError, match="label out of range"):
        model.sample(2, cond=3)


def test_config_errors_are_one_line():
    base = dict(image_size=8, channels=1, base_channels=8, channel_mults=(1, 2), norm_groups=4)
    for bad, match in [({"decoder": "poisson"}, "model.decoder"), ({"beta": -1.0}, "model.beta"),
                       ({"gaussian_std": 0.1}, "gaussian_std applies"), ({"iwae_samples": 0}, "iwae_samples"),
                       ({"class_cond": True}, "labelled data")]:
        with pytest.raises(GenlabError, match=match):
            VAE(VAEConfig(**base, **bad))


def test_model_folder_round_trip_gives_identical_samples(tmp_path):
    model = tiny().float()
    again = GenerativeModel.from_pretrained(model.save_pretrained(tmp_path / "vae")).eval()
    assert isinstance(again, VAE) and again.config == model.config
    gens = lambda: [torch.Generator().manual_seed(7 + i) for i in range(3)]  # noqa: E731
    a, b = model.sample(3, generator=gens()), again.sample(3, generator=gens())
    assert torch.equal(a, b) and a.shape == (3, 1, 8, 8) and a.abs().max() <= 1
    assert not torch.equal(a[0], a[1])


def test_cli_trains_samples_and_evaluates(tiny_fnet, tmp_path, monkeypatch):  # noqa: F811
    import genlab.eval.features

    monkeypatch.setattr(genlab.eval.features, "get_feature_network", lambda *a, **k: tiny_fnet)
    sets = ["name=v", f"out_dir={tmp_path}", "data.max_items=64", "model.base_channels=8", "model.norm_groups=4",
            "model.iwae_samples=2", "train.steps=2", "train.batch_size=8", "train.warmup_steps=1",
            "train.log_every=1", "train.eval_every=2", "sample.n=4"]
    assert main(["train", str(RECIPE), *[a for s in sets for a in ("--set", s)]]) == 0
    run = tmp_path / "v"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("elbo_bits_per_dim" in r for r in records)
    assert main(["sample", str(run), "--n", "4", "--out", str(tmp_path / "grid.png")]) == 0
    assert (tmp_path / "grid.png").is_file()
    assert main(["eval", str(run), "--metrics", "fid,nll", "--n", "8", "--nll-n", "4",
                 "--out", str(tmp_path / "ev")]) == 0
    r = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert r["nll_method"] == "iwae" and r["nll_n"] == 4 and 0 < r["bits_per_dim"] < 10 and r["fid"] >= 0
    assert main(["eval", str(run), "--metrics", "nll", "--nll-method", "elbo", "--nll-n", "4",
                 "--out", str(tmp_path / "ev2")]) == 0
    assert json.loads((tmp_path / "ev2" / "eval.json").read_text())["nll_method"] == "elbo"
