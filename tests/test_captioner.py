"""LLaVA-style captioner: prefix embeddings, the answer-only loss, KV-cached decoding with a prefix, instruction data
from the shapes ground truth, the caption / generate --image / eval commands and their hostile inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from genlab.cli import main
from genlab.data import instructions as ins
from genlab.data.chat import IGNORE
from genlab.data.shapes import relation_of, shapes
from genlab.data.tokenizer import train_tokenizer
from genlab.errors import GenlabError
from genlab.models.captioner import Captioner, CaptionerConfig
from genlab.models.clip import CLIP, CLIPConfig
from genlab.models.gpt import GPT, GPTConfig
from genlab.sampling.text import GenerationConfig, generate


def _gpt(vocab: int = 40, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab, block_size=32, n_layer=2, n_head=2, n_embd=16)).eval()


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    """A random tiny CLIP folder (32 px, 8 px patches: a 4 x 4 grid of 32-wide patch features)."""
    d = tmp_path_factory.mktemp("clip")
    tok = train_tokenizer("a red circle left of a blue square\n" * 4, "char")
    torch.manual_seed(0)
    clip = CLIP(CLIPConfig(image_size=32, channels=3, patch_size=8, vision_width=32, vision_layers=1, vision_heads=2,
                           vocab_size=tok.vocab_size, context_length=16, text_width=16, text_layers=1,
                           text_heads=2, embed_dim=16), tokenizer=tok)
    clip.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def captioner(tiny_clip) -> Captioner:
    torch.manual_seed(0)
    cfg = CaptionerConfig(clip=str(tiny_clip), gpt=GPTConfig(vocab=300, n_layer=2, n_head=2, n_embd=32), stage=2,
                          questions_per_image=3)
    return Captioner.build(cfg, shapes("train", n=32)).eval()


# -- the GPT with input embeddings ----------------------------------------------------------------------------
def test_prefix_embeddings_give_the_gpts_logits_on_the_same_tokens():
    gpt = _gpt()
    ids = torch.randint(0, 40, (3, 11))
    with torch.no_grad():
        want = gpt(ids)
        embeds = gpt.tok_emb(ids)
        got = gpt(None, embeds=embeds)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_kv_cached_decoding_with_a_prefix_equals_full_recomputation():
    """Greedy decoding through the cache (prompts of different lengths: left padding before the prefix) against
    recomputing the whole sequence (prefix embeddings + tokens, no cache, no padding) for every new token."""
    gpt = _gpt(seed=1)
    torch.manual_seed(2)
    prefix = torch.randn(2, 5, 16)
    prompts = [[1, 7, 9], [1, 4, 5, 6, 8, 3]]
    cfg = GenerationConfig(max_new_tokens=8, temperature=0.0, stop_token_ids=[])
    out = generate(gpt, prompts, cfg, prefix=prefix)
    for i, p in enumerate(prompts):
        ids = list(p)
        want = []
        with torch.no_grad():
            for _ in range(8):
                x = torch.cat([prefix[i: i + 1], gpt.tok_emb(torch.tensor([ids]))], dim=1)
                nxt = int(gpt(None, embeds=x)[0, -1].argmax())
                want.append(nxt)
                ids.append(nxt)
        assert out.tokens[i] == want
        # the log-probabilities too
        with torch.no_grad():
            x = torch.cat([prefix[i: i + 1], gpt.tok_emb(torch.tensor([ids[:-1]]))], dim=1)
            logp = gpt(None, embeds=x)[0, -8:].log_softmax(-1)
        torch.testing.assert_close(torch.tensor(out.logprobs[i]), logp[torch.arange(8), torch.tensor(want)],
                                   rtol=1e-4, atol=1e-4)


def test_beam_search_with_a_prefix_of_one_beam_is_greedy():
    gpt = _gpt(seed=3)
    prefix = torch.randn(1, 4, 16)
    greedy = generate(gpt, [[1, 2]], GenerationConfig(max_new_tokens=6, temperature=0.0, stop_token_ids=[]),
                      prefix=prefix)
    beams = generate(gpt, [[1, 2]], GenerationConfig(max_new_tokens=6, num_beams=2, stop_token_ids=[]),
                     prefix=prefix)
    with torch.no_grad():  # the best beam scores at least as high as the greedy path under the full model
        def score(toks):
            x = torch.cat([prefix, gpt.tok_emb(torch.tensor([[1, 2] + toks[:-1]]))], dim=1)
            lp = gpt(None, embeds=x)[0, -len(toks):].log_softmax(-1)
            return float(lp[torch.arange(len(toks)), torch.tensor(toks)].sum())
        assert score(beams.tokens[0]) >= score(greedy.tokens[0]) - 1e-5


# -- the captioner's loss --------------------------------------------------------------------------------------
def test_loss_is_the_masked_cross_entropy_of_the_answer_tokens(captioner):
    data = captioner.prepare_data(shapes("train", n=32))
    batch = data.get_batch(torch.arange(12))
    loss = captioner.training_losses(batch)["loss"]
    # by hand: the GPT on [prefix, tokens], log-softmax, the target log-probabilities where labels mark the answer
    with torch.no_grad():
        h = captioner.projector(batch["patches"])
        x = torch.cat([h, captioner.gpt.tok_emb(batch["input_ids"])], dim=1)
        logits = captioner.gpt(None, embeds=x)
    P, L = h.shape[1], batch["input_ids"].shape[1]
    logp = logits[:, P - 1: P + L - 1].log_softmax(-1)  # position P + t - 1 predicts token t
    labels = batch["labels"]
    mask = labels != IGNORE
    assert not mask[:, 0].any()
    nll = -logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    want = (nll * mask).sum() / mask.sum()
    torch.testing.assert_close(loss.detach(), want, rtol=1e-5, atol=1e-5)
    assert int(captioner.loss_tokens(batch)) == int(mask.sum())


def test_labels_cover_the_answer_and_its_end_token_only(captioner):
    ds = shapes("train", n=32)
    data = captioner.prepare_data(ds)
    tok = captioner.tokenizer
    for i in range(len(data)):
        ids, labels = data.input_ids[i], data.labels[i]
        marked = ids[labels != IGNORE].tolist()
        assert marked[-1] == tok.end_id
        assert tok.decode(marked[:-1]) == data.answers[i]
        assert torch.equal(labels[labels != IGNORE], ids[labels != IGNORE])


def test_stage_1_with_a_frozen_gpt_trains_the_projector_alone(tiny_clip):
    cfg = CaptionerConfig(clip=str(tiny_clip), gpt=GPTConfig(vocab=300, n_layer=1, n_head=2, n_embd=32), stage=1)
    model = Captioner.build(cfg, shapes("train", n=16))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.projector.named_parameters(prefix="projector")} | {"prefix_pos"}
    unfrozen = Captioner.build(CaptionerConfig(**{**cfg.__dict__, "freeze_gpt": False}), shapes("train", n=16))
    assert any(n.startswith("gpt.") for n, p in unfrozen.named_parameters() if p.requires_grad)
    assert not any(n.startswith("visual.") for n, p in unfrozen.named_parameters() if p.requires_grad)


def test_the_prefix_says_where_each_token_sits_on_the_grid(tiny_clip):
    """The same patch feature at every grid cell gives a different prefix token per cell with the position
    embedding, and one token everywhere without it (a CNN tower's features alone do not say where)."""
    cfg = CaptionerConfig(clip=str(tiny_clip), gpt=GPTConfig(vocab=300, n_layer=1, n_head=2, n_embd=32))
    z = torch.randn(1, 1, 32).expand(2, 16, 32)  # the 4 x 4 grid of tiny_clip
    with_pos = Captioner.build(cfg, shapes("train", n=16)).prefix(z)
    assert with_pos.shape == (2, 16, 32)
    assert torch.cdist(with_pos[0], with_pos[0]).add(torch.eye(16)).min() > 0
    without = Captioner.build(CaptionerConfig(**{**cfg.__dict__, "prefix_position": False}), shapes("train", n=16))
    assert torch.equal(without.prefix(z)[0], without.prefix(z)[0, :1].expand(16, -1))
    pooled = Captioner.build(CaptionerConfig(**{**cfg.__dict__, "prefix_pool": 2}), shapes("train", n=16))
    assert pooled.prefix_pos.shape == (1, 4, 32)


def test_folder_round_trip_keeps_the_tower_the_projector_and_the_gpt(captioner, tmp_path):
    captioner.save_pretrained(tmp_path)
    back = Captioner.from_pretrained(tmp_path)
    x = shapes("test", n=4).get_batch(torch.arange(4))["x"]
    assert captioner.answer(x) == back.answer(x)
    for (k, a), (_, b) in zip(captioner.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), k


# -- instructions from the ground truth ------------------------------------------------------------------------
def test_questions_agree_with_the_ground_truth():
    ds = shapes("train", n=300)
    kinds = set()
    for s in ds.scenes:
        objs = s.objects
        for q, a, kind in ins.all_questions(s):
            kinds.add(kind)
            if kind == "color":
                shape = q.removeprefix("What color is the ").removesuffix("?")
                assert [o.color for o in objs if o.shape == shape] == [a]
            elif kind == "shape":
                color = q.removeprefix("What shape is the ").removesuffix(" object?")
                assert [o.shape for o in objs if o.color == color] == [a]
            elif kind == "count" and q == "How many objects are there?":
                assert a == ins.COUNT_WORDS[len(objs)]
            elif kind == "position":
                words = q.removeprefix("Where is the ").removesuffix("?").split(" relative to the ")
                (ca, sa), (cb, sb) = (w.split(" ") for w in words)
                a_obj = next(o for o in objs if (o.color, o.shape) == (ca, sa))
                b_obj = next(o for o in objs if (o.color, o.shape) == (cb, sb))
                assert a == relation_of(a_obj.center, b_obj.center)
        if s.kind == "relation":  # the stated relation is asked and answered as stated
            i, rel, j = s.relation
            a, b = objs[i], objs[j]
            asked = f"Where is the {a.color} {a.shape} relative to the {b.color} {b.shape}?"
            assert (asked, rel, "position") in ins.all_questions(s)
    assert kinds == {"color", "shape", "count", "position"}


def test_every_caption_form_of_a_scene_is_accepted():
    ds = shapes("test", n=200)
    for s, canon in zip(ds.scenes, ds.canonical):
        refs = ins.equivalent_captions(s)
        assert canon in refs and ins.caption(s) in refs
        assert ins.score(canon.upper() + ".", refs) == (True, 1.0)


def test_token_f1_by_hand():
    assert ins.token_f1("a red circle", "a blue circle") == pytest.approx(2 / 3)
    assert ins.token_f1("two red circles", "two red circles") == 1.0
    assert ins.token_f1("", "red") == 0.0
    assert ins.token_f1("red red", "red") == pytest.approx(2 * 0.5 * 1 / 1.5)


def test_stage_2_needs_ground_truth(captioner):
    class Folder:
        info = shapes("train", n=2).info
        captions = ["a red circle", "a blue square"]

    with pytest.raises(GenlabError, match="ground truth"):
        ins.image_conversations(Folder(), 2, 4, 1, 0)
    assert ins.image_conversations(Folder(), 1, 4, 1, 0)[1] == (1, ins.CAPTION_PROMPT, "a blue square", "caption")


# -- commands ----------------------------------------------------------------------------------------------------
def _png(path: Path, split: str = "test", i: int = 0) -> Path:
    img = shapes(split, n=i + 1).images[i].permute(1, 2, 0).numpy()
    Image.fromarray(np.ascontiguousarray(img)).save(path)
    return path


@pytest.fixture(scope="module")
def trained(tiny_clip, tmp_path_factory) -> tuple[Path, Path]:
    """Stage 1 then stage 2 (from stage 1) through `genlab train`, a few steps each on 64 images."""
    root = tmp_path_factory.mktemp("capt")
    base = {"family": "captioner", "data": {"name": "shapes", "image_size": 32, "max_items": 64},
            "model": {"clip": str(tiny_clip), "gpt": {"vocab": 300, "n_layer": 1, "n_head": 2, "n_embd": 32}},
            "train": {"steps": 3, "batch_size": 16, "warmup_steps": 1, "log_every": 1, "ckpt_every": 100}}
    s1 = root / "s1.yaml"
    s1.write_text(yaml.safe_dump({**base, "name": "s1", "model": {**base["model"], "stage": 1}}))
    assert main(["train", str(s1), "--run-dir", str(root / "s1")]) == 0
    s2 = root / "s2.yaml"
    s2.write_text(yaml.safe_dump({**base, "name": "s2", "model": {"init_from": str(root / "s1"), "stage": 2}}))
    assert main(["train", str(s2), "--run-dir", str(root / "s2")]) == 0
    return root / "s1", root / "s2"


def test_stage_2_starts_from_stage_1(trained):
    s1, s2 = (Captioner.from_pretrained(p / "model") for p in trained)
    for k, v in s1.visual.state_dict().items():  # the same frozen tower
        assert torch.equal(v, s2.visual.state_dict()[k]), k
    assert s1.tokenizer.tok.to_str() == s2.tokenizer.tok.to_str()
    assert s2.config.stage == 2 and s2.config.init_from
    assert not torch.equal(s1.gpt.tok_emb.weight, s2.gpt.tok_emb.weight)  # stage 2 tunes the GPT
    assert not torch.equal(s1.projector.fc1.weight, s2.projector.fc1.weight)


def test_caption_generate_and_eval_commands(trained, tmp_path, capsys):
    s2 = trained[1]
    png = _png(tmp_path / "a.png")
    assert main(["caption", str(s2), str(png)]) == 0
    one = capsys.readouterr().out.strip()
    assert main(["caption", str(s2), str(png), str(png)]) == 0
    two = capsys.readouterr().out.strip().splitlines()
    assert [t.rstrip() for t in two] == [f"{png}: {one}".rstrip()] * 2  # an untrained model may say nothing
    assert main(["generate", str(s2), "--image", str(png), "--prompt", "What color is the square?",
                 "--temperature", "0", "--max-new-tokens", "5"]) == 0
    capsys.readouterr()
    assert main(["eval", str(s2), "--metrics", "caption", "--n", "3", "--out", str(tmp_path / "ev")]) == 0
    assert "{}" not in capsys.readouterr().out.splitlines()  # no empty headline before the caption table
    result = json.loads((tmp_path / "ev" / "eval.json").read_text())["caption_eval"]
    assert set(result) == {"seen", "heldout"}
    assert result["seen"]["caption"]["n"] == 3 and 0.0 <= result["heldout"]["f1"] <= 1.0


@pytest.mark.parametrize("make, match", [
    (lambda d: d / "missing.png", "no such file"),
    (lambda d: (d / "junk.png").write_bytes(b"not an image") and d / "junk.png", "cannot read"),
    (lambda d: (d / "trunc.png").write_bytes(_png(d / "full.png").read_bytes()[:60]) and d / "trunc.png",
     "cannot read"),
    (lambda d: Image.new("RGB", (33, 32)).save(d / "big.png") or d / "big.png", "33x32 px"),
    (lambda d: d, "no such file"),
])
def test_bad_images_are_one_line_errors(trained, tmp_path, capsys, make, match):
    path = make(tmp_path)
    for argv in (["caption", str(trained[1]), str(path)],
                 ["generate", str(trained[1]), "--image", str(path), "--prompt", "What color is the star?"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert match in err and len(err.splitlines()) == 1


def test_hostile_command_lines(trained, tmp_path, capsys):
    png = _png(tmp_path / "a.png")
    gpt_dir = tmp_path / "gpt"
    tok = Captioner.from_pretrained(trained[1] / "model").tokenizer
    GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16),
        tokenizer=tok).save_pretrained(gpt_dir)
    cases = [
        (["generate", str(gpt_dir), "--image", str(png)], "takes no image"),
        (["generate", str(trained[1]), "--prompt", "hi"], "give --image"),
        (["generate", str(trained[1]), "--image", str(png), "--int8"], "--int8 does not work with --image"),
        (["caption", str(gpt_dir), str(png)], "does not describe images"),
        (["caption", str(trained[1]), str(png), "--max-new-tokens", "0"], "--max-new-tokens"),
        (["eval", str(gpt_dir), "--metrics", "caption", "--data", "shapes"], "does not describe images"),
    ]
    for argv, match in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert match in err and len(err.splitlines()) == 1, (argv, err)


def test_bad_recipes_are_refused(tiny_clip, tmp_path):
    ds = shapes("train", n=8)
    with pytest.raises(GenlabError, match="model.stage"):
        Captioner.build(CaptionerConfig(clip=str(tiny_clip), stage=3), ds)
    with pytest.raises(GenlabError, match="model.clip is unset"):
        Captioner.build(CaptionerConfig(), ds)
    with pytest.raises(GenlabError, match="not a model folder|neither a model folder"):
        Captioner.build(CaptionerConfig(clip=str(tmp_path)), ds)
    with pytest.raises(GenlabError, match="prefix_pool"):
        Captioner.build(CaptionerConfig(clip=str(tiny_clip), prefix_pool=3), ds)
    with pytest.raises(GenlabError, match="image tower reads"):
        Captioner.build(CaptionerConfig(clip=str(tiny_clip)), shapes("train", n=8, image_size=64))


def test_image_shape_is_checked(captioner):
    with pytest.raises(GenlabError, match="do not fit"):
        captioner.answer(torch.zeros(2, 3, 64, 64))
    with pytest.raises(GenlabError, match="questions for"):
        captioner.answer(torch.zeros(2, 3, 32, 32), ["a", "b", "c"])
