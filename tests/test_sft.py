"""Supervised fine-tuning data: the chat template, assistant-only labels and the masked loss; SFT through `build`."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from test_gpt import dataset, tiny_gpt  # noqa: F401

from genlab.data.chat import ChatData, apply_chat_template, encode_chat, load_conversations
from genlab.errors import GenlabError
from genlab.models.gpt import GPT, GPTConfig

pytestmark = pytest.mark.usefixtures("one_thread")

CONVS = [
    [{"role": "user", "content": "tell a fox"}, {"role": "assistant", "content": "the quick brown fox"}],
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "dog?"},
     {"role": "assistant", "content": "lazy"}, {"role": "user", "content": "more"},
     {"role": "assistant", "content": "the lazy dog"}],
]
JSONL = "\n".join(json.dumps({"messages": c}) for c in CONVS) + "\n"


def test_template_text():
    assert apply_chat_template(CONVS[0], add_generation_prompt=True) == (
        "<|bos|><|user|>tell a fox<|end|><|assistant|>the quick brown fox<|end|><|assistant|>")


def test_labels_are_exactly_the_assistant_tokens():
    tok = tiny_gpt().tokenizer
    ids, labels = encode_chat(tok, CONVS[1])
    assert ids == tok.encode(apply_chat_template(CONVS[1]))  # the rendered text tokenizes the same way
    targets = [t for t in labels if t != -100]
    expected = tok.encode("lazy") + [tok.end_id] + tok.encode("the lazy dog") + [tok.end_id]
    assert targets == expected
    for i, lab in enumerate(labels):
        assert lab in (-100, ids[i])


def test_masked_loss_is_the_mean_over_assistant_tokens():
    model = tiny_gpt(block_size=48)
    data = ChatData.from_jsonl(JSONL, model.tokenizer, 48)
    batch = data.get_batch([0, 1])
    loss = model.training_losses(batch)["loss"]
    with torch.no_grad():
        ref_terms = []
        for conv in CONVS:
            ids, labels = encode_chat(model.tokenizer, conv)
            logits = model(torch.tensor([ids[:-1]]))[0]
            for pos, lab in enumerate(labels[1:]):
                if lab != -100:
                    ref_terms.append(F.cross_entropy(logits[pos], torch.tensor(lab)))
    assert loss.item() == pytest.approx(torch.stack(ref_terms).mean().item(), rel=1e-5)


def test_jsonl_parsing_and_errors():
    assert load_conversations("{cut line\n" + JSONL + '{"messages": [{"ro') == CONVS  # partial edge lines
    with pytest.raises(GenlabError, match="line 3"):
        load_conversations(JSONL + "not json\n" + JSONL)
    with pytest.raises(GenlabError, match="role"):
        load_conversations(json.dumps({"messages": [{"role": "robot", "content": "x"}]}))


def test_build_for_sft_trains_a_tokenizer_on_the_contents(tmp_path):
    model = GPT.build(GPTConfig(tokenizer="char", sft=True, n_layer=1, n_head=2, n_embd=16, block_size=32),
                      dataset(JSONL))
    data = model.prepare_data(dataset(JSONL))
    assert len(data) == 2 and "labels" in data.get_batch([0])
    assert "{" not in model.tokenizer.tok.get_vocab()  # trained on the messages, not on the JSON syntax
    model.save_pretrained(tmp_path)
    tuned = GPT.build(GPTConfig(init_from=str(tmp_path), sft=True), dataset(JSONL))
    assert tuned.config.sft and tuned.tokenizer.encode("fox") == model.tokenizer.encode("fox")


# -- token-weighted loss in the trainer ----------------------------------------------------------------------------
def chat(user: str, assistant: str | None = None) -> str:
    messages = [{"role": "user", "content": user}]
    if assistant is not None:
        messages.append({"role": "assistant", "content": assistant})
    return json.dumps({"messages": messages})


def sft_config(tmp_path, lines: list[str], *overrides: str):
    from genlab.config import load_run_config

    path = tmp_path / "chats.jsonl"
    path.write_text("\n".join(lines) + "\n")
    sets = ["family=gpt", f"data.name={path}", "model.sft=true", "model.tokenizer=char", "model.n_layer=1",
            "model.n_head=2", "model.n_embd=16", "model.block_size=32", "train.warmup_steps=0", "train.grad_clip=0",
            "train.log_every=1", "train.ckpt_every=0", f"out_dir={tmp_path}", "name=sft", *overrides]
    return load_run_config(None, sets)


def test_an_all_masked_batch_has_loss_zero_not_nan():
    model = tiny_gpt()
    ids = torch.tensor([model.tokenizer.encode("the quick brown fox", bos=True)])
    loss = model.training_losses({"input_ids": ids, "labels": torch.full_like(ids, -100)})["loss"]
    assert loss.item() == 0.0


def test_conversations_without_assistant_tokens_are_reported_and_left_out(capsys):
    tok = tiny_gpt().tokenizer
    lines = [chat("dog?", "lazy"), chat("no answer here"), chat("fox " * 20, "quick"), chat("fox?", "brown")]
    data = ChatData.from_jsonl("\n".join(lines), tok, 32)
    kept = [encode_chat(tok, json.loads(line)["messages"])[0] for line in (lines[0], lines[3])]
    assert [row[: len(ids)].tolist() for row, ids in zip(data.input_ids, kept, strict=True)] == kept
    err = capsys.readouterr().err
    assert "left out 2 of 4 conversations" in err and "lines 2, 3" in err and err.count("\n") == 1
    with pytest.raises(GenlabError, match="no conversation has an assistant token"):
        ChatData.from_jsonl("\n".join(lines[1:3]), tok, 32)


def test_sft_run_with_unanswered_and_overlong_rows_trains_with_finite_loss(tmp_path):
    from genlab.train import Trainer

    lines = [chat("dog?", "lazy"), chat("no answer here"), chat("fox " * 20, "quick")] * 4 + [chat("a", "b")] * 3
    trainer = Trainer(sft_config(tmp_path, lines, "train.steps=3", "train.batch_size=4", "train.grad_accum=2"))
    trainer.fit()
    losses = [json.loads(x)["loss"] for x in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()
              if json.loads(x)["split"] == "train"]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))


def test_micro_batches_weighted_by_tokens_give_the_loss_and_gradient_of_the_whole_batch(tmp_path):
    """Two micro-batches with 1 and many target tokens: the step's loss and gradient are those of the mean
    cross-entropy over all target tokens of the concatenated batch (computed here by hand)."""
    import copy

    from genlab.train import Trainer

    lines = [chat("a", "b"), chat("x", "the quick brown fox jumps")] * 8
    trainer = Trainer(sft_config(tmp_path, lines, "train.steps=1", "train.batch_size=4", "train.grad_accum=2"))
    batch = trainer.data.get_batch([0, 2, 1, 3])  # short answers, then long ones
    tokens = [int((batch["labels"][k:k + 2, 1:] != -100).sum()) for k in (0, 2)]
    assert tokens[0] != tokens[1]  # unequal micro-batches: a plain mean of the two means would differ

    ref = copy.deepcopy(trainer.model).train()
    logp = ref(batch["input_ids"][:, :-1]).float().log_softmax(-1)
    targets = batch["labels"][:, 1:]
    mask = targets != -100
    picked = logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    manual = -(picked * mask).sum() / mask.sum()
    manual.backward()

    (opt,) = trainer.optimizers
    opt.step = opt.zero_grad = lambda *a, **k: None  # keep the accumulated gradient to compare
    out = trainer._train_step(batch, trainer.optimizers, trainer.accelerator, trainer.objective)
    assert out["loss"].item() == pytest.approx(manual.item(), rel=1e-5)
    for (name, p), q in zip(trainer.model.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_two_processes_weight_by_the_tokens_of_both(tmp_path, monkeypatch):
    """Two processes, simulated: each weights its rows by the step's token count on both (the all-reduce), and
    the average of their gradients (what DDP applies) is the gradient of the mean over all tokens of both."""
    import copy

    from genlab.train import Trainer

    lines = [chat("a", "b"), chat("x", "the quick brown fox jumps")] * 8
    trainer = Trainer(sft_config(tmp_path, lines, "train.steps=1", "train.batch_size=4", "train.grad_accum=2"))
    halves = [trainer.data.get_batch([0, 2, 4, 6]), trainer.data.get_batch([1, 3, 5, 7])]  # short, then long rows
    counts = [int(trainer.model.loss_tokens(h)) for h in halves]
    ref = copy.deepcopy(trainer.model).train()
    full = {k: torch.cat([h[k] for h in halves]) for k in halves[0]}
    manual = ref.training_losses(full)["loss"]
    manual.backward()

    (opt,) = trainer.optimizers
    opt.step = opt.zero_grad = lambda *a, **k: None
    trainer.world = 2
    grads, losses = [], []
    for rank, half in enumerate(halves):
        monkeypatch.setattr(trainer.accelerator, "reduce", lambda t, reduction, r=rank: t + counts[1 - r])
        trainer.model.zero_grad(set_to_none=True)
        losses.append(trainer._train_step(half, trainer.optimizers, trainer.accelerator, trainer.objective)["loss"])
        grads.append([p.grad.clone() for p in trainer.model.parameters()])
    assert ((losses[0] + losses[1]) / 2).item() == pytest.approx(manual.item(), rel=1e-5)  # as `_reduce` averages
    for g0, g1, q in zip(*grads, ref.parameters(), strict=True):
        torch.testing.assert_close((g0 + g1) / 2, q.grad, rtol=1e-4, atol=1e-6)
