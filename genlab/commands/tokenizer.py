"""`genlab tokenizer train --data fortunes --vocab 4096 [--kind bpe|char] --out tokenizer.json`."""

from __future__ import annotations

import argparse
from pathlib import Path

from genlab.config import DataConfig, check_output_path
from genlab.data import TextDataset, load_dataset
from genlab.errors import GenlabError

VOCAB = 4096  # the default BPE vocabulary size


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="tokenizer_command", required=True)
    t = sub.add_parser("train", help="train a byte-level BPE or character tokenizer on a text dataset")
    t.add_argument("--data", required=True, help="a built-in text dataset (fortunes, jargon) or a UTF-8 text file")
    t.add_argument("--kind", choices=("bpe", "char"), default="bpe")
    t.add_argument("--vocab", type=int, default=None, help=f"BPE vocabulary size (default {VOCAB}; not for char)")
    t.add_argument("--out", default="tokenizer.json", help="output file (or folder)")
    e = sub.add_parser("encode", help="print the tokens of a text")
    e.add_argument("tokenizer", help="tokenizer.json or a model folder")
    e.add_argument("text")


def run(args: argparse.Namespace) -> int:
    from genlab.data.tokenizer import Tokenizer, train_tokenizer

    if args.tokenizer_command == "encode":
        tok = Tokenizer.from_file(args.tokenizer)
        ids = tok.encode(args.text)
        print(" ".join(f"{tok.tok.id_to_token(i)!r}:{i}" for i in ids))
        print(f"{len(ids)} tokens for {len(args.text)} characters")
        return 0
    if args.vocab is not None and args.kind == "char":
        raise GenlabError("--vocab sizes a BPE vocabulary; a char tokenizer has one token per character: drop it")
    check_output_path(args.out, "--out", folder=Path(args.out).is_dir())
    ds = load_dataset(DataConfig(name=args.data))
    if not isinstance(ds, TextDataset):
        raise GenlabError(f"--data {args.data!r} is not text; give fortunes, jargon or a .txt file")
    tok = train_tokenizer(ds.text, args.kind, VOCAB if args.vocab is None else args.vocab, "--vocab")
    path = tok.save(args.out)
    n = sum(len(x) for x in tok.encode_batch(ds.text.split("\n")))
    print(f"wrote {path}: {args.kind}, {tok.vocab_size} tokens; {len(ds.text) / max(n, 1):.2f} characters per token "
          f"on {args.data}")
    return 0
