"""Pixel transformer (family pixel_ar): causality through gradients, the likelihood summing to 1 over every image,
the chain rule against prefix-by-prefix passes, the inverse-CDF draw against softmax, per-item seeds, the model
folder, and train -> sample -> eval from the CLI."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from conftest import randomize_weights, tiny_feature_network

from genlab.cli import main
from genlab.data.images import DELTA
from genlab.errors import GenlabError
from genlab.eval import features as F
from genlab.eval import report as R
from genlab.models.base import GenerativeModel, Likelihood, SampleOption
from genlab.models.pixel_ar import PixelAR, PixelARConfig, categorical

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(size: int = 4, channels: int = 1, classes: int = 0) -> PixelAR:
    torch.manual_seed(0)
    cfg = PixelARConfig(image_size=size, channels=channels, class_cond=classes > 0, num_classes=classes, n_layer=2,
                        n_head=2, n_embd=16)
    model = PixelAR(cfg).double().eval()
    randomize_weights(model)
    return model


def _levels(x: torch.Tensor) -> torch.Tensor:
    return x.double() * DELTA - 1.0


def test_output_at_a_value_has_no_gradient_from_later_values():
    model = _model(size=3, channels=2, classes=3)
    x = torch.rand(2, 2, 3, 3, dtype=torch.double) * 2 - 1
    tokens = model.to_tokens(x)
    emb = {}

    def keep(module, inputs, out):
        out.retain_grad()
        emb["out"] = out

    handle = model.net.gpt.tok_emb.register_forward_hook(keep)
    model.net.gpt.tok_emb.weight.requires_grad_(True)
    try:
        for i in range(tokens.shape[1]):
            logits = model.net.logits(tokens, torch.tensor([0, 2]))
            logits[:, i].pow(2).sum().backward()
            g = emb["out"].grad.abs().sum(-1)  # (B, L): input position p holds the start token (p = 0) or t_{p-1}
            assert (g[:, i + 1:] == 0).all(), f"logits of value {i} depend on later values"
            assert (g[:, : i + 1] > 0).all(), f"logits of value {i} ignore an earlier value"
            model.zero_grad()
    finally:
        handle.remove()


def test_chain_rule_equals_prefix_by_prefix_passes():
    model = _model(size=2, channels=1, classes=2)
    tokens = torch.randint(0, 256, (3, 4))
    y = torch.tensor([1, 0, 1])
    gpt = model.net.gpt
    brute = torch.zeros(3, dtype=torch.double)
    for i in range(4):  # each value from a separate pass over exactly its prefix (no mask or cache involved)
        prefix = torch.cat([model.net.start_tokens(3, y, tokens.device)[:, None], tokens[:, :i]], dim=1)
        logp = gpt(prefix)[:, -1, :256].log_softmax(-1)
        brute += logp.gather(-1, tokens[:, i, None])[:, 0]
    assert torch.allclose(model.net.log_prob(tokens, y), brute, atol=1e-10)


@pytest.mark.parametrize("classes", [0, 3])
def test_likelihood_sums_to_one_over_all_256_squared_images(classes):
    model = _model(size=1, channels=2, classes=classes)
    grid = torch.tensor(list(itertools.product(range(256), repeat=2)))  # every 2-value image
    x = _levels(grid).view(-1, 2, 1, 1)
    with torch.no_grad():
        log_density = torch.cat([model.log_likelihood(x[i: i + 8192]) for i in range(0, len(x), 8192)])
    mass = (log_density + 2 * math.log(DELTA)).exp().sum()  # density x bin volume = mass of each 8-bit image
    assert abs(float(mass) - 1.0) < 1e-9


def test_inverse_cdf_draw_matches_softmax_at_temperature():
    logits = torch.tensor([[0.3, -1.0, 2.0, 0.0, 1.1]]).expand(20000, -1)
    u = (torch.arange(20000, dtype=torch.float64) + 0.5) / 20000  # a uniform grid: frequencies are the CDF's steps
    for t in (1.0, 0.5, 2.0):
        counts = torch.bincount(categorical(logits, u.float(), t), minlength=5).double() / 20000
        assert torch.allclose(counts, torch.softmax(logits[0].double() / t, -1), atol=2e-4)
    assert (categorical(logits, u.float(), 0.0) == 2).all()


def test_capabilities_seeds_and_model_folder(tmp_path):
    model = _model(size=3, channels=1, classes=3).float()
    assert model.likelihood is Likelihood.EXACT and SampleOption.TEMPERATURE in model.sample_options
    gens = [torch.Generator().manual_seed(10 + i) for i in range(3)]
    batch = model.sample(3, torch.tensor([0, 1, 2]), gens, temperature=0.8)
    alone = model.sample(1, torch.tensor([1]), [torch.Generator().manual_seed(11)], temperature=0.8)
    assert torch.equal(batch[1:2], alone)  # item i depends on its own generator alone
    assert batch.shape == (3, 1, 3, 3) and batch.min() >= -1 and batch.max() <= 1
    model.save_pretrained(tmp_path / "m")
    loaded = GenerativeModel.from_pretrained(tmp_path / "m").eval()
    again = loaded.sample(3, torch.tensor([0, 1, 2]), [torch.Generator().manual_seed(10 + i) for i in range(3)],
                          temperature=0.8)
    assert torch.equal(batch, again)
    with pytest.raises(GenlabError, match="temperature"):
        model.sample(2, None, None, temperature=float("nan"))


def test_size_limits_are_one_line_errors():
    with pytest.raises(GenlabError, match="image_size"):
        PixelAR(PixelARConfig(image_size=1024, channels=3))
    with pytest.raises(GenlabError, match="n_embd"):
        PixelAR(PixelARConfig(image_size=4, channels=1, n_embd=10**7))
    with pytest.raises(GenlabError, match="n_layer"):
        PixelAR(PixelARConfig(image_size=4, channels=1, n_layer=10**6))


@pytest.fixture
def tiny_fnet(monkeypatch, tmp_path):
    fnet = tiny_feature_network()
    monkeypatch.setenv("GENLAB_CACHE", str(tmp_path / "cache"))
    for module in (F, R):
        monkeypatch.setattr(module, "get_feature_network", lambda *a, **k: fnet)
    return fnet


def test_cli_trains_samples_and_evaluates_a_pixel_transformer(tmp_path, tiny_fnet):
    sets = ["name=par", f"out_dir={tmp_path}", "model.n_layer=1", "model.n_embd=16", "model.n_head=2",
            "train.steps=2", "train.batch_size=4", "train.warmup_steps=0", "train.log_every=1", "sample.n=4",
            "data.max_items=64"]
    assert main(["train", "configs/mnist-pixelar.yaml", *[a for s in sets for a in ("--set", s)]]) == 0
    run = tmp_path / "par"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses and all(6.0 < v < 9.0 for v in losses)  # ~8 bits/dim before learning (256 levels)
    val = [r for r in rows if r.get("split") == "val"][-1]
    assert val["evals_per_image"] == 784 and val["sample_ms_per_image"] > 0 and 5.0 < val["bits_per_dim"] < 9.0
    assert main(["sample", str(run), "--n", "4", "--label", "3", "--temperature", "0.9",
                 "--out", str(tmp_path / "g.png")]) == 0
    assert (tmp_path / "g.png").is_file()
    assert main(["eval", str(run), "--metrics", "fid,nll", "--n", "8", "--nll-n", "4",
                 "--out", str(tmp_path / "ev")]) == 0
    report = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert math.isfinite(report["fid"]) and 5.0 < report["bits_per_dim"] < 9.0
