"""DPO on an automatically scored preference: fortunes without the letter "e".

    python benchmarks/dpo_preference.py pairs SFT_MODEL pairs.jsonl     # 2 samples per prompt, ranked by e-rate
    genlab train configs/fortunes-dpo.yaml --set data.name=pairs.jsonl --set model.init_from=SFT_MODEL
    python benchmarks/dpo_preference.py score SFT_MODEL runs/fortunes-dpo/model

Prompts are the first word of fortunes lines (train split for pairs, test split for the score). The score of a
completion is its share of letters that are "e" (lower is better; no letters at all counts as 1, so an empty
answer never wins), or with `--prefer short` its length in characters. `score` draws one completion per held-out
prompt from each model with the same seeds
(temperature 1, no truncation, so the samples are the policy's own) and reports the win rate of the DPO model
over the SFT model (ties count half), both mean scores, and KL(pi || pi_ref) estimated as the mean over the DPO
model's samples of log pi(y | x) - log pi_ref(y | x) in nats per completion (Rafailov et al. 2023, eq. 3).
"""

from __future__ import annotations

import argparse
import json
import random
import sys

import torch

from genlab.adapt.dpo import completion_logps
from genlab.data import load_dataset
from genlab.models.gpt import GPT
from genlab.sampling.text import GenerationConfig, generate


def e_rate(text: str) -> float:
    letters = [c for c in text.lower() if c.isalpha()]
    return sum(c == "e" for c in letters) / len(letters) if letters else 1.0


SCORES = {"no-e": e_rate, "short": len}  # lower is preferred: share of letters "e", or characters


def prompts(split: str, n: int, seed: int) -> list[str]:
    lines = [ln.split()[0] for ln in load_dataset("fortunes", split=split).text.splitlines()
             if ln.split() and ln.strip() != "%"]
    return random.Random(seed).sample(lines, min(n, len(lines)))


def sample(model: GPT, texts: list[str], seed: int, max_new: int) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt ids, completion ids) of one draw per prompt, cut at the first line end."""
    tok = model.tokenizer
    ids = [tok.encode(t, bos=True) for t in texts]
    cfg = GenerationConfig(max_new_tokens=max_new, temperature=1.0, stop=["\n"])
    out = generate(model.eval(), ids, cfg, generator=torch.Generator().manual_seed(seed))
    done = []
    for toks in out.tokens:
        cut = next((i for i in range(len(toks)) if "\n" in tok.decode(toks[: i + 1])), len(toks))
        done.append(toks[:cut])
    return ids, done


def seq_logps(model: GPT, ids: list[list[int]], completions: list[list[int]]) -> torch.Tensor:
    tok = model.tokenizer
    width = max(len(p) + len(c) for p, c in zip(ids, completions, strict=True))
    rows = torch.full((len(ids), width), tok.pad_id, dtype=torch.long)
    mask = torch.zeros(len(ids), width)
    for i, (p, c) in enumerate(zip(ids, completions, strict=True)):
        rows[i, : len(p) + len(c)] = torch.tensor(p + c)
        mask[i, len(p): len(p) + len(c)] = 1.0
    with torch.no_grad():
        return torch.cat([completion_logps(model, rows[i: i + 64], mask[i: i + 64]) for i in range(0, len(ids), 64)])


def make_pairs(args: argparse.Namespace) -> None:
    model = GPT.from_pretrained(args.sft)
    texts = prompts("train", args.n, args.seed)
    _, a = sample(model, texts, args.seed, args.max_new)
    _, b = sample(model, texts, args.seed + 1, args.max_new)
    tok, rank = model.tokenizer, SCORES[args.prefer]
    kept = 0
    with open(args.out, "w", encoding="utf-8") as f:
        for t, x, y in zip(texts, a, b, strict=True):
            sx, sy = tok.decode(x), tok.decode(y)
            if rank(sx) == rank(sy) or sx == sy:
                continue
            chosen, rejected = (sx, sy) if rank(sx) < rank(sy) else (sy, sx)
            f.write(json.dumps({"prompt": t, "chosen": chosen, "rejected": rejected}) + "\n")
            kept += 1
    print(f"wrote {kept} pairs of {len(texts)} prompts to {args.out}")


def score(args: argparse.Namespace) -> None:
    sft, dpo = GPT.from_pretrained(args.sft).eval(), GPT.from_pretrained(args.dpo).eval()
    texts = prompts("test", args.n, args.seed)
    ids, ours = sample(dpo, texts, args.seed, args.max_new)
    _, theirs = sample(sft, texts, args.seed, args.max_new)
    tok, rank = dpo.tokenizer, SCORES[args.prefer]
    wins = 0.0
    for x, y in zip(ours, theirs, strict=True):
        rx, ry = rank(tok.decode(x)), rank(tok.decode(y))
        wins += 1.0 if rx < ry else 0.5 if rx == ry else 0.0
    kl = (seq_logps(dpo, ids, ours) - seq_logps(sft, ids, ours)).mean()
    mean = lambda xs: sum(rank(tok.decode(x)) for x in xs) / len(xs)  # noqa: E731
    print(json.dumps({"prefer": args.prefer, "prompts": len(texts), "win_rate": wins / len(texts),
                      "score_dpo": mean(ours), "score_sft": mean(theirs), "kl_nats": float(kl),
                      "tokens_dpo": sum(map(len, ours)) / len(ours), "tokens_sft": sum(map(len, theirs)) / len(theirs),
                      "examples": [tok.decode(x) for x in ours[:3]]}))


def main(argv: list[str] | None = None) -> int:
    torch.set_num_threads(1)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("pairs")
    a.add_argument("sft")
    a.add_argument("out")
    b = sub.add_parser("score")
    b.add_argument("sft")
    b.add_argument("dpo")
    for q in (a, b):
        q.add_argument("--n", type=int, default=512)
        q.add_argument("--seed", type=int, default=0)
        q.add_argument("--max-new", type=int, default=32)
        q.add_argument("--prefer", choices=sorted(SCORES), default="no-e",
                       help="no-e: fewer letters e (default); short: fewer characters")
    args = p.parse_args(argv)
    make_pairs(args) if args.cmd == "pairs" else score(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
