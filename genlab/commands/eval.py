"""`genlab eval MODEL_OR_RUN --metrics fid,kid,is,prc,nll --n 5000 --sampler ddim --steps 20` and
`genlab eval features --data mnist` (train, or show, the dataset's cached feature network).

Writes `eval.json` and `eval.md` (with a sample grid) into `--out` (default: `<run>/eval`). Every number names
the feature network and its hash, the reference split, and n real / n generated.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from genlab.commands.sample import MAX_N, check_drawing_args, check_family_takes, sampling_params
from genlab.config import (
    MAX_TIMESTEPS,
    DataConfig,
    check_int,
    check_output_path,
)
from genlab.errors import GenlabError
from genlab.eval.clip import CLIP_METRICS, check_clip_metrics
from genlab.files import write_atomic
from genlab.models.base import Conditioning, GenerativeModel, Likelihood, Output, SampleOption
from genlab.sampling.distributed import end, init_from_env, local_device

EVAL_STEPS = 20  # sampling steps when --steps is not given, for a family that takes steps
# the options of `genlab eval` that only some families take, by the capability they need
FLAGS = {SampleOption.SAMPLER: ("sampler",), SampleOption.STEPS: ("steps",), SampleOption.GUIDANCE: ("cfg",)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", help="a model folder or run folder to evaluate, or `features` to train the "
                                  "feature network of --data")
    p.add_argument("--data", default=None, help="dataset to compare with (default: the run's data.name)")
    p.add_argument("--split", default="test", help="reference split (default test)")
    p.add_argument("--metrics", default="fid,kid,is,prc", help="comma list of fid,kid,is,prc,nll; caption for an "
                   "image-to-text model (exact match and token F1 on shapes' seen and held-out images, --n of each)")
    p.add_argument("--n", type=int, default=5000, help="generated images (1..10000)")
    p.add_argument("--sampler", default=None, help="any registered sampler name (default: the family's, ddim)")
    p.add_argument("--steps", type=int, default=None, help=f"sampling steps (default {EVAL_STEPS})")
    p.add_argument("--cfg", type=float, default=None, help="guidance scale (default: the family's)")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    p.add_argument("--batch", type=int, default=250, help="images per sampling batch")
    p.add_argument("--kid-subsets", type=int, default=100)
    p.add_argument("--kid-subset-size", type=int, default=1000)
    p.add_argument("--nll-n", type=int, default=256, help="test images (or text blocks) for nll")
    p.add_argument("--nll-method", default=None, help="an estimator the family declares (default its first): "
                   "diffusion vlb (variational bound) or ode (PF-ODE); vae iwae (importance-weighted bound) or elbo; "
                   "families with one estimate use their log_likelihood")
    p.add_argument("--nll-t-samples", type=int, default=50, help="timesteps per image for the vlb estimate")
    p.add_argument("--clip", default=None, help="clip_score: the CLIP model (or run) folder that scores a "
                   "text-to-image model's images against their prompts (default for a CLIP model: itself)")
    p.add_argument("--retrieval-n", type=int, default=1000, help="retrieval (a CLIP model): images and captions "
                   "searched (default 1000)")
    p.add_argument("--out", default=None, help="output folder (default: <run>/eval or eval-<model>)")
    p.add_argument("--geneval-prompts", type=int, default=100, help="geneval: prompts per category and split "
                   "(seen, heldout), 1..100")
    p.add_argument("--geneval-images", type=int, default=4, help="geneval: images per prompt (1..64)")
    p.add_argument("--retrain", action="store_true", help="features: retrain even when cached")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")


def run(args: argparse.Namespace) -> int:
    if args.target == "features":
        return _features(args)
    return _evaluate(args)


def _features(args: argparse.Namespace) -> int:
    from genlab.eval.features import get_feature_network

    fnet = get_feature_network(args.data or "mnist", retrain=args.retrain)
    d = fnet.describe()
    acc = f", test accuracy {d['test_accuracy']:.2%} on {fnet.meta['test_size']} images" \
        if d["test_accuracy"] is not None else ""
    print(f"{d['name']} hash {d['hash']}: {d['feature_dim']}-d features at {d['image_size']}px{acc} "
          f"(trained on {fnet.meta['train_size']} images in {fnet.meta['train_seconds']} s)")
    return 0


def _run_data(model_dir: Path) -> str | None:
    """data.name from the run folder's config.yaml (the model folder's parent), if there is one."""
    for cfg in (model_dir / "config.yaml", model_dir.parent / "config.yaml"):
        if cfg.is_file():
            raw = yaml.safe_load(cfg.read_text()) or {}
            return (raw.get("data") or {}).get("name")
    return None


def _load_model(model_dir: Path, device: str) -> Any:
    """The family's own `from_pretrained` (a language model also loads its tokenizer.json)."""
    from genlab.models.base import read_model_meta
    from genlab.models.lora import is_adapter_folder
    from genlab.registry import MODELS

    if is_adapter_folder(model_dir):  # a LoRA adapter: its base model with the adapter on it
        return GenerativeModel.from_pretrained(model_dir, map_location=device).to(device).eval()
    family = read_model_meta(model_dir)[1].get("family")
    cls = MODELS.get(family) if isinstance(family, str) and family else GenerativeModel  # the base class says why not
    return cls.from_pretrained(model_dir, map_location=device).to(device).eval()


