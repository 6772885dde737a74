"""CLIP: the contrastive loss against transformers' CLIPModel, the temperature clamp, two gloo processes against one
on the same global batch, the evaluation math against brute force and torchmetrics, the towers' contracts, training
through the shared trainer, and `genlab embed` (with its hostile cases)."""

from __future__ import annotations

import json
import math
import os
import socket
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
import yaml
from PIL import Image

from genlab.cli import main
from genlab.data.base import DatasetInfo, ImageDataset
from genlab.errors import GenlabError
from genlab.eval import clip as E
from genlab.models.base import GenerativeModel, Output
from genlab.models.clip import CLIP, CLIPConfig, contrastive_loss

pytestmark = pytest.mark.usefixtures("one_thread")

COLORS = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 60, 220), "yellow": (235, 205, 0)}
TINY = dict(patch_size=4, vision_width=16, vision_layers=1, vision_heads=2, vocab=300, context_length=8,
            text_width=16, text_layers=1, text_heads=2, embed_dim=8)


def toy_dataset(n: int = 16, size: int = 8) -> ImageDataset:
    """Plain squares of four colors, captioned with their color."""
    names = list(COLORS)
    colors = [names[i % len(names)] for i in range(n)]
    images = np.stack([np.full((size, size, 3), COLORS[c], dtype=np.uint8) for c in colors])
    info = DatasetInfo(name="toy", kind="image", size=n, license="generated", attribution="test", channels=3,
                       image_size=size)
    return ImageDataset(images, info, captions=[f"a {c} square" for c in colors])


def tiny_clip(tower: str = "vit", seed: int = 0) -> CLIP:
    torch.manual_seed(seed)
    return CLIP.build(CLIPConfig(image_tower=tower, **TINY), toy_dataset())


# -- the loss and the temperature -----------------------------------------------------------------------------
def test_loss_equals_transformers_clip_loss():
    """transformers' CLIPModel (built from a config, random weights) gives its embeddings, logit scale and loss;
    genlab's loss on the same embeddings and scale must agree."""
    from transformers import CLIPConfig as HFConfig
    from transformers import CLIPModel

    torch.manual_seed(0)
    cfg = HFConfig(text_config=dict(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                    num_attention_heads=2, max_position_embeddings=8),
                   vision_config=dict(image_size=8, patch_size=4, hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=1, num_attention_heads=2),
                   projection_dim=8)
    hf = CLIPModel(cfg).eval()
    for log_scale in (math.log(1 / 0.07), 0.3, 4.0):
        with torch.no_grad():
            hf.logit_scale.fill_(log_scale)
        x = torch.randn(6, 3, 8, 8)
        ids = torch.randint(0, 50, (6, 7))
        with torch.no_grad():
            out = hf(input_ids=ids, pixel_values=x, return_loss=True)
        ours = contrastive_loss(out.image_embeds, out.text_embeds, torch.tensor(log_scale).exp())
        torch.testing.assert_close(ours, out.loss, rtol=1e-5, atol=1e-6)


def test_contrastive_loss_against_its_definition():
    """(CE over rows + CE over columns) / 2 written out with explicit log-softmax sums."""
    g = torch.Generator().manual_seed(1)
    img, txt = F.normalize(torch.randn(5, 4, generator=g), dim=-1), F.normalize(torch.randn(5, 4, generator=g), dim=-1)
    s = 7.5
    logits = s * img @ txt.t()
    rows = -sum(logits[i, i] - torch.logsumexp(logits[i], 0) for i in range(5)) / 5
    cols = -sum(logits[i, i] - torch.logsumexp(logits[:, i], 0) for i in range(5)) / 5
    torch.testing.assert_close(contrastive_loss(img, txt, torch.tensor(s)), (rows + cols) / 2)


