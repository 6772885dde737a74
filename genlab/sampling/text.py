"""Text decoding with a preallocated KV cache: greedy, temperature, top-k, top-p, min-p, penalties, beam search.

`stream` yields one `Step` per new token for a batch of prompts of different lengths (left padding, an
attention mask and per-row RoPE positions); `generate` collects it; `beam_search` follows transformers'
beam search (length penalty, `early_stopping=False` heuristic). The logit filters are pure functions.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor

from genlab.config import MAX_CONTEXT, check_int, check_number, check_seed
from genlab.errors import GenlabError


@dataclass
class GenerationConfig:
    """Decoding settings; temperature 0 means greedy."""

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    min_p: float = 0.0  # 0: off
    repetition_penalty: float = 1.0  # 1: off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    num_beams: int = 1
    length_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)  # stop strings (excluded from the text)
    stop_token_ids: list[int] | None = None  # None: the tokenizer's EOS and END
    seed: int | None = None

    def check(self, flags: bool = False) -> None:
        """Reject settings outside their ranges (or not finite) with the name of the option to change: the field's
        name, or with `flags` the command-line flag (`--top-p`)."""
        def name(key: str) -> str:
            return "--" + key.replace("_", "-") if flags else key

        check_int(name("max_new_tokens"), self.max_new_tokens, 1, MAX_CONTEXT, "the KV cache holds every token")
        check_number(name("temperature"), self.temperature, 0, hint="0 is greedy")
        check_int(name("top_k"), self.top_k, 0)
        check_number(name("top_p"), self.top_p, 0, 1, low_open=True, hint="1 turns it off")
        check_number(name("min_p"), self.min_p, 0, 1, high_open=True, hint="0 turns it off")
        check_number(name("repetition_penalty"), self.repetition_penalty, 0, low_open=True, hint="1 turns it off")
        for key in ("presence_penalty", "frequency_penalty", "length_penalty"):
            check_number(name(key), getattr(self, key))
        check_int(name("num_beams"), self.num_beams, 1)
        if self.seed is not None:
            check_seed(name("seed"), self.seed)
        if any(not s for s in self.stop):
            raise GenlabError(f"{name('stop')} '' is empty: it would stop before the first character; drop it")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


# -- logit processors: (B, V) float logits in, filtered logits out ----------------------------------
def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """CTRL's penalty (Keskar et al. 2019, eq. 2 as in transformers): divide positive, multiply negative logits."""
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def apply_presence_frequency(logits: Tensor, counts: Tensor, presence: float, frequency: float) -> Tensor:
    """OpenAI's penalties: logit - frequency * count - presence * [count > 0], counts over generated tokens."""
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Keep the k largest logits (Fan et al. 2018), ties with the k-th included; the rest become -inf."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Nucleus filter (Holtzman et al. 2020, eq. 3): keep the smallest set of most likely tokens with mass >= p."""
    if p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    mass_before = probs.cumsum(-1) - probs
    remove_sorted = mass_before >= p
    remove_sorted[..., 0] = False
    remove = remove_sorted.scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def min_p_filter(logits: Tensor, min_p: float) -> Tensor:
    """Min-p filter (Nguyen et al. 2024, eq. 1): keep tokens with p(x) >= min_p * max_x p(x)."""
    if min_p <= 0.0:
        return logits
    probs = logits.softmax(-1)
    threshold = min_p * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < threshold, float("-inf"))


def process_logits(logits: Tensor, cfg: GenerationConfig, seen: Tensor | None = None,
                   counts: Tensor | None = None) -> Tensor:
    """Penalties, then temperature, then top-k, top-p and min-p (transformers' order); greedy skips the warpers."""
    if seen is not None and cfg.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, seen, cfg.repetition_penalty)
    if counts is not None and (cfg.presence_penalty or cfg.frequency_penalty):
        logits = apply_presence_frequency(logits, counts, cfg.presence_penalty, cfg.frequency_penalty)
    if cfg.greedy:
        return logits
    if cfg.temperature != 1.0:
        logits = logits / cfg.temperature
    logits = top_k_filter(logits, cfg.top_k)
    logits = top_p_filter(logits, cfg.top_p)
    return min_p_filter(logits, cfg.min_p)


