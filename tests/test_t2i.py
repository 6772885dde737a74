"""Text-to-image diffusion: cross-attention ignores padding (a property, and torch's MultiheadAttention as a peer),
guidance with a negative prompt is the formula, the prompt dropout rate, the model folder, and the CLI end to end
(--prompt, --negative-prompt, --prompt-file, img2img with a prompt, the PNG's prompt chunk, hostile cases)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import randomize_weights
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from genlab.cli import main
from genlab.data.images import PROMPT_KEY, read_params
from genlab.data.tokenizer import train_tokenizer
from genlab.errors import GenlabError
from genlab.models.base import Conditioning, GenerativeModel
from genlab.models.diffusion import DiffusionConfig, DiffusionModel
from genlab.models.t2i import TextCondition, TextDiffusionConfig, TextDiffusionModel, drop_prompts
from genlab.nn.attention import CrossAttention, CrossAttention2d
from genlab.nn.dit import DiT
from genlab.nn.unet import UNet
from genlab.sampling.controls import Guidance
from genlab.sampling.denoiser import classifier_free_guidance

pytestmark = pytest.mark.usefixtures("one_thread")

CAPTIONS = ["a red circle", "a blue square", "a red circle left of a blue square", "two green stars"]


def _gens(n: int, seed: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


@pytest.fixture(scope="module")
def model() -> TextDiffusionModel:
    """A tiny text-conditioned U-Net with every weight random (zero-initialised projections too)."""
    tok = train_tokenizer("\n".join(CAPTIONS * 4), "bpe", 300)
    cfg = TextDiffusionConfig(image_size=8, channels=3, base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
                              attention_resolutions=(4,), head_channels=8, norm_groups=4, timesteps=100,
                              text_width=16, text_depth=1, text_heads=2, vocab_size=tok.vocab_size, max_tokens=16,
                              clip_denoised=False)
    m = TextDiffusionModel(cfg, tokenizer=tok).eval()
    randomize_weights(m)
    return m


# -- cross-attention masks padding -------------------------------------------------------------------
@settings(max_examples=15, deadline=None)
@given(real=st.integers(1, 6), pad=st.integers(0, 5), seed=st.integers(0, 2**16))
def test_cross_attention_output_is_independent_of_padded_tokens(real, pad, seed):
    g = torch.Generator().manual_seed(seed)
    attn = CrossAttention2d(16, 12, head_channels=8, norm_groups=4)
    randomize_weights(attn, seed)
    x = torch.randn(2, 16, 4, 4, generator=g)
    ctx = torch.randn(2, real, 12, generator=g)
    base = attn(x, ctx, torch.ones(2, real, dtype=torch.bool))
    padded = torch.cat([ctx, 100 * torch.randn(2, pad, 12, generator=g)], dim=1)
    mask = torch.cat([torch.ones(2, real, dtype=torch.bool), torch.zeros(2, pad, dtype=torch.bool)], dim=1)
    torch.testing.assert_close(attn(x, padded, mask), base, atol=1e-5, rtol=1e-5)


def test_cross_attention_matches_torch_multihead_attention_with_a_key_padding_mask():
    torch.manual_seed(0)
    ours = CrossAttention(16, 12, heads=4)
    peer = torch.nn.MultiheadAttention(16, 4, kdim=12, vdim=12, batch_first=True)
    with torch.no_grad():
        wk, wv = ours.kv.weight.chunk(2)
        bk, bv = ours.kv.bias.chunk(2)
        peer.q_proj_weight.copy_(ours.q.weight)
        peer.k_proj_weight.copy_(wk)
        peer.v_proj_weight.copy_(wv)
        peer.in_proj_bias.copy_(torch.cat([ours.q.bias, bk, bv]))
        peer.out_proj.weight.copy_(ours.proj.weight)
        peer.out_proj.bias.copy_(ours.proj.bias)
    x, ctx = torch.randn(3, 5, 16), torch.randn(3, 7, 12)
    mask = torch.arange(7)[None] < torch.tensor([[2], [7], [4]])
    expected, _ = peer(x, ctx, ctx, key_padding_mask=~mask, need_weights=False)
    torch.testing.assert_close(ours(x, ctx, mask), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backbone", ["unet", "dit"])
def test_backbones_ignore_padded_text_tokens(backbone):
    torch.manual_seed(0)
    if backbone == "unet":
        net = UNet(3, image_size=8, base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
                   attention_resolutions=(8, 4), head_channels=8, norm_groups=4, context_dim=12)
    else:
        net = DiT(3, image_size=8, patch_size=2, hidden_size=32, depth=2, num_heads=4, context_dim=12)
    randomize_weights(net)
    x, t, ctx = torch.randn(2, 3, 8, 8), torch.tensor([10, 500]), torch.randn(2, 3, 12)
    base = net(x, t, context=ctx, context_mask=torch.ones(2, 3, dtype=torch.bool))
    padded = torch.cat([ctx, torch.randn(2, 4, 12) * 50], dim=1)
    mask = torch.arange(7)[None].expand(2, -1) < 3
    torch.testing.assert_close(net(x, t, context=padded, context_mask=mask), base, atol=1e-4, rtol=1e-4)
    other = net(x, t, context=torch.randn(2, 3, 12), context_mask=torch.ones(2, 3, dtype=torch.bool))
    assert (other - base).abs().max() > 1e-3  # the text does matter


def test_text_condition_batches_conditions_of_different_lengths():
    a = TextCondition(torch.randn(2, 3, 4), torch.ones(2, 3, dtype=torch.bool))
    b = TextCondition(torch.randn(1, 5, 4), torch.ones(1, 5, dtype=torch.bool))
    c = a.cat(b)
    assert c.tokens.shape == (3, 5, 4) and len(c) == 3
    assert c.mask[:2, 3:].sum() == 0 and c.mask[2].all()
    torch.testing.assert_close(c[:2].tokens[:, :3], a.tokens)


# -- guidance with a negative prompt ------------------------------------------------------------------
def test_guidance_with_a_negative_condition_is_the_formula_on_a_toy_denoiser():
    def toy(x, sigma, cond):  # depends on the condition through its real tokens only
        s = (cond.tokens * cond.mask[..., None]).sum((1, 2))
        return x * torch.tanh(s)[:, None, None, None] + sigma[:, None, None, None]

    cond = TextCondition(torch.randn(2, 3, 4), torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool))
    neg = TextCondition(torch.randn(2, 2, 4), torch.ones(2, 2, dtype=torch.bool))
    x, sigma = torch.randn(2, 1, 4, 4), torch.tensor([2.0, 0.5])
    guided = classifier_free_guidance(toy, 5.0, neg)(x, sigma, cond)
    d_c, d_n = toy(x, sigma, cond), toy(x, sigma, neg)
    torch.testing.assert_close(guided, d_n + 5.0 * (d_c - d_n))


def test_negative_prompt_replaces_the_empty_prompt_in_guidance(model):
    x, sigma = torch.randn(2, 3, 8, 8), torch.tensor([3.0, 3.0])
    cond = model.encode_prompts(["a red circle"] * 2)
    for negative, expected_null in ((None, ""), ("blue", "blue")):
        d = model.guided_denoiser(Guidance(4.0, negative=negative), cond)(x, sigma, cond)
        d_c = model.denoise(x, sigma, cond)
        d_n = model.denoise(x, sigma, model.encode_prompts([expected_null] * 2))
        torch.testing.assert_close(d, d_n + 4.0 * (d_c - d_n), atol=1e-5, rtol=1e-5)


def test_sample_with_a_prompt_list_equals_sampling_each_prompt_alone(model):
    kw = {"sampler": "dpmpp_2m", "steps": 4, "guidance": Guidance(3.0, negative="blue")}
    both = model.sample(2, ["a red circle", "two green stars"], generator=_gens(2), **kw)
    alone = model.sample(1, "two green stars", generator=_gens(1, 1), **kw)
    torch.testing.assert_close(both[1:], alone, atol=1e-5, rtol=1e-5)
    assert (both[0] - both[1]).abs().max() > 1e-3


# -- training ----------------------------------------------------------------------------------------
def test_prompt_dropout_rate_is_cond_drop():
    prompts = ["a red circle"] * 20_000
    dropped = drop_prompts(prompts, 0.1, torch.Generator().manual_seed(0))
    rate = sum(p == "" for p in dropped) / len(prompts)
    assert abs(rate - 0.1) < 4 * (0.1 * 0.9 / len(prompts)) ** 0.5
    assert drop_prompts(prompts[:10], 0.0) == prompts[:10]


def test_training_drops_captions_to_the_empty_prompts_embedding(model):
    torch.manual_seed(0)
    batch = {"x": torch.zeros(64, 3, 8, 8), "text": ["a red circle"] * 64}
    model.train()
    try:
        c = model.training_labels(batch, torch.device("cpu"))
    finally:
        model.eval()
    empty = model.encode_prompts([""])
    is_empty = [(row.sum() == empty.mask.sum()).item() and torch.allclose(tok[: empty.tokens.shape[1]],
                                                                          empty.tokens[0])
                for row, tok in zip(c.mask, c.tokens)]
    assert 0 < sum(is_empty) < 20  # ~10% of 64
    assert sum(is_empty) == sum(1 for r in c.mask if r.sum() == 2)  # BOS + EOS: the empty prompt
    assert len(model.training_labels(batch, torch.device("cpu"))) == 64  # eval: no dropout
    assert all(r.sum() > 2 for r in model.training_labels(batch, torch.device("cpu")).mask)


def test_loss_backpropagates_into_the_jointly_trained_text_encoder(model):
    m = TextDiffusionModel(model.config, tokenizer=model.tokenizer)
    randomize_weights(m)
    loss = m.training_losses({"x": torch.rand(4, 3, 8, 8) * 2 - 1, "text": CAPTIONS})["loss"]
    loss.backward()
    assert m.text_encoder.token_embed.weight.grad.abs().sum() > 0


def test_capabilities_declare_text():
    assert Conditioning.TEXT in TextDiffusionModel.conditioning
    assert Conditioning.TEXT not in DiffusionModel.conditioning


def test_model_folder_round_trip_draws_the_same_images(model, tmp_path):
    model.save_pretrained(tmp_path / "m")
    again = GenerativeModel.from_pretrained(tmp_path / "m")
    kw = {"sampler": "euler", "steps": 3, "guidance": Guidance(2.0)}
    torch.testing.assert_close(again.sample(2, "a red circle", generator=_gens(2), **kw),
                               model.sample(2, "a red circle", generator=_gens(2), **kw))


def test_prompt_mistakes_are_user_errors(model):
    with pytest.raises(GenlabError, match="at most 16"):
        model.sample(1, "a red circle " * 20)
    with pytest.raises(GenlabError, match="at most 16"):
        model.sample(1, "a red circle", guidance=Guidance(3.0, negative="blue " * 30))
    with pytest.raises(GenlabError, match="3 prompts for 2"):
        model.sample(2, ["a", "b", "c"])
    assert model.sample(1, "", steps=2).shape == (1, 3, 8, 8)  # the empty prompt is the null condition


# -- the CLI -----------------------------------------------------------------------------------------
def _image_folder(root, n: int = 8):
    root.mkdir()
    rng = np.random.default_rng(0)
    with open(root / "metadata.jsonl", "w") as f:
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "text": CAPTIONS[i % len(CAPTIONS)]}) + "\n")
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A text_diffusion run trained for two steps on a captioned image folder, through `genlab train`."""
    tmp = tmp_path_factory.mktemp("t2i")
    data = _image_folder(tmp / "data")
    code = main(["train", "configs/shapes-t2i.yaml", "--set", f"data.name={data}", "--set", "data.image_size=8",
                 "--set", f"out_dir={tmp}", "--set", "name=tiny", "--set", "train.steps=2",
                 "--set", "train.warmup_steps=1", "--set", "train.batch_size=4", "--set", "model.base_channels=8",
                 "--set", "model.channel_mults=[1, 2]", "--set", "model.num_res_blocks=1",
                 "--set", "model.attention_resolutions=[4]", "--set", "model.text_encoder=null",
                 "--set", "model.text_width=16",
                 "--set", "model.text_depth=1", "--set", "model.timesteps=100", "--set", "sample.n=4",
                 "--set", "sample.steps=2"])
    assert code == 0
    return tmp / "tiny"


