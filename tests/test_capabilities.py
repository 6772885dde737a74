"""Families declare what they take and give; `genlab sample` and `genlab eval` follow the declarations: an image
family without sampler or guidance (the KL autoencoder), a text family, a family without a likelihood, and no
family named or probed for attributes in `commands/` or `eval/`."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import toy_family
from PIL import Image

from genlab.cli import main
from genlab.data.images import read_params, to_uint8
from genlab.models.autoencoder import AutoencoderConfig, AutoencoderKL
from genlab.models.base import Conditioning, GenerativeModel, Likelihood, Output, SampleOption
from genlab.registry import MODELS

PACKAGE = Path(__file__).resolve().parent.parent / "genlab"
pytestmark = pytest.mark.usefixtures("one_thread")


def test_every_family_declares_its_capabilities():
    for name in ("diffusion", "autoencoder_kl", "gpt"):
        cls = MODELS.get(name)
        assert cls.output in Output and cls.likelihood in Likelihood and cls.conditioning <= set(Conditioning)
        assert cls.sample_options <= set(SampleOption)
    ae, gpt, diffusion = MODELS.get("autoencoder_kl"), MODELS.get("gpt"), MODELS.get("diffusion")
    assert (ae.output, ae.likelihood, ae.sample_options, ae.per_item_seeds) == (Output.IMAGE, Likelihood.BOUND,
                                                                                frozenset(), True)
    assert (gpt.output, gpt.likelihood) == (Output.TEXT, Likelihood.EXACT) and Conditioning.TEXT in gpt.conditioning
    assert {SampleOption.SAMPLER, SampleOption.STEPS, SampleOption.GUIDANCE} <= diffusion.sample_options
    assert Conditioning.CLASS_LABEL in diffusion.conditioning and diffusion.per_item_seeds


# -- an image family without sampler, steps or guidance ---------------------------------------------------
@pytest.fixture(scope="module")
def ae_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = AutoencoderConfig(image_size=8, channels=1, base_channels=8, channel_mults=(1, 2), norm_groups=4,
                            z_channels=2)
    return AutoencoderKL(cfg).eval().save_pretrained(tmp_path_factory.mktemp("ae") / "ae")


def test_sample_draws_from_the_autoencoder_by_decoding_prior_draws(ae_dir, tmp_path):
    """Image i is the decoder applied to z ~ N(0, I) drawn from a generator seeded seed + i (computed here)."""
    assert main(["sample", str(ae_dir), "--n", "3", "--seed", "5", "--out-dir", str(tmp_path / "out"),
                 "--out", str(tmp_path / "grid.png")]) == 0
    model = GenerativeModel.from_pretrained(ae_dir).eval()
    with torch.no_grad():
        z = torch.stack([torch.randn(model.latent_shape, generator=torch.Generator().manual_seed(5 + i))
                         for i in range(3)])
        expected = to_uint8(model.decode(z).clamp(-1, 1))
    files = sorted((tmp_path / "out").glob("*.png"))
    assert [f.name for f in files] == ["00000_seed5.png", "00001_seed6.png", "00002_seed7.png"]
    for f, want in zip(files, expected):
        assert np.array_equal(np.asarray(Image.open(f).convert("L")), np.squeeze(want))
    params = read_params(tmp_path / "grid.png")
    assert params["family"] == "autoencoder_kl" and "sampler" not in params and "cfg" not in params


@pytest.mark.parametrize("extra,flag", [(["--sampler", "euler"], "--sampler"), (["--steps", "10"], "--steps"),
                                        (["--cfg", "2"], "--cfg"), (["--label", "1"], "--label"),
                                        (["--eta", "0.5"], "--eta")])
def test_options_the_autoencoder_does_not_take_are_refused(ae_dir, tmp_path, capsys, extra, flag):
    assert main(["sample", str(ae_dir), "--n", "2", "--out", str(tmp_path / "x.png"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"does not take {flag}" in err and "sampling: no options" in err
    assert not (tmp_path / "x.png").exists()


def test_eval_of_the_autoencoder_refuses_sampler_options(ae_dir, tmp_path, capsys):
    assert main(["eval", str(ae_dir), "--data", "mnist", "--metrics", "nll", "--steps", "5",
                 "--out", str(tmp_path / "ev")]) == 2
    assert "does not take --steps" in capsys.readouterr().err


# -- a text family ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gpt_dir(tmp_path_factory):
    from genlab.data import load_dataset
    from genlab.models.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT.build(GPTConfig(tokenizer="char", block_size=16, n_layer=1, n_head=2, n_embd=16),
                      load_dataset("fortunes"))
    return model.save_pretrained(tmp_path_factory.mktemp("gpt") / "gpt")


def test_eval_nll_of_a_text_family_is_the_cross_entropy_of_its_blocks(gpt_dir, tmp_path):
    from genlab.data import load_dataset
    from genlab.models.gpt import encode_text

    assert main(["eval", str(gpt_dir), "--data", "fortunes", "--metrics", "nll", "--nll-n", "4",
                 "--out", str(tmp_path / "ev")]) == 0
    r = json.loads((tmp_path / "ev" / "eval.json").read_text())
    model = GenerativeModel.from_pretrained(gpt_dir).eval()
    ids = encode_text(model.tokenizer, load_dataset("fortunes", split="test").text)
    blocks = ids[: 4 * 17].view(4, 17)
    with torch.no_grad():
        ce = F.cross_entropy(model(blocks[:, :-1]).flatten(0, 1).float(), blocks[:, 1:].flatten())
    assert r["perplexity"] == pytest.approx(float(ce.exp()), rel=1e-5) and r["nll_n"] == 4


def test_image_commands_on_a_text_family_are_refused(gpt_dir, tmp_path, capsys):
    assert main(["sample", str(gpt_dir), "--n", "2", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "outputs text" in err and "genlab generate" in err
    assert main(["eval", str(gpt_dir), "--data", "fortunes", "--metrics", "fid", "--out", str(tmp_path / "e")]) == 2
    assert "outputs text" in capsys.readouterr().err


# -- a family without a likelihood ------------------------------------------------------------------------
def test_nll_of_a_family_without_a_likelihood_is_refused(tmp_path, capsys):
    assert toy_family.Toy.likelihood is Likelihood.NONE
    model = toy_family.Toy(toy_family.ToyConfig(shape=[1, 8, 8]))
    folder = model.save_pretrained(tmp_path / "toy")
    assert main(["eval", str(folder), "--data", "mnist", "--metrics", "nll", "--out", str(tmp_path / "ev")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no likelihood" in err and "leave nll out" in err
    assert not (tmp_path / "ev").exists()


# -- nothing asks for a family by name or probes for attributes -------------------------------------------
def _violations(source: str, name: str) -> list[str]:
    """Comparisons with a family name (or a `.family` attribute), hasattr() calls, and getattr() on anything but
    the argparse namespace `args`."""
    families = set(MODELS)
    found = []
    for node in ast.walk(ast.parse(source)):
        where = f"{name}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            names = [s.value for s in sides if isinstance(s, ast.Constant) and s.value in families]
            attrs = [s for s in sides if isinstance(s, ast.Attribute) and s.attr == "family"]
            if names or attrs:
                found.append(f"{where} compares with a family")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("hasattr", "getattr"):
            target = node.args[0] if node.args else None
            if node.func.id == "hasattr" or not (isinstance(target, ast.Name) and target.id == "args"):
                found.append(f"{where} probes with {node.func.id}")
    return found


def test_commands_and_eval_never_name_a_family_or_probe_a_model():
    files = sorted([*(PACKAGE / "commands").glob("*.py"), *(PACKAGE / "eval").glob("*.py")])
    assert len(files) > 8
    assert [v for f in files for v in _violations(f.read_text(), f.name)] == []


def test_the_checker_finds_what_it_looks_for():
    src = ('def f(model, args):\n    if model.family == "gpt" or "diffusion" != model.family:\n        pass\n'
           '    return hasattr(model, "labels_for"), getattr(model, "tokenizer", None), getattr(args, "n")\n')
    assert len(_violations(src, "example.py")) == 4
