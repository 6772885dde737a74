"""Tokenizers: lossless on arbitrary Unicode (property test), saved files load in transformers unchanged."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from genlab.data.tokenizer import SPECIAL_TOKENS, Tokenizer, tokenizer_kind, train_tokenizer
from genlab.errors import GenlabError

CORPUS = ("Fortune favours the bold. Ça va? naïve café — 日本語のテキスト. 🦊🎉 ok\n" * 30
          + "the quick brown fox jumps over the lazy dog\n" * 30)
TOKENIZERS = {"bpe": train_tokenizer(CORPUS, "bpe", 400), "char": train_tokenizer(CORPUS, "char")}

# any code point but surrogates: letters, emoji (with ZWJ and skin tones), combining marks, controls, NUL
UNICODE = st.text(st.characters(exclude_categories=("Cs",)), max_size=60)
TRICKY = st.lists(st.sampled_from(["e\u0301", "\u0000", "\x1b[0m", "\r\n", "\t", "👩🏽‍💻", "🇫🇷", "\u200d", "\ufeff",
                                   " ", "  ", "ﬁ", "Å", "\U0010ffff", "ǅ"]), max_size=12).map("".join)


@pytest.mark.parametrize("kind", ["bpe", "char"])
@settings(max_examples=150, deadline=None)
@given(text=st.one_of(UNICODE, TRICKY))
def test_decode_encode_is_identity(kind, text):
    tok = TOKENIZERS[kind]
    if any(s in text for s in SPECIAL_TOKENS):
        return
    assert tok.decode(tok.encode(text)) == text


def test_special_tokens_and_vocabulary_size():
    bpe, char = TOKENIZERS["bpe"], TOKENIZERS["char"]
    assert 256 + len(SPECIAL_TOKENS) < bpe.vocab_size <= 400  # a corpus this small runs out of merges
    for tok in (bpe, char):
        assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
        assert tok.encode("<|user|>hi<|end|>")[0] == tok.token_to_id("<|user|>")
    # one token per character seen in the corpus; unseen characters fall back to bytes
    assert len(char.encode("naïve")) == 5
    assert len(char.encode("Ж")) == 2
    assert (tokenizer_kind(bpe), tokenizer_kind(char)) == ("bpe", "char")
    assert len(bpe.encode("the quick brown fox")) < len("the quick brown fox") / 2


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_saved_file_loads_in_transformers(tmp_path, kind):
    from transformers import PreTrainedTokenizerFast

    tok = TOKENIZERS[kind]
    path = tok.save(tmp_path)
    assert Tokenizer.from_file(path).encode(CORPUS[:200]) == tok.encode(CORPUS[:200])
    hf = PreTrainedTokenizerFast(tokenizer_file=str(path))
    text = "naïve 🦊 Ж\tfox"
    assert hf(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    assert hf.decode(tok.encode(text)) == text


def test_user_errors():
    with pytest.raises(GenlabError, match="too small"):
        train_tokenizer(CORPUS, "bpe", 100)
    with pytest.raises(GenlabError, match="choose one of"):
        train_tokenizer(CORPUS, "wordpiece")
    with pytest.raises(GenlabError, match="no tokenizer"):
        Tokenizer.from_file("/nonexistent/tokenizer.json")
