"""`genlab train RECIPE [--set key=value ...] [--run-dir DIR] [--no-resume]`."""

from __future__ import annotations

import argparse
from pathlib import Path

from genlab.config import check_output_path, load_run_config


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="a YAML recipe, or the name of one under configs/ (e.g. mnist-ddpm)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.steps=2000 (repeatable)")
    p.add_argument("--run-dir", default=None, help="the run folder (default: OUT_DIR/NAME from the config)")
    p.add_argument("--no-resume", action="store_true",
                   help="start over even if the run folder has checkpoints (they are deleted)")


def run(args: argparse.Namespace) -> int:
    cfg = load_run_config(args.recipe, args.overrides)  # every key checked before any work starts
    run_dir = check_output_path(args.run_dir or Path(cfg.out_dir) / cfg.name,
                                "--run-dir" if args.run_dir else "the run folder (out_dir/name)", folder=True)
    from genlab.train import Trainer

    trainer = Trainer(cfg, run_dir, resume=not args.no_resume)
    model_dir = trainer.fit()
    if trainer.is_main:
        print(f"run folder: {trainer.run_dir}")
        print(f"model:      {model_dir}")
    if trainer.interrupted:
        raise KeyboardInterrupt
    return 0
