"""The family-agnostic trainer (accelerate), EMA, LR schedule, atomic checkpoints and exact resume."""

from genlab.train.trainer import Trainer, train

__all__ = ["Trainer", "train"]
