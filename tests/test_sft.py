"""Supervised fine-tuning data: the chat template, assistant-only labels and the masked loss; SFT through `build`."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from test_gpt import dataset, tiny_gpt  # noqa: F401

from genlab.adapt.sft import ChatData, apply_chat_template, encode_chat, load_conversations
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
