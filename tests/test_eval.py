"""`genlab eval`, reports, the training evaluator and the metrics plot, on a tiny feature network and model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import tiny_feature_network

from genlab.cli import main
from genlab.errors import GenlabError
from genlab.eval import features as F
from genlab.eval import metrics as M
from genlab.eval import report as R
from genlab.models.base import GenerativeModel
from genlab.plots import plot_eval_metrics


@pytest.fixture(scope="module")
def _trained_tiny_fnet():
    return tiny_feature_network()


@pytest.fixture
def tiny_fnet(_trained_tiny_fnet, tmp_path, monkeypatch):
    """A 1-epoch feature network on 256 MNIST digits, standing in for the cached MNIST network."""
    monkeypatch.setenv("GENLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(R, "get_feature_network", lambda *a, **k: _trained_tiny_fnet)
    return _trained_tiny_fnet


def test_evaluate_images_records_features_hash_and_sample_sizes(tiny_fnet):
    fake = torch.rand(120, 1, 28, 28) * 2 - 1
    r = R.evaluate_images(fake, "mnist", "test", metrics=("fid", "kid", "is", "prc"), fnet=tiny_fnet, kid_subsets=5)
    assert r["features"]["hash"] == "tiny0000" and r["features"]["name"] == "genlab-classifier-mnist"
    assert r["n_fake"] == 120 and r["n_real"] == 2000 and r["reference"]["split"] == "test"
    assert r["kid_subset_size"] == 120


def test_reference_features_are_cached_and_identical(tiny_fnet, tmp_path):
    from genlab.eval.reference import reference_features

    a = reference_features(tiny_fnet, "mnist", "test")
    files = list((tmp_path / "cache" / "reference").glob("*.safetensors"))
    assert len(files) == 1 and "tiny0000" in files[0].name
    b = reference_features(tiny_fnet, "mnist", "test")
    torch.testing.assert_close(a.features, b.features, rtol=0, atol=0)
    assert a.n == 2000 and a.logits.shape == (2000, 10)


def test_reference_cache_tells_networks_with_the_same_hash_but_other_weights_apart(tiny_fnet):
    """A network retrained under the same recipe hash (other weights) gets its own reference features."""
    from genlab.data import load_dataset
    from genlab.eval.reference import all_images, load_images, reference_features

    recipe = F.FeatureRecipe(width=4, feature_dim=16, epochs=1, batch_size=64, seed=1)
    net, meta = F.train_feature_network(load_dataset("mnist").subset(256), None, recipe, "classifier",
                                        progress=False)
    other = F.FeatureNetwork(net, {**tiny_fnet.meta, **meta, "recipe": vars(recipe)})
    assert other.hash == tiny_fnet.hash and other.weights_digest != tiny_fnet.weights_digest
    a, b = reference_features(tiny_fnet, "mnist", "test"), reference_features(other, "mnist", "test")
    torch.testing.assert_close(b.features, other.embed(all_images(load_images("mnist", "test")))[0], rtol=0, atol=0)
    assert not torch.equal(a.features, b.features) and b.network["weights"] == other.weights_digest


def test_real_images_at_a_run_size_take_the_generated_images_path(tiny_fnet):
    """A perfect 32 px model of MNIST (its images are the test split loaded at 32 px) scores FID 0 against the
    test split: real and generated images reach the 28 px network through the same resizes."""
    from genlab.eval.reference import all_images, load_images

    perfect = all_images(load_images("mnist", "test", image_size=32))
    r = R.evaluate_images(perfect, "mnist", "test", metrics=("fid",), fnet=tiny_fnet)
    assert r["fid"] == pytest.approx(0, abs=1e-6) and r["reference"]["image_size"] == 32


def test_training_evaluator_is_deterministic_and_plots(tiny_fnet, tmp_path):
    class Noise(GenerativeModel):
        family = "noise"
        per_item_seeds = True  # takes one generator per image

        def sample(self, n, cond=None, generator=None, **opts):
            assert not opts  # it declares no sampler, steps or guidance, so the evaluator passes none
            return torch.stack([torch.rand(1, 28, 28, generator=g) for g in generator]) * 2 - 1

    evaluate = R.make_training_evaluator("mnist", n=64, sampler="ddim", steps=5, guidance=2.0)
    a, b = evaluate(Noise(None), 10), evaluate(Noise(None), 20)
    assert a == b and {"kid", "kid_se", "fid", "n_fake", "n_real"} <= set(a) and a["n_fake"] == 64
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps({"step": s, "split": "val", **a}) for s in (10, 20)) + "\n")
    png = plot_eval_metrics(path, tmp_path / "samples" / "eval_metrics.png")
    assert png is not None and png.stat().st_size > 1000


def test_metrics_from_features_agree_with_the_metric_functions(tiny_fnet):
    from genlab.eval.reference import reference_features

    ref = reference_features(tiny_fnet, "mnist", "test")
    fake = ref.features[:300] + 0.1
    r = R.metrics_from_features(ref, fake, None, ("fid", "kid", "prc"), kid_subsets=3, seed=1)
    assert r["fid"] == M.fid(ref.features, fake)
    assert r["kid"] == M.kid(ref.features, fake, subsets=3, seed=1)["kid"]
    assert r["prc_n"] == 300
    assert r["precision"] == M.precision_recall(*M.equal_sizes(ref.features, fake, seed=1))["precision"]


def test_parse_metrics_rejects_unknown_names():
    assert R.parse_metrics("fid, KID") == ["fid", "kid"]
    with pytest.raises(GenlabError, match="unknown metric 'fdi'"):
        R.parse_metrics("fid,fdi")


def _tiny_diffusion(tmp_path):
    from genlab.models.diffusion import DiffusionConfig, DiffusionModel

    torch.manual_seed(0)
    cfg = DiffusionConfig(image_size=28, channels=1, num_classes=10, base_channels=8, channel_mults=(1,),
                          num_res_blocks=1, attention_resolutions=(), timesteps=20, norm_groups=4, head_channels=8)
    return DiffusionModel(cfg).save_pretrained(tmp_path / "model")


def test_cli_eval_writes_json_markdown_and_grid(tiny_fnet, tmp_path, monkeypatch, capsys):
    import genlab.eval.features

    monkeypatch.setattr(genlab.eval.features, "get_feature_network", lambda *a, **k: tiny_fnet)
    model_dir = _tiny_diffusion(tmp_path)
    out = tmp_path / "ev"
    rc = main(["eval", str(model_dir), "--data", "mnist", "--metrics", "kid,fid,nll", "--n", "20", "--steps", "2",
               "--kid-subsets", "3", "--nll-n", "3", "--nll-t-samples", "1", "--out", str(out)])
    assert rc == 0
    r = json.loads((out / "eval.json").read_text())
    assert r["n_fake"] == 20 and r["n_real"] == 2000 and r["features"]["hash"] == "tiny0000"
    assert r["sampling"]["sampler"] == "ddim" and r["nll_n"] == 3 and r["bits_per_dim"] > 0
    md = (out / "eval.md").read_text()
    assert "tiny0000" in md and "n_real = 2000" in md and (out / "samples.png").is_file()


def test_cli_eval_without_data_is_a_one_line_error(tmp_path, capsys):
    model_dir = _tiny_diffusion(tmp_path)
    assert main(["eval", str(model_dir), "--metrics", "kid"]) == 2
    assert "pass --data NAME" in capsys.readouterr().err


def test_feature_network_for_unlabelled_images_is_contrastive(tmp_path, monkeypatch):
    """An image folder without labels gets a SimCLR encoder; its features separate two obviously different sets."""
    from PIL import Image

    monkeypatch.setenv("GENLAB_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(64):
        a = np.zeros((8, 8, 3), np.uint8)
        a[:, : 4 if i % 2 else 8] = rng.integers(100, 255)
        Image.fromarray(a).save(folder / f"{i}.png")
    monkeypatch.setattr(F, "default_recipe", lambda name, labelled: F.FeatureRecipe(
        width=4, feature_dim=8, epochs=2, batch_size=32, max_shift=1))
    fnet = F.get_feature_network(str(folder), progress=False)
    assert fnet.meta["kind"] == "contrastive" and fnet.test_accuracy is None
    again = F.get_feature_network(str(folder), progress=False)  # from the cache
    assert again.hash == fnet.hash


def test_cli_eval_of_a_vae_uses_its_log_likelihood_on_dequantized_pixels(tiny_fnet, tmp_path, monkeypatch):
    import genlab.eval.features
    from genlab.models.autoencoder import AutoencoderConfig, AutoencoderKL

    monkeypatch.setattr(genlab.eval.features, "get_feature_network", lambda *a, **k: tiny_fnet)
    torch.manual_seed(0)
    cfg = AutoencoderConfig(image_size=28, channels=1, base_channels=8, channel_mults=(1, 2), norm_groups=4,
                            z_channels=2)
    model_dir = AutoencoderKL(cfg).save_pretrained(tmp_path / "vae")
    out = tmp_path / "ev"
    assert main(["eval", str(model_dir), "--data", "mnist", "--metrics", "kid,nll", "--n", "16", "--kid-subsets",
                 "2", "--nll-n", "4", "--out", str(out)]) == 0
    r = json.loads((out / "eval.json").read_text())
    assert r["family"] == "autoencoder_kl" and r["nll_method"] == "dequantized log_likelihood"
    assert r["n_fake"] == 16 and r["sampling"] == {"seed": 0, "n": 16, "seconds": r["sampling"]["seconds"]}


def test_cli_eval_of_a_language_model_reports_perplexity(tmp_path):
    from genlab.data import load_dataset
    from genlab.models.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    cfg = GPTConfig(tokenizer="char", block_size=16, n_layer=1, n_head=2, n_embd=16)
    model = GPT.build(cfg, load_dataset("fortunes"))
    model_dir = model.save_pretrained(tmp_path / "gpt")
    out = tmp_path / "ev"
    assert main(["eval", str(model_dir), "--data", "fortunes", "--metrics", "nll", "--nll-n", "8",
                 "--out", str(out)]) == 0
    r = json.loads((out / "eval.json").read_text())
    vocab = model.config.vocab_size
    assert r["nll_n"] == 8 and r["tokens"] == 8 * 16 and 1 < r["perplexity"] < 3 * vocab  # untrained: near uniform
    assert main(["eval", str(model_dir), "--data", "fortunes", "--metrics", "fid"]) == 2


def test_trainer_logs_kid_on_generated_samples_and_plots_it(tiny_fnet, tmp_path):
    """`train.eval_every` + `train.eval_n`: KID/FID of fixed-seed samples land in metrics.jsonl and a plot."""
    from genlab.config import load_run_config
    from genlab.train import train

    sets = ["family=diffusion", "data.max_items=32", "model.base_channels=8", "model.channel_mults=[1,2]",
            "model.num_res_blocks=1", "model.attention_resolutions=[]", "model.norm_groups=4", "model.head_channels=8",
            "train.steps=4", "train.warmup_steps=1", "train.batch_size=8", "train.eval_every=2", "train.eval_n=8",
            "sample.steps=2", "sample.n=4", f"out_dir={tmp_path}", "name=kid"]
    run = train(load_run_config(None, sets))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "kid" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert all(np.isfinite(r["kid"]) and r["kid_se"] >= 0 and r["n_fake"] == 8 for r in evals)
    assert (run / "samples" / "eval_metrics.png").is_file()


def test_training_evaluator_uses_the_datasets_own_network_at_the_runs_image_size(_trained_tiny_fnet, tmp_path,
                                                                                 monkeypatch):
    """During training, as in `genlab eval`, a run at another image size is measured in the dataset's own network
    (asked for by name), with the real split loaded at the run's size."""
    from genlab.config import DataConfig

    asked = []
    monkeypatch.setenv("GENLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(R, "get_feature_network", lambda data, **k: asked.append(data) or _trained_tiny_fnet)

    class Noise16(GenerativeModel):
        family = "noise16"

        def sample(self, n, cond=None, generator=None, **opts):
            return torch.rand(n, 1, 16, 16, generator=generator) * 2 - 1

    evaluate = R.make_training_evaluator(DataConfig(name="mnist", image_size=16), n=8)
    r = evaluate(Noise16(None), 1)
    assert asked == ["mnist"] and r["n_fake"] == 8
    ref = list((tmp_path / "cache" / "reference").glob("*.safetensors"))
    assert len(ref) == 1
