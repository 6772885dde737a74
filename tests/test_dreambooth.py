"""DreamBooth (Ruiz et al. 2023): the loss is eq. 2 (the diffusion loss on the instance images plus lambda times that
on the class images, each recomputed independently), the class images are the starting model's own samples of the
class prompt, the concept dataset is a shape `shapes` never draws, recipes that cannot work are one-line errors, and
`genlab train` with LoRA writes an adapter that `sample` reads and `export --merge` folds into a text_diffusion
folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import randomize_weights

from genlab.adapt.dreambooth import DreamBooth, DreamBoothConfig
from genlab.cli import main
from genlab.config import DataConfig
from genlab.data import load_dataset
from genlab.data import shapes as S
from genlab.data.tokenizer import train_tokenizer
from genlab.errors import GenlabError
from genlab.models.base import GenerativeModel
from genlab.models.lora import lora_layers
from genlab.models.t2i import TextDiffusionConfig, TextDiffusionModel
from genlab.sampling.controls import Guidance

pytestmark = pytest.mark.usefixtures("one_thread")

CAPTIONS = ["a red circle", "a blue square", "a red shape", "a red sks shape", "two green stars"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny 32 px text_diffusion model with random weights, saved as a model folder."""
    tok = train_tokenizer("\n".join(CAPTIONS * 4), "bpe", 300)
    cfg = TextDiffusionConfig(image_size=32, channels=3, base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
                              attention_resolutions=(16,), head_channels=8, norm_groups=4, timesteps=100,
                              text_width=16, text_depth=1, text_heads=2, vocab_size=tok.vocab_size, max_tokens=16)
    m = TextDiffusionModel(cfg, tokenizer=tok)
    randomize_weights(m)
    return m.save_pretrained(tmp_path_factory.mktemp("db") / "base")


def dreambooth(base_dir, **keys) -> DreamBooth:
    cfg = DreamBoothConfig(init_from=str(base_dir), instance_prompt="a red sks shape", class_prompt="a red shape",
                           class_images=3, class_steps=2, **keys)
    return DreamBooth.build(cfg, load_dataset(DataConfig(name="shapes_concept")))


def test_the_concept_is_a_red_shape_that_shapes_never_draws_in_both_sizes():
    ds = load_dataset(DataConfig(name="shapes_concept"))
    assert len(ds) == 5 and ds.captions == [S.CONCEPT_CAPTION] * 5
    assert S.CONCEPT[1] not in S.SHAPES and S.CONCEPT[1] in S.NOVEL_SHAPES
    scenes = [S.concept_scene("train", 0, i) for i in range(5)]
    assert {s.objects[0].size for s in scenes} == {"small", "large"}
    img = ds.images.permute(0, 2, 3, 1).numpy().astype(int)
    drawn = (255 - img).max(-1) > 64
    assert all(d.sum() > 20 for d in drawn)  # an object in every image
    red = np.array(S.COLORS["red"])
    assert np.abs(img[drawn] - red).max(-1).mean() < 40  # drawn in the concept's color
    test = load_dataset(DataConfig(name="shapes_concept", split="test"))
    assert not torch.equal(test.images, ds.images)
    # an arrow is not any of the known shapes: its rendered mask differs from each one's in the same box
    box = (0.1, 0.1, 0.9, 0.9)
    arrow = S.render_scene([S.ShapeObject("arrow", "red", "large", box)], 32) < 128
    for shape in S.SHAPES:
        other = S.render_scene([S.ShapeObject(shape, "red", "large", box)], 32) < 128
        assert (arrow[..., 1] != other[..., 1]).mean() > 0.05, shape


def test_the_loss_is_eq_2_instance_plus_lambda_times_prior(base_dir):
    model = dreambooth(base_dir, prior_weight=0.7).train()
    data = model.prepare_data(load_dataset(DataConfig(name="shapes_concept")))
    batch = data.get_batch([0, 1, 2, 3])
    assert batch["text"] == ["a red sks shape"] * 4 and batch["prior_text"] == ["a red shape"] * 4
    torch.manual_seed(5)
    out = model.training_losses(batch)
    torch.manual_seed(5)  # the same t and noise draws, in the same order: instance first, then prior
    inst = TextDiffusionModel.training_losses(model, {"x": batch["x"], "text": batch["text"]})["loss"]
    prior = TextDiffusionModel.training_losses(model, {"x": batch["prior_x"], "text": batch["prior_text"]})["loss"]
    torch.testing.assert_close(out["loss"], inst + 0.7 * prior)
    torch.testing.assert_close(out["instance_loss"], inst)
    assert out["prior_loss"] > 0 and not torch.equal(inst, prior)


def test_class_images_are_the_starting_models_samples_of_the_class_prompt(base_dir):
    model = dreambooth(base_dir)
    x = model.class_images()
    assert x.shape == (3, 3, 32, 32) and model.class_images() is x  # drawn once
    base = GenerativeModel.from_pretrained(base_dir)
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    ref = base.sample(3, "a red shape", generator=gens, sampler="dpmpp_2m", steps=2, guidance=Guidance(3.0))
    assert (x - ref).abs().max() <= 1 / 127.5 + 1e-6  # the same images, rounded to 8 bits
    torch.testing.assert_close(torch.round((x + 1) * 127.5), (x + 1) * 127.5)