def test_temperature_starts_at_1_over_0_07_and_is_clamped_at_100():
    model = tiny_clip()
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert model.scale().item() == pytest.approx(1 / 0.07, rel=1e-6)
    batch = model.prepare_data(toy_dataset()).get_batch(torch.arange(8))
    with torch.no_grad():
        model.logit_scale.fill_(9.0)  # exp(9) = 8103 > 100
    out = model.training_losses(batch)
    assert out["logit_scale"].item() == pytest.approx(100.0, rel=1e-6)
    assert model.logit_scale.item() == pytest.approx(math.log(100.0))  # the parameter itself, as open_clip
    img, txt, _ = model(batch["x"], batch["input_ids"])
    torch.testing.assert_close(out["loss"], contrastive_loss(img, txt, torch.tensor(100.0)))
    with pytest.raises(GenlabError, match="max_logit_scale"):
        CLIP.build(CLIPConfig(init_logit_scale=6.0, **TINY), toy_dataset())


# -- two gloo processes against one -------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_step(rank: int, world: int, port: int, folder: str, out: str) -> None:
    """One rank: its half of the global batch through `training_losses` (features gathered across ranks), backward,
    then gradients averaged over ranks as DistributedDataParallel does."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = GenerativeModel.from_pretrained(folder)
        data = model.prepare_data(toy_dataset())
        per = 8 // world
        batch = data.get_batch(torch.arange(rank * per, (rank + 1) * per))
        loss = model.training_losses(batch)["loss"]
        loss.backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters()}
        for g in grads.values():
            dist.all_reduce(g)
            g /= world
        torch.save({"loss": loss.detach(), "grads": grads}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # ~15 s idle, ~40 s on a loaded 2-core machine: two fresh interpreters import torch
def test_two_gloo_processes_give_the_loss_and_gradients_of_one(tmp_path):
    model = tiny_clip()
    with torch.no_grad():  # make every parameter matter (the zero-initialized class token too)
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    folder = model.save_pretrained(tmp_path / "m")
    model = GenerativeModel.from_pretrained(folder)
    loss = model.training_losses(model.prepare_data(toy_dataset()).get_batch(torch.arange(8)))["loss"]
    loss.backward()
    mp.spawn(_rank_step, args=(2, _free_port(), str(folder), str(tmp_path / "r")), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(tmp_path / f"r.{rank}", weights_only=True)
        torch.testing.assert_close(got["loss"], loss.detach(), rtol=1e-5, atol=1e-6)
        for k, p in model.named_parameters():
            torch.testing.assert_close(got["grads"][k], p.grad, rtol=1e-4, atol=1e-6, msg=k)


# -- evaluation math ------------------------------------------------------------------------------------------------
def test_recall_zeroshot_binding_and_clip_score_against_brute_force():
    g = torch.Generator().manual_seed(3)
    n = 12
    captions = ["a", "b", "a", "c", "d", "b", "e", "f", "a", "g", "h", "c"]
    img, txt = F.normalize(torch.randn(n, 6, generator=g), dim=-1), F.normalize(torch.randn(n, 6, generator=g), dim=-1)
    got = E.retrieval_metrics(img, txt, captions, ks=(1, 2, 5))
    scores = (img @ txt.t()).tolist()
    for k in (1, 2, 5):
        i2t = t2i = 0
        for i in range(n):
            top_texts = sorted(range(n), key=lambda j: -scores[i][j])[:k]
            i2t += any(captions[j] == captions[i] for j in top_texts)
            top_images = sorted(range(n), key=lambda j: -scores[j][i])[:k]
            t2i += any(captions[j] == captions[i] for j in top_images)
        assert got[f"text_retrieval_r@{k}"] == pytest.approx(i2t / n)
        assert got[f"image_retrieval_r@{k}"] == pytest.approx(t2i / n)
    # a duplicate caption is a positive: an image whose twin text ranks first is a hit
    pos = E.positives_of(["x", "y", "x"], ["x", "y", "x"])
    assert E.recall_at_k(torch.tensor([[0.0, 0.1, 0.9], [0, 1, 0], [0, 0, 1.0]]), pos, (1,))[1] == 1.0

    classifier = F.normalize(torch.randn(4, 6, generator=g), dim=-1)
    pred = E.zeroshot_predict(img, classifier)
    assert pred.tolist() == [max(range(4), key=lambda c: float(img[i] @ classifier[c])) for i in range(n)]

    swapped = F.normalize(torch.randn(n, 6, generator=g), dim=-1)
    expect = sum(float(img[i] @ txt[i]) > float(img[i] @ swapped[i]) for i in range(n)) / n
    assert E.binding_accuracy(img, txt, swapped) == pytest.approx(expect)
    cos = [float(img[i] @ txt[i]) for i in range(n)]
    assert E.clip_score(img, txt) == pytest.approx(max(100 * sum(cos) / n, 0.0), rel=1e-5)
    assert E.clip_score(img, -img) == 0.0


def test_clip_score_matches_torchmetrics_over_genlab_clip():
    """torchmetrics' functional clip_score with genlab's CLIP behind its model/processor interface."""
    from torchmetrics.functional.multimodal import clip_score

    model = tiny_clip().eval()
    ds = toy_dataset()
    images = ds.images[:6]  # uint8, as torchmetrics takes them
    prompts = ["a red square", "a blue square", "a green square", "a red square", "a yellow square", "nothing"]

    class Processor:
        def __call__(self, text=None, images=None, **_):
            if text is not None:
                ids = model.tokenize(text)
                return {"input_ids": ids, "attention_mask": ids != model.tokenizer.pad_id}
            return {"pixel_values": torch.stack(images).float() / 127.5 - 1}

    class Wrapped(torch.nn.Module):
        config = SimpleNamespace()  # no text_config: torchmetrics then cuts no caption

        def get_image_features(self, pixel_values):
            return model.encode_image(pixel_values, normalize=False)

        def get_text_features(self, input_ids, attention_mask):
            return model.encode_text(input_ids, normalize=False)

    with torch.no_grad():
        theirs = clip_score(images, prompts, lambda: (Wrapped(), Processor()))
        ours = E.clip_score_of(model, images.float() / 127.5 - 1, prompts)
    assert ours == pytest.approx(float(theirs), rel=1e-5, abs=1e-4)


# -- the towers and the model folder ---------------------------------------------------------------------------------
@pytest.mark.parametrize("tower", ["vit", "cnn"])
def test_features_contract_padding_and_model_folder(tower, tmp_path):
    model = tiny_clip(tower).eval()
    assert model.output is Output.EMBEDDING
    with torch.no_grad():
        tf = model.text_features(["a red square", "a blue square and a green square and more"])
        assert tf.tokens.shape == (2, 8, 16) and tf.mask.dtype == torch.bool and tf.pooled.shape == (2, 8)
        assert tf.mask[0].tolist() == [True] * int(tf.mask[0].sum()) + [False] * (8 - int(tf.mask[0].sum()))
        assert tf.mask[1].all()  # cut to the context, EOS kept last
        alone = model.encode_text(["a red square"])
        torch.testing.assert_close(model.encode_text(["a red square", "a much longer caption here"])[:1], alone)
        assert model.encode_text(["x"]).norm(dim=-1).item() == pytest.approx(1.0)
        x = toy_dataset().get_batch(torch.arange(3))["x"]
        feats = model.image_features(x)
        assert feats.pooled.shape == (3, 8) and feats.patches.shape[0] == 3 and feats.patches.shape[2] == 16
        folder = model.save_pretrained(tmp_path / "m")
        assert (folder / "tokenizer.json").is_file()
        again = GenerativeModel.from_pretrained(folder).eval()
        torch.testing.assert_close(again.encode_image(x), model.encode_image(x))
        torch.testing.assert_close(again.encode_text(["a red square"]), alone)
    with pytest.raises(GenlabError, match="do not fit this CLIP"):
        model.image_features(torch.zeros(1, 3, 16, 16))
    with pytest.raises(GenlabError, match="draws nothing"):
        model.sample(1)


def test_build_refuses_uncaptioned_data_and_bad_sizes():
    ds = toy_dataset()
    ds.captions = None
    with pytest.raises(GenlabError, match="no captions"):
        CLIP.build(CLIPConfig(**TINY), ds)
    with pytest.raises(GenlabError, match="patch_size"):
        CLIP.build(CLIPConfig(**{**TINY, "patch_size": 3}), toy_dataset())
    with pytest.raises(GenlabError, match="image_tower"):
        CLIP.build(CLIPConfig(**{**TINY, "image_tower": "resnet50"}), toy_dataset())


# -- training through the shared trainer and `genlab embed` ------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny CLIP trained for a few steps by `genlab train` on an image folder with captions (metadata.jsonl)."""
    root = tmp_path_factory.mktemp("clip")
    folder = root / "imgs"
    folder.mkdir()
    rows = []
    for i, (name, rgb) in enumerate(list(COLORS.items()) * 2):
        Image.new("RGB", (8, 8), rgb).save(folder / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": f"a {name} square"}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    recipe = {"name": "clip", "family": "clip", "out_dir": str(root), "data": {"name": str(folder), "image_size": 8},
              "model": TINY, "train": {"steps": 3, "batch_size": 4, "warmup_steps": 1, "log_every": 1,
                                       "ckpt_every": 0, "lr": 1e-3}}
    (root / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["train", str(root / "r.yaml")]) == 0
    return root / "clip", folder


