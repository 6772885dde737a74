"""DPO (Rafailov et al. 2023): the loss equals TRL's DPOTrainer loss on the same log-probabilities, completion
log-probabilities equal the chain rule by brute force, and a DPO run starts at log 2 and writes a GPT folder."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from test_gpt import tiny_gpt

from genlab.adapt.dpo import PairData, completion_logps, dpo_loss, read_pairs
from genlab.errors import GenlabError
from genlab.models.gpt import GPT

pytestmark = pytest.mark.usefixtures("one_thread")

PAIRS = [("the quick", " brown fox", " lazy dog."), ("pack my", " box", " five dozen liquor jugs!"),
         ("", "the dog.", "the fox jumps over"), ("jugs", "!", " with box")]


def trl_loss(per_token_logps: torch.Tensor, mask: torch.Tensor, ids: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> torch.Tensor:
    """TRL's DPOTrainer._compute_loss (loss_type sigmoid, reference log-probs precomputed) run on a model whose
    fused head returns `per_token_logps` (rows: chosen, then rejected; zero outside the completion)."""
    from trl import DPOTrainer

    zeros = torch.zeros_like(per_token_logps)
    outputs = SimpleNamespace(log_probs=per_token_logps, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())
    accelerator = SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda t: t, gather=lambda t: t)
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=accelerator, aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=["sigmoid"], loss_weights=[1.0],
        beta=beta, label_smoothing=0.0, use_weighting=False, _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": mask.long(),
              "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
    return DPOTrainer._compute_loss(trainer, lambda **kw: outputs, inputs, False)


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_loss_equals_trls_dpo_loss_on_the_same_log_probabilities(beta):
    policy, reference = tiny_gpt(seed=0, std=0.1), tiny_gpt(seed=1, std=0.1)
    data = PairData.encode(reference, PAIRS, block_size=48)
    rows = data.rows
    ids = torch.cat([rows["chosen_ids"], rows["rejected_ids"]])
    mask = torch.cat([rows["chosen_mask"], rows["rejected_mask"]])
    with torch.no_grad():
        logp = policy(ids[:, :-1]).float().log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0] * mask[:, 1:]
        chosen, rejected = completion_logps(policy, rows["chosen_ids"], rows["chosen_mask"]), \
            completion_logps(policy, rows["rejected_ids"], rows["rejected_mask"])
    ours = dpo_loss(chosen, rejected, rows["ref_chosen"], rows["ref_rejected"], beta).mean()
    theirs = trl_loss(logp, mask, ids, rows["ref_chosen"], rows["ref_rejected"], beta)
    assert abs(float(ours) - math.log(2)) > 1e-3  # policy != reference: a non-trivial margin
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)


def test_completion_log_probability_is_the_chain_rule_difference():
    model = tiny_gpt(seed=2, std=0.1)
    tok = model.tokenizer
    data = PairData.encode(model, PAIRS, block_size=48)
    for i, (prompt, chosen, _) in enumerate(PAIRS):
        p = tok.encode(prompt, bos=True)
        full = p + tok.encode(chosen) + [tok.eos_id]
        with torch.no_grad():
            brute = model.log_likelihood(torch.tensor([full])) - model.log_likelihood(torch.tensor([p])) \
                if len(p) > 1 else model.log_likelihood(torch.tensor([full]))
        torch.testing.assert_close(data.rows["ref_chosen"][i], brute[0], atol=1e-4, rtol=1e-5)


def test_pairs_are_read_and_bad_lines_refused():
    good = [json.dumps(dict(zip(("prompt", "chosen", "rejected"), p, strict=True))) for p in PAIRS]
    assert read_pairs("\n".join(["{\"prom", *good, "{\"prompt\": \"x\""])) == PAIRS  # torn first and last line
    with pytest.raises(GenlabError, match="line 2 of the preference data is not JSON"):
        read_pairs("\n".join([good[0], "nope", good[1]]))
    with pytest.raises(GenlabError, match="string fields prompt, chosen, rejected"):
        read_pairs(json.dumps({"prompt": "a", "chosen": "b"}))
    with pytest.raises(GenlabError, match="chosen == rejected"):
        read_pairs(json.dumps({"prompt": "a", "chosen": "b", "rejected": "b"}))


def run_config(tmp_path, *sets: str):
    from genlab.config import load_run_config

    pairs = tmp_path / "pairs.jsonl"
    lines = [json.dumps(dict(zip(("prompt", "chosen", "rejected"), p, strict=True))) for p in PAIRS * 8]
    pairs.write_text("\n".join(lines) + "\n")
    base = tiny_gpt(seed=0, std=0.1).save_pretrained(tmp_path / "sft")
    return load_run_config(None, [
        "family=dpo", f"data.name={pairs}", f"model.init_from={base}", "model.beta=0.5", "train.steps=6",
        "train.batch_size=8", "train.lr=3e-3", "train.warmup_steps=0", "train.ema_decay=0", "train.log_every=1",
        "train.ckpt_every=0", f"out_dir={tmp_path}", "name=dpo", *sets])


def test_a_dpo_run_starts_at_log_2_raises_the_reward_accuracy_and_writes_a_gpt_folder(tmp_path):
    from genlab.train import Trainer

    trainer = Trainer(run_config(tmp_path))
    batch = trainer.data.get_batch(list(range(8)))
    first = trainer.model.training_losses(batch)
    torch.testing.assert_close(first["loss"], torch.tensor(math.log(2)), atol=1e-5, rtol=0)  # policy = reference
    run = trainer.fit()
    rec = [json.loads(x) for x in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rec if "loss" in r]
    assert losses[-1] < losses[0]
    model = GPT.from_pretrained(run)
    assert model.family == "gpt"
    after = PairData.encode(model, PAIRS, block_size=48).rows
    ref = trainer.data.get_batch(list(range(len(PAIRS))))
    margin = (after["ref_chosen"] - ref["ref_chosen"]) - (after["ref_rejected"] - ref["ref_rejected"])
    assert (margin > 0).all()  # every pair's implicit reward now ranks chosen above rejected


@pytest.mark.parametrize(("sets", "message"), [
    (["model.init_from=null"], "needs model.init_from"),
    (["model.beta=0"], "model.beta"),
    (["model.block_size=2"], "leaves no room"),
])
def test_bad_dpo_settings_fail_with_one_line(tmp_path, sets, message):
    from genlab.train import Trainer

    with pytest.raises(GenlabError, match=message):
        Trainer(run_config(tmp_path, *sets))
