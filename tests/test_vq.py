"""VQ family (vq tokenizer, vq_prior): straight-through gradients, the EMA codebook update against its closed form,
k-means and dead-code restarts, FSQ's levels and indices, codebook usage by brute force, MaskGIT's schedule, and
tokenizer -> prior -> sample -> eval from the CLI."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from conftest import tiny_feature_network

from genlab.cli import main
from genlab.errors import GenlabError
from genlab.eval import features as F
from genlab.eval import report as R
from genlab.models.base import GenerativeModel, SampleOption
from genlab.models.vq import VQConfig, VQPrior, VQPriorConfig, VQTokenizer, mask_ratio
from genlab.nn.quantizers import FSQ, VectorQuantizerEMA, codebook_usage, kmeans

pytestmark = pytest.mark.usefixtures("one_thread")


def test_vq_passes_gradients_straight_through():
    torch.manual_seed(0)
    vq = VectorQuantizerEMA(8, 3, kmeans_init=False).eval()
    z = torch.randn(2, 3, 4, 4, requires_grad=True)
    z_q, idx, _ = vq(z)
    z_q.retain_grad()
    w = torch.randn_like(z_q)
    (z_q * w).sum().backward()
    assert torch.equal(z.grad, z_q.grad) and torch.equal(z.grad, w)
    assert torch.allclose(z_q.detach(), vq.codebook[idx].permute(0, 3, 1, 2), atol=1e-6)  # the value is the code


def test_fsq_passes_gradients_straight_through_its_rounding():
    fsq = FSQ((8, 5, 3))
    z = torch.randn(2, 3, 4, 4, dtype=torch.double, requires_grad=True)
    q, _, _ = fsq(z)
    w = torch.randn_like(q)
    (q * w).sum().backward()
    # d q / d z = f'(z) / (L // 2), as if the rounding were the identity
    zz = z.detach().requires_grad_(True)
    (fsq.bound(zz) / torch.tensor([4.0, 2.0, 1.0], dtype=torch.double).view(1, 3, 1, 1) * w).sum().backward()
    assert torch.allclose(z.grad, zz.grad)


def test_ema_update_matches_the_closed_form_on_a_toy_batch():
    vq = VectorQuantizerEMA(3, 2, decay=0.9, eps=1e-5, kmeans_init=False)
    vq.codebook.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0], [5.0, 5.0]]))
    vq.ema_sum.copy_(vq.codebook)
    vq.ema_count.fill_(1.0)
    flat = torch.tensor([[0.1, 0.0], [0.9, 1.2], [1.1, 0.8], [0.0, -0.2]])
    idx = torch.tensor([0, 1, 1, 0])
    vq.ema_update(flat, idx)
    # by hand: n = (2, 2, 0); sums = ((0.1, -0.2), (2.0, 2.0), (0, 0))
    count = [0.9 * 1 + 0.1 * 2, 0.9 * 1 + 0.1 * 2, 0.9 * 1 + 0.1 * 0]
    sums = [[0.9 * 0 + 0.1 * 0.1, 0.9 * 0 + 0.1 * -0.2], [0.9 + 0.1 * 2.0, 0.9 + 0.1 * 2.0], [0.9 * 5, 0.9 * 5]]
    total = sum(count)
    smoothed = [(c + 1e-5) / (total + 3e-5) * total for c in count]
    expected = torch.tensor([[s / n for s in row] for row, n in zip(sums, smoothed, strict=True)])
    assert torch.allclose(vq.ema_count, torch.tensor(count))
    assert torch.allclose(vq.codebook, expected, atol=1e-6)


def test_kmeans_finds_separated_clusters_and_init_uses_it():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    x = (centres[:, None] + 0.1 * torch.randn(4, 50, 2, generator=g)).reshape(-1, 2)
    found = kmeans(x, 4, generator=torch.Generator().manual_seed(1))
    nearest = torch.cdist(centres, found).min(1).values
    assert (nearest < 0.1).all()
    vq = VectorQuantizerEMA(4, 2, kmeans_init=True).train()
    torch.manual_seed(2)
    with torch.enable_grad():
        vq(x.view(20, 10, 2).permute(0, 2, 1)[..., None])
    assert bool(vq.initialized) and (torch.cdist(centres, vq.codebook).min(1).values < 0.2).all()


def test_dead_codes_restart_at_encoder_outputs():
    torch.manual_seed(0)
    vq = VectorQuantizerEMA(4, 2, kmeans_init=False, dead_threshold=0.5).train()
    vq.codebook.copy_(torch.tensor([[0.0, 0.0], [100.0, 100.0], [200.0, 200.0], [1.0, 1.0]]))
    vq.ema_sum.copy_(vq.codebook)
    vq.ema_count.copy_(torch.tensor([5.0, 0.1, 0.2, 5.0]))  # codes 1 and 2 are dead
    z = torch.randn(3, 2, 2, 2)
    with torch.enable_grad():
        vq(z)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 2)
    for k in (1, 2):  # restarted at one of this batch's vectors (then moved by one EMA step toward their mean)
        assert vq.codebook[k].abs().max() < 10
    assert torch.cdist(vq.codebook[1:3], flat).min() < 5


def test_fsq_levels_rounding_and_indices():
    levels = (8, 5, 3)
    fsq = FSQ(levels)
    z = torch.linspace(-6, 6, 2001).view(1, 1, -1, 1).expand(1, 3, -1, 1)
    q, idx, _ = fsq(z)
    for c, n in enumerate(levels):
        values = q[0, c].unique()
        assert len(values) == n  # exactly L values per channel
        steps = (values * (n // 2)).round()
        assert torch.allclose(values * (n // 2), steps, atol=1e-6)  # integers before rescaling
        assert values.min() >= -1 and values.max() <= 1
    all_idx = torch.arange(fsq.num_codes).view(1, -1, 1)
    codes = fsq.lookup(all_idx)
    assert len({tuple(v) for v in codes[0].permute(1, 2, 0).reshape(-1, 3).tolist()}) == fsq.num_codes == 120
    half = torch.tensor([4.0, 2.0, 1.0]).view(1, 3, 1, 1)
    assert torch.equal(fsq.codes_to_indices(codes * half), all_idx)  # index <-> code is a bijection
    assert torch.equal(fsq.lookup(idx), q.detach())


def test_codebook_usage_by_brute_force():
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 20, (500,), generator=g) % 17  # codes 17..19 never used
    counts = torch.bincount(idx, minlength=20)
    out = codebook_usage(counts)
    assert out["codebook_usage"] == len(set(idx.tolist())) / 20
    p = [idx.tolist().count(k) / 500 for k in range(20)]
    assert math.isclose(out["codebook_perplexity"], math.exp(-sum(v * math.log(v) for v in p if v)), rel_tol=1e-9)


class _Images:
    def __init__(self, x: torch.Tensor) -> None:
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    def get_batch(self, idx):
        return {"x": self.x[torch.as_tensor(idx)], "label": torch.zeros(len(idx), dtype=torch.long)}


@pytest.mark.parametrize("quantizer", ["vq", "fsq"])
def test_epoch_code_counts_match_per_image_brute_force(quantizer):
    torch.manual_seed(0)
    model = VQTokenizer(VQConfig(image_size=8, channels=1, base_channels=8, quantizer=quantizer, codebook_size=16,
                                 code_dim=4, fsq_levels=(3, 3))).eval()
    data = _Images(torch.rand(37, 1, 8, 8) * 2 - 1)
    counts, _, _ = model.code_counts(data, batch_size=10)
    seen: dict[int, int] = {}
    for i in range(len(data)):  # one image at a time
        for k in model.encode_indices(data.x[i: i + 1]).flatten().tolist():
            seen[k] = seen.get(k, 0) + 1
    assert counts.tolist() == [seen.get(k, 0) for k in range(model.num_codes)]
    assert model.validation_metrics(data)["codebook_usage"] == len(seen) / model.num_codes


def test_maskgit_decodes_on_the_cosine_schedule_and_attends_both_ways():
    torch.manual_seed(0)
    tok = VQTokenizer(VQConfig(image_size=8, channels=1, base_channels=8, codebook_size=16, code_dim=4,
                               channel_mults=(1,), patchify=2))
    prior = VQPrior(VQPriorConfig(tokenizer_config=dataclasses.asdict(tok.config), arch="maskgit", n_layer=1,
                                  n_head=2, n_embd=16)).eval()
    L = prior.length
    assert L == 16
    seen = []
    real_forward = prior.net.forward
    prior.net.forward = lambda codes, y: (seen.append((codes == prior.net.mask_id).sum(1)), real_forward(codes, y))[1]
    codes = prior.sample_codes(3, None, [torch.Generator().manual_seed(i) for i in range(3)], 1.0, steps=5)
    assert (codes != prior.net.mask_id).all() and codes.max() < 16
    expected = [L] + [math.floor(math.cos(math.pi / 2 * t / 5) * L) for t in range(1, 5)]
    assert [int(s[0]) for s in seen] == expected and all((s == s[0]).all() for s in seen)
    prior.net.forward = real_forward
    emb = torch.zeros(1, L + 1, 16, requires_grad=True)
    x = emb
    full = torch.ones(1, 1, L + 1, L + 1, dtype=torch.bool)
    for i, block in enumerate(prior.net.blocks):
        x = block(x, prior.net.rope_cos, prior.net.rope_sin, full, None, i)
    x[0, 1].sum().backward()
    assert (emb.grad[0, 2:].abs().sum(-1) > 0).all()  # position 1 sees later ones: bidirectional
    assert float(mask_ratio(torch.tensor(0.0))) == 1.0 and abs(float(mask_ratio(torch.tensor(1.0)))) < 1e-7


def test_size_limits_are_one_line_errors():
    with pytest.raises(GenlabError, match="codebook_size"):
        VQTokenizer(VQConfig(image_size=8, channels=1, codebook_size=10**9))
    with pytest.raises(GenlabError, match="fsq_levels"):
        VQTokenizer(VQConfig(image_size=8, channels=1, quantizer="fsq", fsq_levels=(256,) * 4))
    with pytest.raises(GenlabError, match="base_channels"):
        VQTokenizer(VQConfig(image_size=8, channels=1, base_channels=10**7))
    tok = dataclasses.asdict(VQConfig(image_size=8, channels=1, base_channels=8))
    with pytest.raises(GenlabError, match="n_layer"):
        VQPrior(VQPriorConfig(tokenizer_config=tok, n_layer=10**6))
    with pytest.raises(GenlabError, match="maskgit_steps"):
        VQPrior(VQPriorConfig(tokenizer_config=tok, arch="maskgit", maskgit_steps=10**9))
    with pytest.raises(GenlabError, match="tokenizer"):
        VQPrior(VQPriorConfig())


@pytest.fixture
def tiny_fnet(monkeypatch, tmp_path):
    fnet = tiny_feature_network()
    monkeypatch.setenv("GENLAB_CACHE", str(tmp_path / "cache"))
    for module in (F, R):
        monkeypatch.setattr(module, "get_feature_network", lambda *a, **k: fnet)
    return fnet


def _sets(*pairs: str) -> list[str]:
    return [a for s in pairs for a in ("--set", s)]


def test_cli_trains_tokenizer_then_priors_and_samples(tmp_path, tiny_fnet):
    common = ("train.steps=2", "train.batch_size=8", "train.warmup_steps=0", "train.log_every=1", "sample.n=4",
              "data.max_items=64", f"out_dir={tmp_path}")
    assert main(["train", "configs/mnist-vq.yaml", *_sets("name=tok", "model.base_channels=8",
                                                            "model.codebook_size=32", *common)]) == 0
    rows = [json.loads(line) for line in (tmp_path / "tok" / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if r.get("split") == "val"][-1]
    assert 0 < val["codebook_usage"] <= 1 and val["codebook_perplexity"] >= 1
    for recipe, name in (("configs/mnist-vq-prior.yaml", "gpt"), ("configs/mnist-maskgit.yaml", "mg")):
        assert main(["train", recipe, *_sets(f"name={name}", f"model.tokenizer={tmp_path / 'tok'}",
                                             "model.n_layer=1", "model.n_embd=16", "model.n_head=2", *common)]) == 0
        loaded = GenerativeModel.from_pretrained(tmp_path / name / "model")
        assert isinstance(loaded, VQPrior) and loaded.tokenizer.num_codes == 32
        steps = ["--steps", "3"] if SampleOption.STEPS in loaded.sample_options else []
        assert main(["sample", str(tmp_path / name), "--n", "4", "--label", "2", "--temperature", "0.9", *steps,
                     "--out", str(tmp_path / f"{name}.png")]) == 0
    assert main(["sample", str(tmp_path / "gpt"), "--n", "2", "--steps", "3", "--out", str(tmp_path / "x.png")]) == 2
    assert main(["eval", str(tmp_path / "mg"), "--metrics", "fid", "--n", "8", "--out", str(tmp_path / "ev")]) == 0
    assert math.isfinite(json.loads((tmp_path / "ev" / "eval.json").read_text())["fid"])
