"""`genlab export MODEL --to hf --out DIR`: a folder transformers loads as LlamaForCausalLM."""

from __future__ import annotations

import argparse
from pathlib import Path

from genlab.config import check_output_path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a genlab GPT model folder (e.g. runs/fortunes-gpt/model)")
    p.add_argument("--to", choices=("hf",), default="hf", help="target format: hf (transformers Llama)")
    p.add_argument("--out", default=None, help="output folder (default: MODEL-hf)")


def run(args: argparse.Namespace) -> int:
    from genlab.models.gpt import GPT
    from genlab.models.hf_export import export_hf

    out = check_output_path(args.out or str(Path(args.model)).rstrip("/") + "-hf", "--out", folder=True)
    model = GPT.from_pretrained(args.model)
    export_hf(model, out)
    print(f"wrote {out} (LlamaForCausalLM + PreTrainedTokenizerFast with a chat template)")
    return 0