def test_without_a_class_prompt_there_is_no_prior_term(base_dir):
    model = dreambooth(base_dir, prior_weight=0.0)
    model.config.class_prompt = ""
    data = model.prepare_data(load_dataset(DataConfig(name="shapes_concept")))
    assert "prior_x" not in data.get_batch([0]) and set(model.training_losses(data.get_batch([0, 1]))) == {"loss"}


@pytest.mark.parametrize("keys, message", [
    (dict(init_from=None), "needs model.init_from"),
    (dict(class_prompt=""), "needs model.class_prompt"),
    (dict(prior_weight=-1.0), "model.prior_weight"),
    (dict(class_steps=0), "model.class_steps"),
    (dict(class_sampler="eulr"), "euler"),
    (dict(base_channels=64), "model.base_channels=64 but model.init_from has 8"),
])
def test_bad_dreambooth_keys_are_one_line_errors(base_dir, keys, message):
    cfg = dict(init_from=str(base_dir), instance_prompt="a red sks shape", class_prompt="a red shape")
    with pytest.raises(GenlabError, match=message):
        DreamBooth.build(DreamBoothConfig(**{**cfg, **keys}), load_dataset(DataConfig(name="shapes_concept")))


def test_init_from_must_be_a_text_to_image_model(tmp_path):
    from genlab.models.diffusion import DiffusionConfig, DiffusionModel

    other = DiffusionModel(DiffusionConfig(image_size=32, channels=3, base_channels=8, channel_mults=(1,),
                                           num_res_blocks=1, attention_resolutions=(), norm_groups=4,
                                           timesteps=10, class_cond=False)).save_pretrained(tmp_path / "d")
    with pytest.raises(GenlabError, match="holds a diffusion model"):
        dreambooth(other)


@pytest.mark.slow  # 27 s on one thread of a loaded 2-core CPU, most of it importing peft
def test_cli_trains_a_lora_dreambooth_that_sample_and_export_merge_read(base_dir, tmp_path, capsys):
    sets = [f"model.init_from={base_dir}", f"out_dir={tmp_path}", "name=db", "model.class_images=4",
            "model.class_steps=2", "adapt.lora.rank=2", "train.steps=3", "train.warmup_steps=1", "train.lr=0.05",
            "train.ema_decay=0", "train.ckpt_every=0", "sample.n=2", "sample.steps=2"]
    assert main(["train", "configs/shapes-dreambooth.yaml", *[a for s in sets for a in ("--set", s)]]) == 0
    adapter = tmp_path / "db" / "model"
    meta = json.loads((adapter / "adapter_config.json").read_text())
    assert meta["r"] == 2 and meta["base_model_name_or_path"] == str(base_dir)
    loaded = GenerativeModel.from_pretrained(adapter)
    assert type(loaded) is TextDiffusionModel and lora_layers(loaded)
    assert main(["sample", str(tmp_path / "db"), "--prompt", "a red sks shape", "--n", "1", "--steps", "2",
                 "--out", str(tmp_path / "x.png")]) == 0
    assert main(["export", str(tmp_path / "db"), "--merge", "--out", str(tmp_path / "merged")]) == 0
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["family"] == "text_diffusion"
    assert main(["train", "configs/shapes-dreambooth.yaml", *[a for s in sets for a in ("--set", s)],
                 "--set", "name=db2", "--set", "data.image_size=64"]) == 2
    assert "set data.image_size=32" in capsys.readouterr().err


# -- the concept classifier ------------------------------------------------------------------------------------
def test_concept_renders_are_balanced_single_objects_with_the_concept_last():
    from genlab.eval.concept import ConceptRecipe, concept_classes, concept_renders

    recipe = ConceptRecipe(per_class=8)
    x, y = concept_renders(recipe, "val")
    classes = concept_classes("arrow")
    assert classes[-1] == "arrow" and classes[:-1] == S.SHAPES
    assert x.shape == (2 * len(classes), 3, 32, 32) and torch.equal(torch.bincount(y), torch.full((8,), 2))
    assert x.min() >= -1 and x.max() <= 1 and not torch.equal(x, concept_renders(recipe, "train")[0][: len(x)])
    with pytest.raises(GenlabError, match="not a new shape"):
        concept_classes("circle")


def test_share_is_the_fraction_of_images_called_the_concept():
    from genlab.eval.concept import ConceptClassifier

    class Stub(torch.nn.Module):  # calls an image the concept when its mean is above 0
        def forward(self, x):
            logits = torch.zeros(len(x), 8)
            logits[:, 7] = x.mean((1, 2, 3))
            return logits

    clf = ConceptClassifier(Stub(), (*S.SHAPES, "arrow"), {"image_size": 32})
    x = torch.cat([torch.full((3, 3, 32, 32), 0.5), torch.full((5, 3, 32, 32), -0.5)])
    assert clf.share(x) == 3 / 8 and clf.concept == "arrow"
    with pytest.raises(GenlabError, match="reads"):
        clf.predict(torch.zeros(2, 3, 16, 16))


@pytest.mark.slow
def test_the_concept_classifier_tells_the_arrow_from_the_known_shapes_on_held_out_renders():
    from genlab.eval.concept import ConceptRecipe, train_concept_classifier

    clf = train_concept_classifier(ConceptRecipe())  # the benchmark's recipe: 99.4% in 80 s on one loaded thread
    assert clf.meta["val_accuracy"] > 0.9 and clf.meta["val_concept_recall"] > 0.9
    assert clf.meta["val_known_called_concept"] < 0.05