def choose(logits: Tensor, cfg: GenerationConfig, generator: torch.Generator | None) -> Tensor:
    """Argmax when greedy, else one draw from softmax(logits) (already processed)."""
    if cfg.greedy:
        return logits.argmax(-1)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


# -- batched decoding -------------------------------------------------------------------------------
class Step(NamedTuple):
    """One decoding step: the token of each row, its log-probability under the model, and which rows emitted one."""

    tokens: Tensor  # (B,) long (pad where not active)
    logprobs: Tensor  # (B,) float: log p(token | context) of the unprocessed model
    active: Tensor  # (B,) bool


@dataclass
class GenerationOutput:
    """Generated tokens per prompt (stop token excluded), their log-probabilities, and why each ended."""

    tokens: list[list[int]]
    logprobs: list[list[float]]
    finish_reason: list[str]
    texts: list[str] | None = None


def left_pad(prompts: list[list[int]], pad_id: int, device: torch.device | str = "cpu"
             ) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Left-padded ids (B, T), the real-token mask (None if no padding) and RoPE positions (None if no padding)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise GenlabError("every prompt needs at least one token (prepend BOS to an empty prompt)")
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    real = torch.zeros(len(prompts), T, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = torch.as_tensor(p, dtype=torch.long)
        real[i, T - len(p):] = True
    if bool(real.all()):
        return ids.to(device), None, None
    positions = (real.long().cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), real.to(device), positions.to(device)


def _stop_ids(model: Any, cfg: GenerationConfig) -> list[int]:
    if cfg.stop_token_ids is not None:
        return list(cfg.stop_token_ids)
    tok = getattr(model, "tokenizer", None)
    return [tok.eos_id, tok.end_id] if tok is not None else []


def _pad_id(model: Any) -> int:
    tok = getattr(model, "tokenizer", None)
    return tok.pad_id if tok is not None else 0


@torch.inference_mode()
def stream(model: Any, prompts: list[list[int]], cfg: GenerationConfig,
           generator: torch.Generator | None = None, prefix: Tensor | None = None) -> Iterator[Step]:
    """Yield one `Step` per new token for a batch of token-id prompts (sampling or greedy, KV-cached).

    `prefix` (B, P, n_embd): input embeddings that precede each row's prompt (an image, LLaVA-style); the
    left padding goes before them.
    """
    cfg.check()
    device = model.tok_emb.weight.device
    if generator is None and cfg.seed is not None:
        generator = torch.Generator(device).manual_seed(cfg.seed)
    pad = _pad_id(model)
    P = 0 if prefix is None else prefix.shape[1]
    if prefix is not None and prefix.shape[0] != len(prompts):
        raise GenlabError(f"{prefix.shape[0]} prefixes for {len(prompts)} prompts; give one per prompt")
    ids, real, positions = left_pad([[pad] * P + p for p in prompts], pad, device)
    B, T = ids.shape
    V = model.config.vocab_size
    max_len = T + cfg.max_new_tokens
    cache = model.new_cache(B, max_len)
    key_mask = None
    if real is not None:
        key_mask = torch.ones(B, max_len, dtype=torch.bool, device=device)
        key_mask[:, :T] = real
    next_pos = torch.tensor([P + len(p) for p in prompts], device=device)[:, None]
    seen = counts = None
    if cfg.repetition_penalty != 1.0:
        seen = torch.zeros(B, V, dtype=torch.bool, device=device)
        for i, p in enumerate(prompts):
            seen[i, torch.as_tensor(p, dtype=torch.long, device=device)] = True
    if cfg.presence_penalty or cfg.frequency_penalty:
        counts = torch.zeros(B, V, device=device)
    stop_ids = torch.tensor(_stop_ids(model, cfg), dtype=torch.long, device=device)
    stop_strings = [s for s in cfg.stop if s]
    tail_len = max((len(s) for s in stop_strings), default=0) + 8
    generated: list[list[int]] = [[] for _ in range(B)]
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    active = torch.ones(B, dtype=torch.bool, device=device)
    can_stop = len(stop_ids) > 0 or bool(stop_strings)
    extra = {} if prefix is None else {"embeds": _with_prefix(model, ids, prefix, [len(p) for p in prompts])}
    logits = model(ids, cache, key_mask=key_mask, positions=positions, last_only=True, **extra)[:, -1].float()
    for step in range(cfg.max_new_tokens):
        nxt = choose(process_logits(logits, cfg, seen, counts), cfg, generator)
        logprob = logits.gather(-1, nxt[:, None])[:, 0] - logits.logsumexp(-1)
        if not can_stop:  # every row runs to max_new_tokens: no masking
            yield Step(nxt, logprob, active)
        else:
            is_stop = torch.isin(nxt, stop_ids)
            active = ~(finished | is_stop)
            nxt = nxt.masked_fill(~active, pad)
            yield Step(nxt, logprob, active)
            finished = finished | is_stop
            if stop_strings:
                finished = finished | _hit_stop_strings(model.tokenizer, generated, nxt, active, stop_strings,
                                                        tail_len)
            if bool(finished.all()):
                return
        if step == cfg.max_new_tokens - 1:
            return
        if seen is not None:
            seen.scatter_(1, nxt[:, None], True)
        if counts is not None:
            counts.scatter_add_(1, nxt[:, None], active[:, None].float())
        pos = None
        if real is not None:
            pos = next_pos
            next_pos = next_pos + 1
        logits = model(nxt[:, None], cache, key_mask=key_mask, positions=pos)[:, -1].float()


def _with_prefix(model: Any, ids: Tensor, prefix: Tensor, lengths: list[int]) -> Tensor:
    """Token embeddings of left-padded `ids` (B, T) with row i's `prefix` in the P slots before its prompt."""
    embeds = model.tok_emb(ids).clone()
    T, P = ids.shape[1], prefix.shape[1]
    for i, n in enumerate(lengths):
        embeds[i, T - n - P: T - n] = prefix[i].to(embeds.dtype)
    return embeds


def _hit_stop_strings(tok: Any, generated: list[list[int]], nxt: Tensor, active: Tensor, stops: list[str],
                      tail_len: int) -> Tensor:
    """Rows whose recent text contains a stop string."""
    hit = torch.zeros(len(generated), dtype=torch.bool, device=nxt.device)
    for i, (t, a) in enumerate(zip(nxt.tolist(), active.tolist())):
        if a:
            generated[i].append(t)
            tail = tok.decode(generated[i][-tail_len:])
            hit[i] = any(s in tail for s in stops)
    return hit


def generate(model: Any, prompts: list[list[int]], cfg: GenerationConfig,
             generator: torch.Generator | None = None, prefix: Tensor | None = None) -> GenerationOutput:
    """Decode every prompt (token ids) to completion: sampling / greedy via `stream`, or beam search; `prefix`
    (B, P, n_embd) as in `stream`."""
    cfg.check()
    if cfg.num_beams > 1:
        outs = [beam_search(model, p, cfg, None if prefix is None else prefix[i: i + 1])
                for i, p in enumerate(prompts)]
        return GenerationOutput([o[0] for o in outs], [o[1] for o in outs], [o[2] for o in outs])
    B = len(prompts)
    tokens: list[list[int]] = [[] for _ in range(B)]
    logprobs: list[list[float]] = [[] for _ in range(B)]
    reason = ["length"] * B
    for step in stream(model, prompts, cfg, generator, prefix):
        for i, (t, lp, a) in enumerate(zip(step.tokens.tolist(), step.logprobs.tolist(), step.active.tolist())):
            if a:
                tokens[i].append(t)
                logprobs[i].append(lp)
            elif reason[i] == "length":
                reason[i] = "stop"
    return GenerationOutput(tokens, logprobs, reason)


def generate_text(model: Any, prompts: list[str], cfg: GenerationConfig, generator: torch.Generator | None = None,
                  bos: bool = True) -> GenerationOutput:
    """`generate` on text prompts; the texts are cut before the first stop string."""
    tok = model.tokenizer
    out = generate(model, [tok.encode(p, bos=bos) for p in prompts], cfg, generator)
    out.texts = []
    for i, ids in enumerate(out.tokens):
        text, hit = cut_at_stop(tok.decode(ids), cfg.stop)
        if hit:
            out.finish_reason[i] = "stop"
        out.texts.append(text)
    return out


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """`text` up to the earliest stop string, and whether one was found."""
    cuts = [text.find(s) for s in stops if s and s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


# -- beam search --------------------------------------------------------------------------------------
@torch.inference_mode()
def beam_search(model: Any, prompt: list[int], cfg: GenerationConfig, prefix: Tensor | None = None
                ) -> tuple[list[int], list[float], str]:
    """Beam search (as in transformers, `early_stopping=False`): finished hypotheses are scored
    sum log p / (generated length ** length_penalty) (Wu et al. 2016 use a related length normalization).

    Returns the best hypothesis (stop token excluded), its per-token log-probabilities and the finish reason.
    """
    nb = cfg.num_beams
    device = model.tok_emb.weight.device
    stop_ids = set(_stop_ids(model, cfg))
    T = len(prompt) + (0 if prefix is None else prefix.shape[1])
    cache = model.new_cache(nb, T + cfg.max_new_tokens)
    ids = torch.tensor([prompt] * nb, dtype=torch.long, device=device)
    extra = {}  # `prefix` (1, P, n_embd): input embeddings before the prompt, as in `stream`
    if prefix is not None:
        extra["embeds"] = torch.cat([prefix.expand(nb, -1, -1).to(device), model.tok_emb(ids)], dim=1)
    logits = model(ids, cache, last_only=True, **extra)[:, -1].float()
    running_scores = torch.full((nb,), -1.0e9, device=device)
    running_scores[0] = 0.0
    beams: list[list[int]] = [[] for _ in range(nb)]
    beam_lps: list[list[float]] = [[] for _ in range(nb)]
    finished: list[tuple[float, list[int], list[float], str]] = []
    for gen in range(cfg.max_new_tokens):
        logprobs = process_logits(logits, GenerationConfig(temperature=0.0, repetition_penalty=cfg.repetition_penalty),
                                  _seen(beams, prompt, logits) if cfg.repetition_penalty != 1.0 else None)
        logprobs = logprobs.log_softmax(-1)
        V = logprobs.shape[-1]
        scores, flat = (running_scores[:, None] + logprobs).flatten().topk(min(2 * nb, nb * V))
        last = gen == cfg.max_new_tokens - 1
        next_beams: list[tuple[int, int]] = []
        next_scores: list[float] = []
        length = gen + 1
        for rank, (s, f) in enumerate(zip(scores.tolist(), flat.tolist())):
            b, t = divmod(f, V)
            hits = t in stop_ids or last
            if hits:
                if rank < nb and s > -1.0e8:
                    toks = beams[b] + ([] if t in stop_ids else [t])
                    lps = beam_lps[b] + ([] if t in stop_ids else [float(logprobs[b, t])])
                    reason = "stop" if t in stop_ids else "length"
                    finished.append((s / length**cfg.length_penalty, toks, lps, reason))
                continue
            if len(next_beams) < nb:
                next_beams.append((b, t))
                next_scores.append(s)
        finished = sorted(finished, key=lambda h: -h[0])[:nb]
        if last or not next_beams:
            break
        src = torch.tensor([b for b, _ in next_beams], device=device)
        new_tokens = torch.tensor([t for _, t in next_beams], device=device)
        beam_lps = [beam_lps[b] + [float(logprobs[b, t])] for b, t in next_beams]
        beams = [beams[b] + [t] for b, t in next_beams]
        running_scores = torch.tensor(next_scores, device=device)
        if len(finished) == nb and next_scores[0] / length ** cfg.length_penalty <= finished[-1][0]:
            break  # no running beam can beat the worst finished one (transformers' heuristic)
        cache.reorder(src)
        logits = model(new_tokens[:, None], cache)[:, -1].float()
    if not finished:
        return beams[0], beam_lps[0], "length"
    _, toks, lps, reason = finished[0]
    return toks, lps, reason


def _seen(beams: list[list[int]], prompt: list[int], logits: Tensor) -> Tensor:
    seen = torch.zeros_like(logits, dtype=torch.bool)
    for i, b in enumerate(beams):
        seen[i, torch.tensor(prompt + b, dtype=torch.long)] = True
    return seen
