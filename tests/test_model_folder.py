"""`load_model_folder`: the one loader of a model (or run) folder that a recipe key names, with its family check."""

from __future__ import annotations

import pytest
import torch
from test_gpt import tiny_gpt

from genlab.errors import GenlabError
from genlab.models.base import load_model_folder
from genlab.models.diffusion import DiffusionConfig, DiffusionModel
from genlab.models.gpt import GPT

pytestmark = pytest.mark.usefixtures("one_thread")

WANTED = "a trained diffusion model (or run) folder"


def _is_diffusion(m) -> bool:
    return type(m) is DiffusionModel


def _diffusion() -> DiffusionModel:
    cfg = DiffusionConfig(image_size=8, channels=1, base_channels=8, channel_mults=(1,), num_res_blocks=1,
                          attention_resolutions=(), head_channels=8, norm_groups=4, timesteps=10)
    return DiffusionModel(cfg)


def test_an_accepted_folder_loads_with_its_weights_and_a_run_folder_is_read_through_model(tmp_path):
    saved = _diffusion()
    saved.save_pretrained(tmp_path / "run" / "model")
    for path in (tmp_path / "run" / "model", tmp_path / "run", str(tmp_path / "run")):
        got = load_model_folder("model.init_from", path, WANTED, _is_diffusion)
        assert type(got) is DiffusionModel
        for k, v in saved.state_dict().items():
            assert torch.equal(got.state_dict()[k], v), k


@pytest.mark.parametrize("path", [None, ""])
def test_an_unset_key_says_who_needs_it_and_what_to_give(path):
    with pytest.raises(GenlabError) as e:
        load_model_folder("model.teacher", path, WANTED, _is_diffusion, needed_by="family consistency")
    assert str(e.value) == f"family consistency needs model.teacher: {WANTED}"


def test_a_folder_of_another_family_names_the_key_the_path_the_family_and_what_to_give(tmp_path):
    tiny_gpt().save_pretrained(tmp_path / "gpt")
    with pytest.raises(GenlabError) as e:
        load_model_folder("model.init_from", str(tmp_path / "gpt"), WANTED, _is_diffusion)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg == f"model.init_from={str(tmp_path / 'gpt')!r} holds a gpt model; give {WANTED}"
    assert isinstance(load_model_folder("model.init_from", tmp_path / "gpt", "a GPT", lambda m: isinstance(m, GPT)),
                      GPT)


def test_a_missing_folder_is_the_folder_loaders_own_one_line_error(tmp_path):
    with pytest.raises(GenlabError, match="neither a model folder"):
        load_model_folder("model.init_from", tmp_path / "nothing", WANTED, _is_diffusion)
