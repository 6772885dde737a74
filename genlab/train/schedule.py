"""Learning-rate schedule: linear warmup, then cosine decay to a floor (or constant)."""

from __future__ import annotations

import math
from functools import partial

import torch

SCHEDULES = ("cosine", "constant")


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, schedule: str, min_lr_ratio: float) -> float:
    """Multiplier of the base LR for optimizer step `step` (0-based).

    Linear warmup (Goyal et al. 2017, "Accurate, Large Minibatch SGD", sec. 2.2): (step + 1) / warmup_steps;
    then cosine annealing (Loshchilov & Hutter 2017, SGDR, eq. 5) from 1 down to `min_lr_ratio` at `total_steps`.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_schedulers(optimizers: list[torch.optim.Optimizer], train_cfg) -> list[torch.optim.lr_scheduler.LambdaLR]:
    """One `LambdaLR` per optimizer, all following `lr_factor` for `train_cfg`."""
    fn = partial(lr_factor, warmup_steps=train_cfg.warmup_steps, total_steps=train_cfg.steps,
                 schedule=train_cfg.lr_schedule, min_lr_ratio=train_cfg.min_lr_ratio)
    return [torch.optim.lr_scheduler.LambdaLR(opt, fn) for opt in optimizers]
