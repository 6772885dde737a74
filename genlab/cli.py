"""`genlab data|train|sample|eval|generate|tokenizer|export|...`: one module per subcommand.

Each module in `genlab.commands` defines `add_arguments(parser)` and `run(args) -> int`.
User errors (`GenlabError`) are printed as one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NoReturn

from genlab.errors import GenlabError

# subcommand -> one-line help; the module is genlab.commands.<name>
COMMANDS = {
    "data": "list and look at datasets",
    "demo": "train the default recipe for a bounded time, sample it and write a report",
    "train": "train a model from a recipe (resumes from the run folder's checkpoints)",
    "tokenizer": "train a BPE or character tokenizer on a text dataset",
    "generate": "generate text with a language model (sampling, beam search, speculative, streaming)",
    "export": "export a language model to the Hugging Face format",
    "sample": "draw images from a diffusion model (DDIM, DDPM, classifier-free guidance) into PNGs",
    "eval": "measure a model (FID, KID, IS, precision/recall, bits/dim) or train a dataset's feature network",
    "embed": "turn texts and images into vectors with a CLIP model (.npy or .json)",
    "caption": "describe images with an image-to-text model (LLaVA-style captioner)",
    "serve": "serve models over an OpenAI-compatible HTTP API with a durable job queue and batching",
}


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors (a missing argument, `--n many`) are one-line user errors like any other."""

    def error(self, message: str) -> NoReturn:
        raise GenlabError(f"{message} (see `{self.prog} --help`)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="genlab", description="A workbench for generative AI.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in COMMANDS.items():
        module = importlib.import_module(f"genlab.commands.{name.replace('-', '_')}")
        p = sub.add_parser(name, help=help_, description=help_)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return int(args._run(args) or 0)
    except GenlabError as e:
        print(f"genlab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("genlab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
