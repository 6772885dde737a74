"""`genlab generate MODEL --prompt "..." [--temperature 0.8 --top-p 0.9 --stream ...]`: text from a language model."""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from genlab.config import MAX_SAMPLES, check_int
from genlab.errors import GenlabError

GAMMA = 4  # tokens drafted per speculative step by default


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a GPT model folder (genlab's or an exported Hugging Face Llama folder)")
    p.add_argument("--prompt", action="append", default=[], help="prompt text (repeat for a batch; default: empty)")
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user turn of the chat template")
    p.add_argument("--image", default=None, help="an image file, for a model that takes images (a captioner): each "
                   "prompt is a question about it (default: describe it)")
    p.add_argument("--n", type=int, default=1, help="samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=1.0, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--num-beams", type=int, default=1, help="beam search with this many beams")
    p.add_argument("--length-penalty", type=float, default=1.0)
    p.add_argument("--stop", action="append", default=[], help=r"stop string, \n and \t understood (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stream", action="store_true", help="print tokens as they come (one prompt, --n 1)")
    p.add_argument("--logprobs", action="store_true", help="print each token's log-probability")
    p.add_argument("--int8", action="store_true", help="int8 linear layers (CPU inference)")
    p.add_argument("--draft", default=None, help="a smaller model folder for speculative decoding")
    p.add_argument("--gamma", type=int, default=None, help=f"tokens drafted per speculative step (default {GAMMA})")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: one token at a time is latency-bound, and extra threads "
                        "stall when the cores are shared; more help large batches)")


def _check_args(args: argparse.Namespace) -> None:
    """Every option on its own and against the others, before a model is loaded."""
    check_int("--n", args.n, 1, MAX_SAMPLES)
    check_int("--threads", args.threads, 0)
    if args.image is not None:
        for flag, given in (("--draft", args.draft), ("--int8", args.int8), ("--chat", args.chat)):
            if given:
                raise GenlabError(f"{flag} does not work with --image (questions about an image take the model's own "
                                  "chat template, in float); drop one of them")
    if args.gamma is not None and not args.draft:
        raise GenlabError("--gamma sets the tokens drafted per speculative step: it needs --draft")
    if args.draft:
        check_int("--gamma", GAMMA if args.gamma is None else args.gamma, 1, 64)
        for flag, given in (("--num-beams", args.num_beams > 1), ("--stream", args.stream),
                            ("--logprobs", args.logprobs)):
            if given:
                raise GenlabError(f"{flag} does not work with --draft (speculative decoding); drop one of them")
    if args.length_penalty != 1.0 and args.num_beams <= 1:
        raise GenlabError("--length-penalty scores finished beams: it does nothing without --num-beams > 1")
    filters = [f for f, on in (("--top-k", args.top_k), ("--top-p", args.top_p != 1.0), ("--min-p", args.min_p)) if on]
    if args.temperature == 0 and filters:
        raise GenlabError(f"{', '.join(filters)} filter what is sampled; with --temperature 0 (greedy) they do nothing")
    if args.stream and (len(args.prompt) > 1 or args.n > 1 or args.num_beams > 1):
        raise GenlabError("--stream works with one prompt, --n 1 and no beam search")
    if args.stream and args.logprobs:
        raise GenlabError("--logprobs prints after the text; it does nothing with --stream")


def _check_memory(model, rows: int, length: int) -> None:
    """Refuse a KV cache (rows x tokens x layers x keys and values) larger than this machine's memory."""
    item = model.tok_emb.weight.element_size()
    need = rows * length * model.config.n_layer * 2 * model.n_kv_head * model.head_dim * item
    have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > have:
        raise GenlabError(f"the KV cache for {rows} sequences of {length} tokens would take {need / 2**30:.1f} GiB, "
                          f"more than this machine's {have / 2**30:.1f} GiB; lower --max-new-tokens, --n or "
                          "--num-beams")


def _prompt_ids(tok, text: str, chat: bool) -> list[int]:
    if chat:
        from genlab.data.chat import encode_chat

        return encode_chat(tok, [{"role": "user", "content": text}], add_generation_prompt=True)[0]
    return tok.encode(text, bos=True)


def _load(path: str, int8: bool):
    """A language model folder (genlab's or a Hugging Face Llama folder; or a run folder), or any family whose
    output is text."""
    from genlab.models.base import GenerativeModel, Output, read_model_meta, resolve_model_dir
    from genlab.models.gpt import GPT
    from genlab.nn.quant import quantize_int8

    path = resolve_model_dir(path)
    if (path / "config.json").is_file() and read_model_meta(path)[1].get("model_type") == "llama":
        model = GPT.from_pretrained(path).eval()
    else:
        model = GenerativeModel.from_pretrained(path).eval()
    if model.output is not Output.TEXT:
        raise GenlabError(f"{path} holds a {model.family} model, which outputs {model.output.value}, not text; "
                          "give a language model (a gpt folder, or a model that answers in text)")
    if int8:
        from genlab.models.lora import merge_lora

        return quantize_int8(merge_lora(model))  # a LoRA adapter is folded in before its weights are rounded
    return model


