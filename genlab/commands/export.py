"""`genlab export MODEL --to hf --out DIR`: a folder transformers loads as LlamaForCausalLM; `--to diffusers`: a
folder diffusers' DDPMPipeline / DDIMPipeline (or AutoencoderKL) loads."""

from __future__ import annotations

import argparse
from pathlib import Path

from genlab.config import check_output_path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a genlab GPT model folder (e.g. runs/fortunes-gpt/model); with --to diffusers a "
                   "diffusion or autoencoder_kl run or model folder (e.g. runs/mnist-ddpm); with --merge a LoRA "
                   "adapter (run or adapter folder) of any family")
    p.add_argument("--to", choices=("hf", "diffusers"), default="hf",
                   help="target format: hf (transformers Llama) or diffusers (UNet2DModel + scheduler, AutoencoderKL)")
    p.add_argument("--out", default=None, help="output folder (default: MODEL-hf, MODEL-diffusers, or MODEL-merged "
                   "with --merge)")
    p.add_argument("--merge", action="store_true",
                   help="write a genlab model folder with the LoRA adapter of MODEL merged into its weights")


def run(args: argparse.Namespace) -> int:
    from genlab.models.base import resolve_model_dir
    from genlab.models.gpt import GPT
    from genlab.models.hf_export import export_hf
    from genlab.models.lora import merge_lora

    if args.to == "diffusers":
        return _run_diffusers(args)
    suffix = "-merged" if args.merge else "-hf"
    out = check_output_path(args.out or str(Path(args.model)).rstrip("/") + suffix, "--out", folder=True)
    if args.merge:  # a LoRA adapter of any family: W0 + (alpha / r) B A folded into plain layers
        model = merge_lora(_model_class(args.model).from_pretrained(resolve_model_dir(args.model)))
        model.save_pretrained(out)
        print(f"wrote {out} (a genlab {model.family} model folder, the adapter merged)")
        return 0
    model = merge_lora(GPT.from_pretrained(args.model))  # a LoRA adapter folder: W0 + (alpha / r) B A
    export_hf(model, out)
    print(f"wrote {out} (LlamaForCausalLM + PreTrainedTokenizerFast with a chat template)")
    return 0


def _model_class(path: str) -> type:
    """The class whose `from_pretrained` reads `path` (or its adapter's base): GPT for a Hugging Face Llama folder,
    else the family named in config.json."""
    from genlab.models.base import GenerativeModel, read_model_meta, resolve_model_dir
    from genlab.models.gpt import GPT
    from genlab.models.lora import adapter_base, is_adapter_folder

    d = resolve_model_dir(path)
    base = resolve_model_dir(adapter_base(d)) if is_adapter_folder(d) else d
    return GPT if read_model_meta(base)[1].get("model_type") == "llama" else GenerativeModel


def _run_diffusers(args: argparse.Namespace) -> int:
    from genlab.errors import GenlabError
    from genlab.models.base import GenerativeModel, resolve_model_dir
    from genlab.models.diffusers_export import export_diffusers

    if args.merge:
        raise GenlabError("--merge writes a genlab folder; leave it out with --to diffusers")
    out = check_output_path(args.out or str(Path(args.model)).rstrip("/") + "-diffusers", "--out", folder=True)
    model = GenerativeModel.from_pretrained(resolve_model_dir(args.model))
    print(f"wrote {out} ({export_diffusers(model, out)})")
    return 0
