"""Speculative decoding: greedy output is exactly the target's; sampled tokens follow the target's distribution."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy.stats import chisquare
from test_gpt import tiny_gpt

from genlab.sampling.speculative import accept_or_resample, speculative_generate
from genlab.sampling.text import GenerationConfig, generate

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("gamma", [1, 3, 5])
def test_greedy_speculative_equals_target_greedy(gamma):
    target, draft = tiny_gpt(seed=0), tiny_gpt(seed=1, n_layer=1)
    for text in ("the", "pack my box"):
        p = target.tokenizer.encode(text, bos=True)
        cfg = GenerationConfig(max_new_tokens=30, temperature=0, stop_token_ids=[])
        spec = speculative_generate(target, draft, p, cfg, gamma=gamma)
        assert spec.tokens == generate(target, [p], cfg).tokens[0]
        assert spec.drafted >= spec.accepted


def test_draft_identical_to_target_accepts_everything():
    target = tiny_gpt(seed=0)
    p = target.tokenizer.encode("the", bos=True)
    spec = speculative_generate(target, target, p, GenerationConfig(max_new_tokens=20, temperature=0.7, seed=0), 4)
    assert spec.acceptance_rate == 1.0 or len(spec.tokens) < 20


def test_acceptance_rule_output_follows_the_target_distribution():
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]])
    q = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    counts = np.zeros(4)
    for _ in range(4000):
        x = torch.multinomial(q[0], 1, generator=g)
        n, nxt = accept_or_resample(p, q, x, g)
        counts[int(x) if n == 1 else nxt] += 1
    assert chisquare(counts, 4000 * p[0].numpy()).pvalue > 1e-3


def test_sampled_speculative_tokens_follow_the_target_distribution():
    """Chi-square over all 2-token continuations (vocabulary 4) against the target's exact probabilities."""
    target, draft = tiny_gpt(vocab_size=4, seed=0, std=0.6), tiny_gpt(vocab_size=4, seed=5, std=0.6, n_layer=1)
    prompt = [1, 2]
    cfg = GenerationConfig(max_new_tokens=2, temperature=1.0, stop_token_ids=[])
    with torch.no_grad():
        seqs = torch.tensor([prompt + list(s) for s in itertools.product(range(4), repeat=2)])
        logits = target(seqs)
        logp = logits[:, 1:-1].log_softmax(-1).gather(-1, seqs[:, 2:, None]).sum((1, 2))
    expected = logp.double().exp().numpy()
    g = torch.Generator().manual_seed(0)
    counts = np.zeros(16)
    n = 1000
    for _ in range(n):
        out = speculative_generate(target, draft, prompt, cfg, gamma=2, generator=g)
        counts[out.tokens[0] * 4 + out.tokens[1]] += 1
    assert chisquare(counts, n * expected / expected.sum()).pvalue > 1e-3
