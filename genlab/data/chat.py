"""Chat data: the chat template over the special tokens, JSONL conversations, assistant-only labels for SFT.

A conversation `{"messages": [{"role": "user", "content": "..."}, ...]}` becomes
`<|bos|><|user|>...<|end|><|assistant|>...<|end|>`; the loss covers only the assistant's tokens and its
closing `<|end|>` (the instruction-tuning objective of Ouyang et al. 2022, section 3.5 "SFT").
The same template ships with exported models as a Jinja `chat_template`.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import Tensor

from genlab.data.tokenizer import ASSISTANT, BOS, END, SYSTEM, USER, Tokenizer
from genlab.errors import GenlabError
from genlab.files import jsonl_records

ROLES = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
IGNORE = -100


def _check(messages: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise GenlabError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise GenlabError(f"{where}: each message needs a role in {sorted(ROLES)} and a string content, got {m!r}")
    return messages


def apply_chat_template(messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    """The conversation as text with its role markers (what `tokenizer_config.json`'s chat_template renders)."""
    _check(messages, "chat")
    text = BOS + "".join(ROLES[m["role"]] + m["content"] + END for m in messages)
    return text + (ASSISTANT if add_generation_prompt else "")


def encode_chat(tok: Tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool = False
                ) -> tuple[list[int], list[int]]:
    """Token ids of the templated conversation and labels: the id on assistant tokens (and their END), else -100.

    Role markers are inserted as ids, so text that merely looks like a marker stays plain text.
    """
    _check(messages, "chat")
    ids, labels = [tok.bos_id], [IGNORE]
    for m in messages:
        content = tok.encode(m["content"]) + [tok.end_id]
        ids += [tok.token_to_id(ROLES[m["role"]])] + content
        labels += [IGNORE] + (content if m["role"] == "assistant" else [IGNORE] * len(content))
    if add_generation_prompt:
        ids.append(tok.token_to_id(ASSISTANT))
        labels.append(IGNORE)
    return ids, labels


def load_conversations(text: str) -> list[list[dict[str, str]]]:
    """Conversations from JSONL text, one `{"messages": [...]}` per line.

    A text file split by characters may cut its first or last line; such a partial line is skipped.
    """
    return [conv for _, conv in _numbered_conversations(text)]


def _numbered_conversations(text: str) -> list[tuple[int, list[dict[str, str]]]]:
    """(line number from 1, conversation) of every conversation in JSONL text (see `load_conversations`)."""
    out = []
    form = '{"messages": [{"role": ..., "content": ...}, ...]}'
    for n, record in jsonl_records(text, "chat data", form):
        if not isinstance(record, dict) or "messages" not in record:
            raise GenlabError(f"line {n} of the chat data has no 'messages' list")
        out.append((n, _check(record["messages"], f"line {n} of the chat data")))
    if not out:
        raise GenlabError("the chat data holds no conversations; give JSONL lines with a 'messages' list")
    return out


def conversation_text(text: str) -> str:
    """The message contents of JSONL chat data, one per line (what a tokenizer is trained on)."""
    return "\n".join(m["content"] for conv in load_conversations(text) for m in conv)


class ChatData:
    """Templated conversations padded (or cut) to block_size + 1 tokens, with assistant-only labels."""

    def __init__(self, input_ids: Tensor, labels: Tensor) -> None:
        self.input_ids, self.labels = input_ids, labels

    @classmethod
    def from_jsonl(cls, text: str, tok: Tokenizer, block_size: int) -> ChatData:
        """Encode every conversation; one with no assistant token within its first block_size + 1 tokens (no
        assistant turn, or a prompt that fills the block) has nothing to learn from and is left out, with a
        one-line report on stderr; if that leaves nothing, a GenlabError."""
        convs = _numbered_conversations(text)
        n = block_size + 1
        input_ids = torch.full((len(convs), n), tok.pad_id, dtype=torch.long)
        labels = torch.full((len(convs), n), IGNORE, dtype=torch.long)
        for i, (_, conv) in enumerate(convs):
            ids, lab = encode_chat(tok, conv)
            input_ids[i, : min(len(ids), n)] = torch.tensor(ids[:n])
            labels[i, : min(len(lab), n)] = torch.tensor(lab[:n])
        keep = (labels[:, 1:] != IGNORE).any(dim=1)
        if not keep.any():
            raise GenlabError(f"no conversation has an assistant token within model.block_size + 1 = {n} tokens: "
                              "give conversations with an assistant turn, or raise block_size")
        if not keep.all():
            lines = [line for (line, _), k in zip(convs, keep.tolist(), strict=True) if not k]
            first = ", ".join(map(str, lines[:5])) + (", ..." if len(lines) > 5 else "")
            print(f"genlab: left out {len(lines)} of {len(convs)} conversations with no assistant token within "
                  f"{n} tokens (no assistant turn, or a prompt longer than model.block_size; lines {first})",
                  file=sys.stderr)
        return cls(input_ids[keep], labels[keep])

    def __len__(self) -> int:
        return len(self.input_ids)

    def get_batch(self, indices: Tensor | list[int]) -> dict[str, Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return {"input_ids": self.input_ids[idx], "labels": self.labels[idx]}

    def iter_eval_batches(self, batch_size: int):
        for i in range(0, len(self), batch_size):
            yield self.get_batch(torch.arange(i, min(i + batch_size, len(self))))
