"""Speculative decoding with a small draft model (Leviathan et al. 2023, Algorithm 1; Chen et al. 2023, Algorithm 2).

The draft proposes `gamma` tokens; the target scores them in one forward pass; token i is kept with probability
min(1, p_i(x) / q_i(x)), and at the first rejection a token is drawn from norm(max(0, p_i - q_i)). The output
has exactly the target's distribution (after the same temperature / top-k / top-p / min-p processing); with
temperature 0 both distributions are one-hot and the output is exactly the target's greedy decoding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from genlab.errors import GenlabError
from genlab.sampling.text import GenerationConfig, _stop_ids, process_logits


@dataclass
class SpeculativeOutput:
    """Generated tokens (stop token excluded) and how many drafted tokens the target accepted."""

    tokens: list[int]
    drafted: int
    accepted: int
    target_calls: int

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / max(self.drafted, 1)


def _probs(logits: Tensor, cfg: GenerationConfig) -> Tensor:
    """The distribution decoding draws from: one-hot argmax when greedy, else softmax of processed logits."""
    logits = process_logits(logits.float(), cfg)
    if cfg.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    return logits.softmax(-1)


def accept_or_resample(p: Tensor, q: Tensor, drafted: Tensor, generator: torch.Generator | None
                       ) -> tuple[int, int | None]:
    """Leviathan et al. 2023, Algorithm 1 for one row: p, q (gamma + 1 | gamma, V) target and draft distributions.

    Returns (number of drafted tokens accepted, the token that follows them: a residual or bonus draw).
    """
    gamma = len(drafted)
    r = torch.rand(gamma, generator=generator, device=p.device)
    idx = torch.arange(gamma, device=p.device)
    p_x, q_x = p[idx, drafted], q[idx, drafted]
    rejected = (r * q_x > p_x).nonzero()  # r > p/q, written without dividing by q = 0
    n = int(rejected[0]) if len(rejected) else gamma
    if n < gamma:
        residual = (p[n] - q[n]).clamp(min=0)
        if float(residual.sum()) <= 0:  # p == q numerically: any draw from p is exact
            residual = p[n]
        nxt = torch.multinomial(residual / residual.sum(), 1, generator=generator)
    else:
        nxt = torch.multinomial(p[gamma], 1, generator=generator)
    return n, int(nxt)


@torch.inference_mode()
def speculative_generate(target: torch.nn.Module, draft: torch.nn.Module, prompt: list[int], cfg: GenerationConfig,
                         gamma: int = 4, generator: torch.Generator | None = None) -> SpeculativeOutput:
    """Decode one prompt with `target`, drafting `gamma` tokens at a time with `draft` (same tokenizer)."""
    cfg.check()
    if gamma < 1:
        raise GenlabError(f"gamma={gamma} must be at least 1")
    if target.config.vocab_size != draft.config.vocab_size:
        raise GenlabError("the draft model must share the target's tokenizer (vocab sizes differ)")
    if not prompt:
        raise GenlabError("the prompt needs at least one token (prepend BOS)")
    if cfg.repetition_penalty != 1.0 or cfg.presence_penalty or cfg.frequency_penalty or cfg.num_beams > 1:
        raise GenlabError("speculative decoding supports temperature, top-k, top-p and min-p only")
    device = target.tok_emb.weight.device
    if generator is None and cfg.seed is not None:
        generator = torch.Generator(device).manual_seed(cfg.seed)
    stop = set(_stop_ids(target, cfg))
    max_len = len(prompt) + cfg.max_new_tokens + gamma + 1
    t_cache, d_cache = target.new_cache(1, max_len), draft.new_cache(1, max_len)
    ids = torch.tensor([prompt], device=device)
    # both caches hold every committed token but the last ones, which wait in `*_pending`
    if len(prompt) > 1:
        target(ids[:, :-1], t_cache)
        draft(ids[:, :-1], d_cache)
    t_pending, d_pending = [prompt[-1]], [prompt[-1]]
    out: list[int] = []
    drafted = accepted = calls = 0
    while len(out) < cfg.max_new_tokens:
        g = min(gamma, cfg.max_new_tokens - len(out))
        q_rows, proposal = [], []
        feed = d_pending
        for _ in range(g):
            logits = draft(torch.tensor([feed], device=device), d_cache)[0, -1]
            q = _probs(logits[None], cfg)[0]
            x = int(torch.multinomial(q, 1, generator=generator)) if not cfg.greedy else int(q.argmax())
            q_rows.append(q)
            proposal.append(x)
            feed = [x]
        base = t_cache.length
        p = _probs(target(torch.tensor([t_pending + proposal], device=device), t_cache)[0, -(g + 1):], cfg)
        calls += 1
        n, nxt = accept_or_resample(p, torch.stack(q_rows), torch.tensor(proposal, device=device), generator)
        drafted += g
        accepted += n
        new = proposal[:n] + [nxt]
        # roll both caches back to the committed prefix (minus the token each will be fed next)
        t_cache.length = base + len(t_pending) + n
        d_cache.length = min(d_cache.length, base + len(t_pending) + n)
        committed_in_draft = d_cache.length - base - len(t_pending)
        t_pending = [nxt]
        d_pending = proposal[max(committed_in_draft, 0): n] + [nxt]
        for t in new:
            if t in stop or len(out) >= cfg.max_new_tokens:
                return SpeculativeOutput(out, drafted, accepted, calls)
            out.append(t)
    return SpeculativeOutput(out, drafted, accepted, calls)
