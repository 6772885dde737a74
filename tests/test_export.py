"""Hugging Face export: transformers' LlamaForCausalLM and PreTrainedTokenizerFast load the folder as it is and
agree with genlab (logits, greedy and beam-search generation, token ids, chat template); import reads it back."""

from __future__ import annotations

import pytest
import torch
from test_gpt import tiny_gpt
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from genlab.data.chat import apply_chat_template, encode_chat
from genlab.models.gpt import GPT
from genlab.models.hf_export import export_hf
from genlab.sampling.text import GenerationConfig, generate

pytestmark = pytest.mark.usefixtures("one_thread")

MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the fox?"},
            {"role": "assistant", "content": "jumps over the dog"}, {"role": "user", "content": "and?"}]


@pytest.fixture(scope="module", params=[dict(tie_embeddings=True), dict(tie_embeddings=False, n_kv_head=2)],
                ids=["tied", "untied-gqa"])
def exported(request, tmp_path_factory):
    model = tiny_gpt(std=0.2, **request.param)
    d = export_hf(model, tmp_path_factory.mktemp("hf"))
    return model, d, LlamaForCausalLM.from_pretrained(d).eval(), PreTrainedTokenizerFast.from_pretrained(d)


def test_transformers_logits_match(exported):
    model, _, hf, _ = exported
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, model.config.vocab_size, (3, 40), generator=g)
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x), atol=1e-4, rtol=0)


def test_transformers_greedy_generate_gives_the_same_tokens(exported):
    model, _, hf, _ = exported
    tok = model.tokenizer
    for text in ("the lazy", "pack my box with", "o"):
        p = tok.encode(text, bos=True)
        ours = generate(model, [p], GenerationConfig(max_new_tokens=24, temperature=0, stop_token_ids=[]))
        theirs = hf.generate(torch.tensor([p]), max_new_tokens=24, do_sample=False, eos_token_id=None,
                             pad_token_id=tok.pad_id)
        assert ours.tokens[0] == theirs[0, len(p):].tolist()


def test_transformers_beam_search_gives_the_same_tokens(exported):
    model, _, hf, _ = exported
    tok = model.tokenizer
    p = tok.encode("the quick", bos=True)
    # a frequent token as "EOS" so that beams finish at different lengths
    eos = generate(model, [p], GenerationConfig(max_new_tokens=8, temperature=0, stop_token_ids=[])).tokens[0][2]
    for lp in (1.0, 0.0, -1.0):
        cfg = GenerationConfig(max_new_tokens=10, num_beams=3, length_penalty=lp, stop_token_ids=[eos])
        ours = generate(model, [p], cfg).tokens[0]
        theirs = hf.generate(torch.tensor([p]), max_new_tokens=10, num_beams=3, length_penalty=lp, do_sample=False,
                             early_stopping=False, eos_token_id=eos, pad_token_id=tok.pad_id)[0, len(p):].tolist()
        assert ours == [t for t in theirs if t not in (eos, tok.pad_id)]


def test_tokenizer_and_chat_template_agree(exported):
    model, _, _, hf_tok = exported
    tok = model.tokenizer
    text = "Fox 🦊 jumps\tover\n é!"
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    assert hf_tok.decode(tok.encode(text)) == text
    rendered = hf_tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert rendered == apply_chat_template(MESSAGES, add_generation_prompt=True)
    assert hf_tok(rendered, add_special_tokens=False)["input_ids"] == encode_chat(tok, MESSAGES, True)[0]


def test_import_reads_the_folder_back(exported):
    model, d, _, _ = exported
    back = GPT.from_pretrained(d)
    x = torch.randint(0, model.config.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x), atol=1e-6, rtol=0)
    assert back.config.tie_embeddings == model.config.tie_embeddings