def _evaluate(args: argparse.Namespace) -> int:
    from genlab.data import load_dataset
    from genlab.eval.report import parse_metrics
    from genlab.models.base import resolve_model_dir
    from genlab.registry import SAMPLERS

    metrics = parse_metrics(args.metrics)
    check_drawing_args(args)
    check_int("--kid-subsets", args.kid_subsets, 1, MAX_N)
    check_int("--kid-subset-size", args.kid_subset_size, 2)
    check_int("--nll-n", args.nll_n, 1)
    check_int("--nll-t-samples", args.nll_t_samples, 1, MAX_TIMESTEPS)
    check_int("--retrieval-n", args.retrieval_n, 2, MAX_N)
    if args.clip is not None:
        resolve_model_dir(args.clip)  # a missing CLIP folder fails before sampling
    check_int("--geneval-prompts", args.geneval_prompts, 1, 100)
    check_int("--geneval-images", args.geneval_images, 1, 64)
    if args.sampler is not None:
        SAMPLERS.get(args.sampler)
    if args.out is not None:
        check_output_path(args.out, "--out", folder=True)
    model_dir = resolve_model_dir(args.target)
    data = args.data or _run_data(model_dir)
    if data is None:
        raise GenlabError(f"{model_dir} has no run config.yaml naming its data; pass --data NAME")
    load_dataset(DataConfig(name=data, split=args.split))  # an unknown dataset or split fails before sampling
    rank, world = init_from_env()  # under torchrun / accelerate launch: each process draws its shard
    try:
        return _evaluate_model(args, model_dir, data, metrics, rank)
    finally:
        if world > 1:
            end()


