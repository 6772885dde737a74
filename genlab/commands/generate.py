"""`genlab generate MODEL --prompt "..." [--temperature 0.8 --top-p 0.9 --stream ...]`: text from a language model."""

from __future__ import annotations

import argparse
import sys
import time

import torch

from genlab.errors import GenlabError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a GPT model folder (genlab's or an exported Hugging Face Llama folder)")
    p.add_argument("--prompt", action="append", default=[], help="prompt text (repeat for a batch; default: empty)")
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user turn of the chat template")
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
    p.add_argument("--gamma", type=int, default=4, help="tokens drafted per speculative step")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: one token at a time is latency-bound, and extra threads "
                        "stall when the cores are shared; more help large batches)")


def _prompt_ids(tok, text: str, chat: bool) -> list[int]:
    if chat:
        from genlab.data.chat import encode_chat

        return encode_chat(tok, [{"role": "user", "content": text}], add_generation_prompt=True)[0]
    return tok.encode(text, bos=True)


def _load(path: str, int8: bool):
    from genlab.models.gpt import GPT
    from genlab.nn.quant import quantize_int8

    model = GPT.from_pretrained(path).eval()
    return quantize_int8(model) if int8 else model


def run(args: argparse.Namespace) -> int:
    from genlab.sampling.text import GenerationConfig, cut_at_stop, generate, stream

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.n < 1:
        raise GenlabError(f"--n {args.n} must be at least 1")
    args.stop = [s.replace("\\n", "\n").replace("\\t", "\t") for s in args.stop]
    model = _load(args.model, args.int8)
    tok = model.tokenizer
    cfg = GenerationConfig(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        min_p=args.min_p, repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty, num_beams=args.num_beams, length_penalty=args.length_penalty,
        stop=args.stop, seed=args.seed,
    )
    cfg.check()
    texts = args.prompt or [""]
    prompts = [_prompt_ids(tok, t, args.chat) for t in texts for _ in range(args.n)]
    labels = ["" if args.chat else t for t in texts for _ in range(args.n)]  # chat: print the reply only
    t0 = time.perf_counter()
    if args.draft:
        from genlab.sampling.speculative import speculative_generate

        draft = _load(args.draft, args.int8)
        g = torch.Generator().manual_seed(args.seed)
        total = 0
        for label, ids in zip(labels, prompts):
            out = speculative_generate(model, draft, ids, cfg, gamma=args.gamma, generator=g)
            total += len(out.tokens)
            print(label + cut_at_stop(tok.decode(out.tokens), args.stop)[0])
            print(f"[speculative: {out.accepted}/{out.drafted} drafted tokens accepted "
                  f"({out.acceptance_rate:.0%}), {out.target_calls} target calls]", file=sys.stderr)
        _report(total, t0)
        return 0
    if args.stream:
        if len(prompts) != 1 or cfg.num_beams > 1:
            raise GenlabError("--stream works with one prompt, --n 1 and no beam search")
        sys.stdout.write(labels[0])
        ids: list[int] = []
        shown = 0
        hold = max((len(s) for s in args.stop), default=1) - 1
        for step in stream(model, prompts, cfg):
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
    out = generate(model, prompts, cfg)
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
