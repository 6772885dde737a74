"""LoRA on the diffusion backbones (Hu et al. 2021): adapters on the U-Net's and DiT's attention, cross-attention and
convolutions (never on the text encoder), only adapters train, merging is exact (the unmerged adapter as the
oracle), a saved adapter loads with peft's own PeftModel and gives genlab's outputs, and `genlab train`, `sample`,
`export --merge` and the server's model pool read adapter folders; bad adapters are one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import randomize_weights
from PIL import Image

from genlab.cli import main
from genlab.data.tokenizer import train_tokenizer
from genlab.errors import GenlabError
from genlab.models.base import GenerativeModel, resolve_model_dir
from genlab.models.lora import add_lora, lora_layers, merge_lora
from genlab.models.t2i import TextDiffusionConfig, TextDiffusionModel

pytestmark = pytest.mark.usefixtures("one_thread")

CAPTIONS = ["a red circle", "a blue square", "a red circle left of a blue square", "two green stars"]
BACKBONES = {
    "unet": dict(backbone="unet", base_channels=8, channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=(4,),
                 head_channels=8, norm_groups=4),
    "dit": dict(backbone="dit", patch_size=2, hidden_size=16, depth=2, num_heads=2),
}


class Lora:
    def __init__(self, rank: int = 2, alpha: float = 4.0, dropout: float = 0.0) -> None:
        self.rank, self.alpha, self.dropout = rank, alpha, dropout


def tiny_t2i(backbone: str) -> TextDiffusionModel:
    tok = train_tokenizer("\n".join(CAPTIONS * 4), "bpe", 300)
    cfg = TextDiffusionConfig(image_size=8, channels=3, timesteps=100, text_width=16, text_depth=1, text_heads=2,
                              vocab_size=tok.vocab_size, max_tokens=16, clip_denoised=False, **BACKBONES[backbone])
    m = TextDiffusionModel(cfg, tokenizer=tok).eval()
    randomize_weights(m)
    return m


def adapted(tmp_path, backbone: str, rank: int = 2):
    """A tiny text-to-image base saved to a folder, loaded back as `init_from`, with adapters whose B is random."""
    base_dir = tiny_t2i(backbone).save_pretrained(tmp_path / "base")
    model = GenerativeModel.from_pretrained(base_dir)
    model.config.init_from = str(base_dir)
    peft_model = add_lora(model, Lora(rank))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return base_dir, model.eval(), peft_model


def eps(model, seed: int = 0) -> torch.Tensor:
    """The backbone's prediction on fixed noise, timesteps and prompts."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 3, 8, 8, generator=g)
    t = torch.tensor([5, 50, 95])
    with torch.no_grad():
        return model.backbone(x, t, CAPTIONS[:3])


