"""Continuous batching for text decoding (Yu et al. 2022, Orca: iteration-level scheduling, section 3.2).

A request joins the running batch at the next decoding step: its prompt is prefilled alone, then its KV-cache
rows are merged into the batch cache, right-aligned (left padding masked out of attention, per-row RoPE
positions), so every row decodes exactly as it would alone. A row leaves when it meets a stop token, a stop
string or its `max_tokens`. Each request carries its own sampling settings and its own `torch.Generator`;
nothing mutable is shared between requests. `BatchDecoder` is the synchronous core (`add`, `step`);
`TextEngine` runs it on a thread for the server.
"""

from __future__ import annotations

import secrets
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from genlab.config import MAX_SEED, check_int
from genlab.errors import GenlabError
from genlab.nn.transformer import KVCache
from genlab.sampling.text import GenerationConfig, choose, cut_at_stop, process_logits

MAX_TOP_LOGPROBS = 20  # alternatives per token (OpenAI's bound)
CACHE_CHUNK = 64  # KV-cache columns added at a time as the batch grows
COMPACT_MIN = 16  # unused columns on the left worth squeezing out (when also a quarter of them)


@dataclass
class TextRequest:
    """One decoding request: prompt token ids and its own sampling settings (temperature 0: greedy)."""

    prompt: list[int]
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None  # None: a fresh random seed, reported back in `TextEvent.seed`
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] | None = None  # None: the tokenizer's EOS and END
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's and the k most likely alternatives
    prefix: Tensor | None = None  # (P, n_embd) input embeddings before the prompt (an image, LLaVA-style)

    def generation_config(self) -> GenerationConfig:
        """The settings as `sampling.text`'s config, validated (one-line `GenlabError` naming the field)."""
        cfg = GenerationConfig(max_new_tokens=self.max_tokens, temperature=self.temperature, top_k=self.top_k,
                               top_p=self.top_p, min_p=self.min_p, repetition_penalty=self.repetition_penalty,
                               presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                               stop=list(self.stop), stop_token_ids=self.stop_token_ids, seed=self.seed)
        cfg.check()
        if self.logprobs is not None:
            check_int("logprobs", self.logprobs, 0, MAX_TOP_LOGPROBS)
        if not self.prompt:
            raise GenlabError("the prompt has no tokens")
        if self.prefix is not None and self.prefix.ndim != 2:
            raise GenlabError(f"prefix must be (positions, width), got shape {tuple(self.prefix.shape)}")
        return cfg


@dataclass
class TokenInfo:
    """A generated token: id, its text, log p under the model, and the most likely alternatives (text, log p)."""

    id: int
    text: str
    logprob: float
    top: list[tuple[str, float]] | None = None


@dataclass
class TextEvent:
    """What one step produced for one request: newly safe text, the tokens behind it, and the end if it came."""

    delta: str
    tokens: list[TokenInfo]
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    seed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


