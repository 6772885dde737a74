"""Sample quality vs steps for each sampler on one class-conditional MNIST diffusion checkpoint.

    python benchmarks/sampler_sweep.py MODEL_OR_RUN [--samplers ddim,euler,heun,dpmpp_2m,unipc,ddpm]
        [--steps 5,10,20,50,250] [--n 500] [--cfg 1.0] [--spacing trailing | --schedule karras] [--out DIR] [--quick]

A sampler may name its own sigma schedule or spacing after an @ (`dpmpp_2m@karras`); the others use --spacing /
--schedule.

Every (sampler, steps) cell draws the same `n` images (image i: seed + i, label i mod 10) and is scored in genlab's
MNIST feature network against the test split: FID (biased at small n, but every cell has the same n), KID (unbiased)
and classifier agreement (the feature network's classifier gives the requested digit). NFE counts network calls per
image (heun / dpm_2 take two per step). Writes sweep.json, sweep.md (table) and sweep.png (FID vs steps, one line per
sampler) into --out, and prints one JSON line: ddpm at its largest step count is the reference, and the best of
dpmpp_2m / unipc at 10-20 steps is reported as a ratio to it (the goal: FID within 10%, ratio <= 1.1).
--quick: n=100, steps 5,10,20 (plus the reference), for a smoke run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from genlab.errors import GenlabError  # noqa: E402
from genlab.eval.features import get_feature_network  # noqa: E402
from genlab.eval.reference import reference_features  # noqa: E402
from genlab.eval.report import metrics_from_features, sample_images  # noqa: E402
from genlab.models.base import GenerativeModel, resolve_model_dir  # noqa: E402
from genlab.sampling.controls import Guidance  # noqa: E402
from genlab.sampling.schedules import SPACINGS  # noqa: E402

FEW_STEP_SAMPLERS, FEW_STEPS = ("dpmpp_2m", "unipc"), (10, 20)


def _ints(spec: str) -> list[int]:
    return [int(s) for s in spec.split(",") if s.strip()]


def run_cell(model: GenerativeModel, fnet, ref, spec: str, steps: int, n: int, seed: int, cfg: float,
             spacing: str, schedule: str | None, batch_size: int) -> dict:
    """Sample n labelled images with one sampler / step count and score them; `spec` is a sampler name, or
    `name@schedule` to override the sweep's schedule / spacing for it."""
    sampler, _, own = spec.partition("@")
    if own in SPACINGS:
        spacing, schedule = own, None
    elif own:
        schedule = own
    labels = torch.arange(n) % model.num_classes
    calls = [0]
    hook = model.net.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    t0 = time.perf_counter()
    try:
        images = sample_images(model.sample, n, seed, batch_size=batch_size, cond=labels, sampler=sampler,
                               steps=steps, guidance=Guidance(cfg), spacing=spacing, schedule=schedule)
    finally:
        hook.remove()
    seconds = time.perf_counter() - t0
    feats, logits = fnet.embed(images, with_logits=True)
    scores = metrics_from_features(ref, feats, None, ("fid", "kid"), kid_subsets=50)
    agreement = float((logits.argmax(1) == labels).float().mean())
    return {"sampler": spec, "steps": steps, "nfe": calls[0] / -(-n // batch_size), "n": n,
            "fid": scores["fid"], "kid": scores["kid"], "kid_se": scores["kid_se"], "accuracy": agreement,
            "seconds": round(seconds, 1)}


def table(cells: list[dict]) -> str:
    rows = ["| sampler | steps | NFE | FID | KID | digit agreement | seconds |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for c in cells:
        rows.append(f"| {c['sampler']} | {c['steps']} | {c['nfe']:.0f} | {c['fid']:.2f} | "
                    f"{c['kid']:.4g} ± {c['kid_se']:.2g} | {100 * c['accuracy']:.1f}% | {c['seconds']} |")
    return "\n".join(rows) + "\n"


def plot(cells: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for sampler in dict.fromkeys(c["sampler"] for c in cells):
        pts = sorted((c["steps"], c["fid"]) for c in cells if c["sampler"] == sampler)
        ax.plot(*zip(*pts, strict=True), marker="o", label=sampler)
    ax.set_xscale("log")
    ax.set_xlabel("steps")
    ax.set_ylabel("FID (genlab MNIST features)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary(cells: list[dict]) -> dict:
    """The ddpm reference (its largest step count) and the best few-step dpmpp_2m / unipc cell as ratios to it."""
    ddpm = [c for c in cells if c["sampler"] == "ddpm"]
    if not ddpm:
        raise GenlabError("the sweep needs the ddpm sampler as its reference; add it to --samplers")
    ref = max(ddpm, key=lambda c: c["steps"])
    few = [c for c in cells if c["sampler"].partition("@")[0] in FEW_STEP_SAMPLERS and c["steps"] in FEW_STEPS]
    out = {"metric": "fid", "reference": f"ddpm-{ref['steps']}", "reference_fid": round(ref["fid"], 3),
           "reference_kid": ref["kid"], "reference_accuracy": ref["accuracy"], "n": ref["n"]}
    if few:
        best = min(few, key=lambda c: c["fid"])
        out |= {"best_few_step": f"{best['sampler']}-{best['steps']}", "best_few_step_fid": round(best["fid"], 3),
                "fid_ratio": round(best["fid"] / ref["fid"], 3), "accuracy_ratio": round(
                    best["accuracy"] / max(ref["accuracy"], 1e-9), 3), "within_10pct": best["fid"] <= 1.1 * ref["fid"]}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a class-conditional MNIST diffusion model folder or run folder")
    p.add_argument("--samplers", default="ddim,euler,heun,dpmpp_2m,unipc,ddpm")
    p.add_argument("--steps", default="5,10,20,50,250")
    p.add_argument("--max-steps-for", default="ddpm", help="samplers run at step counts above 50 (default: ddpm "
                   "only, the reference); 'all' for every sampler")
    p.add_argument("--n", type=int, default=500, help="images per cell")
    p.add_argument("--cfg", type=float, default=1.0, help="guidance scale (1 = conditional model, no guidance)")
    p.add_argument("--spacing", default="trailing", help="timestep spacing of the discrete schedule")
    p.add_argument("--schedule", default=None, help="a sigma schedule instead of the spacing (karras, exponential)")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/sampler-sweep")
    p.add_argument("--quick", action="store_true", help="n=100, steps 5,10,20 (+ the ddpm reference)")
    args = p.parse_args()
    try:
        model = GenerativeModel.from_pretrained(resolve_model_dir(args.model)).eval()
        if getattr(model, "family", "") != "diffusion" or not getattr(model, "num_classes", 0):
            raise GenlabError(f"{args.model} is not a class-conditional diffusion model")
        samplers, steps = args.samplers.split(","), _ints(args.steps)
        n = 100 if args.quick else args.n
        long_ok = set(samplers) if args.max_steps_for == "all" else set(args.max_steps_for.split(","))
        grid = [(s, k) for s in samplers for k in steps if k <= 50 or s in long_ok]
        if args.quick:
            grid = [(s, k) for s, k in grid if k <= 20] + [("ddpm", max(steps))]
        fnet = get_feature_network("mnist")
        ref = reference_features(fnet, "mnist", "test", image_size=model.image_shape[-1])
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        cells = []
        for sampler, k in tqdm(grid, desc="sampler sweep", unit="cell"):
            cells.append(run_cell(model, fnet, ref, sampler, k, n, args.seed, args.cfg, args.spacing,
                                  args.schedule, args.batch_size))
            tqdm.write(json.dumps(cells[-1]), file=sys.stderr)
            (out / "sweep.json").write_text(json.dumps({"model": str(args.model), "cfg": args.cfg,
                                                        "spacing": args.spacing,
                                                        "schedule": args.schedule, "cells": cells}, indent=1))
        (out / "sweep.md").write_text(table(cells))
        plot(cells, out / "sweep.png")
        print(json.dumps({"benchmark": "sampler_sweep", "cells": len(cells), **summary(cells)}))
    except GenlabError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
