"""Plots of a run's `metrics.jsonl` as PNGs (matplotlib's Agg canvas: no display, no global pyplot state)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from genlab.files import atomic_path, read_jsonl


def _figure(figsize: tuple[float, float], dpi: int = 100) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, out: str | Path) -> Path:
    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp)
    return out


def plot_losses(metrics_path: str | Path, out: str | Path) -> Path | None:
    """Training loss (and validation metrics whose name contains "loss") against step, as a PNG."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    for rec in read_jsonl(metrics_path):
        for k, v in rec.items():
            if "loss" in k and isinstance(v, int | float):
                name = f"{rec.get('split', 'train')} {k}"
                xs, ys = series.setdefault(name, ([], []))
                xs.append(rec["step"])
                ys.append(v)
    if not series:
        return None
    fig = _figure((6, 4))
    ax = fig.add_subplot()
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, label=name, linestyle="-" if name.startswith("train") else "--", marker=None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if all(y > 0 for _, ys in series.values() for y in ys):
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.subplots_adjust(left=0.12, right=0.97, bottom=0.12, top=0.96)
    return _save(fig, out)


def plot_eval_metrics(metrics_path: str | Path, out: str | Path, keys: Sequence[str] = ("kid", "fid")) -> Path | None:
    """The evaluation metrics of a run's `metrics.jsonl` against the step (KID with its standard error band)."""
    rows = read_jsonl(metrics_path)
    series = {k: [(r["step"], r[k], r.get(f"{k}_se")) for r in rows if k in r and "step" in r] for k in keys}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    fig = _figure((4.5 * len(series), 3.2))
    axes = fig.subplots(1, len(series), squeeze=False)
    for ax, (k, pts) in zip(axes[0], series.items()):
        steps, vals, ses = zip(*pts)
        ax.plot(steps, vals, marker="o", ms=3)
        if all(s is not None and math.isfinite(s) for s in ses):
            ax.fill_between(steps, [v - s for v, s in zip(vals, ses)], [v + s for v, s in zip(vals, ses)], alpha=0.3)
        n = next((r.get("n_fake") for r in rows if k in r), None)
        ax.set(xlabel="step", ylabel=k.upper(), title=f"{k.upper()} (n={n})" if n else k.upper())
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, out)
