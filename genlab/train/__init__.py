"""The family-agnostic trainer (accelerate), EMA, LR schedule, atomic checkpoints and exact resume."""

from genlab.train.checkpoint import resolve_model_dir
from genlab.train.trainer import Trainer, train

__all__ = ["Trainer", "train", "resolve_model_dir"]
