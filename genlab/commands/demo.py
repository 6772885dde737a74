"""`genlab demo`: train the default recipe (class-conditional DDPM on MNIST) for a bounded time, sample a
10x10 grid (one row per digit), measure the samples with genlab's digit classifier, and write a report."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from genlab.config import (
    MAX_SAMPLES,
    MAX_SAMPLING_STEPS,
    check_int,
    check_number,
    check_output_path,
    check_seed,
    load_run_config,
)
from genlab.data.images import save_grid
from genlab.files import read_jsonl
from genlab.models.base import GenerativeModel
from genlab.sampling.controls import Guidance
from genlab.sampling.solvers import sampler_options

RECIPE = "mnist-ddpm"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", default=RECIPE, help="the recipe to train (a class-conditional image model)")
    p.add_argument("--minutes", type=float, default=None, help="training time bound (default: the recipe's)")
    p.add_argument("--per-class", type=int, default=100, help="samples per class for the report (default 100)")
    p.add_argument("--sampler", default=None, help="default: the recipe's sample.sampler")
    p.add_argument("--steps", type=int, default=None, help="default: the recipe's sample.steps")
    p.add_argument("--cfg", type=float, default=None, help="guidance scale (default: the recipe's sample.cfg)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")


def _check_args(args: argparse.Namespace) -> None:
    """The demo's own options, before the recipe trains (the recipe's keys are checked when it is loaded)."""
    if args.minutes is not None:
        check_number("--minutes", args.minutes, 0, low_open=True)
    check_int("--per-class", args.per_class, 1, MAX_SAMPLES)
    check_seed("--seed", args.seed, MAX_SAMPLES)
    if args.steps is not None:
        check_int("--steps", args.steps, 1, MAX_SAMPLING_STEPS)
    if args.cfg is not None:
        check_number("--cfg", args.cfg, 0, hint="1 = no guidance")
    if args.sampler is not None:
        sampler_options(args.sampler)


def run(args: argparse.Namespace) -> int:
    from genlab.eval.features import get_feature_network
    from genlab.eval.report import evaluate_images
    from genlab.train import train

    _check_args(args)
    overrides = list(args.overrides)
    if args.minutes is not None:
        overrides.append(f"train.max_minutes={args.minutes}")
    cfg = load_run_config(args.recipe, overrides)
    check_output_path(Path(cfg.out_dir) / cfg.name, "the run folder (out_dir/name)", folder=True)
    sampler = args.sampler if args.sampler is not None else cfg.sample.sampler
    steps = args.steps if args.steps is not None else cfg.sample.steps
    scale = args.cfg if args.cfg is not None else cfg.sample.cfg

    t0 = time.monotonic()
    run_dir = train(cfg)
    train_s = time.monotonic() - t0
    model = GenerativeModel.from_pretrained(run_dir / "model").eval()
    num_classes = model.num_classes
    classifier = get_feature_network(cfg.data.name)

    n = num_classes * args.per_class
    labels = torch.arange(num_classes).repeat_interleave(args.per_class)
    params = {"sampler": sampler, "steps": steps, "cfg": scale, "seed": args.seed}
    t1 = time.monotonic()
    images = sample_in_batches(model, labels, args.seed, sampler=sampler, steps=steps, guidance=Guidance(scale))
    sample_s = time.monotonic() - t1
    predicted = classifier.classify(images)
    per_class = [(predicted[labels == c] == c).float().mean().item() for c in range(num_classes)]
    agreement = (predicted == labels).float().mean().item()
    quality = evaluate_images(images, cfg.data.name, "test", metrics=("fid", "kid"), fnet=classifier)

    out = run_dir / "demo"
    rows = torch.cat([images[labels == c][:10] for c in range(num_classes)])
    grid = save_grid(rows, out / "samples.png", nrow=10, params={**params, "labels": "one row per class"})
    metrics = {
        "recipe": args.recipe, "run_dir": str(run_dir), "train_seconds": round(train_s, 1),
        "train_steps": _last_step(run_dir), "planned_steps": cfg.train.steps, "lr_schedule": cfg.train.lr_schedule,
        "samples": n, **params,
        "sample_seconds": round(sample_s, 1), "classifier": classifier.describe(),
        "classifier_agreement": agreement, "classifier_agreement_per_class": per_class,
        **{k: quality[k] for k in ("fid", "kid", "kid_se", "n_real", "reference")},
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    report = write_report(out / "report.md", metrics, grid)
    print(f"samples grid: {grid}\nreport:       {report}\nmodel:        {run_dir / 'model'}")
    print(f"{agreement:.1%} of {n} samples are classified as the digit asked for "
          f"(classifier test accuracy {classifier.test_accuracy:.2%})")
    return 0


def sample_in_batches(model: Any, labels: torch.Tensor, seed: int, batch: int = 250, **opts: Any) -> torch.Tensor:
    """Sample one image per label; image i uses its own generator seeded `seed + i`, so any one is reproducible."""
    from tqdm.auto import tqdm

    out = []
    bar = tqdm(total=len(labels), desc="sampling", unit="img")
    for s in range(0, len(labels), batch):
        chunk = labels[s : s + batch]
        gens = [torch.Generator().manual_seed(seed + s + i) for i in range(len(chunk))]
        out.append(model.sample(len(chunk), cond=chunk, generator=gens, **opts))
        bar.update(len(chunk))
    bar.close()
    return torch.cat(out)


def _last_step(run_dir: Path) -> int | None:
    steps = [rec.get("step") for rec in read_jsonl(run_dir / "metrics.jsonl")]
    return max((s for s in steps if s is not None), default=None)


def _cut_short_note(m: dict[str, Any]) -> list[str]:
    """A report line when the time limit stopped a decaying LR schedule early (its weights then keep the noise of a
    high LR, which ODE samplers draw as speckle), with the step count that fits this machine."""
    done, planned = m["train_steps"], m["planned_steps"]
    if m["lr_schedule"] == "constant" or done is None or done >= planned:
        return []
    return [f"- the time limit stopped training at step {done} of {planned}, before the {m['lr_schedule']} LR "
            f"schedule had decayed; on this machine `--set train.steps={done}` fits the time"]


def write_report(path: Path, m: dict[str, Any], grid: Path) -> Path:
    """A short Markdown report: what was trained, how long, and how the samples measure."""
    c = m["classifier"]
    lines = [
        f"# genlab demo: {m['recipe']}",
        "",
        f"- run folder: `{m['run_dir']}`; trained {m['train_steps']} steps in {m['train_seconds']} s",
        *_cut_short_note(m),
        f"- sampling: {m['samples']} images ({m['sampler']}, {m['steps']} steps, guidance {m['cfg']}, "
        f"seeds {m['seed']}..{m['seed'] + m['samples'] - 1}) in {m['sample_seconds']} s",
        f"- feature network `{c['name']}` (hash `{c['hash']}`), test accuracy {c['test_accuracy']:.2%}",
        f"- **{m['classifier_agreement']:.1%}** of samples are classified as the class that was asked for",
        f"- FID {m['fid']:.4g}, KID {m['kid']:.4g} ± {m['kid_se']:.2g} (standard error) against the "
        f"{m['reference']['split']} split, in the same features (n_real {m['n_real']}, n_generated {m['samples']})",
        "",
        "| class | " + " | ".join(str(i) for i in range(len(m["classifier_agreement_per_class"]))) + " |",
        "|---|" + "---|" * len(m["classifier_agreement_per_class"]),
        "| agreement | " + " | ".join(f"{a:.0%}" for a in m["classifier_agreement_per_class"]) + " |",
        "",
        f"![samples, one row per class]({grid.name})",
        "",
    ]
    path.write_text("\n".join(lines))
    return path
