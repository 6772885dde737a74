"""Config: unknown keys and wrong types fail by name, before any work; overrides are typed."""

from __future__ import annotations

from pathlib import Path

import pytest

from genlab.config import TrainConfig, apply_overrides, from_dict, load_run_config
from genlab.errors import GenlabError


def test_unknown_key_names_key_and_choices() -> None:
    with pytest.raises(GenlabError) as e:
        from_dict(TrainConfig, {"stpes": 3})
    msg = str(e.value)
    assert "'stpes'" in msg and "did you mean 'steps'" in msg and "batch_size" in msg


def test_nested_unknown_key_is_dotted(tmp_path: Path) -> None:
    p = tmp_path / "r.yaml"
    p.write_text("train:\n  lr: 0.1\n  warmpu_steps: 3\n")
    with pytest.raises(GenlabError, match=r"'train\.warmpu_steps'"):
        load_run_config(str(p))


def test_wrong_type_is_rejected() -> None:
    with pytest.raises(GenlabError, match="train.batch_size' must be an integer"):
        from_dict(TrainConfig, {"batch_size": "lots"}, prefix="train.")
    with pytest.raises(GenlabError, match="must have 2 items"):
        from_dict(TrainConfig, {"betas": [0.9]})


def test_overrides_are_parsed_as_yaml_and_typed() -> None:
    raw = apply_overrides({}, ["train.lr=1e-4", "train.betas=[0.5, 0.9]", "train.compile=true", "name=x"])
    cfg = from_dict(TrainConfig, raw["train"])
    assert cfg.lr == pytest.approx(1e-4) and cfg.betas == (0.5, 0.9) and cfg.compile is True
    assert raw["name"] == "x"


def test_malformed_yaml_is_one_line(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("train: [unclosed\n")
    with pytest.raises(GenlabError, match="not valid YAML"):
        load_run_config(str(p))


def test_missing_recipe() -> None:
    with pytest.raises(GenlabError, match="no recipe"):
        load_run_config("does-not-exist")