def _image_prompts(model, args: argparse.Namespace, texts: list[str]):
    """(language model, prompt ids, prefix): with --image, the model's image prompt for each question; without,
    the prompts as text (or chat turns) for the model itself. Either is refused where the model cannot take it."""
    from genlab.commands.caption import read_image
    from genlab.models.base import Conditioning

    takes_image = Conditioning.IMAGE in model.conditioning
    if args.image is not None and not takes_image:
        raise GenlabError(f"--image: this {model.family} model takes no image ({model.takes()}); drop --image")
    if args.image is None and takes_image and Conditioning.NONE not in model.conditioning:
        raise GenlabError(f"this {model.family} model answers about an image: give --image FILE")
    questions = [t for t in texts for _ in range(args.n)]
    if args.image is None:
        return model, [_prompt_ids(model.tokenizer, t, args.chat) for t in questions], None
    image = read_image(args.image, model.image_shape, "--image")
    p = model.image_prompt(image.expand(len(questions), -1, -1, -1), questions)
    return p.model, p.prompts, p.prefix


def run(args: argparse.Namespace) -> int:
    from genlab.sampling.text import GenerationConfig, cut_at_stop, generate, stream

    args.stop = [s.replace("\\n", "\n").replace("\\t", "\t") for s in args.stop]
    cfg = GenerationConfig(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        min_p=args.min_p, repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty, num_beams=args.num_beams, length_penalty=args.length_penalty,
        stop=args.stop, seed=args.seed,
    )
    cfg.check(flags=True)
    _check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = _load(args.model, args.int8)
    tok = model.tokenizer
    texts = args.prompt or [""]
    model, prompts, prefix = _image_prompts(model, args, texts)
    _check_memory(model, cfg.num_beams if cfg.num_beams > 1 else len(prompts),
                  max(map(len, prompts)) + cfg.max_new_tokens + (0 if prefix is None else prefix.shape[1]))
    quiet = args.chat or prefix is not None  # chat and image questions: print the reply only
    labels = ["" if quiet else t for t in texts for _ in range(args.n)]
    t0 = time.perf_counter()
    if args.draft:
        from genlab.sampling.speculative import speculative_generate

        draft = _load(args.draft, args.int8)
        g = torch.Generator().manual_seed(args.seed)
        total = 0
        for label, ids in zip(labels, prompts):
            out = speculative_generate(model, draft, ids, cfg, gamma=GAMMA if args.gamma is None else args.gamma,
                                       generator=g)
            total += len(out.tokens)
            print(label + cut_at_stop(tok.decode(out.tokens), args.stop)[0])
            print(f"[speculative: {out.accepted}/{out.drafted} drafted tokens accepted "
                  f"({out.acceptance_rate:.0%}), {out.target_calls} target calls]", file=sys.stderr)
        _report(total, t0)
        return 0
    if args.stream:
        sys.stdout.write(labels[0])
        ids: list[int] = []
        shown = 0
        hold = max((len(s) for s in args.stop), default=1) - 1
        for step in stream(model, prompts, cfg, prefix=prefix):
            if not bool(step.active[0]):
                break
            ids.append(int(step.tokens[0]))
            text, hit = cut_at_stop(tok.decode(ids), args.stop)
            safe = len(text) if hit else len(text) - hold
            if not text.endswith("\ufffd") and safe > shown:
                sys.stdout.write(text[shown:safe])
                sys.stdout.flush()
                shown = safe
            if hit:
                break
        text, _ = cut_at_stop(tok.decode(ids), args.stop)
        sys.stdout.write(text[shown:] + "\n")
        _report(len(ids), t0)
        return 0
    out = generate(model, prompts, cfg, prefix=prefix)
    for i, (label, ids) in enumerate(zip(labels, out.tokens)):
        text, hit = cut_at_stop(tok.decode(ids), args.stop)
        reason = "stop" if hit else out.finish_reason[i]
        if len(prompts) > 1:
            print(f"--- sample {i} ({reason}, {len(ids)} tokens)")
        print(label + text)
        if args.logprobs:
            for t, lp in zip(ids, out.logprobs[i]):
                print(f"  {tok.decode([t], skip_special=False)!r:>16} {lp:8.3f}")
    _report(sum(len(x) for x in out.tokens), t0)
    return 0


def _report(n: int, t0: float) -> None:
    dt = time.perf_counter() - t0
    print(f"[{n} tokens in {dt:.2f}s, {n / max(dt, 1e-9):.1f} tokens/s]", file=sys.stderr)