def test_trained_by_the_shared_trainer(trained):
    run, _ = trained
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and 0 < r["logit_scale"] <= 100 for r in rows if r["split"] == "train")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (run / "model").iterdir()}


def test_embed_writes_npy_and_json_that_match_the_model(trained, tmp_path, capsys):
    run, folder = trained
    model = GenerativeModel.from_pretrained(run / "model").eval()
    assert main(["embed", str(run), "--text", "a red square", "--text", "", "--image", str(folder / "0.png"),
                 "--output", str(tmp_path / "e.npy")]) == 0
    emb = np.load(tmp_path / "e.npy")
    with torch.no_grad():
        texts = model.encode_text(["a red square", ""]).numpy()
        image = model.encode_image(toy_dataset(1).get_batch([0])["x"]).numpy()
    np.testing.assert_allclose(emb, np.concatenate([texts, image]), rtol=1e-5, atol=1e-6)
    assert main(["embed", str(run / "model"), "--image", str(folder / "0.png"), "--text", "a red square",
                 "--output", str(tmp_path / "e.json")]) == 0
    doc = json.loads((tmp_path / "e.json").read_text())
    assert doc["inputs"] == [{"text": "a red square"}, {"image": str(folder / "0.png")}] and doc["dim"] == 8
    assert doc["cosine"][0][0] == pytest.approx(float(emb[2] @ emb[0]), abs=1e-5)
    capsys.readouterr()
    assert main(["embed", str(run), "--text", "a blue square"]) == 0
    line = json.loads(capsys.readouterr().out.splitlines()[0])
    assert line["text"] == "a blue square" and len(line["embedding"]) == 8