def test_cli_samples_a_prompt_and_records_it_in_each_png(trained, tmp_path):
    out = tmp_path / "imgs"
    assert main(["sample", str(trained), "--prompt", "a red circle left of a blue square", "--negative-prompt",
                 "green", "--cfg", "5", "--n", "2", "--steps", "3", "--out-dir", str(out),
                 "--out", str(tmp_path / "grid.png")]) == 0
    files = sorted(out.glob("*.png"))
    assert len(files) == 2
    for f in files:
        with Image.open(f) as im:
            assert im.text[PROMPT_KEY] == "a red circle left of a blue square"
        params = read_params(f)
        assert params["prompt"] == "a red circle left of a blue square"
        assert params["negative_prompt"] == "green" and params["cfg"] == 5
    assert read_params(tmp_path / "grid.png")["prompt"] == "a red circle left of a blue square"


def test_cli_prompt_file_draws_n_images_per_prompt(trained, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\ntwo green stars\n")
    out = tmp_path / "imgs"
    assert main(["sample", str(trained), "--prompt-file", str(prompts), "--n", "2", "--steps", "2",
                 "--out-dir", str(out)]) == 0
    got = [read_params(f)["prompt"] for f in sorted(out.glob("*.png"))]
    assert got == ["a red circle", "a red circle", "two green stars", "two green stars"]
    assert [read_params(f)["seed"] for f in sorted(out.glob("*.png"))] == [0, 1, 2, 3]


def test_cli_img2img_and_inpainting_take_a_prompt(trained, tmp_path):
    init = tmp_path / "init.png"
    Image.fromarray(np.full((8, 8, 3), 200, dtype=np.uint8)).save(init)
    mask = tmp_path / "mask.png"
    m = np.zeros((8, 8), dtype=np.uint8)
    m[:, 4:] = 255
    Image.fromarray(m).save(mask)
    for extra in (["--strength", "0.5"], ["--mask", str(mask)]):
        out = tmp_path / f"{len(extra)}{extra[0][2:]}.png"
        assert main(["sample", str(trained), "--prompt", "a red circle", "--init-image", str(init), "--n", "1",
                     "--steps", "4", "--out", str(out), *extra]) == 0
        assert read_params(out)["prompt"] == "a red circle"


def test_cli_refuses_a_prompt_on_a_class_conditional_model(tmp_path, capsys):
    cfg = DiffusionConfig(image_size=8, channels=1, num_classes=3, base_channels=8, channel_mults=(1,),
                          num_res_blocks=1, attention_resolutions=(), head_channels=8, norm_groups=4, timesteps=50)
    DiffusionModel(cfg).save_pretrained(tmp_path / "cc")
    assert main(["sample", str(tmp_path / "cc"), "--prompt", "a red circle", "--n", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not take --prompt" in err[0] and "--label" in err[0]


@pytest.mark.parametrize("args,match", [
    (["--prompt", "a red circle " * 30], "at most"),
    (["--prompt", "x" * 3000], "characters"),
    (["--prompt", "a", "--prompt-file", "p.txt"], "one of them"),
    (["--prompt-file", "missing.txt"], "cannot read"),
    (["--prompt", "a red circle", "--negative-prompt", "green", "--cfg", "1"], "raise --cfg"),
    (["--label", "1"], "does not take --label"),
])
def test_cli_prompt_mistakes_are_one_line_errors(trained, tmp_path, capsys, monkeypatch, args, match):
    monkeypatch.chdir(tmp_path)
    assert main(["sample", str(trained), "--n", "1", "--steps", "2", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0]


def test_cli_empty_prompt_draws_the_unconditional_model(trained, tmp_path):
    (tmp_path / "empty.txt").write_text("\n  \n")
    assert main(["sample", str(trained), "--prompt", "", "--n", "1", "--steps", "2",
                 "--out", str(tmp_path / "e.png")]) == 0
    assert read_params(tmp_path / "e.png")["prompt"] == ""
    assert main(["sample", str(trained), "--prompt-file", str(tmp_path / "empty.txt"), "--n", "1"]) == 2


# -- latent space and emoji captions -----------------------------------------------------------------
def test_latent_text_model_builds_over_an_autoencoder_and_keeps_it_in_its_folder(tmp_path):
    from genlab.data.base import DatasetInfo, ImageDataset
    from genlab.models.autoencoder import AutoencoderConfig, AutoencoderKL

    ae = AutoencoderKL(AutoencoderConfig(image_size=16, channels=3, base_channels=8, channel_mults=(1, 2),
                                         norm_groups=4, z_channels=2))
    ae.save_pretrained(tmp_path / "ae")
    images = np.random.default_rng(0).integers(0, 255, (8, 16, 16, 3), dtype=np.uint8)
    info = DatasetInfo(name="tiny", kind="image", size=8, license="-", attribution="-", channels=3, image_size=16)
    data = ImageDataset(images, info, captions=CAPTIONS * 2)
    cfg = TextDiffusionConfig(autoencoder=str(tmp_path / "ae"), base_channels=8, channel_mults=(1,),
                              num_res_blocks=1, attention_resolutions=(8,), head_channels=8, norm_groups=4,
                              timesteps=50, text_width=16, text_depth=1, vocab=300)
    m = TextDiffusionModel.build(cfg, data).eval()
    assert (m.config.channels, m.config.image_size) == (2, 8) and m.config.max_tokens >= 3
    batch = m.prepare_data(data).get_batch([0, 1, 2])
    assert batch["text"] == CAPTIONS[:3]  # latents keep their captions
    assert torch.isfinite(m.training_losses(batch)["loss"])
    m.save_pretrained(tmp_path / "m")
    again = GenerativeModel.from_pretrained(tmp_path / "m")
    kw = {"sampler": "ddim", "steps": 2, "guidance": Guidance(3.0, negative="a blue square")}
    x = again.sample(2, "a red circle", generator=_gens(2), **kw)
    assert x.shape == (2, 3, 16, 16)
    torch.testing.assert_close(x, m.sample(2, "a red circle", generator=_gens(2), **kw))


def test_emoji_captions_name_the_category_when_asked():
    from genlab.config import DataConfig
    from genlab.data import load_dataset

    names = load_dataset(DataConfig(name="twemoji", max_items=2))
    full = load_dataset(DataConfig(name="twemoji", caption="name+category", max_items=2))
    assert full.captions[0].startswith(names.captions[0] + ", ") and full.captions[0].count(",") >= 2
    with pytest.raises(GenlabError, match="data.caption"):
        load_dataset(DataConfig(name="twemoji", caption="emoji"))


def test_frozen_clip_text_tower_gives_clips_own_token_features_and_stays_frozen(tmp_path):
    from genlab.data.base import DatasetInfo, ImageDataset
    from genlab.models.clip import CLIP, CLIPConfig

    images = np.random.default_rng(0).integers(0, 255, (8, 8, 8, 3), dtype=np.uint8)
    info = DatasetInfo(name="tiny", kind="image", size=8, license="-", attribution="-", channels=3, image_size=8)
    data = ImageDataset(images, info, captions=CAPTIONS * 2)
    clip = CLIP.build(CLIPConfig(patch_size=4, vision_width=16, vision_layers=1, vision_heads=2, vocab=300,
                                 context_length=16, text_width=16, text_layers=1, text_heads=2, embed_dim=8), data)
    randomize_weights(clip)
    clip.save_pretrained(tmp_path / "clip")
    cfg = TextDiffusionConfig(text_encoder=str(tmp_path / "clip"), base_channels=8, channel_mults=(1,),
                              num_res_blocks=1, attention_resolutions=(8,), head_channels=8, norm_groups=4,
                              timesteps=50)
    m = TextDiffusionModel.build(cfg, data)
    c = m.encode_prompts(CAPTIONS)
    peer = clip.text_features(CAPTIONS)
    L = c.tokens.shape[1]
    torch.testing.assert_close(c.mask, peer.mask[:, :L])
    torch.testing.assert_close(c.tokens[c.mask], peer.tokens[:, :L][c.mask], atol=1e-5, rtol=1e-5)
    m.train()
    m.training_losses({"x": torch.rand(4, 3, 8, 8) * 2 - 1, "text": CAPTIONS})["loss"].backward()
    assert all(p.grad is None and not p.requires_grad for p in m.text_encoder.parameters())
    m.save_pretrained(tmp_path / "m")
    again = GenerativeModel.from_pretrained(tmp_path / "m")
    torch.testing.assert_close(again.encode_prompts(CAPTIONS).tokens, c.tokens)
