"""Run under torchrun / accelerate launch: train the toy recipe, then each process saves its weights and the
item indices it trained on to RUN_DIR/rank<R>.pt (test support; the trainer itself writes only from rank 0)."""

import sys
from pathlib import Path

import torch

from genlab.config import load_run_config
from genlab.registry import MODELS
from genlab.train import Trainer

MODELS.modules.append("toy_family")  # this script's folder is on sys.path

if __name__ == "__main__":
    recipe, run_dir, *overrides = sys.argv[1:]
    trainer = Trainer(load_run_config(recipe, overrides), Path(run_dir))
    trainer.fit()
    torch.save({"weights": trainer.model.state_dict(), "seen": trainer.model.seen},
               Path(run_dir) / f"rank{trainer.rank}.pt")
