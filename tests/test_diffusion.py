"""The diffusion family: training loss, guidance, model folders, previews and the `genlab sample` CLI."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from PIL import Image

from genlab.cli import main
from genlab.config import SampleConfig
from genlab.data import load_dataset
from genlab.data.images import read_params
from genlab.errors import GenlabError
from genlab.models.base import GenerativeModel
from genlab.models.diffusion import DiffusionConfig, DiffusionModel
from genlab.sampling.denoiser import classifier_free_guidance

TINY = dict(base_channels=8, channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=(4,), head_channels=8,
            norm_groups=4)


def tiny_model(**kw) -> DiffusionModel:
    torch.manual_seed(0)
    model = DiffusionModel(DiffusionConfig(image_size=8, channels=1, num_classes=3, **TINY, **kw)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model().save_pretrained(tmp_path_factory.mktemp("tiny") / "model")


def test_build_fills_shape_and_classes_from_the_dataset():
    ds = load_dataset("mnist").subset(16)
    model = DiffusionModel.build(DiffusionConfig(**{**TINY, "attention_resolutions": (7,)}), ds)
    assert (model.config.image_size, model.config.channels, model.config.num_classes) == (28, 1, 10)
    assert model.net.label_embed.embed.num_embeddings == 11  # ten digits and the null class
    assert DiffusionModel.build(DiffusionConfig(**TINY, class_cond=False), ds).num_classes == 0
    with pytest.raises(GenlabError, match="image_size"):
        DiffusionModel.build(DiffusionConfig(**TINY, image_size=32), ds)


def test_training_loss_is_the_simple_loss_on_diffusers_noising():
    model = tiny_model()
    batch = {"x": torch.rand(5, 1, 8, 8) * 2 - 1, "label": torch.tensor([0, 1, 2, -1, 1])}
    torch.manual_seed(0)
    loss = model.training_losses(batch)["loss"]
    torch.manual_seed(0)
    t = torch.randint(0, 1000, (5,))
    eps = torch.randn(5, 1, 8, 8)
    x_t = DDPMScheduler(num_train_timesteps=1000).add_noise(batch["x"], eps, t)
    y = torch.tensor([0, 1, 2, 3, 1])  # unlabeled -> null class
    torch.testing.assert_close(loss, F.mse_loss(model.net(x_t, t, y), eps), atol=1e-5, rtol=1e-5)


def test_guidance_scale_one_is_the_conditional_model_and_scale_s_extrapolates():
    model = tiny_model()
    x, sigma, y = torch.randn(3, 1, 8, 8) * 4, torch.tensor([3.0, 1.0, 0.5]), torch.tensor([0, 2, 1])
    null = torch.full_like(y, 3)
    with torch.no_grad():
        d_cond, d_null = model.denoise(x, sigma, y), model.denoise(x, sigma, null)
        torch.testing.assert_close(classifier_free_guidance(model.denoise, 1.0, null)(x, sigma, y), d_cond,
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(classifier_free_guidance(model.denoise, 3.0, null)(x, sigma, y),
                                   d_null + 3.0 * (d_cond - d_null), atol=1e-5, rtol=1e-5)


def test_sample_range_labels_and_argument_errors():
    model = tiny_model()
    x = model.sample(6, generator=torch.Generator().manual_seed(0), steps=4)
    assert x.shape == (6, 1, 8, 8) and x.min() >= -1 and x.max() <= 1
    assert model.labels_for(7, None).tolist() == [0, 0, 0, 1, 1, 1, 2]  # one grid row per class
    for kwargs, msg in [({"steps": 0}, "steps"), ({"sampler": "eulr"}, "sampler"), ({"cond": 3}, "label"),
                        ({"sampler": "ddpm", "eta": 0.5}, "eta")]:
        with pytest.raises(GenlabError, match=msg):
            model.sample(2, **kwargs)
    with pytest.raises(GenlabError, match="n=0"):
        model.sample(0)


def test_round_trip_gives_identical_samples(model_dir):
    model = tiny_model()
    loaded = GenerativeModel.from_pretrained(model_dir).eval()
    assert isinstance(loaded, DiffusionModel) and loaded.config == model.config
    for sampler in ("ddim", "ddpm"):
        a = model.sample(3, cond=[0, 1, 2], generator=torch.Generator().manual_seed(5), sampler=sampler, steps=5)
        b = loaded.sample(3, cond=[0, 1, 2], generator=torch.Generator().manual_seed(5), sampler=sampler, steps=5)
        assert torch.equal(a, b)


def test_truncated_weights_give_a_one_line_error(model_dir, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_bytes((model_dir / "config.json").read_bytes())
    data = (model_dir / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(GenlabError, match="truncated or corrupt"):
        GenerativeModel.from_pretrained(broken)
    assert main(["sample", str(broken), "--n", "1", "--steps", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "truncated or corrupt" in err


def test_write_preview_has_one_row_per_class(tmp_path):
    model = tiny_model()
    [path] = model.write_preview(tmp_path / "step_0000010", SampleConfig(n=7, steps=3), torch.Generator())
    img = np.asarray(Image.open(path))
    assert img.shape == (3 * 10 + 2, 2 * 10 + 2)  # 3 rows (classes) x 2 columns of 8px + 2px padding
    assert read_params(path)["steps"] == 3


def _pixels(path):
    return np.asarray(Image.open(path))


def test_cli_same_seed_same_image_and_params_in_png(model_dir, tmp_path):
    args = ["sample", str(model_dir), "--n", "4", "--steps", "3", "--cfg", "2", "--seed", "11"]
    assert main(args + ["--out", str(tmp_path / "a.png"), "--out-dir", str(tmp_path / "single")]) == 0
    assert main(args + ["--out", str(tmp_path / "b.png")]) == 0
    assert np.array_equal(_pixels(tmp_path / "a.png"), _pixels(tmp_path / "b.png"))
    p = read_params(tmp_path / "a.png")
    assert (p["seed"], p["steps"], p["cfg"], p["sampler"], p["labels"]) == (11, 3, 2.0, "ddim", [0, 0, 1, 1])
    # image 3 of the batch, reproduced alone from the seed and parameters in its own PNG
    single = tmp_path / "single" / "00003_seed14.png"
    q = read_params(single)
    assert (q["seed"], q["label"], q["steps"], q["cfg"]) == (14, 1, 3, 2.0)
    assert main(["sample", str(model_dir), "--n", "1", "--steps", "3", "--cfg", "2", "--seed", str(q["seed"]),
                 "--label", str(q["label"]), "--out-dir", str(tmp_path / "alone")]) == 0
    alone, batched = _pixels(tmp_path / "alone" / "00000_seed14.png"), _pixels(single)
    assert alone.shape == batched.shape == (8, 8)
    assert np.abs(alone.astype(int) - batched.astype(int)).max() <= 1  # batch-size rounding at most one level


@pytest.mark.parametrize("extra,msg", [(["--steps", "-3"], "--steps"), (["--n", "100000"], "--n"),
                                       (["--sampler", "nope"], "sampler"), (["--label", "3"], "label"),
                                       (["--cfg", "-1"], "--cfg")])
def test_cli_bad_arguments_are_one_line_errors(model_dir, tmp_path, capsys, extra, msg):
    assert main(["sample", str(model_dir), "--out", str(tmp_path / "x.png"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("genlab: error:") and msg in err


def test_cli_resolves_a_run_folder(model_dir, tmp_path):
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    for f in ("config.json", "model.safetensors"):
        (run / "model" / f).write_bytes((model_dir / f).read_bytes())
    assert main(["sample", str(run), "--n", "2", "--steps", "2", "--out", str(tmp_path / "r.png")]) == 0
    assert read_params(tmp_path / "r.png")["n"] == 2
