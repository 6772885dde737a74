"""Tokenizers for the language models: byte-level BPE and characters, both saved as one `tokenizer.json`.

Both are `tokenizers.Tokenizer` objects underneath, so the saved file loads as it is in
`transformers.PreTrainedTokenizerFast`. Byte-level BPE (Radford et al. 2019, GPT-2 section 2.2) is lossless on
any UTF-8 text; the character tokenizer keeps one token per character seen in the corpus and falls back to
`<0xNN>` byte tokens for the rest (as Llama's SentencePiece model does), so it is lossless too.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from genlab.config import MAX_VOCAB, check_int
from genlab.errors import GenlabError
from genlab.files import write_atomic

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, SYSTEM, USER, ASSISTANT, END]
KINDS = ("bpe", "char")
TOKENIZER_NAME = "tokenizer.json"


class Tokenizer:
    """A `tokenizers.Tokenizer` with the special tokens genlab's language models and chat template use."""

    def __init__(self, tok: HFTokenizer) -> None:
        self.tok = tok
        missing = [t for t in SPECIAL_TOKENS if tok.token_to_id(t) is None]
        if missing:
            raise GenlabError(f"tokenizer lacks the special tokens {missing}; train it with `genlab tokenizer train`")
        self.pad_id, self.bos_id, self.eos_id = (tok.token_to_id(t) for t in (PAD, BOS, EOS))
        self.end_id = tok.token_to_id(END)
        self.special_ids = {tok.token_to_id(t) for t in SPECIAL_TOKENS}

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str, bos: bool = False) -> list[int]:
        """Token ids of `text` (special-token strings in `text` become their ids), optionally after BOS."""
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if bos else ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        """Text of `ids`; special tokens are dropped unless `skip_special` is False."""
        return self.tok.decode(list(ids), skip_special_tokens=skip_special)

    def token_to_id(self, token: str) -> int:
        i = self.tok.token_to_id(token)
        if i is None:
            raise GenlabError(f"token {token!r} is not in the vocabulary")
        return i

    def to_str(self) -> str:
        return self.tok.to_str()

    def save(self, path: str | Path) -> Path:
        """Write `tokenizer.json` (atomically) at `path`, or inside `path` when it is a folder."""
        p = Path(path)
        if p.is_dir() or not p.suffix:
            p.mkdir(parents=True, exist_ok=True)
            p = p / TOKENIZER_NAME
        return write_atomic(p, self.to_str())

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """Read `tokenizer.json` (or a folder holding one)."""
        p = Path(path)
        if p.is_dir():
            p = p / TOKENIZER_NAME
        if not p.is_file():
            raise GenlabError(f"no tokenizer at {p}: train one with `genlab tokenizer train`")
        try:
            return cls(HFTokenizer.from_str(p.read_text(encoding="utf-8")))
        except Exception as e:  # tokenizers raises plain Exceptions on malformed files
            if isinstance(e, GenlabError):
                raise
            raise GenlabError(f"{p} is not a valid tokenizer.json ({e})") from None

    @classmethod
    def from_str(cls, text: str) -> Tokenizer:
        return cls(HFTokenizer.from_str(text))


def train_bpe(text: str, vocab_size: int, what: str = "vocab size") -> Tokenizer:
    """Byte-level BPE (Sennrich et al. 2016; GPT-2's byte alphabet) trained on `text` to `vocab_size` entries
    (`what` names the size in errors: a flag or a config key)."""
    min_size = 256 + len(SPECIAL_TOKENS)
    if vocab_size < min_size:
        raise GenlabError(f"{what} {vocab_size} is too small for byte-level BPE; use at least {min_size}")
    check_int(what, vocab_size, min_size, MAX_VOCAB, "the trainer's tables and the embedding grow with it")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2, show_progress=False,
    )
    tok.train_from_iterator(_chunks(text), trainer=trainer, length=None)
    return Tokenizer(tok)


def train_char(text: str, max_chars: int | None = None) -> Tokenizer:
    """One token per character of `text` (the `max_chars` most frequent), `<0xNN>` byte tokens for any other."""
    counts = Counter(text)
    chars = [c for c, _ in counts.most_common(max_chars)]
    vocab: dict[str, int] = {}
    for t in [*SPECIAL_TOKENS, *(f"<0x{b:02X}>" for b in range(256)), *sorted(chars)]:
        vocab.setdefault(t, len(vocab))
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.FixedLength(length=1)
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens(SPECIAL_TOKENS)
    return Tokenizer(tok)


def train_tokenizer(text: str, kind: str = "bpe", vocab_size: int = 4096, what: str = "vocab size") -> Tokenizer:
    """A tokenizer of `kind` ("bpe" or "char") trained on `text`."""
    if kind not in KINDS:
        raise GenlabError(f"unknown tokenizer kind {kind!r}; choose one of: {', '.join(KINDS)}")
    if not text:
        raise GenlabError("cannot train a tokenizer on empty text")
    return train_bpe(text, vocab_size, what) if kind == "bpe" else train_char(text)


def tokenizer_kind(tok: Tokenizer) -> str:
    """"bpe" or "char", read from the tokenizer's own model description."""
    model = json.loads(tok.to_str())["model"]
    return "char" if model.get("byte_fallback") else "bpe"


def _chunks(text: str, size: int = 1 << 16) -> list[str]:
    """Split `text` at line ends into pieces of about `size` characters (the BPE trainer's input)."""
    out, start = [], 0
    while start < len(text):
        end = text.find("\n", start + size)
        end = len(text) if end < 0 else end + 1
        out.append(text[start:end])
        start = end
    return out
