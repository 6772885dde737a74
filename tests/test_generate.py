"""Decoding: KV cache vs recomputation, left padding vs alone, logit filters vs their definitions and
transformers' processors, beam search vs brute force, seeds, stop strings, streaming and logprobs."""

from __future__ import annotations

import itertools

import pytest
import torch
from test_gpt import tiny_gpt
from transformers.generation import logits_process as hf

from genlab.errors import GenlabError
from genlab.sampling.text import (
    GenerationConfig,
    apply_presence_frequency,
    apply_repetition_penalty,
    beam_search,
    generate,
    generate_text,
    min_p_filter,
    stream,
    top_k_filter,
    top_p_filter,
)

pytestmark = pytest.mark.usefixtures("one_thread")

NEG = float("-inf")


@pytest.mark.parametrize("n_kv_head", [4, 2])
def test_kv_cache_equals_full_recomputation(n_kv_head):
    model = tiny_gpt(n_kv_head=n_kv_head, std=0.1)
    x = torch.randint(0, model.config.vocab_size, (3, 20))
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(3, 20)
        chunks = [model(x[:, :7], cache), model(x[:, 7:10], cache)]  # a prefill, then a multi-token step
        chunks += [model(x[:, t: t + 1], cache) for t in range(10, 20)]  # then one token at a time
    torch.testing.assert_close(torch.cat(chunks, 1), full, atol=1e-5, rtol=0)


def test_one_token_steps_follow_in_place_weight_updates():
    """The decode path keeps (in, out) weight copies; an optimizer-style in-place update must reach them."""
    model = tiny_gpt(std=0.1)
    x = torch.randint(0, model.config.vocab_size, (2, 6))
    with torch.no_grad():
        model(x[:, :1], model.new_cache(2, 6))  # builds the copies
        for p in model.parameters():
            p.mul_(1.5)
        full = model(x)
        cache = model.new_cache(2, 6)
        steps = torch.cat([model(x[:, t: t + 1], cache) for t in range(6)], 1)
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=0)


def test_greedy_generation_equals_recomputing_the_whole_sequence_each_step():
    model = tiny_gpt()
    prompt = model.tokenizer.encode("the fox", bos=True)
    out = generate(model, [prompt], GenerationConfig(max_new_tokens=15, temperature=0, stop_token_ids=[]))
    seq = list(prompt)
    with torch.no_grad():
        for t, lp in zip(out.tokens[0], out.logprobs[0]):
            logits = model(torch.tensor([seq]))[0, -1]
            assert t == int(logits.argmax())
            assert lp == pytest.approx(float(logits.log_softmax(-1)[t]), abs=1e-5)
            seq.append(t)
    assert len(out.tokens[0]) == 15


def test_left_padded_batch_equals_each_prompt_alone():
    model = tiny_gpt(n_kv_head=2)
    tok = model.tokenizer
    prompts = [tok.encode(s, bos=True) for s in ("the lazy dog jumps", "a", "pack my box")]
    cfg = GenerationConfig(max_new_tokens=12, temperature=0, stop_token_ids=[])
    batch = generate(model, prompts, cfg)
    for i, p in enumerate(prompts):
        alone = generate(model, [p], cfg)
        assert batch.tokens[i] == alone.tokens[0]
        torch.testing.assert_close(torch.tensor(batch.logprobs[i]), torch.tensor(alone.logprobs[0]), atol=1e-5,
                                   rtol=0)


def test_sampling_is_reproducible_by_seed_and_batched_rows_differ():
    model = tiny_gpt()
    p = model.tokenizer.encode("the", bos=True)
    cfg = GenerationConfig(max_new_tokens=20, temperature=1.0, seed=7, stop_token_ids=[])
    a, b = generate(model, [p, p], cfg), generate(model, [p, p], cfg)
    assert a.tokens == b.tokens
    assert a.tokens[0] != a.tokens[1]
    cfg.seed = 8
    assert generate(model, [p, p], cfg).tokens != a.tokens


def test_streaming_yields_what_generate_returns():
    model = tiny_gpt()
    p = model.tokenizer.encode("over", bos=True)
    cfg = GenerationConfig(max_new_tokens=10, temperature=0.9, top_k=5, seed=3)
    streamed = [int(s.tokens[0]) for s in stream(model, [p], cfg) if bool(s.active[0])]
    assert streamed == generate(model, [p], cfg).tokens[0]


def test_stop_strings_cut_the_text():
    model = tiny_gpt()
    cfg = GenerationConfig(max_new_tokens=40, temperature=1.0, seed=0, stop_token_ids=[])
    free = generate_text(model, ["the"], cfg).texts[0]
    stop = free[5:7]
    cfg.stop = [stop]
    out = generate_text(model, ["the"], cfg)
    assert out.texts[0] == free[: free.find(stop)]
    assert out.finish_reason[0] == "stop"
    assert len(out.tokens[0]) < 40