@pytest.mark.parametrize("backbone", BACKBONES)
def test_adapters_sit_on_attention_cross_attention_and_convolutions_and_only_they_train(tmp_path, backbone):
    _, model, _ = adapted(tmp_path, backbone)
    names = [n for n, _ in lora_layers(model)]
    assert names and all(n.startswith("net.") for n in names)  # never the text encoder
    kinds = {n.rsplit(".", 1)[-1] for n in names}
    assert {"qkv", "proj", "q", "kv"} <= kinds  # self-attention and cross-attention
    if backbone == "unet":
        assert {"conv1", "conv2", "conv"} <= kinds
        convs = [m for n, m in lora_layers(model) if n.endswith("conv1")]
        assert all(isinstance(m.get_base_layer(), torch.nn.Conv2d) for m in convs)
    else:
        assert "x_embedder" in kinds and any(n.endswith("mlp.0") for n in names)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    batch = {"x": torch.randn(4, 3, 8, 8), "text": CAPTIONS}
    model.training_losses(batch)["loss"].backward()
    assert all(p.grad is not None for p in trainable.values())
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
    torch.optim.SGD(trainable.values(), lr=0.1).step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= set(trainable)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_merged_outputs_equal_the_unmerged_adapters(tmp_path, backbone):
    base_dir, model, _ = adapted(tmp_path, backbone)
    base_out = eps(GenerativeModel.from_pretrained(base_dir).eval())
    unmerged = eps(model)
    assert (unmerged - base_out).abs().max() > 1e-2  # the adapters do change the outputs
    merged = merge_lora(model)
    assert not lora_layers(merged)
    torch.testing.assert_close(eps(merged), unmerged, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_a_saved_adapter_loads_with_peft_and_gives_genlabs_outputs(tmp_path, backbone):
    from peft import PeftModel

    base_dir, model, peft_model = adapted(tmp_path, backbone)
    peft_model.save_pretrained(tmp_path / "adapter", save_embedding_layers=False)  # as the trainer saves
    meta = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert meta["peft_type"] == "LORA" and meta["r"] == 2 and meta["base_model_name_or_path"] == str(base_dir)
    expected = eps(model)
    theirs = PeftModel.from_pretrained(GenerativeModel.from_pretrained(base_dir), str(tmp_path / "adapter")).eval()
    torch.testing.assert_close(eps(theirs.base_model.model), expected, atol=1e-6, rtol=1e-6)
    ours = GenerativeModel.from_pretrained(resolve_model_dir(tmp_path / "adapter")).eval()
    torch.testing.assert_close(eps(ours), expected, atol=1e-6, rtol=1e-6)


def _image_folder(root, n: int = 8):
    root.mkdir()
    rng = np.random.default_rng(0)
    with open(root / "metadata.jsonl", "w") as f:
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "text": CAPTIONS[i % len(CAPTIONS)]}) + "\n")
    return root


TINY_RECIPE = ["data.image_size=8", "train.warmup_steps=1", "train.batch_size=4", "model.base_channels=8",
               "model.channel_mults=[1, 2]", "model.num_res_blocks=1", "model.attention_resolutions=[4]",
               "model.text_encoder=null", "model.text_width=16", "model.text_depth=1", "model.timesteps=100",
               "sample.n=4", "sample.steps=2", "train.ckpt_every=0"]


