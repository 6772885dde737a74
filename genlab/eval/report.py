"""Evaluate generated images against a real split, during training and from the CLI; JSON, Markdown and plots.

Every result names the feature network and its hash, the reference split, and n real / n generated, so two
numbers are comparable exactly when those fields agree.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from genlab.config import DataConfig
from genlab.data.images import save_grid
from genlab.errors import GenlabError
from genlab.eval import metrics as M
from genlab.eval.clip import CLIP_METRICS
from genlab.eval.features import FeatureNetwork, get_feature_network
from genlab.eval.reference import Reference, reference_features
from genlab.models.base import GenerativeModel, SampleOption
from genlab.sampling.controls import Guidance
from genlab.sampling.distributed import gather_shards, process_group, shard

IMAGE_METRICS = ("fid", "kid", "is", "prc")
ALL_METRICS = (*IMAGE_METRICS, "nll", "caption")  # caption: answers of an image-to-text model (eval/captioning.py)
# geneval: Shapes-GenEval prompt adherence of a text-to-image model (eval/geneval.py)
ALL_METRICS = (*ALL_METRICS, "geneval")
ALL_METRICS = (*ALL_METRICS, *CLIP_METRICS)  # of a CLIP model, and clip_score (eval/clip.py)


def parse_metrics(spec: str | Sequence[str]) -> list[str]:
    """'fid,kid' -> ['fid', 'kid'], checked against the known names."""
    names = [s.strip().lower() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    bad = [n for n in names if n not in ALL_METRICS]
    if bad or not names:
        raise GenlabError(f"unknown metric {bad[0] if bad else '(none)'!r}; choose from {','.join(ALL_METRICS)}")
    return names


def metrics_from_features(ref: Reference, fake: Tensor, fake_logits: Tensor | None, metrics: Sequence[str],
                          kid_subsets: int = 100, kid_subset_size: int = 1000, seed: int = 0) -> dict[str, Any]:
    """The requested image metrics of generated features against a reference, with n real / n generated."""
    out: dict[str, Any] = {"features": ref.network, "reference": ref.describe(), "n_real": ref.n, "n_fake": len(fake)}
    if "fid" in metrics:
        out["fid"] = M.fid(ref.features, fake)
    if "kid" in metrics:
        out |= M.kid(ref.features, fake, subsets=kid_subsets, subset_size=kid_subset_size, seed=seed)
    if "is" in metrics:
        if fake_logits is None:
            raise GenlabError(f"the Inception-style score needs a classifier; {ref.dataset!r} has no labels")
        out |= M.inception_score(fake_logits, splits=min(10, len(fake_logits)), seed=seed)
    if "prc" in metrics:
        out |= M.precision_recall_density_coverage(ref.features, fake, seed=seed)
    return out


def evaluate_images(images: Tensor, data: DataConfig | str = "mnist", split: str = "test",
                    metrics: Sequence[str] = ("fid", "kid", "prc"), fnet: FeatureNetwork | None = None,
                    **kw: Any) -> dict[str, Any]:
    """FID / KID / IS / precision-recall of images in [-1, 1] against a real split, in genlab's feature network
    (the split loaded at the images' side, so both take the same resizes into the network)."""
    fnet = fnet or get_feature_network(data)
    ref = reference_features(fnet, data, split, image_size=images.shape[-1])
    feats, logits = fnet.embed(images, with_logits="is" in metrics)
    return metrics_from_features(ref, feats, logits, metrics, **kw)


def sample_images(sample: Callable[..., Tensor], n: int, seed: int, batch_size: int = 250,
                  cond: Tensor | None = None, progress: bool = False, per_item_seeds: bool = True,
                  **opts: Any) -> Tensor:
    """Draw `n` images with `sample(count, cond=..., generator=..., **opts)`: with `per_item_seeds` image i uses its
    own generator seeded `seed + i` (families that take a list of generators), else batch b one seeded `seed + b`.

    Under several processes (torchrun, accelerate launch) each draws its shard of the batches and every process
    returns all n images, the same as one process draws (so use a `batch_size` that gives every process work)."""
    from tqdm.auto import tqdm

    rank, world = process_group()
    items = shard(n, rank, world, batch_size)
    out = []
    bar = tqdm(total=len(items), desc="sampling", unit="img", disable=not progress or rank != 0)
    for start in range(items.start, items.stop, batch_size):
        count = min(batch_size, items.stop - start)
        if per_item_seeds:
            gen: Any = [torch.Generator().manual_seed(seed + start + i) for i in range(count)]
        else:
            gen = torch.Generator().manual_seed(seed + start)
        c = cond[start : start + count] if cond is not None else None
        out.append(sample(count, cond=c, generator=gen, **opts).cpu())
        bar.update(count)
    bar.close()
    return gather_shards(torch.cat(out) if out else None, n, batch_size)


def family_sample_options(model: Any, sampler: str | None = None, steps: int | None = None,
                          guidance: float | None = None, eta: float | None = None) -> dict[str, Any]:
    """The keyword arguments of `model.sample` among these (None = the family's default) that its family declares
    it takes (`sample_options`); the rest are left out."""
    takes, opts = model.sample_options, {}
    if SampleOption.SAMPLER in takes:
        opts |= {k: v for k, v in (("sampler", sampler), ("eta", eta)) if v is not None}
    if SampleOption.STEPS in takes and steps is not None:
        opts["steps"] = steps
    if SampleOption.GUIDANCE in takes and guidance is not None:
        opts["guidance"] = Guidance(guidance)
    return opts


def make_training_evaluator(data: DataConfig | str, n: int = 500, split: str = "test", seed: int = 0,
                            metrics: Sequence[str] = ("kid", "fid"), sampler: str | None = None,
                            steps: int | None = None, guidance: float | None = None, eta: float | None = None
                            ) -> Callable[[Any, int], dict[str, float]]:
    """`fn(model, step) -> {"kid": ..., "kid_se": ..., "fid": ..., "n_fake": n, ...}` on the same `n` seeds each call,
    with the sampling options the model's family takes.

    KID is the metric to watch at small n (unbiased); FID is logged too but is biased upwards at small n.
    The feature network and reference features are prepared once, here. Under several processes every process
    must call `fn`: each draws its shard of the samples, and rank 0 alone measures (the others get {}).
    """
    main = process_group()[0] == 0
    # the dataset's own network, as `genlab eval` uses, with the real split at the run's image size
    fnet = get_feature_network(data if isinstance(data, str) else data.name, progress=True) if main else None
    ref = reference_features(fnet, data, split) if main else None
    subset = min(n, ref.n, 1000) if main else 0

    def evaluate(model: GenerativeModel, step: int) -> dict[str, float]:
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                x = sample_images(model.sample, n, seed, per_item_seeds=model.per_item_seeds,
                                  **family_sample_options(model, sampler, steps, guidance, eta))
        finally:
            model.train(was_training)
        if not main:
            return {}
        feats, logits = fnet.embed(x, with_logits="is" in metrics)
        r = metrics_from_features(ref, feats, logits, metrics, kid_subsets=50, kid_subset_size=subset, seed=seed)
        return {k: float(v) for k, v in r.items() if isinstance(v, int | float)}

    return evaluate


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def write_report(result: dict[str, Any], out_dir: str | Path, images: Tensor | None = None,
                 nrow: int | None = None) -> dict[str, Path]:
    """Write `eval.json`, `eval.md` and (given images) `samples.png` into `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "eval.json", "md": out_dir / "eval.md"}
    paths["json"].write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Evaluation of {result.get('model', 'samples')}", ""]
    f = result.get("features")
    if f:
        acc = f.get("test_accuracy")
        lines += [f"Features: `{f['name']}` (hash `{f['hash']}`, weights `{f.get('weights')}`, {f['feature_dim']}-d"
                  + (f", test accuracy {acc:.2%})" if acc is not None else ")"), ""]
    ref = result.get("reference")
    if ref:
        lines += [f"Reference: {ref['dataset']} {ref['split']} split, n_real = {ref['n']}; "
                  f"n_generated = {result.get('n_fake')}", ""]
    if result.get("sampling"):
        lines += ["Sampling: " + ", ".join(f"{k}={v}" for k, v in result["sampling"].items()), ""]
    rows = [("FID", "fid", None), ("KID", "kid", "kid_se"), ("Inception-style score", "is", "is_std"),
            ("precision (k=3)", "precision", None), ("recall (k=3)", "recall", None),
            ("density (k=5)", "density", None), ("coverage (k=5)", "coverage", None),
            ("NLL (bits/dim)", "bits_per_dim", "bits_per_dim_se"), ("perplexity", "perplexity", None),
            ("NLL (nats/token)", "nll_per_token", None)]
    table = [(label, result[k], result.get(err)) for label, k, err in rows if k in result]
    if table:
        lines += ["| metric | value | ± |", "|---|---|---|"]
        lines += [f"| {label} | {_fmt(v)} | {_fmt(e) if e is not None else ''} |" for label, v, e in table]
        lines += ["", "KID ± is its standard error; IS ± is the std over splits."]
        if "prc_n" in result:
            lines += [f"Precision, recall, density and coverage compare {result['prc_n']} real with {result['prc_n']} "
                      "generated (the larger set subsampled): they depend on the sample sizes, so compare them at "
                      "equal `prc_n`."]
    if images is not None:
        paths["grid"] = save_grid(images, out_dir / "samples.png", nrow=nrow)
        lines += ["", "![samples](samples.png)"]
    paths["md"].write_text("\n".join(lines) + "\n")
    return paths
