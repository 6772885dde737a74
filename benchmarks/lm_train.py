"""Training speed: genlab's GPT vs transformers' LlamaForCausalLM of the same config, same batch, same run.

    python benchmarks/lm_train.py [--layers 6 --width 384 --heads 6 --vocab 4096 --batch 16 --block 128]

Both models start from the same weights (genlab's, exported), train with AdamW on the same random token
batches, and are timed alternately (forward + backward + optimizer step); each figure is the median step.
Prints one JSON line with training tokens/s and the ratio genlab / transformers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from genlab.data.tokenizer import train_tokenizer  # noqa: E402
from genlab.models.gpt import GPT, GPTConfig  # noqa: E402
from genlab.models.hf_export import export_hf  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--width", type=int, default=384)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import LlamaForCausalLM

    from genlab.data import load_dataset

    torch.manual_seed(0)
    tok = train_tokenizer(load_dataset("fortunes").text[:500_000], "bpe", args.vocab)
    cfg = GPTConfig(vocab_size=tok.vocab_size, n_layer=args.layers, n_head=args.heads, n_embd=args.width,
                    block_size=args.block)
    ours = GPT(cfg, tok).train()
    d = Path(tempfile.mkdtemp(prefix="lm-train-bench-")) / "hf"
    export_hf(ours, d)
    hf = LlamaForCausalLM.from_pretrained(d, attn_implementation="sdpa").train()
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-4)
    opt_hf = torch.optim.AdamW(hf.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)

    def step_ours(ids: torch.Tensor) -> float:
        loss = ours.training_losses({"input_ids": ids})["loss"]
        opt_ours.zero_grad(set_to_none=True)
        loss.backward()
        opt_ours.step()
        return loss.item()

    def step_hf(ids: torch.Tensor) -> float:
        logits = hf(ids[:, :-1]).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
        opt_hf.zero_grad(set_to_none=True)
        loss.backward()
        opt_hf.step()
        return loss.item()

    t_ours, t_hf, losses = [], [], []
    for i in range(args.steps + 1):
        ids = torch.randint(0, cfg.vocab_size, (args.batch, args.block + 1), generator=g)
        t = time.perf_counter()
        a = step_ours(ids)
        t1 = time.perf_counter()
        b = step_hf(ids)
        t2 = time.perf_counter()
        if i:  # the first step warms up both
            t_ours.append(t1 - t)
            t_hf.append(t2 - t1)
        losses.append((a, b))
    tokens = args.batch * args.block
    ours_s, hf_s = statistics.median(t_ours), statistics.median(t_hf)
    print(json.dumps({
        "benchmark": "lm_train", "params_M": round(sum(p.numel() for p in ours.parameters()) / 1e6, 2),
        "batch": args.batch, "block": args.block, "threads": torch.get_num_threads(),
        "genlab_tok_s": round(tokens / ours_s, 1), "transformers_tok_s": round(tokens / hf_s, 1),
        "ratio": round(hf_s / ours_s, 2), "first_loss_equal": abs(losses[0][0] - losses[0][1]) < 1e-4,
    }))


if __name__ == "__main__":
    main()
