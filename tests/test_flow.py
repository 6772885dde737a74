"""Normalizing flows (RealNVP, Glow): invertibility, log-determinants against brute-force Jacobians, actnorm's
data-dependent init, the LU 1x1 conv, temperature, the model folder, and train -> sample -> eval from the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import randomize_weights, tiny_feature_network
from torch.autograd.functional import jacobian

from genlab.cli import main
from genlab.eval import features as F
from genlab.eval import report as R
from genlab.models.base import GenerativeModel, Likelihood, SampleOption
from genlab.models.flow import FlowConfig, FlowModel
from genlab.nn.invertible import ActNorm, AffineCoupling, InvConv1x1, Squeeze, channel_mask, checkerboard_mask

pytestmark = pytest.mark.usefixtures("one_thread")
ARCHS = ("glow", "realnvp")


def _flow(arch: str, class_cond: bool = False, size: int = 4) -> FlowModel:
    """A tiny float64 flow with every weight random (zero-initialized couplings would be the identity)."""
    torch.manual_seed(0)
    cfg = FlowConfig(image_size=size, channels=1, arch=arch, levels=2, steps=2, hidden=4, class_cond=class_cond,
                     num_classes=3 if class_cond else 0)
    model = FlowModel(cfg).double()
    model.encode(torch.randn(8, 1, size, size, dtype=torch.double))  # actnorm's data-dependent init
    randomize_weights(model)
    return model


def _brute_logdet(f, x: torch.Tensor) -> torch.Tensor:
    """log |det J| of f at one item x (1, C, H, W), from the full Jacobian."""
    jac = jacobian(f, x).reshape(x.numel(), x.numel())
    return torch.linalg.slogdet(jac).logabsdet


@pytest.mark.parametrize("arch", ARCHS)
def test_flow_is_invertible(arch):
    model = _flow(arch, class_cond=True, size=8)
    x = torch.rand(5, 1, 8, 8, dtype=torch.double) * 2 - 1
    zs, _ = model.encode(x, torch.tensor([0, 1, 2, 1, 0]))
    assert (model.decode(zs) - x).abs().max() < 1e-5
    assert zs[0].abs().max() > 0.5  # not trivially the identity


def _layers() -> list[tuple[str, torch.nn.Module]]:
    torch.manual_seed(1)
    layers = [("actnorm", ActNorm(2)), ("invconv", InvConv1x1(2)), ("squeeze", Squeeze()),
              ("coupling checkerboard tanh", AffineCoupling(2, 4, checkerboard_mask(2, 4, 1), "tanh")),
              ("coupling channel sigmoid", AffineCoupling(2, 4, channel_mask(2, 0), "sigmoid"))]
    for _, layer in layers:
        layer.double()
        if isinstance(layer, ActNorm):
            layer.initialize(torch.randn(16, 2, 4, 4, dtype=torch.double) * 3 + 1)
        randomize_weights(layer)
    return layers


@pytest.mark.parametrize("name,layer", _layers(), ids=lambda v: v if isinstance(v, str) else "")
def test_each_layer_logdet_is_the_brute_force_jacobian_and_inverts(name, layer):
    x = torch.randn(1, 2, 4, 4, dtype=torch.double)
    y, logdet = layer(x)
    assert torch.allclose(logdet[0], _brute_logdet(lambda t: layer(t)[0], x), atol=1e-8)
    assert (layer.inverse(y) - x).abs().max() < 1e-10


@pytest.mark.parametrize("arch", ARCHS)
def test_whole_flow_log_likelihood_is_prior_plus_brute_force_logdet(arch):
    """With N(0, I) priors (zero-initialized, left so), log p(x) = sum log N(z; 0, I) + log|det dz/dx|."""
    model = _flow(arch)
    for level in model.levels:
        for p in level.prior.parameters():
            p.data.zero_()
    x = torch.randn(1, 1, 4, 4, dtype=torch.double)

    def to_z(t):
        return torch.cat([z.flatten(1) for z in model.encode(t)[0]], dim=1)

    z = to_z(x)
    prior = (-0.5 * (z**2 + math.log(2 * math.pi))).sum()
    assert torch.allclose(model.log_likelihood(x)[0], prior + _brute_logdet(to_z, x), atol=1e-8)


def test_actnorm_initializes_to_zero_mean_unit_variance_once_and_keeps_it_in_the_state():
    torch.manual_seed(0)
    x = torch.randn(64, 3, 5, 5) * torch.tensor([0.1, 2.0, 5.0]).view(1, 3, 1, 1) + torch.tensor([3.0, -1, 0]).view(
        1, 3, 1, 1)
    an = ActNorm(3)
    y, _ = an(x)
    assert torch.allclose(y.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(y.var(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-4)
    bias = an.bias.detach().clone()
    an(x * 10)  # a second batch does not initialize again
    assert torch.equal(an.bias, bias)
    resumed = ActNorm(3)
    resumed.load_state_dict(an.state_dict())
    assert torch.equal(resumed(x * 10)[0], an(x * 10)[0])  # the loaded layer keeps its init


def test_lu_conv_logdet_is_hw_times_slogdet_of_its_weight():
    torch.manual_seed(3)
    conv = InvConv1x1(4).double()
    randomize_weights(conv)
    _, logdet = conv(torch.randn(2, 4, 3, 5, dtype=torch.double))
    expected = 15 * torch.linalg.slogdet(conv.weight()).logabsdet
    assert torch.allclose(logdet, expected.expand(2))


def test_capabilities_and_temperature_scales_the_prior():
    assert FlowModel.likelihood is Likelihood.EXACT and SampleOption.TEMPERATURE in FlowModel.sample_options
    model = _flow("glow", size=8).float()
    cold = [model.sample(2, generator=torch.Generator().manual_seed(s), temperature=0.0) for s in (1, 2)]
    assert torch.equal(cold[0], cold[1])  # T = 0: every draw is the prior mean, whatever the noise
    hot = [model.sample(2, generator=torch.Generator().manual_seed(s), temperature=1.0) for s in (1, 2)]
    assert not torch.equal(hot[0], hot[1])


def test_model_folder_round_trip_gives_identical_samples(tmp_path):
    model = _flow("realnvp", class_cond=True, size=8).float().eval()
    loaded = GenerativeModel.from_pretrained(model.save_pretrained(tmp_path / "flow")).eval()
    gens = [[torch.Generator().manual_seed(i) for i in range(3)] for _ in range(2)]
    a = model.sample(3, cond=torch.tensor([0, 1, 2]), generator=gens[0], temperature=0.7)
    b = loaded.sample(3, cond=torch.tensor([0, 1, 2]), generator=gens[1], temperature=0.7)
    assert isinstance(loaded, FlowModel) and torch.equal(a, b)


@pytest.fixture
def tiny_fnet(tmp_path, monkeypatch):
    fnet = tiny_feature_network()
    monkeypatch.setenv("GENLAB_CACHE", str(tmp_path / "cache"))
    for module in (F, R):
        monkeypatch.setattr(module, "get_feature_network", lambda *a, **k: fnet)
    return fnet


def test_cli_trains_samples_and_evaluates_a_flow(tmp_path, tiny_fnet):
    sets = ["name=flow", f"out_dir={tmp_path}", "model.levels=2", "model.steps=1", "model.hidden=8",
            "train.steps=2", "train.batch_size=8", "train.warmup_steps=0", "train.log_every=1", "sample.n=4"]
    assert main(["train", "configs/mnist-flow.yaml", *[a for s in sets for a in ("--set", s)]]) == 0
    run = tmp_path / "flow"
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert losses and all(2.0 < v < 12.0 for v in losses)  # bits/dim of 8-bit images, before learning
    assert main(["sample", str(run), "--n", "4", "--temperature", "0.7", "--out", str(tmp_path / "g.png")]) == 0
    assert (tmp_path / "g.png").is_file()
    assert main(["eval", str(run), "--metrics", "fid,nll", "--n", "8", "--nll-n", "8",
                 "--out", str(tmp_path / "ev")]) == 0
    report = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert math.isfinite(report["fid"]) and 2.0 < report["bits_per_dim"] < 12.0