def _evaluate_model(args: argparse.Namespace, model_dir: Path, data: str, metrics: list[str], rank: int) -> int:
    """Sample (every process its shard), then measure and write on rank 0."""
    from genlab.eval.features import get_feature_network
    from genlab.eval.likelihood import nll_bits_per_dim
    from genlab.eval.reference import all_images, load_images, reference_features
    from genlab.eval.report import (
        IMAGE_METRICS,
        family_sample_options,
        metrics_from_features,
        sample_images,
        write_report,
    )

    device = local_device(args.device)
    model = _load_model(model_dir, device)
    check_family_takes(model, args, FLAGS)
    image_metrics = [m for m in metrics if m in IMAGE_METRICS]
    if image_metrics and model.output is not Output.IMAGE:
        raise GenlabError(f"{','.join(image_metrics)} measure images, but the {model.family} family outputs "
                          f"{model.output.value}; use --metrics nll")
    if "nll" in metrics and model.likelihood is Likelihood.NONE:
        raise GenlabError(f"this {model.family} model has no likelihood (nor a bound on it); leave nll out of "
                          f"--metrics (it gives: {model.takes()})")
    clip_metrics = [m for m in metrics if m in CLIP_METRICS]
    if clip_metrics:
        check_clip_metrics(model, clip_metrics, args.clip)
    if "caption" in metrics and not (Conditioning.IMAGE in model.conditioning and model.output is Output.TEXT):
        raise GenlabError(f"caption measures answers about images, but this {model.family} model does not describe "
                          f"images ({model.takes()}); leave caption out of --metrics")
    if "geneval" in metrics and not (Conditioning.TEXT in model.conditioning and model.output is Output.IMAGE):
        raise GenlabError(f"geneval prompts a text-to-image model, but this {model.family} model does not draw "
                          f"from text ({model.takes()}); leave geneval out of --metrics")
    if args.nll_method is not None and args.nll_method not in model.likelihood_estimators:
        offered = ", ".join(model.likelihood_estimators) or "none: it has one, its own log_likelihood"
        raise GenlabError(f"--nll-method {args.nll_method}: the {model.family} family's estimators are {offered}")
    out_dir = Path(args.out) if args.out else (model_dir.parent / "eval" if (model_dir.parent / "config.yaml")
                                               .is_file() else Path(f"eval-{model_dir.name}"))
    result: dict[str, Any] = {"model": str(args.target), "family": model.family, "data": data}
    images = labels = None
    if image_metrics:
        opts = family_sample_options(model, args.sampler, args.steps or EVAL_STEPS, args.cfg)
        labels = model.labels_for(args.n)
        t0 = time.monotonic()
        images = sample_images(model.sample, args.n, args.seed, batch_size=args.batch, cond=labels, progress=True,
                               per_item_seeds=model.per_item_seeds, **opts)
    geneval = _geneval_sample(args, model) if "geneval" in metrics else None
    clip_drawn = _clip_score_sample(args, model, data) if "clip_score" in metrics and model.output is Output.IMAGE \
        else None
    if rank != 0:
        return 0
    if image_metrics:
        fnet = get_feature_network(data)
        result["sampling"] = {**sampling_params(model, opts), "seed": args.seed, "n": args.n,
                              "seconds": round(time.monotonic() - t0, 1)}
        # the real split at the generated images' side, so both take the same resizes into the network
        ref = reference_features(fnet, data, args.split, image_size=images.shape[-1])
        feats, logits = fnet.embed(images, with_logits="is" in image_metrics, progress=True)
        result |= metrics_from_features(ref, feats, logits, image_metrics, kid_subsets=args.kid_subsets,
                                        kid_subset_size=args.kid_subset_size, seed=args.seed)
    if "nll" in metrics and model.output is Output.TEXT:
        result |= _perplexity(model, data, args.split, args.nll_n, device)
    elif "nll" in metrics:
        test = load_images(data, args.split)
        x = all_images(test)[: args.nll_n].to(device)
        g = torch.Generator().manual_seed(args.seed)
        bpd = nll_bits_per_dim(model, x, method=args.nll_method, t_samples=args.nll_t_samples, generator=g,
                               progress=True)
        result |= {"bits_per_dim": float(bpd.mean()), "bits_per_dim_se": float(bpd.std() / len(bpd) ** 0.5),
                   "nll_method": args.nll_method or (model.likelihood_estimators or ("dequantized log_likelihood",))[0],
                   "nll_n": len(bpd)}
    if "caption" in metrics:
        from genlab.eval.captioning import evaluate_captioner

        result |= evaluate_captioner(model, args.n, seed=args.seed)
    if clip_metrics:
        result |= _clip_metrics(args, model, data, clip_metrics, clip_drawn, device)
    nrow = None
    if images is not None and labels is not None:
        classes = labels.unique()
        per = max(1, min(10, args.n // len(classes)))
        images = torch.cat([images[labels == c][:per] for c in classes])
        nrow = per
    elif images is not None:
        images = images[:100]
    paths = write_report(result, out_dir, images, nrow=nrow)
    shown = {k: v for k, v in result.items() if k in ("fid", "kid", "kid_se", "is", "precision", "recall",
                                                        "density", "coverage", "bits_per_dim", "perplexity")}
    if shown:  # a caption- or geneval-only run has no headline numbers; its tables follow
        print(json.dumps(shown))
    if "caption_eval" in result:
        from genlab.eval.captioning import caption_table

        table = caption_table(result)
        print(table)
        with paths["md"].open("a", encoding="utf-8") as f:
            f.write("\n## Captions and answers (exact match, token F1)\n\n" + table + "\n")
    if geneval is not None:
        _geneval_write(geneval, result, out_dir)
    print(f"wrote {paths['json']} and {paths['md']}")
    return 0


def _perplexity(model: Any, data: str, split: str, max_blocks: int, device: str) -> dict[str, Any]:
    """Perplexity of a language model on non-overlapping `block_size + 1` token windows of a text split."""
    from genlab.data import TextDataset, load_dataset
    from genlab.eval.likelihood import perplexity
    from genlab.models.gpt import encode_text

    ds = load_dataset(data, split=split)
    if not isinstance(ds, TextDataset):
        raise GenlabError(f"dataset {data!r} is not text: a language model is evaluated on a text split")
    ids = encode_text(model.tokenizer, ds.text)
    L = model.config.block_size + 1
    blocks = ids[: (len(ids) // L) * L].view(-1, L)[:max_blocks].to(device)
    if len(blocks) == 0:
        raise GenlabError(f"the {split} split has fewer than {L} tokens; evaluate on more text")
    return {**perplexity(model, blocks), "nll_method": "exact (autoregressive)", "nll_n": len(blocks)}


def _geneval_sample(args: argparse.Namespace, model: Any) -> dict[str, Any]:
    """Shapes-GenEval's seen and held-out prompts drawn by a text-to-image model (each process its shard); the
    prompts reach `sample` as `cond` through the family's own `labels_for`."""
    from genlab.eval import geneval as G
    from genlab.eval.report import family_sample_options, sample_images

    opts = family_sample_options(model, args.sampler, args.steps or EVAL_STEPS, args.cfg)
    drawn: dict[str, Any] = {}
    t0 = time.monotonic()
    for split in G.SPLITS:
        specs = G.expand(G.prompt_specs(split, args.geneval_prompts), args.geneval_images)
        prompts = model.labels_for(len(specs), [s.prompt for s in specs])
        images = sample_images(model.sample, len(specs), args.seed, batch_size=args.batch, cond=prompts,
                               progress=True, per_item_seeds=model.per_item_seeds, **opts)
        drawn[split] = (specs, images)
    sampling = {**sampling_params(model, opts), "seed": args.seed, "seconds": round(time.monotonic() - t0, 1)}
    return {"drawn": drawn, "sampling": sampling, "prompts_per_category": args.geneval_prompts,
            "images_per_prompt": args.geneval_images}


def _geneval_write(geneval: dict[str, Any], result: dict[str, Any], out_dir: Path) -> None:
    """Score the drawn images, add the table to `result` and write geneval.json / geneval.md and a grid."""
    from genlab.data.images import save_grid
    from genlab.eval import geneval as G

    reader = G.get_reader(progress=True)
    tables = {split: G.score(images, specs, reader) for split, (specs, images) in geneval["drawn"].items()}
    extra = {"model": result["model"], "family": result["family"], "sampling": geneval["sampling"],
             "prompts_per_category": geneval["prompts_per_category"],
             "images_per_prompt": geneval["images_per_prompt"], "reader": reader.meta}
    paths = G.write_geneval(tables, out_dir, extra)
    specs, images = geneval["drawn"]["seen"]
    first = [i for c in G.CATEGORIES for i in [j for j, s in enumerate(specs) if s.category == c][:8]]
    save_grid(images[first], out_dir / "geneval_seen.png", nrow=8,
              params={"prompts": [specs[i].prompt for i in first]})
    result["geneval"] = tables
    write_atomic(out_dir / "eval.json", json.dumps(result, indent=2) + "\n")
    print(G.markdown_table(tables))
    print(f"wrote {paths['json']} and {paths['md']}")


def _clip_score_sample(args: argparse.Namespace, model: Any, data: str) -> tuple[Any, list[str], dict[str, Any]]:
    """A text-to-image model's images for the split's first --n captions (each process its shard), for clip_score."""
    from genlab.eval.clip import split_captions
    from genlab.eval.report import family_sample_options, sample_images

    prompts = model.labels_for(args.n, split_captions(data, args.split, args.n))
    opts = family_sample_options(model, args.sampler, args.steps or EVAL_STEPS, args.cfg)
    images = sample_images(model.sample, args.n, args.seed, batch_size=args.batch, cond=prompts, progress=True,
                           per_item_seeds=model.per_item_seeds, **opts)
    return images, prompts, sampling_params(model, opts)


def _clip_metrics(args: argparse.Namespace, model: Any, data: str, metrics: list[str], drawn: Any,
                  device: str) -> dict[str, Any]:
    """zeroshot / retrieval / binding of a CLIP model, clip_score of drawn images (or a CLIP's real split)."""
    from genlab.eval.clip import evaluate_clip, load_clip, shapes_table

    clip = load_clip(args.clip, device) if args.clip is not None else None
    images, prompts, params = drawn if drawn is not None else (None, None, None)
    out = evaluate_clip(model, data, args.split, metrics, n=args.n, retrieval_n=args.retrieval_n, clip=clip,
                        images=images, prompts=prompts)
    if params is not None:
        out["clip_score_sampling"] = {**params, "seed": args.seed, "n": args.n}
    if args.clip is not None:
        out["clip_model"] = args.clip
    print(json.dumps(out))
    if "shapes_clip" in out:
        print(shapes_table(out))
    return out
