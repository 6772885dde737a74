"""Registries see every name whatever was imported first: each CLI command, run in a fresh interpreter, takes a
non-default name from each registry (family, backbone, dataset, sampler)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from genlab.errors import GenlabError
from genlab.registry import Registry

TINY_DIT = ["model.backbone=dit", "model.patch_size=8", "model.hidden_size=16", "model.depth=1",
            "model.num_heads=2", "data.name=noto", "data.max_items=8", "train.steps=1", "train.warmup_steps=0",
            "train.batch_size=4", "train.log_every=1", "sample.sampler=dpmpp_2m", "sample.steps=2", "sample.n=2"]


def genlab(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "genlab.cli", *args], capture_output=True, text=True, env=env)


def assert_ok(r: subprocess.CompletedProcess) -> None:
    assert "unknown" not in r.stderr, r.stderr
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.fixture(scope="module")
def dit_run(tmp_path_factory):
    """`genlab train mnist-ddpm` turned into a DiT on noto whose preview uses dpmpp_2m: backbone, dataset and
    sampler by name."""
    out = tmp_path_factory.mktemp("runs")
    sets = [a for s in [*TINY_DIT, f"out_dir={out}", "name=dit"] for a in ("--set", s)]
    assert_ok(genlab("train", "mnist-ddpm", *sets))
    return out / "dit"


def test_train_with_dit_backbone_noto_data_and_dpmpp_2m_previews(dit_run):
    assert (dit_run / "model" / "model.safetensors").is_file()
    assert (dit_run / "samples").is_dir() and any((dit_run / "samples").glob("*.png"))


def test_sample_with_a_non_default_sampler(dit_run, tmp_path):
    assert_ok(genlab("sample", str(dit_run), "--sampler", "dpmpp_2m", "--n", "2", "--steps", "2",
                     "--out", str(tmp_path / "grid.png")))
    assert (tmp_path / "grid.png").is_file()


def test_eval_with_a_non_default_sampler(dit_run, tmp_path):
    assert_ok(genlab("eval", str(dit_run), "--metrics", "nll", "--nll-n", "2", "--nll-t-samples", "2",
                     "--sampler", "dpmpp_2m", "--n", "2", "--steps", "2", "--out", str(tmp_path / "eval")))
    assert (tmp_path / "eval" / "eval.json").is_file()


def test_eval_of_a_non_default_family(tmp_path):
    """An autoencoder_kl folder (random weights), measured by its likelihood bound."""
    from genlab.models.autoencoder import AutoencoderConfig, AutoencoderKL

    AutoencoderKL(AutoencoderConfig(image_size=32, channels=3, base_channels=8, channel_mults=(1,), norm_groups=4,
                                    z_channels=2)).save_pretrained(tmp_path / "ae")
    assert_ok(genlab("eval", str(tmp_path / "ae"), "--data", "noto", "--metrics", "nll", "--nll-n", "2",
                     "--out", str(tmp_path / "eval")))
    assert (tmp_path / "eval" / "eval.json").is_file()


def test_data_show_of_a_non_default_dataset(tmp_path):
    assert_ok(genlab("data", "show", "twemoji", "--n", "2", "--out", str(tmp_path / "g.png")))
    assert (tmp_path / "g.png").is_file()


def _names_in_fresh_interpreter(preamble: str = "") -> tuple[set[str], ...]:
    code = (f"{preamble}from genlab.registry import BACKBONES, DATASETS, MODELS, SAMPLERS; "
            "print(*[','.join(sorted(r)) for r in (MODELS, BACKBONES, DATASETS, SAMPLERS)], sep='|')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return tuple(set(x.split(",")) for x in r.stdout.strip().split("|"))


def test_a_fresh_interpreter_lists_every_name():
    models, backbones, datasets, samplers = _names_in_fresh_interpreter()
    assert {"diffusion", "autoencoder_kl", "gpt"} <= models and {"unet", "dit"} <= backbones
    assert {"mnist", "twemoji", "noto", "fortunes", "jargon"} <= datasets
    assert {"ddim", "ddpm", "euler", "heun", "dpmpp_2m", "dpmpp_2m_sde", "unipc"} <= samplers
    # the same as an interpreter that imported every registering module itself before listing
    every = _names_in_fresh_interpreter("import importlib; from genlab import registry as g; "
                                        "[importlib.import_module(m) for r in (g.MODELS, g.BACKBONES, g.DATASETS, "
                                        "g.SAMPLERS) for m in r.modules]; ")
    assert (models, backbones, datasets, samplers) == every


def test_a_lookup_imports_only_until_the_name_appears(tmp_path, monkeypatch):
    """Registering modules are imported in order, on first use; an unknown name lists every registered one."""
    reg: Registry[int] = Registry("widget", ["widgets_a", "widgets_b"])
    monkeypatch.setattr(sys.modules[__name__], "REG", reg, raising=False)
    for mod, names in (("widgets_a", ("one",)), ("widgets_b", ("two", "three"))):
        body = "".join(f"REG.register({n!r})({i})\n" for i, n in enumerate(names))
        (tmp_path / f"{mod}.py").write_text(f"from {__name__} import REG\n{body}")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert reg.get("one") == 0 and "widgets_a" in sys.modules and "widgets_b" not in sys.modules
    assert "three" in reg and "widgets_b" in sys.modules
    with pytest.raises(GenlabError, match=r"unknown widget 'thre' \(did you mean 'three'\?\); choose one of: one, "
                                          r"three, two"):
        reg.get("thre")
    for mod in ("widgets_a", "widgets_b"):
        sys.modules.pop(mod)
