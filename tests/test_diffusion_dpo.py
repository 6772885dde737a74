"""Diffusion-DPO (Wallace et al. 2023, eq. 14): the loss against a hand computation and the paper's code's form, log 2
and the gradient's closed form at theta = ref, a step that lowers the chosen image's error against the rejected one's,
the pair folder format and its hostile inputs, ranking by the Shapes-GenEval verdicts, and `genlab train` end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_weights
from PIL import Image

from genlab.adapt.diffusion_dpo import DiffusionDPO, DiffusionDPOConfig, diffusion_dpo_loss, rank_pairs
from genlab.cli import main
from genlab.data import load_dataset
from genlab.data.image_pairs import load_image_pairs, write_image_pairs
from genlab.data.tokenizer import train_tokenizer
from genlab.errors import GenlabError
from genlab.eval import geneval as G
from genlab.models.base import GenerativeModel
from genlab.models.t2i import TextDiffusionConfig, TextDiffusionModel

pytestmark = pytest.mark.usefixtures("one_thread")

CAPTIONS = ["a red circle", "a blue square", "a red circle left of a blue square", "two green stars"]


def test_loss_matches_a_hand_computation_and_the_papers_code():
    err_w, err_l, ref_w, ref_l = (torch.tensor([v]) for v in (0.30, 0.50, 0.40, 0.20))
    # -beta [(0.30 - 0.40) - (0.50 - 0.20)] = 2 x 0.4 = 0.8, so L = -log sigmoid(0.8) = log(1 + e^-0.8)
    assert diffusion_dpo_loss(err_w, err_l, ref_w, ref_l, 2.0).item() == pytest.approx(math.log1p(math.exp(-0.8)))
    g = torch.Generator().manual_seed(0)
    e = torch.rand(4, 16, generator=g)
    beta_dpo = 5000.0  # the paper's training script: -logsigmoid(-0.5 beta_dpo (model_diff - ref_diff))
    code = -F.logsigmoid(-0.5 * beta_dpo * ((e[0] - e[1]) - (e[2] - e[3])))
    torch.testing.assert_close(diffusion_dpo_loss(e[0], e[1], e[2], e[3], beta_dpo / 2), code)


def _tiny_t2i() -> TextDiffusionModel:
    tok = train_tokenizer("\n".join(CAPTIONS * 4), "bpe", 300)
    cfg = TextDiffusionConfig(image_size=8, channels=3, base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
                              attention_resolutions=(4,), head_channels=8, norm_groups=4, timesteps=100,
                              text_width=16, text_depth=1, text_heads=2, vocab_size=tok.vocab_size, max_tokens=16,
                              clip_denoised=False)
    m = TextDiffusionModel(cfg, tokenizer=tok)
    randomize_weights(m)
    return m


def _pair_folder(root, n: int = 6, size: int = 8):
    g = torch.Generator().manual_seed(3)
    chosen = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    rejected = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    write_image_pairs(root, [CAPTIONS[i % len(CAPTIONS)] for i in range(n)], chosen, rejected,
                      [{"i": i} for i in range(n)])
    return root, chosen, rejected


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("t2i") / "base"
    _tiny_t2i().save_pretrained(d)
    return d


@pytest.fixture()
def dpo(base_dir, tmp_path):
    root, _, _ = _pair_folder(tmp_path / "pairs")
    cfg = DiffusionDPOConfig(init_from=str(base_dir), beta=50.0)
    data = load_dataset(str(root))
    model = DiffusionDPO.build(cfg, data)
    return model, model.prepare_data(data)


def test_at_theta_equal_ref_the_loss_is_log_2_and_its_gradient_is_the_closed_form(dpo):
    model, data = dpo
    batch = data.get_batch([0, 1, 2, 3])
    torch.manual_seed(7)
    out = model.training_losses(batch)
    assert out["loss"].item() == pytest.approx(math.log(2), abs=1e-6)
    model.zero_grad()
    out["loss"].backward()
    grads = [p.grad.clone() for p in model.policy.parameters() if p.grad is not None]
    # dL/dtheta at theta = ref: beta sigma(0) d(mean over pairs of err_w - err_l) = beta/2 d(...) (same t and eps)
    torch.manual_seed(7)
    B = 4
    t = torch.randint(0, model.policy.config.timesteps, (B,)).repeat(2)
    eps = torch.randn_like(batch["chosen"]).repeat(2, 1, 1, 1)
    x0, prompts = torch.cat([batch["chosen"], batch["rejected"]]), list(batch["text"]) * 2
    e_w, e_l = model.policy.vp_errors(x0, t, eps, model.policy.encode_prompts(prompts)).chunk(2)
    model.zero_grad()
    (model.config.beta / 2 * (e_w - e_l).mean()).backward()
    expected = [p.grad for p in model.policy.parameters() if p.grad is not None]
    assert len(grads) == len(expected) > 0
    for a, b in zip(grads, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))  # float32 sums, any thread count
    assert all(p.grad is None for p in model.ref.parameters())


def test_a_gradient_step_lowers_the_chosen_error_against_the_rejected_and_leaves_the_reference(dpo):
    model, data = dpo
    batch = data.get_batch(list(range(len(data))))
    ref_before = {k: v.clone() for k, v in model.ref.state_dict().items()}

    def errors():
        torch.manual_seed(11)
        B = len(batch["text"])
        t = torch.randint(0, model.policy.config.timesteps, (B,)).repeat(2)
        eps = torch.randn_like(batch["chosen"]).repeat(2, 1, 1, 1)
        x0, prompts = torch.cat([batch["chosen"], batch["rejected"]]), list(batch["text"]) * 2
        with torch.no_grad():
            return [e.mean().item() for e in model.policy.vp_errors(x0, t, eps,
                                                                    model.policy.encode_prompts(prompts)).chunk(2)]

    w0, l0 = errors()
    torch.manual_seed(11)
    loss = model.training_losses(batch)["loss"]
    model.zero_grad()
    loss.backward()
    with torch.no_grad():
        for p in model.policy.parameters():
            if p.grad is not None:
                p -= 1e-3 * p.grad
    w1, l1 = errors()
    assert (w1 - l1) < (w0 - l0)  # the chosen image's error falls relative to the rejected one's
    torch.manual_seed(11)
    assert model.training_losses(batch)["loss"].item() < math.log(2)
    for k, v in model.ref.state_dict().items():
        torch.testing.assert_close(v, ref_before[k], rtol=0, atol=0)


def test_pair_folder_round_trips(tmp_path):
    root, chosen, rejected = _pair_folder(tmp_path / "pairs", n=3)
    pairs = load_image_pairs(root)
    assert pairs.prompts == CAPTIONS[:3] and pairs.extra == [{"i": 0}, {"i": 1}, {"i": 2}]
    assert torch.equal(pairs.chosen, chosen) and torch.equal(pairs.rejected, rejected)
    assert pairs.info.image_size == 8 and len(pairs) == 3


def _write(root, lines, images=("a.png", "b.png"), size=(8, 8)):
    root.mkdir(exist_ok=True)
    for i, name in enumerate(images):
        Image.fromarray(np.full((*size[::-1], 3), 40 * i, dtype=np.uint8)).save(root / name)
    (root / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return root


@pytest.mark.parametrize("lines, match", [
    (['{"prompt": "x"}'], "needs 'chosen'"),
    (['{"prompt": 3, "chosen": "a.png", "rejected": "b.png"}'], "string field prompt"),
    (['{"prompt": "x", "chosen": "a.png", "rejected": "missing.png"}'], "does not exist"),
    (['{"prompt": "x", "chosen": "../a.png", "rejected": "b.png"}'], "outside the pair folder"),
    (['{"prompt": "x", "chosen": "a.png", "rejected": "a.png"}'], "identical"),
    (['{"prompt": "x", "chosen": "a.png", "rejected": "t.txt"}'], "not a readable image"),
    (['{"prompt": "x", "chosen": "a.png", "rejected": "b.png"}', "not json", "{}"], "not JSON"),
    ([""], "holds no pairs"),
])
def test_bad_pair_folders_are_one_line_errors(tmp_path, lines, match):
    root = _write(tmp_path / "p", lines)
    (root / "t.txt").write_text("text")
    with pytest.raises(GenlabError, match=match):
        load_image_pairs(root)


def test_pair_images_of_mixed_or_wrong_size_are_refused(tmp_path, base_dir):
    root = _write(tmp_path / "p", ['{"prompt": "x", "chosen": "a.png", "rejected": "b.png"}'], size=(8, 8))
    Image.fromarray(np.zeros((8, 6, 3), dtype=np.uint8)).save(root / "b.png")
    with pytest.raises(GenlabError, match="square and of one size"):
        load_image_pairs(root)
    other = _write(tmp_path / "q", ['{"prompt": "a red circle", "chosen": "a.png", "rejected": "b.png"}'],
                   size=(16, 16))
    model = DiffusionDPO.build(DiffusionDPOConfig(init_from=str(base_dir)), None)
    with pytest.raises(GenlabError, match="model's size"):
        model.prepare_data(load_image_pairs(other))
    with pytest.raises(GenlabError, match="folder of image pairs"):
        model.prepare_data(load_dataset("shapes"))


def test_build_refuses_a_missing_or_wrong_start_and_a_bad_beta(tmp_path, base_dir):
    with pytest.raises(GenlabError, match="needs model.init_from"):
        DiffusionDPO.build(DiffusionDPOConfig(), None)
    with pytest.raises(GenlabError, match="model.beta"):
        DiffusionDPO.build(DiffusionDPOConfig(init_from=str(base_dir), beta=0.0), None)
    with pytest.raises(GenlabError, match="model.beta"):
        DiffusionDPO.build(DiffusionDPOConfig(init_from=str(base_dir), beta=float("nan")), None)
    from genlab.models.diffusion import DiffusionConfig, DiffusionModel

    d = DiffusionModel(DiffusionConfig(image_size=8, channels=1, base_channels=8, channel_mults=(1,),
                                       num_res_blocks=1, attention_resolutions=(), norm_groups=4, timesteps=10))
    d.save_pretrained(tmp_path / "uncond")
    with pytest.raises(GenlabError, match="text-to-image"):
        DiffusionDPO.build(DiffusionDPOConfig(init_from=str(tmp_path / "uncond")), None)


def test_rank_pairs_takes_a_correct_and_an_incorrect_sample_of_the_same_prompt():
    specs = G.prompt_specs("seen", 1)[:3]
    verdicts = [False, True, False, True,  # prompt 0: chosen 1, rejected 0
                True, True, True, True,  # prompt 1: no incorrect sample, no pair
                False, False, False, True]  # prompt 2: chosen 11, rejected 8
    assert rank_pairs(specs, torch.zeros(12, 3, 4, 4), verdicts, 4) == [(1, 0), (11, 8)]
    with pytest.raises(GenlabError, match="scores"):
        rank_pairs(specs, torch.zeros(12, 3, 4, 4), verdicts[:-1], 4)
    graded = [0.2, 0.5, 0.5, 0.1, 0.3, 0.3, 0.3, 0.3, 2.0, 0.0, 0.7, 0.0]  # best and worst, first of each
    assert rank_pairs(specs, torch.zeros(12, 3, 4, 4), graded, 4) == [(1, 3), (8, 9)]


def test_attribute_recall_reads_multisets():
    spec = G.make_spec("counting", [("red", "circle")] * 3)
    det = lambda c, s: G.Detection(s, c, "small", (0, 0, 4, 4))  # noqa: E731
    r = G.attribute_recall(spec, [det("red", "circle"), det("red", "square"), det("blue", "circle")])
    assert r == pytest.approx({"objects": 1 / 3, "colors": 2 / 3, "shapes": 2 / 3, "partial": 5 / 9, "count": 1.0})
    assert G.attribute_recall(spec, [])["partial"] == 0.0


def test_cli_trains_on_a_pair_folder_and_writes_a_plain_text_diffusion_folder(tmp_path, base_dir):
    root, _, _ = _pair_folder(tmp_path / "pairs", n=4)
    code = main(["train", "configs/shapes-dpo.yaml", "--set", f"data.name={root}", "--set",
                 f"model.init_from={base_dir}", "--set", f"out_dir={tmp_path}", "--set", "name=dpo",
                 "--set", "train.steps=2", "--set", "train.batch_size=2", "--set", "train.warmup_steps=1",
                 "--set", "train.lr=1e-2", "--set", "sample.n=2", "--set", "sample.steps=2"])
    assert code == 0
    out = GenerativeModel.from_pretrained(tmp_path / "dpo" / "model")
    assert isinstance(out, TextDiffusionModel)
    base = GenerativeModel.from_pretrained(base_dir)
    moved = [not torch.equal(a, b) for a, b in zip(out.state_dict().values(), base.state_dict().values())]
    assert set(out.state_dict()) == set(base.state_dict()) and any(moved)
    rows = [json.loads(line) for line in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert any("reward_acc" in r for r in rows)


def test_cli_refuses_data_that_is_not_a_pair_folder_in_one_line(tmp_path, base_dir, capsys):
    (tmp_path / "imgs").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "imgs" / "a.png")
    for data, init, match in ((tmp_path / "imgs", base_dir, "folder of image pairs"),
                              (_pair_folder(tmp_path / "pairs")[0], tmp_path / "nowhere", "nowhere")):
        code = main(["train", "configs/shapes-dpo.yaml", "--set", f"data.name={data}", "--set",
                     f"model.init_from={init}", "--set", f"out_dir={tmp_path}", "--set", "train.steps=20"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and match in err[0], err
