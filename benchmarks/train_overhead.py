"""Trainer overhead: genlab's Trainer loop vs a bare PyTorch loop on the same model, data and optimizer.

    python benchmarks/train_overhead.py [--steps 60] [--repeats 3] [--layers 2 --width 128 --batch 16 --block 64]

The bare loop is what the trainer must do at least: draw a batch, forward + loss, backward, clip, AdamW step.
The trainer adds the LR schedule, EMA, the per-step loss check (one host sync), logging and the progress bar.
Both run a small GPT on the fortunes corpus (checkpoints, previews and validation off); rounds alternate so
that machine load hits both alike, and each figure is the best round. The trainer's rate is read from its own
metrics.jsonl (the second logging window, after warm-up). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from genlab.config import load_run_config  # noqa: E402
from genlab.files import read_jsonl  # noqa: E402
from genlab.train import Trainer  # noqa: E402


def bare_loop(model: torch.nn.Module, opt: torch.optim.Optimizer, data, batch_size: int, warmup: int, steps: int,
              g: torch.Generator) -> float:
    """Steps/s of the minimal loop (timed after `warmup` untimed steps)."""

    def step() -> None:
        batch = data.get_batch(torch.randint(len(data), (batch_size,), generator=g))
        model.training_losses(batch)["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return steps / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--block", type=int, default=64)
    args = ap.parse_args()
    out = Path(tempfile.mkdtemp(prefix="train-overhead-"))
    half = args.steps // 2
    sets = [f"out_dir={out}", "family=gpt", "data.name=fortunes", f"model.n_layer={args.layers}",
            f"model.n_embd={args.width}", "model.n_head=4", "model.vocab=512", f"model.block_size={args.block}",
            f"train.steps={args.steps}", f"train.batch_size={args.batch}", f"train.log_every={half}",
            "train.ckpt_every=0", "train.eval_every=0", "train.warmup_steps=10", "train.mixed_precision=fp32"]
    trainer_rates, bare_rates = [], []
    for r in range(args.repeats):
        cfg = load_run_config(None, [*sets, f"name=trainer{r}"])
        trainer = Trainer(cfg, resume=False)
        trainer.fit()
        lines = read_jsonl(trainer.run_dir / "metrics.jsonl")
        trainer_rates.append([x["steps_per_s"] for x in lines if x["split"] == "train"][1])

        bare = Trainer(load_run_config(None, [*sets, f"name=bare{r}"]), resume=False)
        bare_rates.append(bare_loop(bare.model, bare.optimizers[0].optimizer, bare.data, args.batch, half,
                                    args.steps - half, torch.Generator().manual_seed(r)))
    best_trainer, best_bare = max(trainer_rates), max(bare_rates)
    print(json.dumps({
        "benchmark": "train_overhead", "model": f"gpt {args.layers}x{args.width}, batch {args.batch}x{args.block}",
        "trainer_steps_per_s": round(best_trainer, 2), "bare_loop_steps_per_s": round(best_bare, 2),
        "ratio_trainer_over_bare": round(best_trainer / best_bare, 3), "threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