def _train(tmp, name: str, *sets: str) -> int:
    args = ["train", "configs/shapes-t2i.yaml", "--set", f"out_dir={tmp}", "--set", f"name={name}"]
    for s in (*TINY_RECIPE, *sets):
        args += ["--set", s]
    return main(args)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny text_diffusion base (2 steps) and a rank-2 LoRA run on it (3 steps at a high learning rate), both
    through `genlab train` on a captioned image folder."""
    tmp = tmp_path_factory.mktemp("t2i-lora")
    data = _image_folder(tmp / "data")
    assert _train(tmp, "base", f"data.name={data}", "train.steps=2") == 0
    assert _train(tmp, "lora", f"data.name={data}", "train.steps=3", "train.lr=0.05", "train.ema_decay=0",
                  f"model.init_from={tmp / 'base'}", "adapt.lora.rank=2") == 0
    return tmp


def _png(path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(int)


def test_cli_trains_samples_merges_and_serves_a_diffusion_adapter(runs, tmp_path):
    adapter = runs / "lora" / "model"
    assert (adapter / "adapter_config.json").is_file() and not (adapter / "config.json").exists()
    sample = ["--prompt", "a red circle", "--n", "2", "--steps", "3", "--seed", "7"]
    for name, folder in (("adapter", runs / "lora"), ("base", runs / "base")):
        assert main(["sample", str(folder), *sample, "--out", str(tmp_path / f"{name}.png")]) == 0
    assert main(["export", str(runs / "lora"), "--merge", "--out", str(tmp_path / "merged")]) == 0
    meta = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert meta["family"] == "text_diffusion" and (tmp_path / "merged" / "tokenizer.json").is_file()
    assert main(["sample", str(tmp_path / "merged"), *sample, "--out", str(tmp_path / "merged.png")]) == 0
    adapted_png, merged_png, base_png = (_png(tmp_path / f"{k}.png") for k in ("adapter", "merged", "base"))
    assert np.abs(adapted_png - merged_png).max() <= 1  # 1e-5 apart before rounding to 8 bits
    assert np.abs(adapted_png - base_png).max() > 0  # the adapter is applied at sampling time

    from genlab.serve.pool import ModelPool

    served = tmp_path / "served"
    served.mkdir()
    (served / "concept").symlink_to(runs / "lora", target_is_directory=True)
    pool = ModelPool(served)
    assert pool.entry("concept").family == "text_diffusion"
    assert lora_layers(pool.get("concept"))  # loaded with its adapter, unmerged


def _write_adapter_config(adapter, **changes) -> None:
    path = adapter / "adapter_config.json"
    meta = json.loads(path.read_text())
    meta.update(changes)
    path.write_text(json.dumps(meta))


@pytest.mark.parametrize("changes, message", [
    ({"r": 0}, "rank r=0"),
    ({"r": 10**9}, "rank r=1000000000"),
    ({"lora_alpha": -1}, "lora_alpha=-1"),
    ({"peft_type": "IA3"}, "LoRA adapters only"),
    ({"base_model_name_or_path": "nowhere/at/all"}, "does not exist"),
])
def test_a_bad_adapter_folder_is_a_one_line_error(runs, tmp_path, capsys, changes, message):
    import shutil

    adapter = shutil.copytree(runs / "lora" / "model", tmp_path / "adapter")
    _write_adapter_config(adapter, **changes)
    assert main(["sample", str(adapter), "--prompt", "a red circle", "--n", "1", "--steps", "2",
                 "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_an_adapter_for_another_base_is_a_one_line_error(runs, tmp_path, capsys):
    import shutil

    other = tiny_t2i("dit").save_pretrained(tmp_path / "other")  # another backbone: no such layers
    wider = tiny_t2i("unet")
    wider.config.base_channels = 16
    wider = TextDiffusionModel(wider.config, tokenizer=wider.tokenizer).save_pretrained(tmp_path / "wider")
    for base in (other, wider):
        adapter = shutil.copytree(runs / "lora" / "model", tmp_path / f"adapter-{base.name}")
        _write_adapter_config(adapter, base_model_name_or_path=str(base))
        assert main(["export", str(adapter), "--merge", "--out", str(tmp_path / f"m-{base.name}")]) == 2
        err = capsys.readouterr().err.strip()
        assert "does not fit its base model" in err and len(err.splitlines()) == 1
        assert not (tmp_path / f"m-{base.name}").exists()


@pytest.mark.parametrize("sets, message", [
    (["adapt.lora.rank=1000"], "adapt.lora.rank=1000 is above"),  # more than the smallest layer's rank
    (["adapt.lora.rank=5000"], "adapt.lora.rank"),
    (["adapt.lora.rank=-1"], "adapt.lora.rank"),
    (["adapt.lora.rank=2", "data.image_size=32"], "set data.image_size=8"),
])
def test_bad_lora_settings_on_a_diffusion_recipe_are_one_line_errors(runs, tmp_path, capsys, sets, message):
    data = runs / "data"
    assert _train(tmp_path, "bad", f"data.name={data}", "train.steps=1", f"model.init_from={runs / 'base'}",
                  *sets) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_init_from_another_family_is_refused(tmp_path, capsys):
    from test_gpt import tiny_gpt

    gpt = tiny_gpt().save_pretrained(tmp_path / "gpt")
    data = _image_folder(tmp_path / "data")
    assert _train(tmp_path, "bad", f"data.name={data}", "train.steps=1", f"model.init_from={gpt}") == 2
    assert "holds a gpt model" in capsys.readouterr().err


def test_continued_training_without_lora_starts_from_the_base_weights(runs):
    from genlab.config import DataConfig
    from genlab.data import load_dataset

    base = GenerativeModel.from_pretrained(resolve_model_dir(runs / "base"))
    data = load_dataset(DataConfig(name=str(runs / "data"), image_size=8))
    cont = TextDiffusionModel.build(TextDiffusionConfig(init_from=str(runs / "base"), cond_drop=0.0), data)
    assert cont.config.cond_drop == 0.0 and cont.config.init_from == str(runs / "base")
    for (n, p), (_, q) in zip(base.state_dict().items(), cont.state_dict().items(), strict=True):
        assert torch.equal(p, q), n
    with pytest.raises(GenlabError, match="neither a model folder"):
        TextDiffusionModel.build(TextDiffusionConfig(init_from=str(runs / "nothing")), data)
