"""`genlab export MODEL --to hf --out DIR`: a folder transformers loads as LlamaForCausalLM."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a genlab GPT model folder (e.g. runs/fortunes-gpt/model)")
    p.add_argument("--to", choices=("hf",), default="hf", help="target format: hf (transformers Llama)")
    p.add_argument("--out", default=None, help="output folder (default: MODEL-hf)")


def run(args: argparse.Namespace) -> int:
    from genlab.models.gpt import GPT
    from genlab.models.hf_export import export_hf

    model = GPT.from_pretrained(args.model)
    out = Path(args.out) if args.out else Path(str(Path(args.model)).rstrip("/") + "-hf")
    export_hf(model, out)
    print(f"wrote {out} (LlamaForCausalLM + PreTrainedTokenizerFast with a chat template)")
    return 0