class Sequence:
    """The per-request decoding state: its settings, generator, tokens and text emitted so far."""

    def __init__(self, req: TextRequest, tokenizer: Any, device: torch.device,
                 callback: Callable[[TextEvent], None] | None) -> None:
        self.req, self.tok, self.callback = req, tokenizer, callback
        self.cfg = req.generation_config()
        self.seed = req.seed if req.seed is not None else secrets.randbelow(MAX_SEED)
        self.generator = torch.Generator(device).manual_seed(self.seed)
        if req.stop_token_ids is not None:
            self.stop_ids = set(req.stop_token_ids)
        else:
            self.stop_ids = {tokenizer.eos_id, tokenizer.end_id} if tokenizer is not None else set()
        self.tokens: list[int] = []
        self.infos: list[TokenInfo] = []
        self.sent = 0  # characters of text already emitted
        self.sent_tokens = 0
        self.text = ""
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.cancelled = False
        self.needs_history = self.cfg.repetition_penalty != 1.0 or bool(
            self.cfg.presence_penalty or self.cfg.frequency_penalty)

    @property
    def length(self) -> int:
        """Positions the prompt fills: its prefix embeddings and its tokens."""
        return len(self.req.prompt) + (0 if self.req.prefix is None else self.req.prefix.shape[0])

    # -- sampling -------------------------------------------------------------------------------
    def choose(self, logits: Tensor) -> int:
        """The next token from this row's raw logits (1, V) with this request's own filters and generator."""
        seen = counts = None
        if self.needs_history:
            V = logits.shape[-1]
            hist = torch.tensor(self.req.prompt + self.tokens, dtype=torch.long, device=logits.device)
            seen = torch.zeros(1, V, dtype=torch.bool, device=logits.device)
            seen[0, hist] = True
            gen = torch.tensor(self.tokens, dtype=torch.long, device=logits.device)
            counts = torch.bincount(gen, minlength=V).to(logits.dtype)[None]
        return int(choose(process_logits(logits, self.cfg, seen, counts), self.cfg, self.generator)[0])

    # -- text -----------------------------------------------------------------------------------
    def advance(self, token: int, logprob: float, top: list[tuple[str, float]] | None) -> TextEvent:
        """Take the chosen token; decide whether the request ends; the event with the text now safe to send."""
        if token in self.stop_ids:
            self.finish_reason = "stop"
        else:
            self.tokens.append(token)
            self.infos.append(TokenInfo(token, self.tok.decode([token]) if self.tok else "", logprob, top))
            self.text = self.tok.decode(self.tokens) if self.tok else ""
            cut, hit = cut_at_stop(self.text, self.cfg.stop)
            if hit:
                self.text, self.finish_reason = cut, "stop"
            elif len(self.tokens) >= self.req.max_tokens:
                self.finish_reason = "length"
        return self.event()

    def event(self, error: str | None = None) -> TextEvent:
        """Text not sent yet; while running, hold back what could still turn out to begin a stop string, and
        an incomplete UTF-8 character (decoded as U+FFFD)."""
        safe = len(self.text)
        if self.finish_reason is None:
            safe -= _held_back(self.text, self.cfg.stop)
        delta, self.sent = self.text[self.sent: max(safe, self.sent)], max(safe, self.sent)
        infos: list[TokenInfo] = []
        if delta or self.finish_reason is not None:  # tokens travel with the text they make
            infos, self.sent_tokens = self.infos[self.sent_tokens:], len(self.infos)
        return TextEvent(delta, infos, self.finish_reason, self.seed, self.length, len(self.tokens), error)

    def emit(self, ev: TextEvent) -> None:
        if self.callback is not None:
            self.callback(ev)


def _held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters of `text` to hold: the longest tail that begins some stop string, and a
    trailing replacement character (a multi-byte character whose bytes have not all come)."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), hold, -1):
            if s.startswith(text[len(text) - k:]):
                hold = k
                break
    n = len(text)
    while n - hold > 0 and text[n - hold - 1] == "\ufffd":
        hold += 1
    return hold


