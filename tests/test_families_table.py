"""The family table (benchmarks/families.py), Stacked-MNIST and the diversity measures against independent
references: brute-force nearest neighbours, closed-form KLs, constructed Stacked-MNIST images."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_feature_network

from genlab.data import load_dataset
from genlab.errors import GenlabError
from genlab.eval import diversity

ROOT = Path(__file__).resolve().parent.parent


def _families():
    if "families_bench" not in sys.modules:
        spec = importlib.util.spec_from_file_location("families_bench", ROOT / "benchmarks" / "families.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules["families_bench"] = mod
        spec.loader.exec_module(mod)
    return sys.modules["families_bench"]


# -- closed forms and brute force -------------------------------------------------------------------------------
def test_kl_to_uniform_closed_form():
    assert diversity.kl_to_uniform(torch.tensor([5, 5, 5, 5])) == pytest.approx(0.0, abs=1e-12)
    assert diversity.kl_to_uniform(torch.tensor([0, 7, 0, 0, 0])) == pytest.approx(math.log(5))
    # two of four bins, equally: KL = log(4 / 2)
    assert diversity.kl_to_uniform(torch.tensor([3, 0, 3, 0])) == pytest.approx(math.log(2))
    p = np.array([0.1, 0.2, 0.3, 0.4])
    assert diversity.kl_to_uniform(torch.tensor(p * 1000)) == pytest.approx(float((p * np.log(4 * p)).sum()))
    with pytest.raises(GenlabError):
        diversity.kl_to_uniform(torch.zeros(3))


def test_class_shares():
    out = diversity.class_shares(torch.tensor([0, 0, 1, 3]), 4)
    assert out["class_shares"] == [0.5, 0.25, 0.0, 0.25]
    assert out["class_kl"] == pytest.approx(0.5 * math.log(2) + 2 * 0.25 * math.log(1.0))


def test_memorization_rate_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(60, 5, generator=g), torch.randn(200, 5, generator=g)
    copies = train[:7] + 1e-4 * torch.randn(7, 5, generator=g)  # near-copies of training items
    samples = torch.cat([copies, torch.randn(33, 5, generator=g)])
    out = diversity.memorization_rate(samples, train, test)

    def nn_dist(q):
        return np.array([min(float(np.linalg.norm(a - b)) for b in train.numpy()) for a in q.numpy()])

    threshold = np.quantile(nn_dist(test), 0.01)  # torch.quantile and numpy both interpolate linearly
    expected = float((nn_dist(samples) < threshold).mean())
    assert out["memorization_threshold"] == pytest.approx(threshold)
    assert out["memorization"] == pytest.approx(expected)
    assert out["memorization"] >= 7 / 40  # the near-copies are caught


# -- Stacked-MNIST ----------------------------------------------------------------------------------------------
def test_stacked_mnist_dataset():
    mnist = load_dataset("mnist")
    ds = load_dataset("stacked_mnist")
    assert ds.images.shape[1:] == (3, 28, 28) and ds.info.num_classes == 1000
    assert len(torch.unique(ds.labels)) == 1000  # every mode present in the train split
    # each channel is one MNIST train digit, and the label is its mode
    digit_of = {bytes(img.numpy().tobytes()): int(y) for img, y in zip(mnist.images[:, 0], mnist.labels)}
    for i in range(5):
        d = [digit_of[bytes(ds.images[i, c].numpy().tobytes())] for c in range(3)]
        assert int(ds.labels[i]) == 100 * d[0] + 10 * d[1] + d[2]
    test = load_dataset("stacked_mnist", split="test")
    assert len(test) == 6000 and not torch.equal(test.images[:10], ds.images[:10])
    with pytest.raises(GenlabError):
        load_dataset("stacked_mnist", split="val")


def test_stacked_mode_count_on_constructed_images():
    """A classifier that reads the digit off each channel's mean: modes and KL must match the construction."""
    def make(digits):
        d = torch.as_tensor(digits, dtype=torch.float32)
        return (d[:, :, None, None] / 10).expand(-1, -1, 4, 4).clone()  # channel c is filled with d_c / 10

    def classify(x):
        return (x.mean(dim=(1, 2, 3)) * 10).round().long()

    all_modes = np.array([[m // 100, m // 10 % 10, m % 10] for m in range(1000)])
    out = diversity.stacked_mnist_modes(make(all_modes), classify)
    assert out == {"modes": 1000, "modes_kl": pytest.approx(0.0, abs=1e-12), "modes_n": 1000}
    two = make([[1, 2, 3]] * 30 + [[9, 9, 9]] * 10)
    out = diversity.stacked_mnist_modes(two, classify)
    p = np.array([0.75, 0.25])
    assert out["modes"] == 2 and out["modes_kl"] == pytest.approx(float((p * np.log(1000 * p)).sum()))
    with pytest.raises(GenlabError):
        diversity.stacked_mnist_modes(torch.zeros(2, 1, 4, 4), classify)


def test_stacked_mode_count_with_the_classifier_on_real_stacks():
    """Real Stacked-MNIST test images through the MNIST classifier: its modes agree with the labels where the
    (tiny) classifier gets all three digits right."""
    fnet = tiny_feature_network()
    ds = load_dataset("stacked_mnist", split="test").subset(300)
    x = ds.get_batch(torch.arange(300))["x"]
    out = diversity.stacked_mnist_modes(x, fnet.classify)
    assert out["modes_n"] == 300 and 1 <= out["modes"] <= len(torch.unique(ds.labels))


# -- the table --------------------------------------------------------------------------------------------------
def _tiny_settings(fam, **kw):
    tiny = {
        "mnist-vae": ["model.base_channels=8", "model.norm_groups=4", "model.iwae_samples=2", "train.batch_size=16",
                      "data.max_items=256"],
        "mnist-gan": ["model.base_channels=4", "model.d_features=8", "train.batch_size=8", "data.max_items=256",
                      "train.channels_last=false"],
    }
    return fam.Settings(**({"minutes": 0.01, "n": 40, "stacked_n": 30, "nll_n": 4, "batch": 20, "extra": tiny} | kw))


def test_table_smoke_cache_and_retrain(tmp_path, monkeypatch, one_thread):
    fam = _families()
    monkeypatch.setenv("GENLAB_CACHE", str(tmp_path / "cache"))
    measure = fam.Measure(tiny_feature_network())
    rows = [fam.Row("vae", "mnist-vae", roles=("vae",)),
            fam.Row("gan-stacked", "mnist-gan", fam.UNCOND, data=fam.STACKED, roles=("gan_stacked",)),
            fam.Row("not-yet", "mnist-no-such-recipe")]
    s = _tiny_settings(fam)
    out = tmp_path / "fam"
    logs: list[str] = []
    first = fam.run_rows(rows, s, out, measure=measure, log=logs.append)
    assert first["trained"] == ["vae", "gan-stacked"] and first["missing"] == ["not-yet"]
    vae, gan = first["rows"]["vae"], first["rows"]["gan-stacked"]
    assert vae["n"] == 40 and math.isfinite(vae["fid"]) and vae["kid_se"] >= 0
    assert len(vae["class_shares"]) == 10 and sum(vae["class_shares"]) == pytest.approx(1.0)
    assert 0 <= vae["memorization"] <= 1 and vae["nfe"] == 1 and vae["ms_per_image"] > 0
    assert vae["likelihood"] == "bound" and math.isfinite(vae["bits_per_dim"])
    t = vae["train"]
    assert t["params"] > 0 and t["flops_per_step"] > 0 and t["train_flops"] == t["flops_per_step"] * t["steps"]
    assert t["images_seen"] == 16 * t["steps"]
    assert gan["modes_n"] == 30 and 1 <= gan["modes"] <= 30 and "fid" not in gan
    assert (out / "rows" / "vae.json").is_file() and vae["code_version"] and vae["key"]

    paths = fam.write_table(first, rows, out)
    md = paths["md"].read_text()
    assert "| vae |" in md and "Stacked-MNIST" in md and "not-yet" in md and "## Acceptance" in md
    assert json.loads(paths["json"].read_text())["rows"]["vae"]["fid"] == pytest.approx(vae["fid"])
    assert paths["png"].is_file()

    again = fam.run_rows(rows, s, out, measure=measure, log=logs.append)
    assert again["trained"] == [] and again["measured"] == []  # nothing changed: nothing trained or measured
    assert again["rows"]["vae"]["fid"] == vae["fid"]

    s.extra = {**s.extra, "mnist-gan": [*s.extra["mnist-gan"], "model.z_dim=32"]}  # one recipe changes
    third = fam.run_rows(rows, s, out, measure=measure, log=logs.append)
    assert third["trained"] == ["gan-stacked"] and third["measured"] == ["gan-stacked"]

    s.n = 50  # the evaluation changes: both rows are measured again, neither is retrained
    fourth = fam.run_rows(rows, s, out, measure=measure, log=logs.append)
    assert fourth["trained"] == [] and fourth["measured"] == ["vae"]  # the stacked row draws stacked_n


def test_acceptance_checks_on_constructed_rows():
    fam = _families()

    def rec(name, roles, **m):
        return {"row": name, "spec": {"roles": roles}, "train": {}, **m}

    rows = {"r0": rec("r0", ("r0", "genlab_diffusion"), fid=10.0), "fm": rec("fm", ("fm50",), fid=10.5),
            "gan": rec("gan", ("gan",), fid=25.0), "vae": rec("vae", ("vae",), fid=49.0),
            "glow": rec("glow", ("flow",), bits_per_dim=1.1), "hf": rec("hf", ("diffusers",), fid=30.0)}
    checks = {c["check"]: c["result"] for c in fam.acceptance(rows)}
    assert checks["flow matching (Euler 50) FID <= 1.1 r0"] == "pass"
    assert checks["relativistic GAN + R1 + R2 FID <= 2 r0"] == "fail"
    assert checks["VAE FID <= 5 r0"] == "pass"
    assert checks["flows <= 1.20 test bits/dim"] == "pass"
    assert checks["genlab diffusion FID <= 0.5 x diffusers row"] == "pass"
    assert checks["autoregressive model: the lowest bits/dim"] == "n/a"
    assert fam._quality({"nonfinite_samples": 3, "n": 200}) == "non-finite samples (3/200)"
    assert fam._quality({"diverged": True}) == "diverged" and fam._quality({"fid": 12.345}) == "12.3"


def test_count_calls_and_flops():
    fam = _families()

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 4, bias=False)
            self.body = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.SiLU(), torch.nn.Linear(4, 4))
            self.act = torch.nn.SiLU()  # no parameters: reused freely, never counted

    net = Net()
    with fam.count_calls(net) as calls:
        net.lin(torch.zeros(3, 8))  # used once (like a class token), then five evaluations of the body
        for _ in range(5):
            net.act(net.act(net.body(torch.zeros(3, 4))))
    assert calls[0] == 5
    x = torch.randn(3, 8)
    # forward 2*3*8*4, backward twice that (grad of input and weight)
    assert fam.count_flops(lambda: net.lin(x.requires_grad_()).sum().backward()) == 3 * 2 * 3 * 8 * 4
    assert fam.fitted_steps(60, 10, 0.5) == 95


@pytest.mark.parametrize("argv, match", [
    (["--rows", "ddpm-250,nope"], "unknown row 'nope'"),
    (["--minutes", "0"], "--minutes"),
    (["--minutes", "nan"], "--minutes"),
    (["--n", "5"], "--n"),
    (["--stacked-n", "0"], "--stacked-n"),
    (["--nll-n", "0"], "--nll-n"),
    (["--n", "0"], "--n"),
    (["--threads", "0"], "--threads"),
    (["--batch", "0"], "--batch"),
])
def test_bad_options_fail_before_any_work(argv, match, tmp_path):
    fam = _families()
    with pytest.raises(GenlabError, match=match):
        fam.main([*argv, "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_out_must_be_a_folder(tmp_path):
    fam = _families()
    f = tmp_path / "a-file"
    f.write_text("x")
    with pytest.raises(GenlabError):
        fam.main(["--out", str(f), "--rows", "ddpm-250", "--table-only"])


@pytest.mark.slow
def test_two_stage_row_trains_its_tokenizer_first(tmp_path, monkeypatch, one_thread):
    """A VQ row: the tokenizer trains with half the budget, the MaskGIT prior reads its folder; usage is kept."""
    fam = _families()
    monkeypatch.setenv("GENLAB_CACHE", str(tmp_path / "cache"))
    tiny = ["model.base_channels=8", "model.norm_groups=4", "train.batch_size=16", "data.max_items=256"]
    prior = ["model.n_layer=1", "model.n_embd=32", "model.n_head=2", "train.batch_size=16", "data.max_items=256"]
    s = fam.Settings(minutes=0.02, n=20, nll_n=4, batch=20, extra={"mnist-vq": tiny, "mnist-maskgit": prior})
    row = fam.Row("vq-maskgit", "mnist-maskgit", tokenizer="mnist-vq", roles=("vq",))
    res = fam.run_rows([row], s, tmp_path / "fam", measure=fam.Measure(tiny_feature_network()))
    rec = res["rows"]["vq-maskgit"]
    assert res["trained"] == ["vq-maskgit"] and len(rec["train"]["stages"]) == 2
    assert 0 < rec["train"]["codebook_usage"] <= 1 and math.isfinite(rec["fid"])
    assert rec["train"]["train_flops"] == sum(st["train_flops"] for st in rec["train"]["stages"])
    again = fam.run_rows([row], s, tmp_path / "fam", measure=fam.Measure(tiny_feature_network()))
    assert again["trained"] == [] and again["measured"] == []


# -- training keyed apart from sampling ------------------------------------------------------------------------
def test_sampling_only_code_and_keys_leave_the_training_key_alone():
    """A family's sampling keys (consistency distillation's searched times) and its sampling-only functions change
    the row's key (it is measured again) but not its training run's key (the weights are reused); a family that
    declares none keeps its keys as they were (the source hashed byte for byte)."""
    fam = _families()
    src = ("class M:\n    def training_losses(self, b):\n        return b * 2\n\n"
           "    def sample(self, n):\n        return n\n\n\ndef helper():\n    return 1\n")
    strip = ("sample", "helper")
    assert fam.without_functions(src, strip) == fam.without_functions(
        src.replace("return n", "return n + 1").replace("return 1", "return 2") + "# a comment\n", strip)
    assert fam.without_functions(src, strip) != fam.without_functions(src.replace("b * 2", "b * 3"), strip)
    assert "training_losses" in fam.without_functions(src, strip) and "'sample'" not in fam.without_functions(
        src, strip)

    s = fam.Settings(minutes=1, n=20)
    cd = next(r for r in fam.ROWS if r.name == "cd-4")
    base_key, base_spec = fam.train_key(cd, s)
    assert not {"search_steps", "search_n", "sampling_sigmas"} & set(base_spec["config"]["model"])
    assert fam.row_config(cd, s, "run").model["search_steps"] == 4  # the recipe's, for the measurement
    changed = fam.Settings(minutes=1, n=20, extra={"mnist-cd": ["model.search_n=7", "model.search_iters=3"]})
    assert fam.train_key(cd, changed)[0] == base_key  # the same training run
    one, two = fam.sampling_spec(cd, s), fam.sampling_spec(cd, changed)
    assert one and two and one != two and two["keys"]["search_n"] == 7  # the row is measured again
    trained = fam.Settings(minutes=1, n=20, extra={"mnist-cd": ["model.num_scales=12"]})
    assert fam.train_key(cd, trained)[0] != base_key  # a training key still retrains
    assert fam.code_version(cd, "consistency", training=True) != fam.code_version(cd, "consistency")

    vae = fam.Row("vae", "mnist-vae")
    assert fam.sampling_spec(vae, s) == {}
    assert fam.code_version(vae, "vae", training=True) == fam.code_version(vae, "vae")
