"""TarFlow: invertibility, the log-determinant against a brute-force Jacobian, each block's autoregressive structure,
guidance and temperature, the model folder, and train -> sample -> eval from the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import randomize_weights, tiny_feature_network
from torch import Tensor
from torch.autograd.functional import jacobian

from genlab.cli import main
from genlab.data.images import DELTA
from genlab.errors import GenlabError
from genlab.eval import features as F
from genlab.eval import report as R
from genlab.models.base import GenerativeModel, Likelihood, SampleOption
from genlab.models.tarflow import TarFlow, TarFlowConfig
from genlab.sampling.controls import Guidance

pytestmark = pytest.mark.usefixtures("one_thread")


def _tarflow(class_cond: bool = True, size: int = 4, patch: int = 2, channels: int = 1) -> TarFlow:
    """A tiny float64 TarFlow with every weight random (zero-initialized output projections would be the identity),
    scaled down so exp(alpha) stays moderate."""
    torch.manual_seed(0)
    cfg = TarFlowConfig(image_size=size, channels=channels, patch_size=patch, blocks=3, layers_per_block=1,
                        n_embd=8, n_head=2, class_cond=class_cond, num_classes=3 if class_cond else 0)
    model = TarFlow(cfg).double().eval()
    randomize_weights(model)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    return model


def test_tarflow_is_invertible():
    model = _tarflow(size=8, patch=2)
    x = torch.rand(5, 1, 8, 8, dtype=torch.double) * 2 - 1
    y = torch.tensor([0, 1, 2, 1, 0])
    z, _ = model.encode(x, y)
    assert (model.decode(z, y) - x).abs().max() < 1e-5
    assert (model.patchify(x) - z).abs().max() > 0.1  # not trivially the identity
    z_null, _ = model.encode(x)  # the null class: another map, inverted as well
    assert (model.decode(z_null) - x).abs().max() < 1e-5 and (z_null - z).abs().max() > 1e-3


@pytest.mark.parametrize("channels", [1, 2])
def test_log_likelihood_is_prior_plus_brute_force_logdet(channels):
    model = _tarflow(size=4, patch=2, channels=channels)
    x = torch.rand(2, channels, 4, 4, dtype=torch.double) * 2 - 1
    y = torch.tensor([2, 0])
    z, logp = model.encode(x, y)
    for b in range(2):
        def f(xx, b=b):
            return model.encode(xx, y[b: b + 1])[0]

        D = x[0].numel()
        jac = jacobian(f, x[b: b + 1]).reshape(D, D)
        logdet = torch.linalg.slogdet(jac).logabsdet
        log_pz = torch.distributions.Normal(0.0, 1.0).log_prob(z[b]).sum()
        assert torch.allclose(logp[b], log_pz + logdet, atol=1e-9)


def test_each_block_is_autoregressive_in_its_order():
    model = _tarflow(size=4, patch=2)
    block = model.flow[0]
    x = torch.randn(1, 4, 4, dtype=torch.double)
    y = torch.tensor([1])
    jac = jacobian(lambda h: block(h, y)[0], x).reshape(4, 4, 4, 4)  # (patch i out, d, patch j in, d)
    for i in range(4):
        for j in range(i + 1, 4):
            assert jac[i, :, j].abs().max() == 0  # z_i does not depend on later patches
        assert jac[i, :, i].abs().max() > 0


def test_temperature_and_guidance():
    model = _tarflow(size=4, patch=2)
    assert model.likelihood is Likelihood.EXACT
    assert {SampleOption.TEMPERATURE, SampleOption.GUIDANCE} <= model.sample_options
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(3)]  # noqa: E731
    zero = model.sample(3, torch.tensor([0, 1, 2]), gens(), temperature=0.0)
    expected = model.decode(torch.zeros(3, 4, 4, dtype=torch.double), torch.tensor([0, 1, 2])).clamp(-1, 1)
    assert torch.allclose(zero, expected)  # T = 0: the image of z = 0
    plain = model.sample(3, torch.tensor([0, 1, 2]), gens(), temperature=0.7)
    unit = model.sample(3, torch.tensor([0, 1, 2]), gens(), temperature=0.7, guidance=Guidance(1.0))
    guided = model.sample(3, torch.tensor([0, 1, 2]), gens(), temperature=0.7, guidance=Guidance(3.0))
    assert torch.allclose(plain, unit) and (plain - guided).abs().max() > 1e-3
    alone = model.sample(1, torch.tensor([1]), [torch.Generator().manual_seed(1)], temperature=0.7,
                         guidance=Guidance(3.0))
    assert torch.allclose(guided[1:2], alone)  # per-item seeds
    with pytest.raises(GenlabError, match="negative"):
        model.sample(2, 0, None, guidance=Guidance(2.0, negative=1))
    with pytest.raises(GenlabError, match="class-conditional"):
        _tarflow(class_cond=False).sample(2, None, None, guidance=Guidance(2.0))


def test_model_folder_round_trip_gives_identical_samples(tmp_path):
    model = _tarflow(size=4, patch=2).float()
    model.save_pretrained(tmp_path / "m")
    loaded = GenerativeModel.from_pretrained(tmp_path / "m")
    g = lambda: [torch.Generator().manual_seed(i) for i in range(2)]  # noqa: E731
    assert torch.equal(model.sample(2, 1, g()), loaded.sample(2, 1, g()))


def test_size_limits_are_one_line_errors():
    with pytest.raises(GenlabError, match="image_size"):
        TarFlow(TarFlowConfig(image_size=10**6, channels=1))
    with pytest.raises(GenlabError, match="blocks"):
        TarFlow(TarFlowConfig(image_size=8, channels=1, blocks=10**6))
    with pytest.raises(GenlabError, match="patch_size"):
        TarFlow(TarFlowConfig(image_size=8, channels=1, patch_size=3))
    with pytest.raises(GenlabError, match="n_embd"):
        TarFlow(TarFlowConfig(image_size=8, channels=1, n_embd=10**7))


@pytest.fixture
def tiny_fnet(monkeypatch, tmp_path):
    fnet = tiny_feature_network()
    monkeypatch.setenv("GENLAB_CACHE", str(tmp_path / "cache"))
    for module in (F, R):
        monkeypatch.setattr(module, "get_feature_network", lambda *a, **k: fnet)
    return fnet


def test_cli_trains_samples_and_evaluates_a_tarflow(tmp_path, tiny_fnet):
    sets = ["name=tf", f"out_dir={tmp_path}", "model.blocks=2", "model.layers_per_block=1", "model.n_embd=16",
            "model.n_head=2", "train.steps=2", "train.batch_size=8", "train.warmup_steps=0", "train.log_every=1",
            "sample.n=4", "data.max_items=64"]
    assert main(["train", "configs/mnist-tarflow.yaml", *[a for s in sets for a in ("--set", s)]]) == 0
    run = tmp_path / "tf"
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert losses and all(0.5 < v < 12.0 for v in losses)
    val = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"val"' in line][-1]
    assert val["evals_per_image"] == 2 * 49 and val["sample_ms_per_image"] > 0 and 0.5 < val["bits_per_dim"] < 12.0
    assert main(["sample", str(run), "--n", "4", "--label", "3", "--temperature", "0.7", "--cfg", "2",
                 "--out", str(tmp_path / "g.png")]) == 0
    assert main(["eval", str(run), "--metrics", "fid,nll", "--n", "8", "--nll-n", "8",
                 "--out", str(tmp_path / "ev")]) == 0
    report = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert math.isfinite(report["fid"]) and 0.5 < report["bits_per_dim"] < 12.0


# -- noise augmentation and the denoising step (Zhai et al. 2024, sec. 2.3) ----------------------------------------
def _gaussian_tarflow(sigma: float, blocks: int = 3) -> tuple[TarFlow, Tensor, Tensor]:
    """A float64 TarFlow whose blocks output constant (mu_k, alpha_k) per patch value (zero output weights, random
    biases), so its density is a product of Gaussians: x_c ~ N(mean_c, std_c^2) for patch value c, with
    x = mu_0 + e^alpha_0 (mu_1 + e^alpha_1 (... + e^alpha_{K-1} z)) written out here; also (mean_c, std_c)."""
    torch.manual_seed(0)
    cfg = TarFlowConfig(image_size=4, channels=1, patch_size=2, blocks=blocks, layers_per_block=1, n_embd=8, n_head=2,
                        noise_std=sigma)
    model = TarFlow(cfg).double().eval()
    randomize_weights(model)
    mean, log_std = torch.zeros(4, dtype=torch.double), torch.zeros(4, dtype=torch.double)
    with torch.no_grad():
        for block in model.flow:
            block.proj_out.weight.zero_()
            mu, alpha = torch.randn(4, dtype=torch.double) * 0.5, torch.randn(4, dtype=torch.double) * 0.3
            block.proj_out.bias.copy_(torch.cat([mu, alpha]))
            mean, log_std = mean + log_std.exp() * mu, log_std + alpha
    return model, mean, log_std.exp()


def test_the_denoising_step_is_the_gaussian_posterior_mean():
    """For y = x + sigma eps with x ~ N(m, s^2 - sigma^2), y ~ N(m, s^2) and E[x | y] = m + (1 - sigma^2 / s^2)(y - m)
    (the Gaussian conjugate posterior, no score involved): the step must give it for a flow of density N(m, s^2)."""
    sigma = 0.2
    model, mean, std = _gaussian_tarflow(sigma)
    assert std.min() > sigma
    y = torch.randn(5, 1, 4, 4, dtype=torch.double, generator=torch.Generator().manual_seed(3))
    m, s2 = model.unpatchify(mean.expand(1, 4, 4)), model.unpatchify((std**2).expand(1, 4, 4))  # per pixel
    posterior_mean = m + (1 - sigma**2 / s2) * (y - m)
    assert torch.allclose(model.denoise(y), posterior_mean, atol=1e-10)
    assert (posterior_mean - y).abs().max() > 1e-2  # the step moves the sample
    # sampling decodes, then takes this step (and only with noise_std > 0)
    g = lambda: [torch.Generator().manual_seed(i) for i in range(2)]  # noqa: E731
    noisy = model.sample(2, None, g(), temperature=0.5, denoise=False)
    assert torch.allclose(model.sample(2, None, g(), temperature=0.5), model.denoise(noisy).clamp(-1, 1))
    model.config.noise_std = 0.0
    assert torch.equal(model.sample(2, None, g(), temperature=0.5), noisy)


def test_the_denoising_score_matches_finite_differences_of_the_log_likelihood():
    """A random conditional flow: (denoise(y) - y) / sigma^2 against central differences of log p(y | label)."""
    model = _tarflow(size=4, patch=2)
    model.config.noise_std = 0.1
    y = torch.rand(2, 1, 4, 4, dtype=torch.double, generator=torch.Generator().manual_seed(1)) * 2 - 1
    labels = torch.tensor([2, 0])
    score = (model.denoise(y, labels) - y) / 0.1**2

    def central(b: int, idx: tuple[int, ...], h: float) -> float:
        e = torch.zeros_like(y[b: b + 1])
        e[(0, *idx)] = h
        with torch.no_grad():
            up, down = (model.log_likelihood(y[b: b + 1] + s * e, labels[b: b + 1]) for s in (1, -1))
        return float(up - down) / (2 * h)

    for b in range(2):  # the norms compute in float32: h = 1e-3, its h^2 error cancelled by Richardson extrapolation
        for idx in [(0, 0, 0), (0, 1, 2), (0, 3, 3), (0, 2, 1)]:
            fd = (4 * central(b, idx, 1e-3) - central(b, idx, 2e-3)) / 3
            assert abs(fd - float(score[(b, *idx)])) < 2e-5 * max(1.0, abs(fd)), (fd, float(score[(b, *idx)]))
    null = (model.denoise(y) - y) / 0.1**2  # unlabelled: the null class's score, another one
    assert (null - score).abs().max() > 1e-3


@pytest.mark.parametrize("sigma", [0.0, 0.3])
def test_training_noise_is_gaussian_of_the_configured_std(sigma):
    """A new TarFlow is the identity map (zero output projections), so its loss on an all-zero batch is
    (D/2 log 2 pi + ||y||^2 / 2 - D log DELTA) / (D log 2) of the noised input y: the mean square of the noise it
    trained on, read back from the loss, is sigma^2 (Gaussian augmentation) or DELTA^2 / 12 (uniform
    dequantization, sigma = 0)."""
    torch.manual_seed(0)
    model = TarFlow(TarFlowConfig(image_size=8, channels=1, patch_size=2, blocks=2, layers_per_block=1, n_embd=8,
                                  n_head=2, noise_std=sigma))
    loss = float(model.training_losses({"x": torch.zeros(256, 1, 8, 8)})["loss"])
    mean_square = 2 * (loss * math.log(2) + math.log(DELTA)) - math.log(2 * math.pi)
    expected = sigma**2 if sigma else DELTA**2 / 12
    assert abs(mean_square / expected - 1) < 0.1, (mean_square, expected)


def test_noise_std_out_of_range_is_a_one_line_error():
    for bad in (-0.1, 2.0, float("nan")):
        with pytest.raises(GenlabError, match="model.noise_std"):
            TarFlow(TarFlowConfig(image_size=8, channels=1, noise_std=bad))