def test_stop_token_ends_a_row():
    model = tiny_gpt()
    p = model.tokenizer.encode("the", bos=True)
    free = generate(model, [p], GenerationConfig(max_new_tokens=20, temperature=0, stop_token_ids=[])).tokens[0]
    stop_tok = free[3]
    out = generate(model, [p], GenerationConfig(max_new_tokens=20, temperature=0, stop_token_ids=[stop_tok]))
    assert out.tokens[0] == free[: free.index(stop_tok)]
    assert out.finish_reason == ["stop"]


# -- filters against their definitions and transformers' processors --------------------------------
LOGITS = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, 3.0], [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]])


def kept(x: torch.Tensor) -> list[set[int]]:
    return [set(torch.nonzero(row > NEG).flatten().tolist()) for row in x]


def test_top_k_keeps_the_k_largest():
    assert kept(top_k_filter(LOGITS, 2)) == [{0, 5}, {4, 5}]
    torch.testing.assert_close(top_k_filter(LOGITS, 3), hf.TopKLogitsWarper(3)(None, LOGITS.clone()))


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8, 0.95, 0.999])
def test_top_p_keeps_the_smallest_set_reaching_p(p):
    probs = LOGITS.softmax(-1)
    for row, keep in zip(probs, kept(top_p_filter(LOGITS, p))):
        # brute force: among all subsets with mass >= p, the smallest (ties: the one of the largest mass)
        best = min((s for n in range(1, 7) for s in itertools.combinations(range(6), n) if row[list(s)].sum() >= p),
                   key=lambda s: (len(s), -float(row[list(s)].sum())))
        assert keep == set(best)
    torch.testing.assert_close(top_p_filter(LOGITS, p), hf.TopPLogitsWarper(p)(None, LOGITS.clone()))


@pytest.mark.parametrize("min_p", [0.05, 0.3, 0.9])
def test_min_p_keeps_tokens_above_a_fraction_of_the_top(min_p):
    probs = LOGITS.softmax(-1)
    expect = [{i for i in range(6) if row[i] >= min_p * row.max()} for row in probs]
    assert kept(min_p_filter(LOGITS, min_p)) == expect
    torch.testing.assert_close(min_p_filter(LOGITS, min_p), hf.MinPLogitsWarper(min_p)(None, LOGITS.clone()))


def test_repetition_penalty_matches_transformers():
    ids = torch.tensor([[0, 4, 4], [2, 3, 5]])
    seen = torch.zeros_like(LOGITS, dtype=torch.bool).scatter(1, ids, True)
    ref = hf.RepetitionPenaltyLogitsProcessor(1.3)(ids, LOGITS.clone())
    torch.testing.assert_close(apply_repetition_penalty(LOGITS, seen, 1.3), ref)


def test_presence_and_frequency_penalties_follow_their_formula():
    counts = torch.tensor([[0.0, 2, 0, 1, 0, 0], [3, 0, 0, 0, 0, 1]])
    out = apply_presence_frequency(LOGITS, counts, presence=0.5, frequency=0.25)
    for b, i in itertools.product(range(2), range(6)):
        c = float(counts[b, i])
        assert float(out[b, i]) == pytest.approx(float(LOGITS[b, i]) - 0.25 * c - (0.5 if c > 0 else 0.0))


def test_sampled_tokens_stay_inside_the_top_k():
    model = tiny_gpt()
    p = model.tokenizer.encode("the", bos=True)
    cfg = GenerationConfig(max_new_tokens=25, temperature=1.5, top_k=2, seed=1, stop_token_ids=[])
    seq = list(p)
    with torch.no_grad():
        for t in generate(model, [p], cfg).tokens[0]:
            top2 = model(torch.tensor([seq]))[0, -1].topk(2).indices.tolist()
            assert t in top2
            seq.append(t)


# -- beam search ------------------------------------------------------------------------------------
def test_exhaustive_beam_search_finds_the_most_likely_sequence():
    model = tiny_gpt(vocab_size=4, std=0.8)
    prompt = [1, 2]
    n = 3
    with torch.no_grad():
        seqs = torch.tensor([prompt + list(s) for s in itertools.product(range(4), repeat=n)])
        best = seqs[model.log_likelihood(seqs).argmax(), 2:].tolist()
    tokens, _, _ = beam_search(model, prompt, GenerationConfig(num_beams=16, max_new_tokens=n, stop_token_ids=[]))
    assert tokens == best


def test_user_errors_are_one_line():
    model = tiny_gpt()
    with pytest.raises(GenlabError, match="top_p"):
        generate(model, [[1]], GenerationConfig(top_p=0))
    with pytest.raises(GenlabError, match="prompt"):
        generate(model, [[]], GenerationConfig())