@pytest.mark.parametrize("args, fragment", [
    ([], "nothing to embed"),
    (["--image", "missing.png"], "is not a file"),
    (["--text", "x", "--output", "out.txt"], "must end in .npy or .json"),
    (["--text", "x", "--output", "OUTDIR"], "is a folder"),
    (["--text", "x", "--batch", "0"], "--batch"),
    (["--text", "x", "--device", "tpu"], "--device"),
    (["--text", "x" * 100_001], "too long"),
    (["--image", "NOTIMAGE"], "cannot read --image"),
])
def test_embed_hostile(trained, tmp_path, capsys, args, fragment):
    run, _ = trained
    (tmp_path / "d.npy").mkdir()
    (tmp_path / "notimage.png").write_text("not a png")
    args = [str(tmp_path / "d.npy") if a == "OUTDIR" else str(tmp_path / "notimage.png") if a == "NOTIMAGE" else a
            for a in args]
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["embed", str(run), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_embed_refuses_a_model_that_is_not_an_embedding_model(tmp_path, capsys):
    from genlab.models.diffusion import DiffusionConfig, DiffusionModel

    d = DiffusionModel(DiffusionConfig(image_size=8, channels=1, base_channels=8, channel_mults=(1,),
                                       num_res_blocks=1, attention_resolutions=(), head_channels=8, norm_groups=4,
                                       timesteps=10)).save_pretrained(tmp_path / "dm")
    assert main(["embed", str(d), "--text", "x"]) == 2
    assert "outputs image" in capsys.readouterr().err
    assert main(["embed", str(tmp_path / "nowhere"), "--text", "x"]) == 2


def test_eval_command_measures_a_clip_model(trained, tmp_path, capsys):
    """`genlab eval RUN --metrics retrieval,clip_score` equals the figures computed here from the embeddings."""
    run, folder = trained
    assert main(["eval", str(run), "--data", str(folder), "--metrics", "retrieval,clip_score", "--n", "6",
                 "--retrieval-n", "8", "--out", str(tmp_path / "ev")]) == 0
    got = json.loads((tmp_path / "ev" / "eval.json").read_text())
    model = GenerativeModel.from_pretrained(run / "model").eval()
    from genlab.data import load_dataset

    batch = load_dataset(str(folder)).get_batch(torch.arange(8))
    x = F.interpolate(batch["x"], size=(8, 8), mode="bilinear", antialias=True)  # the folder loads at 64 px
    img, txt = E.embed_images(model, x), E.embed_texts(model, batch["text"])
    expect = E.retrieval_metrics(img, txt, batch["text"])
    assert got["retrieval"]["image_retrieval_r@1"] == pytest.approx(expect["image_retrieval_r@1"])
    assert got["retrieval"]["text_retrieval_r@5"] == pytest.approx(expect["text_retrieval_r@5"])
    assert got["clip_score"] == pytest.approx(E.clip_score(img[:6], txt[:6]), rel=1e-5)
    capsys.readouterr()
    assert main(["eval", str(run), "--data", str(folder), "--metrics", "binding"]) == 2
    assert "ground truth of `shapes`" in capsys.readouterr().err


def test_eval_refuses_clip_metrics_for_models_that_cannot_take_them(tmp_path, capsys):
    from genlab.models.diffusion import DiffusionConfig, DiffusionModel

    d = DiffusionModel(DiffusionConfig(image_size=8, channels=1, base_channels=8, channel_mults=(1,),
                                       num_res_blocks=1, attention_resolutions=(), head_channels=8, norm_groups=4,
                                       timesteps=10)).save_pretrained(tmp_path / "dm")
    for metrics, fragment in [("zeroshot", "measure a CLIP model"), ("clip_score", "takes no text")]:
        assert main(["eval", str(d), "--data", "mnist", "--metrics", metrics, "--n", "2"]) == 2
        assert fragment in capsys.readouterr().err
    assert main(["eval", str(d), "--data", "mnist", "--metrics", "clip_score", "--clip", str(tmp_path / "no")]) == 2
    assert "neither a model folder" in capsys.readouterr().err


@pytest.mark.slow
def test_torchrun_two_processes_train_the_same_weights_as_one(trained, tmp_path):
    """The trainer under torchrun (gloo, DDP): features gathered across ranks make every step's loss one process's."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    _, folder = trained
    recipe = {"name": "c", "family": "clip", "out_dir": str(tmp_path), "data": {"name": str(folder), "image_size": 8},
              "model": TINY, "train": {"steps": 3, "batch_size": 8, "warmup_steps": 1, "log_every": 1,
                                       "ckpt_every": 0, "lr": 1e-2, "ema_decay": 0.0}}
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for procs, name in [(1, "one"), (2, "two")]:
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump({**recipe, "name": name}))
        launch = [str(bin_dir / "torchrun"), "--nproc_per_node", "2", "--master_port", str(_free_port())] \
            if procs == 2 else [sys.executable]
        proc = subprocess.run([*launch, "-m", "genlab.cli", "train", str(tmp_path / f"{name}.yaml")], env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
    # every step's loss (over the whole global batch) and the temperature it reached; weights are compared loosely,
    # since Adam turns gradients that are zero up to rounding (a key bias, which softmax ignores) into +-lr steps
    logs = {n: [json.loads(line) for line in (tmp_path / n / "metrics.jsonl").read_text().splitlines()]
            for n in ("one", "two")}
    for a, b in zip(logs["one"], logs["two"], strict=True):
        if a["split"] == "train":
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
            assert b["logit_scale"] == pytest.approx(a["logit_scale"], rel=1e-5)
    one, two = (load_file(str(tmp_path / n / "model" / "model.safetensors")) for n in ("one", "two"))
    assert one.keys() == two.keys()
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=0, atol=0.07, msg=k)  # 3 Adam steps of lr 1e-2 at most