class BatchDecoder:
    """The running batch over a GPT: a shared KV cache with right-aligned rows, per-row positions and a key mask.

    Row i holds its n_i real tokens in cache columns [L - n_i, L) (L = `cache.length`); columns before are
    padding, masked out of attention. The cache is a view of the first B rows ("slots") of a larger, zero-filled
    store: a joining row is written into the next free slot, a leaving row's slot is refilled by the last row, so
    neither copies the other rows; only a join with a longer prompt than L (the rows shift right), a full store
    (the dead columns on the left are squeezed out, or it grows) or more rows than slots move them all.
    `add` queues a request; `step` admits queued requests (prefilling each alone), chooses one token for every row,
    emits events, drops finished rows and runs one decoding step.
    """

    def __init__(self, model: Any, max_batch: int = 64) -> None:
        check_int("max_batch", max_batch, 1, 4096)
        self.model, self.max_batch = model, max_batch
        self.tok = getattr(model, "tokenizer", None)
        self.device = model.tok_emb.weight.device
        self.waiting: deque[Sequence] = deque()
        self.rows: list[Sequence] = []
        self.store: KVCache | None = None  # (layers, slots, Hkv, cap, D); padding stays finite (zeros or old keys)
        self.cache: KVCache | None = None  # the view of the first len(rows) slots that the model reads and writes
        self.n: Tensor = torch.zeros(0, dtype=torch.long, device=self.device)  # real tokens per row
        self.logits: Tensor | None = None  # (B, V) next-token logits of every row
        self.steps = 0

    def add(self, req: TextRequest, callback: Callable[[TextEvent], None] | None = None) -> Sequence:
        """Queue a request (validated now); it joins at the next `step`."""
        seq = Sequence(req, self.tok, self.device, callback)
        self.waiting.append(seq)
        return seq

    def _text(self, token: int) -> str:
        return self.tok.decode([token], skip_special=False) if self.tok else str(token)

    @property
    def busy(self) -> bool:
        return bool(self.rows or self.waiting)

    # -- cache bookkeeping --------------------------------------------------------------------------
    def _key_mask(self) -> Tensor:
        cap, L = self.cache.max_len, self.cache.length
        col = torch.arange(cap, device=self.device)[None]
        return col >= (L - self.n)[:, None]  # real columns, and every column from L on (written this step)

    def _view(self, B: int, L: int) -> None:
        """Point the model's cache at the first B slots, L columns filled."""
        view = KVCache(0, 0, 0, 0, 0, self.store.k.dtype, self.device)
        view.k, view.v = self.store.k[:, :B], self.store.v[:, :B]
        view.max_len, view.length = self.store.max_len, L
        self.cache = view

    def _allocate(self, slots: int, cap: int, L: int) -> None:
        """A new zero-filled store of `slots` x `cap` columns holding the rows' real columns, ending at column L."""
        m = self.model
        new = KVCache(m.config.n_layer, slots, m.n_kv_head, cap, m.head_dim, m.tok_emb.weight.dtype, self.device)
        new.k.zero_()
        new.v.zero_()  # a masked key's weight is 0, and 0 * NaN is NaN: padding must be finite
        B = len(self.rows)
        if B:
            w, old = int(self.n.max()), self.cache.length
            new.k[:, :B, :, L - w: L].copy_(self.store.k[:, :B, :, old - w: old])
            new.v[:, :B, :, L - w: L].copy_(self.store.v[:, :B, :, old - w: old])
        self.store = new

    def _shift(self, L: int) -> None:
        """Move every row's real columns in place so that they end at column L."""
        old, B = self.cache.length, len(self.rows)
        if L == old or not B:
            return
        w = int(self.n.max())
        for t in (self.store.k, self.store.v):
            t[:, :B, :, L - w: L].copy_(t[:, :B, :, old - w: old].clone())

    def _make_room(self, B: int, L: int) -> None:
        """Ensure slots for B rows and columns for L + 1 (rows ending at column L)."""
        if self.store is None:
            self._allocate(max(4, B), L + CACHE_CHUNK, L)
            return
        slots, cap = self.store.k.shape[1], self.store.max_len
        if B > slots or L + 1 > cap:
            grow = L + 1 > cap
            new_cap = max(cap + max(CACHE_CHUNK, cap // 2), L + CACHE_CHUNK) if grow else cap
            self._allocate(max(slots, min(2 * slots, self.max_batch), B), new_cap, L)
        else:
            self._shift(L)

    def _drop(self, keep: list[int]) -> list[int]:
        """Keep rows `keep`; the last kept rows move into the slots of the rows that left. Returns each new row's
        old index."""
        B = len(keep)
        if B == len(self.rows):
            return keep
        if not B:
            self.rows, self.store, self.cache, self.logits = [], None, None, None
            self.n = self.n[:0]
            return []
        gone = sorted(set(range(len(self.rows))) - set(keep))
        holes = [i for i in gone if i < B]
        fillers = [i for i in keep if i >= B]
        order = list(range(B))
        L, w = self.cache.length, int(self.n.max())
        for h, f in zip(holes, fillers):
            for t in (self.store.k, self.store.v):
                t[:, h, :, L - w: L].copy_(t[:, f, :, L - w: L])
            order[h] = f
        self.rows = [self.rows[i] for i in order]
        idx = torch.tensor(order, device=self.device)
        self.n, self.logits = self.n[idx], self.logits[idx]
        self._view(B, L)
        return order

    # -- the loop -----------------------------------------------------------------------------------
    @torch.inference_mode()
    def _prefill(self, seq: Sequence) -> tuple[Tensor, Tensor, Tensor]:
        """The prompt (after its prefix embeddings, if any) alone through the model: its cache rows (k, v) and
        its next-token logits (1, V)."""
        ids = torch.tensor([seq.req.prompt], dtype=torch.long, device=self.device)
        prefix = seq.req.prefix
        embeds = None
        if prefix is not None:
            embeds = torch.cat([prefix.to(self.model.tok_emb.weight)[None], self.model.tok_emb(ids)], dim=1)
        cache = self.model.new_cache(1, seq.length)
        logits = self.model(ids if embeds is None else None, cache, last_only=True, embeds=embeds)[:, -1].float()
        return cache.k, cache.v, logits

    def _admit(self) -> None:
        extra, logits, joined = [], [], []
        while self.waiting and len(self.rows) + len(joined) < self.max_batch:
            seq = self.waiting.popleft()
            if seq.cancelled:
                seq.finish_reason = "cancelled"
                seq.emit(seq.event())
                continue
            try:
                k, v, lg = self._prefill(seq)
            except (GenlabError, RuntimeError) as e:  # e.g. out of memory: this request fails, the batch goes on
                seq.finish_reason, seq.error = "error", str(e).splitlines()[0] if str(e) else type(e).__name__
                seq.emit(seq.event(error=seq.error))
                continue
            extra.append((k, v))
            logits.append(lg)
            joined.append(seq)
        if not joined:
            return
        B0 = len(self.rows)
        L = max([self.cache.length if self.cache is not None else 0] + [k.shape[3] for k, _ in extra])
        self._make_room(B0 + len(joined), L)
        for j, (k, v) in enumerate(extra):
            P = k.shape[3]
            self.store.k[:, B0 + j: B0 + j + 1, :, L - P: L].copy_(k)
            self.store.v[:, B0 + j: B0 + j + 1, :, L - P: L].copy_(v)
        self.rows += joined
        new_n = torch.tensor([s.length for s in joined], dtype=torch.long, device=self.device)
        self.n = torch.cat([self.n, new_n])
        self._view(len(self.rows), L)
        lg = torch.cat(logits)
        self.logits = lg if self.logits is None else torch.cat([self.logits, lg])

    def _choose(self) -> tuple[list[int], Tensor]:
        """One token per row, each by its own settings and generator; and log p of every token (B, V)."""
        logits = self.logits
        logp = logits.log_softmax(-1)
        tokens = logits.argmax(-1).tolist()  # greedy rows (no penalties) need nothing else
        for i, seq in enumerate(self.rows):
            if (not seq.cfg.greedy or seq.needs_history) and seq.finish_reason is None:
                try:
                    tokens[i] = seq.choose(logits[i: i + 1])
                except RuntimeError as e:  # e.g. settings that overflow to inf: this row fails, the batch goes on
                    seq.finish_reason, seq.error = "error", str(e).splitlines()[0] if str(e) else type(e).__name__
        return tokens, logp

    @torch.inference_mode()
    def step(self) -> int:
        """Admit waiting requests, emit one token for every row, drop finished rows, decode one step.

        Returns the number of tokens emitted.
        """
        self._admit()
        if not self.rows:
            return 0
        for seq in self.rows:
            if seq.cancelled and seq.finish_reason is None:
                seq.finish_reason = "cancelled"
        tokens, logp = self._choose()
        chosen = logp.gather(-1, torch.tensor(tokens, device=self.device)[:, None])[:, 0].tolist()
        keep = []
        emitted = 0
        for i, seq in enumerate(self.rows):
            if seq.finish_reason in ("cancelled", "error"):
                seq.emit(seq.event(error=seq.error))
                continue
            top = None
            if seq.req.logprobs:
                vals, ids = logp[i].topk(min(seq.req.logprobs, logp.shape[-1]))
                top = [(self._text(t), lp) for t, lp in zip(ids.tolist(), vals.tolist())]
            ev = seq.advance(tokens[i], chosen[i], top)
            emitted += 1
            seq.emit(ev)
            if seq.finish_reason is None:
                keep.append(i)
        order = self._drop(keep)
        if self.rows:
            self._decode([tokens[i] for i in order])
        self.steps += 1
        return emitted

    def _decode(self, tokens: list[int]) -> None:
        """One token per row through the model: per-row positions n_i, the key mask of each row's columns."""
        L, w = self.cache.length, int(self.n.max())
        if L - w >= max(COMPACT_MIN, L // 4):  # a quarter of the columns no row uses: squeeze them out in place
            self._shift(w)  # (attention reads every column each step; one copy costs about one step's read)
            L = w
            self._view(len(self.rows), L)
        if L + 1 > self.cache.max_len:
            self._make_room(len(self.rows), L)
            self._view(len(self.rows), L)
        ids = torch.tensor(tokens, dtype=torch.long, device=self.device)[:, None]
        mask = self._key_mask()
        logits = self.model(ids, self.cache, key_mask=mask, positions=self.n[:, None])
        self.n = self.n + 1
        self.logits = logits[:, -1].float()

    def run(self, requests: list[TextRequest]) -> list[list[TextEvent]]:
        """Decode `requests` together to completion (all join at the first step); every event per request."""
        events: list[list[TextEvent]] = [[] for _ in requests]
        for i, r in enumerate(requests):
            self.add(r, events[i].append)
        while self.busy:
            self.step()
        return events


class TextEngine:
    """A `BatchDecoder` on its own thread: `submit` from any thread, events arrive through the callback
    (on the engine's thread); `cancel` ends a request at its next step; `close` stops the thread."""

    def __init__(self, model: Any, max_batch: int = 64) -> None:
        self.decoder = BatchDecoder(model, max_batch)
        self._inbox: deque[Sequence] = deque()
        self._cv = threading.Condition()
        self._stop = False
        self.thread = threading.Thread(target=self._loop, name="genlab-text-engine", daemon=True)
        self.thread.start()

    def submit(self, req: TextRequest, callback: Callable[[TextEvent], None]) -> Sequence:
        """Validate and queue a request (a `GenlabError` for bad settings); it joins the batch at the next step."""
        seq = Sequence(req, self.decoder.tok, self.decoder.device, callback)
        with self._cv:
            if self._stop:
                raise GenlabError("the text engine is shut down")
            self._inbox.append(seq)
            self._cv.notify()
        return seq

    @staticmethod
    def cancel(seq: Sequence) -> None:
        seq.cancelled = True

    def _loop(self) -> None:
        dec = self.decoder
        while True:
            with self._cv:
                while not self._stop and not self._inbox and not dec.busy:
                    self._cv.wait()
                if self._stop:
                    break
                dec.waiting.extend(self._inbox)
                self._inbox.clear()
            try:
                dec.step()
            except Exception as e:  # a failing step ends the batch's requests with an error, the engine goes on
                msg = str(e).splitlines()[0] if str(e) else type(e).__name__
                for seq in dec.rows + list(dec.waiting):
                    seq.finish_reason, seq.error = "error", msg
                    seq.emit(seq.event(error=msg))
                dec.rows, dec.store, dec.cache, dec.logits = [], None, None, None
                dec.waiting.clear()
                dec.n = dec.n[:0]
        for seq in dec.rows + list(dec.waiting) + list(self._inbox):
            seq.finish_reason = "cancelled"
            seq.emit(seq.event())

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self.thread.join(timeout=30)
