"""Every generative family on MNIST, side by side, under one wall-clock training budget.

    python benchmarks/families.py [--minutes 10] [--n 1000] [--stacked-n 10000] [--rows ddpm-250,gan,...]
        [--out runs/families] [--threads N] [--smoke]

Each row trains one recipe of `configs/` with genlab's own trainer for `--minutes` of wall-clock time
(`train.max_minutes`; where the recipe decays its LR by a cosine, `train.steps` is fitted to the budget from the
time of a probe step, so the decay finishes), or, for the diffusers row, diffusers' `UNet2DModel` + `DDPMScheduler`
in a plain loop in the style of diffusers' `train_unconditional` example, under the same budget. Every row is then
measured the same way: `--n` samples (balanced labels for class-conditional models, seeds `i`), scored in genlab's
MNIST feature network against the test split (FID, KID +- SE, precision, recall, density, coverage), classified by
that network's digit classifier (the share of each digit, its KL to uniform, and the share classified as asked),
a memorization rate in the same feature space (samples nearer to a training image than the 1st percentile of
test-to-train nearest distances), test bits/dim where the family declares a likelihood (exact or a bound), the
parameters, the training FLOPs (one step counted by `torch.utils.flop_counter.FlopCounterMode`, times the steps),
the images seen, the network evaluations per sample and the sampling time per image. Stacked-MNIST rows train
unconditional models on three stacked digits and count the modes hit of 1,000 in `--stacked-n` samples.

Outputs in --out: `rows/<row>.json` (one per finished row, with its config hash and code version: a rerun trains
and measures only the rows whose recipe, budget, evaluation or family source changed; a family's sampling keys and
sampling-only functions (`sampling_keys`, `sampling_code`) re-measure its rows without retraining them: its training
runs without them, and its measurement makes the family's `tune_sampling` choices first, against the training
split, cached per choice settings in the run folder), `train/<run>/` (the run
folders), `families.md` (the table and the pass/fail of the issue's acceptance ratios), `families.png` (FID
against sampling ms per image, log scale) and `families.json`; the last line printed is one JSON line.
Rows whose recipe is not in `configs/` yet are listed as missing. `--smoke`: a few seconds a row, tiny n.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import functools
import hashlib
import json
import math
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from genlab.config import (  # noqa: E402
    check_int,
    check_number,
    check_output_path,
    load_run_config,
    resolve_recipe,
    to_dict,
)
from genlab.errors import GenlabError  # noqa: E402
from genlab.eval import diversity  # noqa: E402
from genlab.eval.features import FeatureNetwork, get_feature_network  # noqa: E402
from genlab.eval.reference import all_images, load_images, reference_features  # noqa: E402
from genlab.eval.report import family_sample_options, metrics_from_features, sample_images  # noqa: E402
from genlab.files import read_jsonl, write_atomic  # noqa: E402
from genlab.models.base import GenerativeModel, Likelihood, class_labels  # noqa: E402
from genlab.registry import MODELS  # noqa: E402

STACKED = "stacked_mnist"


@dataclass(frozen=True)
class Row:
    """One line of the table: a recipe (or the diffusers baseline) trained under the budget, sampled one way.

    Rows with the same recipe, overrides, data and seed share one training run and differ in how they sample.
    `roles` name the acceptance checks a row takes part in."""

    name: str
    recipe: str = ""  # a recipe under configs/ (empty for the diffusers baseline)
    overrides: tuple[str, ...] = ()
    sampler: str | None = None  # None: the family's default
    steps: int | None = None
    guidance: float | None = 1.0  # no guidance: FID of the model's own distribution
    data: str = "mnist"  # or "stacked_mnist" (unconditional, mode count instead of FID)
    seed: int = 0
    kind: str = "genlab"  # genlab | diffusers
    roles: tuple[str, ...] = ()
    tokenizer: str = ""  # a two-stage family: the recipe of its tokenizer, trained first (half the budget each)
    tokenizer_overrides: tuple[str, ...] = ()
    # a distilled family: the recipe of its teacher, trained first under the whole budget (the same run as that
    # recipe's own rows), whose model folder the row's recipe reads as model.teacher; the row's own training gets
    # the budget again and its record keeps the teacher's beside it, not added to it
    teacher: str = ""

    @property
    def stacked(self) -> bool:
        return self.data == STACKED


UNCOND = ("model.class_cond=false",)
# The table's rows, in the order they are run (the acceptance rows first). Recipes that are not in configs/ yet
# (the autoregressive, VQ and TarFlow families) are shown as missing until they land.
ROWS: list[Row] = [
    Row("ddpm-250", "mnist-ddpm", sampler="ddpm", steps=250, roles=("r0", "genlab_diffusion")),
    Row("diffusers-ddpm-250", kind="diffusers", sampler="ddpm", steps=250, roles=("diffusers",)),
    Row("fm-euler-50", "mnist-fm", sampler="euler", steps=50, roles=("fm50",)),
    Row("gan-r3", "mnist-gan", roles=("gan",)),
    Row("vae", "mnist-vae", roles=("vae",)),
    Row("glow", "mnist-flow", roles=("flow",)),
    Row("realnvp", "mnist-flow", overrides=("model.arch=realnvp",), roles=("flow",)),
    Row("dcgan", "mnist-dcgan", roles=("dcgan",)),
    Row("gan-r3-stacked-s0", "mnist-gan", UNCOND, data=STACKED, seed=0, roles=("gan_stacked",)),
    Row("dcgan-stacked", "mnist-dcgan", UNCOND, data=STACKED, roles=("dcgan_stacked",)),
    Row("ddpm-dpm-20", "mnist-ddpm", sampler="dpmpp_2m", steps=20),
    Row("edm-heun-18", "mnist-edm", sampler="heun", steps=18, roles=("genlab_diffusion",)),
    Row("dit-dpm-20", "mnist-dit", sampler="dpmpp_2m", steps=20),
    Row("pixel-ar", "mnist-pixelar", roles=("ar",)),
    Row("vq-gpt-prior", "mnist-vq-prior", tokenizer="mnist-vq", roles=("vq",)),
    Row("vq-maskgit", "mnist-maskgit", tokenizer="mnist-vq", roles=("vq",)),
    Row("fsq-maskgit", "mnist-maskgit", tokenizer="mnist-vq", tokenizer_overrides=("model.quantizer=fsq",),
        roles=("vq",)),
    Row("tarflow", "mnist-tarflow", roles=("flow",)),
    Row("gan-r3-stacked-s1", "mnist-gan", UNCOND, data=STACKED, seed=1, roles=("gan_stacked",)),
    Row("gan-r3-stacked-s2", "mnist-gan", UNCOND, data=STACKED, seed=2, roles=("gan_stacked",)),
    Row("ddpm-stacked-dpm-20", "mnist-ddpm", UNCOND, sampler="dpmpp_2m", steps=20, data=STACKED),
    # few steps (issue 14): consistency distillation of the EDM teacher and a shortcut model without one, against
    # the teacher's own DDPM-250 (r0 of these checks, in the same run)
    *[Row(f"cd-{k}", "mnist-cd", steps=k, teacher="mnist-edm", roles=(f"fewstep{k}", "fewstep_cost"))
      for k in (1, 2, 4)],
    *[Row(f"shortcut-{k}", "mnist-shortcut", steps=k, roles=(f"fewstep{k}", "fewstep_cost")) for k in (1, 2, 4)],
    Row("edm-ddpm-250", "mnist-edm", sampler="ddpm", steps=250, roles=("r0_teacher",)),
]


@dataclass
class Settings:
    """What every row shares: the budget and how it is measured (all of it enters each row's key)."""

    minutes: float = 10.0
    n: int = 1000
    stacked_n: int = 10000
    nll_n: int = 256
    batch: int = 250
    extra: dict[str, Any] = field(default_factory=dict)  # overrides every genlab row takes (tests: tiny models)

    def eval_key(self, row: Row) -> dict[str, Any]:
        """The measurement settings a row's numbers depend on."""
        return {"stacked_n": self.stacked_n} if row.stacked else {"n": self.n, "nll_n": self.nll_n}


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def git_describe() -> str:
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def source_files(module_name: str) -> list[Path]:
    """A genlab module's file and the files of the genlab models / nn / sampling modules it imports."""
    import importlib

    path = Path(importlib.import_module(module_name).__file__)
    files = {path}
    for node in ast.walk(ast.parse(path.read_text())):
        names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else (
            [a.name for a in node.names] if isinstance(node, ast.Import) else [])
        for name in names:
            if name.split(".")[:2] in (["genlab", "models"], ["genlab", "nn"], ["genlab", "sampling"]) \
                    and name.count(".") >= 2:
                with contextlib.suppress(ImportError):
                    files.add(Path(importlib.import_module(name).__file__))
    return sorted(files)


def code_version(row: Row, family: str | None, training: bool = False) -> str:
    """A hash of the row's family source (its module and the building blocks it imports); for the diffusers row,
    of this baseline's loop and the diffusers version. Taken once per family and process: the modules a process
    imported do not change when their files do, so every row of one run keys the code it runs. `training`: without
    the functions of the family's module that only sample (`sampling_code`), for the key of its training run."""
    return _code_version(row.kind, family, training)


def without_functions(source: str, names: tuple[str, ...]) -> str:
    """The module's syntax tree (`ast.dump`: comments and layout left out) without the functions and methods named
    `names`."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef):
            node.body = [b for b in node.body if not (isinstance(b, ast.FunctionDef | ast.AsyncFunctionDef)
                                                      and b.name in names)] or [ast.Pass()]
    return ast.dump(tree)


@functools.cache
def _code_version(kind: str, family: str | None, training: bool = False) -> str:
    h = hashlib.sha256()
    if kind == "diffusers":
        import inspect

        import diffusers

        h.update(diffusers.__version__.encode())
        for fn in (train_diffusers, DiffusersDDPM):
            h.update(inspect.getsource(fn).encode())
    else:
        cls = MODELS.get(family)
        own = Path(sys.modules[cls.__module__].__file__).resolve()
        for f in source_files(cls.__module__):
            h.update(f.name.encode())
            if training and cls.sampling_code and f.resolve() == own:
                h.update(without_functions(f.read_text(), cls.sampling_code).encode())
            else:
                h.update(f.read_bytes())
    return h.hexdigest()[:16]


# -- counting ---------------------------------------------------------------------------------------------------
def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of `fn` (forward and backward) by `torch.utils.flop_counter.FlopCounterMode`."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _GlobalOnly()  # its per-module hooks break autograd.grad (the GAN's R1 penalty)
    with counter:
        fn()
    return int(counter.get_total_flops())


class _GlobalOnly(contextlib.nullcontext):
    """Stands in for FlopCounterMode's module tracker: every FLOP counts towards "Global" alone."""

    parents = frozenset({"Global"})


@contextlib.contextmanager
def count_calls(model: nn.Module) -> Iterator[list[int]]:
    """Network evaluations: forward calls of every module that holds parameters of its own (convolutions, linear
    layers, norms, embeddings); yields a list whose [0] is, on exit, the largest count among them. Each such layer
    runs once per evaluation of the network that holds it, whether the sampler calls the network's forward or a
    method of it (a KV-cache step); a two-stage sampler counts its most-called network (MaskGIT's 8 prior steps,
    not the one decoder pass)."""
    counts: dict[str, int] = {}
    owners = [(k, m) for k, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))]
    hooks = [m.register_forward_hook(lambda *_, k=k: counts.__setitem__(k, counts.get(k, 0) + 1))
             for k, m in owners]
    out = [0]
    try:
        yield out
    finally:
        for h in hooks:
            h.remove()
        out[0] = max(counts.values(), default=0)


def fitted_steps(budget_s: float, build_s: float, step_s: float) -> int:
    """Steps that fit the budget after the build, at the probe's step time, with 5% left for the variance."""
    return max(1, int(0.95 * (budget_s - build_s) / max(step_s, 1e-6)))


# -- training ---------------------------------------------------------------------------------------------------
def row_config(row: Row, settings: Settings, run_name: str, training: bool = False) -> Any:
    """The row's recipe with the budget and the table's overrides; `training`: without the family's sampling keys
    (their defaults apply, so the trainer makes no sampling choices: the measurement makes them)."""
    overrides = [*settings.extra.get(row.recipe, ()), *settings.extra.get("*", ()), *row.overrides,
                 f"data.name={row.data}", f"train.seed={row.seed}", f"train.max_minutes={settings.minutes}",
                 "train.eval_every=0", "train.sample_every=0", "train.ckpt_every=0", f"name={run_name}"]
    cfg = load_run_config(row.recipe, overrides)
    if training:
        for k in MODELS.get(cfg.family).sampling_keys:
            cfg.model.pop(k, None)
    return cfg


def sampling_spec(row: Row, settings: Settings) -> dict[str, Any]:
    """What a row's sampling choices depend on beyond its training: the recipe's sampling keys and the family's whole
    source; {} for a family that declares none (its rows keep their keys)."""
    if row.kind != "genlab":
        return {}
    cfg = row_config(row, settings, "run")
    cls = MODELS.get(cfg.family)
    if not (cls.sampling_keys or cls.sampling_code):
        return {}
    return {"keys": {k: cfg.model[k] for k in cls.sampling_keys if k in cfg.model},
            "code": code_version(row, cfg.family)}


def train_key(row: Row, settings: Settings) -> tuple[str, dict[str, Any]]:
    """The hash that decides whether a training run can be reused, and what it covers (not the family's sampling
    keys or sampling-only functions)."""
    if row.kind == "diffusers":
        spec: dict[str, Any] = {"kind": "diffusers", "data": row.data, "seed": row.seed,
                                "extra": settings.extra.get("diffusers", {})}
        family = None
    else:
        cfg = row_config(row, settings, "run", training=True)
        spec = {"kind": "genlab", "config": to_dict(cfg)}
        family = cfg.family
    spec |= {"minutes": settings.minutes, "code": code_version(row, family, training=True)}
    return _hash(spec), spec


def train_genlab(row: Row, settings: Settings, run_dir: Path) -> dict[str, Any]:
    """Train a recipe with genlab's trainer for the budget; a probe step (in a scratch folder) gives the FLOPs of
    one step and its time, from which a cosine-decayed recipe's `train.steps` is fitted to the budget."""
    from genlab.train import Trainer

    cfg = row_config(row, settings, run_dir.name, training=True)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as scratch:
        probe = Trainer(copy.deepcopy(cfg), Path(scratch) / "probe", resume=False)
        build_s = time.monotonic() - t0

        def step() -> None:
            probe.step_fn(probe._next_batch(), probe.optimizers, probe.accelerator, probe.objective)

        params = sum(p.numel() for p in probe.model.parameters())
        flops = count_flops(step)
        t1 = time.monotonic()
        step()
        step()
        step_s = (time.monotonic() - t1) / 2
    if cfg.train.lr_schedule != "constant":
        cfg.train.steps = fitted_steps(60 * settings.minutes, build_s, step_s)
        cfg.train.warmup_steps = min(cfg.train.warmup_steps, cfg.train.steps // 4)
    info: dict[str, Any] = {"params": params, "flops_per_step": flops, "probe_step_s": round(step_s, 4),
                            "planned_steps": cfg.train.steps, "batch_size": cfg.train.batch_size}
    t_start = time.monotonic()
    trainer = Trainer(cfg, run_dir, resume=False)
    try:
        trainer.fit()
        info["diverged"] = False
    except GenlabError as e:  # a non-finite loss stops the trainer without saving: the row diverged
        info |= {"diverged": True, "error": str(e)}
    if trainer.interrupted:  # Ctrl-C / SIGTERM: the trainer saved its checkpoint; the table stops here
        raise KeyboardInterrupt
    info |= {"steps": trainer.step, "train_seconds": round(time.monotonic() - t_start, 1)}
    info["images_seen"] = trainer.step * cfg.train.batch_size
    info["train_flops"] = flops * trainer.step
    last = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r.get("split") == "train"]
    info["last_train_metrics"] = {k: v for k, v in (last[-1] if last else {}).items() if isinstance(v, int | float)}
    usage = [r["codebook_usage"] for r in read_jsonl(run_dir / "metrics.jsonl") if "codebook_usage" in r]
    if usage:  # a VQ tokenizer's validation: the share of codes used over the whole test split
        info["codebook_usage"] = usage[-1]
    return info


# -- the diffusers baseline -------------------------------------------------------------------------------------
DIFFUSERS_DEFAULTS = {  # diffusers' train_unconditional example defaults, at genlab's mnist-ddpm size and batch
    "batch_size": 32, "lr": 1e-4, "lr_warmup_steps": 500, "adam_beta1": 0.95, "adam_beta2": 0.999,
    "adam_weight_decay": 1e-6, "adam_epsilon": 1e-8, "ema_inv_gamma": 1.0, "ema_power": 0.75,
    "ema_max_decay": 0.9999, "ddpm_num_steps": 1000, "ddpm_beta_schedule": "linear",
    "block_out_channels": (16, 32, 64), "layers_per_block": 2, "norm_num_groups": 8, "attention_head_dim": 32,
}


def make_diffusers_unet(h: dict[str, Any], channels: int, num_classes: int) -> nn.Module:
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=28, in_channels=channels, out_channels=channels, layers_per_block=h["layers_per_block"],
        block_out_channels=tuple(h["block_out_channels"]), norm_num_groups=h["norm_num_groups"],
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), attention_head_dim=h["attention_head_dim"],
        num_class_embeds=num_classes or None)


class DiffusersDDPM(nn.Module):
    """diffusers' UNet2DModel sampled by DDPMScheduler's loop (DDPMPipeline's, with class labels)."""

    def __init__(self, unet: nn.Module, scheduler: Any) -> None:
        super().__init__()
        self.unet, self.scheduler = unet, scheduler

    @torch.no_grad()
    def sample(self, n: int, cond: Tensor | None = None, generator: torch.Generator | None = None,
               steps: int = 250) -> Tensor:
        cfg = self.unet.config
        device = next(self.unet.parameters()).device
        x = torch.randn(n, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=generator).to(device)
        self.scheduler.set_timesteps(steps)
        y = cond.to(device) if cond is not None else None
        for t in self.scheduler.timesteps:
            eps = self.unet(x, t, class_labels=y).sample
            x = self.scheduler.step(eps, t, x, generator=generator).prev_sample
        return x.clamp(-1, 1).cpu()


def train_diffusers(row: Row, settings: Settings, run_dir: Path, device: str) -> dict[str, Any]:
    """diffusers' train_unconditional loop (eps MSE on DDPMScheduler.add_noise, AdamW, cosine with warmup,
    EMAModel with warmup) on genlab's MNIST batches for the budget; the EMA weights are saved with save_pretrained."""
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    from genlab.data import load_dataset

    h = DIFFUSERS_DEFAULTS | settings.extra.get("diffusers", {})
    t0 = time.monotonic()
    torch.manual_seed(row.seed)
    data = load_dataset(row.data)
    num_classes = 0 if row.stacked else data.info.num_classes
    unet = make_diffusers_unet(h, data.info.channels, num_classes).to(device)
    noise_scheduler = DDPMScheduler(num_train_timesteps=h["ddpm_num_steps"], beta_schedule=h["ddpm_beta_schedule"])
    opt = torch.optim.AdamW(unet.parameters(), lr=h["lr"], betas=(h["adam_beta1"], h["adam_beta2"]),
                            weight_decay=h["adam_weight_decay"], eps=h["adam_epsilon"])
    g = torch.Generator().manual_seed(row.seed)
    order: list[Tensor] = []

    def step() -> float:
        nonlocal order
        if not order:
            order = list(torch.randperm(len(data), generator=g).split(h["batch_size"]))[:-1] or [
                torch.arange(len(data))]
        batch = data.get_batch(order.pop(0))
        x = batch["x"].to(device)
        noise = torch.randn_like(x)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(x),), device=device)
        eps = unet(noise_scheduler.add_noise(x, noise, t), t,
                   class_labels=batch["label"].to(device) if num_classes else None).sample
        loss = nn.functional.mse_loss(eps.float(), noise.float())
        loss.backward()
        nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    # probe: FLOPs of one step and its time (on a copy, so the run starts from the same weights)
    state = copy.deepcopy(unet.state_dict())
    build_s = time.monotonic() - t0
    flops = count_flops(step)
    t1 = time.monotonic()
    step()
    step()
    step_s = (time.monotonic() - t1) / 2
    unet.load_state_dict(state)
    opt = torch.optim.AdamW(unet.parameters(), lr=h["lr"], betas=(h["adam_beta1"], h["adam_beta2"]),
                            weight_decay=h["adam_weight_decay"], eps=h["adam_epsilon"])
    g.manual_seed(row.seed)
    order = []
    steps = fitted_steps(60 * settings.minutes, build_s, step_s)
    lr_scheduler = get_scheduler("cosine", optimizer=opt, num_warmup_steps=min(h["lr_warmup_steps"], steps // 4),
                                 num_training_steps=steps)
    ema = EMAModel(unet.parameters(), decay=h["ema_max_decay"], use_ema_warmup=True, inv_gamma=h["ema_inv_gamma"],
                   power=h["ema_power"])
    t_start = time.monotonic()
    done, loss = 0, math.nan
    t0 = time.monotonic() - build_s  # the budget counts the build once, not the probe (as for genlab rows)
    while done < steps and time.monotonic() - t0 < 60 * settings.minutes:
        loss = step()
        lr_scheduler.step()
        ema.step(unet.parameters())
        done += 1
    diverged = done > 0 and not math.isfinite(loss)
    ema.copy_to(unet.parameters())
    unet.save_pretrained(run_dir / "unet")
    noise_scheduler.save_pretrained(run_dir / "scheduler")
    return {"params": sum(p.numel() for p in unet.parameters()), "flops_per_step": flops,
            "probe_step_s": round(step_s, 4), "planned_steps": steps, "batch_size": h["batch_size"],
            "steps": done, "train_seconds": round(time.monotonic() - t_start, 1), "diverged": diverged,
            "images_seen": done * h["batch_size"], "train_flops": flops * done,
            "last_train_metrics": {"loss": loss}}


def load_diffusers(run_dir: Path, device: str) -> DiffusersDDPM:
    from diffusers import DDPMScheduler, UNet2DModel

    unet = UNet2DModel.from_pretrained(run_dir / "unet").to(device).eval()
    return DiffusersDDPM(unet, DDPMScheduler.from_pretrained(run_dir / "scheduler"))


# -- measuring --------------------------------------------------------------------------------------------------
class Measure:
    """The feature network, the real test features and the train/test features for memorization, made once."""

    def __init__(self, fnet: FeatureNetwork | None = None) -> None:
        self.fnet = fnet or get_feature_network("mnist")
        self.ref = reference_features(self.fnet, "mnist", "test")
        self.train_features = self.fnet.embed(all_images(load_images("mnist", "train")))[0]
        self.test_images = all_images(load_images("mnist", "test"))

    def describe(self) -> dict[str, Any]:
        return {"features": self.fnet.describe(), "reference": self.ref.describe()}

    def images(self, images: Tensor, labels: Tensor | None) -> dict[str, Any]:
        feats, _ = self.fnet.embed(images)
        out = metrics_from_features(self.ref, feats, None, ("fid", "kid", "prc"),
                                    kid_subset_size=min(len(feats), self.ref.n, 1000))
        out = {k: v for k, v in out.items() if k not in ("features", "reference")}
        classes = self.fnet.net.logits_from_features(feats).argmax(-1)
        out |= diversity.class_shares(classes, 10)
        if labels is not None:
            out["asked"] = float((classes == labels.cpu()).double().mean())
        out |= diversity.memorization_rate(feats, self.train_features, self.ref.features)
        return out

    def stacked(self, images: Tensor) -> dict[str, Any]:
        return diversity.stacked_mnist_modes(images, self.fnet.classify)


def sample_row(model: Any, row: Row, n: int, batch: int, labels: Tensor | None, opts: dict[str, Any],
               per_item_seeds: bool) -> tuple[Tensor, float, int]:
    """`n` images, the sampling ms per image and the network evaluations per sample."""
    calls = [0]

    def counted(count: int, **kw: Any) -> Tensor:
        calls[0] += 1
        return model.sample(count, **kw)

    with count_calls(model) as nfe_calls:
        t0 = time.perf_counter()
        images = sample_images(counted, n, 0, batch_size=batch, cond=labels, per_item_seeds=per_item_seeds, **opts)
        seconds = time.perf_counter() - t0
    # a family that samples without calling a submodule's forward (a flow runs its layers' inverse) is one pass
    return images, 1000 * seconds / n, max(1, round(nfe_calls[0] / max(1, calls[0])))


def tune_row(model: Any, row: Row, run_dir: Path, settings: Settings, measure: Measure) -> dict[str, Any]:
    """The family's sampling choices (`tune_sampling`) with the recipe's sampling keys, scored against the training
    split in the table's feature network (the test split is never read); cached in the run folder per settings and
    family source, so rows that share a training run choose once."""
    spec = sampling_spec(row, settings)
    if not spec:
        return {}
    from genlab.eval.tuning import validation_fid

    cfg = row_config(row, settings, "run")
    path = run_dir / f"tuning-{_hash([spec, measure.fnet.hash, measure.fnet.weights_digest])}.json"
    if path.is_file():
        done = json.loads(path.read_text())
        for k, v in done["config"].items():
            setattr(model.config, k, tuple(v) if isinstance(v, list) else v)
        return done["tuning"]
    for k in model.sampling_keys:
        if k in cfg.model:
            setattr(model.config, k, cfg.model[k])
    t0 = time.monotonic()
    chosen = model.tune_sampling(lambda: validation_fid(cfg.data, measure.fnet), print)
    tuning = {**chosen, "seconds": round(time.monotonic() - t0, 1)}
    config = {k: getattr(model.config, k) for k in model.sampling_keys}
    write_atomic(path, json.dumps({"config": config, "tuning": tuning}, indent=2))
    return tuning


def measure_row(row: Row, run_dir: Path, settings: Settings, measure: Measure, device: str) -> dict[str, Any]:
    """Sample and score one trained row (after the family's sampling choices, where it makes any)."""
    n = settings.stacked_n if row.stacked else settings.n
    tuning: dict[str, Any] = {}
    if row.kind == "diffusers":
        model: Any = load_diffusers(run_dir, device)
        conditional = model.unet.config.num_class_embeds is not None
        labels = class_labels(n, None, 10) if conditional else None
        opts: dict[str, Any] = {"steps": row.steps or 250}
        per_item, likelihood, sampling = False, Likelihood.NONE, {"sampler": "ddpm (DDPMScheduler)", **opts}
    else:
        model = GenerativeModel.from_pretrained(run_dir / "model", map_location=device).to(device).eval()
        tuning = tune_row(model, row, run_dir, settings, measure)
        labels = model.labels_for(n)
        opts = family_sample_options(model, row.sampler, row.steps, row.guidance)
        per_item, likelihood = model.per_item_seeds, model.likelihood
        sampling = {k: (v.scale if k == "guidance" else v) for k, v in opts.items()}
    images, ms, nfe = sample_row(model, row, n, settings.batch, labels, opts, per_item)
    out: dict[str, Any] = {"n": n, "ms_per_image": ms, "nfe": nfe, "sampling": sampling,
                           "conditional": labels is not None, "likelihood": likelihood.value}
    if tuning:
        out["tuning"] = tuning
    bad = int((~torch.isfinite(images.flatten(1))).any(1).sum())
    if bad:  # a sample that is not a number cannot be scored: the row says how many, and keeps its likelihood
        out["nonfinite_samples"] = bad
    else:
        out |= measure.stacked(images) if row.stacked else measure.images(images, labels)
    if likelihood is not Likelihood.NONE and not row.stacked:
        from genlab.eval.likelihood import nll_bits_per_dim

        x = measure.test_images[: settings.nll_n].to(device)
        bpd = nll_bits_per_dim(model, x, generator=torch.Generator().manual_seed(0))
        out |= {"bits_per_dim": float(bpd.mean()), "nll_n": len(bpd)}
        if len(bpd) > 1:  # one image (--nll-n 1) has no standard error
            out["bits_per_dim_se"] = float(bpd.std() / len(bpd) ** 0.5)
    return out


# -- the table --------------------------------------------------------------------------------------------------
def recipe_exists(row: Row) -> bool:
    if row.kind == "diffusers":
        return True
    try:
        resolve_recipe(row.recipe)
        return True
    except GenlabError:
        return False


def _run_dir(out: Path, row: Row, tkey: str) -> Path:
    return out / "train" / f"{row.recipe or row.kind}-{row.data}-s{row.seed}-{tkey[:8]}"


def _stages(row: Row, settings: Settings, out: Path) -> list[tuple[Row, Settings, str, dict[str, Any]]]:
    """The training runs a row needs, in order, with their settings and keys: one, or for a two-stage family a
    tokenizer then the model over its codes (`model.tokenizer` = the first run's folder), each with half the
    budget; or for a distilled family its teacher then the row (`model.teacher` = the teacher's model folder), each
    with the whole budget."""
    if row.teacher:
        teacher = Row(f"{row.name}-teacher", row.teacher, data=row.data, seed=row.seed)
        kt, spec_t = train_key(teacher, settings)
        student = Row(**{**asdict(row), "teacher": "", "overrides": (
            *row.overrides, f"model.teacher={(_run_dir(out, teacher, kt) / 'model').resolve()}")})
        return [(teacher, settings, kt, spec_t), (student, settings, *train_key(student, settings))]
    if not row.tokenizer:
        return [(row, settings, *train_key(row, settings))]
    half = Settings(**{**asdict(settings), "minutes": settings.minutes / 2})
    first = Row(f"{row.name}-tokenizer", row.tokenizer, row.tokenizer_overrides, data=row.data, seed=row.seed)
    k1, spec1 = train_key(first, half)
    second = Row(**{**asdict(first), "name": row.name, "recipe": row.recipe, "tokenizer": "",
                    "overrides": (*row.overrides, f"model.tokenizer={_run_dir(out, first, k1).resolve()}")})
    return [(first, half, k1, spec1), (second, half, *train_key(second, half))]


def _ensure_trained(row: Row, settings: Settings, tkey: str, out: Path, device: str,
                    log: Callable[[str], None]) -> tuple[Path, dict[str, Any], bool]:
    """The run folder of a row's training (trained now unless a run with the same key finished before), its
    record, and whether it was trained now."""
    run_dir = _run_dir(out, row, tkey)
    done_path = run_dir / "done.json"
    done = json.loads(done_path.read_text()) if done_path.is_file() else None
    if done and done.get("train_key") == tkey:
        return run_dir, done, False
    log(f"[families] training {row.name} for {settings.minutes:g} min -> {run_dir}")
    run_dir.mkdir(parents=True, exist_ok=True)
    info = train_diffusers(row, settings, run_dir, device) if row.kind == "diffusers" \
        else train_genlab(row, settings, run_dir)
    done = {"train_key": tkey, **info}
    write_atomic(done_path, json.dumps(done, indent=2))
    return run_dir, done, True


def _combine(stages: list[dict[str, Any]], distilled: bool = False) -> dict[str, Any]:
    """One training record from a tokenizer's and a prior's: FLOPs, images, steps and seconds add up; a distilled
    row's is its own, with its teacher's under "teacher"."""
    if len(stages) == 1:
        return stages[0]
    first, last = stages
    if distilled:
        return {**last, "teacher": first, "diverged": any(s.get("diverged") for s in stages)}
    out = {**last, "stages": stages, "diverged": any(s.get("diverged") for s in stages)}
    for k in ("train_flops", "images_seen", "train_seconds"):
        out[k] = sum(s.get(k) or 0 for s in stages)
    out["steps"] = "+".join(str(s.get("steps")) for s in stages)
    out["codebook_usage"] = first.get("codebook_usage")
    return out


def _row_spec(row: Row) -> dict[str, Any]:
    """The row's fields for its key (the two-stage fields only where set, so other rows keep their keys)."""
    return {k: v for k, v in asdict(row).items() if v or k not in ("tokenizer", "tokenizer_overrides", "teacher")}


def run_rows(rows: list[Row], settings: Settings, out: Path, device: str = "cpu",
             measure: Measure | None = None, log: Callable[[str], None] | None = None, keep_going: bool = False,
             cached_only: bool = False) -> dict[str, Any]:
    """Train (where needed) and measure each row; returns {"rows": {name: record}, "trained": [...],
    "measured": [...], "missing": [...], "failed": [...]}. A row whose key matches its stored record is neither
    trained nor measured again; runs shared by several rows train once."""
    (out / "rows").mkdir(parents=True, exist_ok=True)
    log = log or (lambda msg: print(msg, flush=True))  # flushed: a background run's log shows where it is
    measure_ = measure
    records: dict[str, Any] = {}
    trained, measured, missing, failed = [], [], [], []
    for row in rows:
        if not recipe_exists(row) or any(first and not recipe_exists(Row(row.name, first))
                                         for first in (row.tokenizer, row.teacher)):
            missing.append(row.name)
            continue
        stages = _stages(row, settings, out)
        m = measure_ or Measure()
        measure_ = m
        key_spec = {"train": [k for *_, k, _ in stages], "row": _row_spec(row), "eval": settings.eval_key(row),
                    "batch": settings.batch, "features": [m.fnet.hash, m.fnet.weights_digest]}
        sampling = sampling_spec(row, settings)
        key = _hash(key_spec | ({"sampling": sampling} if sampling else {}))
        path = out / "rows" / f"{row.name}.json"
        old = json.loads(path.read_text()) if path.is_file() else None
        if old and old.get("key") == key:
            records[row.name] = old
            continue
        if cached_only:
            missing.append(f"{row.name} (not measured with these settings)")
            continue
        try:
            dones = []
            for stage_row, stage_settings, tkey, _ in stages:
                run_dir, done, now = _ensure_trained(stage_row, stage_settings, tkey, out, device, log)
                dones.append({k: v for k, v in done.items() if k != "train_key"})
                if now and row.name not in trained:
                    trained.append(row.name)
            train = _combine(dones, distilled=bool(row.teacher))
            log(f"[families] measuring {row.name}")
            rec: dict[str, Any] = {"row": row.name, "key": key, "train_key": stages[-1][2],
                                   "code_version": stages[-1][3]["code"], "git": git_describe(), "spec": asdict(row),
                                   "minutes": settings.minutes, "train": train, **m.describe()}
            rec |= {"diverged": True} if train.get("diverged") else measure_row(row, run_dir, settings, m, device)
        except Exception as e:  # noqa: BLE001 - one failing row must not lose the table; it is reported, not kept
            if not keep_going:
                raise
            log(f"[families] row {row.name} failed: {type(e).__name__}: {e}")
            failed.append(f"{row.name}: {type(e).__name__}: {e}")
            continue
        write_atomic(path, json.dumps(rec, indent=2))
        records[row.name] = rec
        measured.append(row.name)
    return {"rows": records, "trained": trained, "measured": measured, "missing": missing, "failed": failed}


def _ratio_check(rows: dict[str, Any], role: str, ref_role: str, limit: float) -> tuple[str, str]:
    a = [r for r in rows.values() if role in r["spec"]["roles"] and "fid" in r]
    b = [r for r in rows.values() if ref_role in r["spec"]["roles"] and "fid" in r]
    if not a or not b:
        return "n/a", f"needs rows with roles {role} and {ref_role}"
    ref = b[0]["fid"]
    parts = [f"{r['row']} {r['fid']:.3g} = {r['fid'] / ref:.2f} x {b[0]['row']} ({ref:.3g})" for r in a]
    ok = all(r["fid"] <= limit * ref for r in a)
    return ("pass" if ok else "fail"), "; ".join(parts)


def _cost_check(rows: dict[str, Any], role: str, ref_role: str, limit: float) -> tuple[str, str]:
    """Training FLOPs of the rows with `role` (a distilled row's own, without its teacher's) against the `ref_role`
    row's; rows sharing one training run are counted once."""
    ref = [r for r in rows.values() if ref_role in r["spec"]["roles"] and r["train"].get("train_flops")]
    runs = {r["train_key"]: r for r in rows.values() if role in r["spec"]["roles"] and r["train"].get("train_flops")}
    if not ref or not runs:
        return "n/a", f"needs rows with roles {role} and {ref_role}"
    base = ref[0]["train"]["train_flops"]
    parts = [f"{r['spec']['recipe']} {_si(r['train']['train_flops'])} = {r['train']['train_flops'] / base:.2f} x "
             f"{ref[0]['spec']['recipe']} ({_si(base)})" for r in runs.values()]
    ok = all(r["train"]["train_flops"] <= limit * base for r in runs.values())
    return ("pass" if ok else "fail"), "; ".join(parts)


def acceptance(rows: dict[str, Any]) -> list[dict[str, str]]:
    """The issue's acceptance checks on the measured rows: pass, fail, or n/a when a row is missing."""
    checks = []

    def add(name: str, result: tuple[str, str]) -> None:
        checks.append({"check": name, "result": result[0], "detail": result[1]})

    add("flow matching (Euler 50) FID <= 1.1 r0", _ratio_check(rows, "fm50", "r0", 1.1))
    add("relativistic GAN + R1 + R2 FID <= 2 r0", _ratio_check(rows, "gan", "r0", 2.0))
    stacked = [r for r in rows.values() if "gan_stacked" in r["spec"]["roles"]]
    if stacked:
        ok = [r for r in stacked if not r.get("diverged") and "modes" in r]
        detail = "; ".join(f"{r['row']}: " + (f"{r['modes']}/1000 modes, KL {r['modes_kl']:.3f}" if "modes" in r
                                              else "diverged") for r in stacked)
        full = len(stacked) >= 3 and len(ok) == len(stacked) and all(
            r["modes"] == 1000 and r["modes_kl"] <= 0.1 for r in ok)
        add("GAN on Stacked-MNIST: 1000/1000 modes, KL <= 0.1, 3 seeds, none diverging",
            ("pass" if full else "fail", detail + ("" if len(stacked) >= 3 else f" (only {len(stacked)} of 3 seeds)")))
    else:
        add("GAN on Stacked-MNIST: 1000/1000 modes, KL <= 0.1, 3 seeds, none diverging", ("n/a", "no stacked rows"))
    dc = [r for r in rows.values() if "dcgan_stacked" in r["spec"]["roles"] and "modes" in r]
    add("DCGAN baseline mode count (beside)", ("info", "; ".join(f"{r['row']}: {r['modes']}/1000, KL "
                                                                 f"{r['modes_kl']:.3f}" for r in dc) or "not run"))
    add("VAE FID <= 5 r0", _ratio_check(rows, "vae", "r0", 5.0))
    for k, limit in ((1, 2.5), (2, 1.5), (4, 1.3)):
        add(f"few steps: {k} step{'s' if k > 1 else ''} FID <= {limit} r0 (the EDM teacher's DDPM-250, same run)",
            _ratio_check(rows, f"fewstep{k}", "r0_teacher", limit))
    add("few steps: training FLOPs <= 1.5 x the EDM teacher's", _cost_check(rows, "fewstep_cost", "r0_teacher", 1.5))
    flows = [r for r in rows.values() if "flow" in r["spec"]["roles"] and "bits_per_dim" in r]
    add("flows <= 1.20 test bits/dim", (("pass" if all(r["bits_per_dim"] <= 1.20 for r in flows) else "fail")
                                        if flows else "n/a",
                                        "; ".join(f"{r['row']} {r['bits_per_dim']:.3f}" for r in flows) or "no rows"))
    with_bpd = [r for r in rows.values() if "bits_per_dim" in r]
    ar = [r for r in with_bpd if "ar" in r["spec"]["roles"]]
    if ar:
        best = min(with_bpd, key=lambda r: r["bits_per_dim"])
        add("autoregressive model: the lowest bits/dim", ("pass" if "ar" in best["spec"]["roles"] else "fail",
                                                          f"lowest: {best['row']} {best['bits_per_dim']:.3f}"))
    else:
        add("autoregressive model: the lowest bits/dim", ("n/a", "no autoregressive row measured"))
    vq = [r for r in rows.values() if "vq" in r["spec"]["roles"]]
    usage = [(r["row"], r["train"].get("codebook_usage")) for r in vq]
    if usage and all(u is not None for _, u in usage):
        add("VQ codebook usage >= 90%", ("pass" if all(u >= 0.9 for _, u in usage) else "fail",
                                         "; ".join(f"{n} {u:.1%}" for n, u in usage)))
    else:
        add("VQ codebook usage >= 90%", ("n/a", "no VQ row with a logged codebook usage"))
    gd = [r for r in rows.values() if "genlab_diffusion" in r["spec"]["roles"] and "fid" in r]
    df = [r for r in rows.values() if "diffusers" in r["spec"]["roles"] and "fid" in r]
    if gd and df:
        best = min(gd, key=lambda r: r["fid"])
        ok = best["fid"] <= 0.5 * df[0]["fid"]
        add("genlab diffusion FID <= 0.5 x diffusers row",
            ("pass" if ok else "fail", f"{best['row']} {best['fid']:.3g} vs {df[0]['row']} {df[0]['fid']:.3g} "
                                       f"({best['fid'] / df[0]['fid']:.2f} x)"))
    else:
        add("genlab diffusion FID <= 0.5 x diffusers row",
            ("n/a", "needs a genlab diffusion row and the diffusers row"))
    return checks


def _f(v: Any, fmt: str = ".3g") -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else format(v, fmt)
    return str(v)


def _si(v: float | None) -> str:
    if v is None:
        return "–"
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= scale:
            return f"{v / scale:.3g}{unit}"
    return f"{v:.3g}"


def _quality(r: dict[str, Any]) -> str:
    """The FID cell: the FID, or why there is none."""
    if r.get("diverged"):
        return "diverged"
    if r.get("nonfinite_samples"):
        return f"non-finite samples ({r['nonfinite_samples']}/{r['n']})"
    return _f(r.get("fid"))


def write_table(result: dict[str, Any], rows: list[Row], out: Path, note: str = "") -> dict[str, Path]:
    """families.md (tables + acceptance), families.png (FID vs ms per image) and families.json."""
    recs = result["rows"]
    checks = acceptance(recs)
    any_rec = next(iter(recs.values()), {})
    feats = any_rec.get("features", {})
    lines = ["# The family table", ""]
    if note:
        lines += [note, ""]
    lines += [f"Budget: {any_rec.get('minutes', '?')} min of training a row. Features: `{feats.get('name')}` (hash "
              f"`{feats.get('hash')}`, weights `{feats.get('weights')}`); reference: MNIST test split "
              f"(n = {any_rec.get('reference', {}).get('n')}). Memorization is measured in the same feature space.",
              "", "| row | params | train FLOPs | images seen | NFE | ms/img | FID | KID ± SE | prec | rec | dens "
              "| cov | class KL | asked | memo | bits/dim |", "|" + "---|" * 16]
    for row in rows:
        r = recs.get(row.name)
        if r is None or row.stacked:
            continue
        t = r["train"]
        bpd = f"{r['bits_per_dim']:.3f} ({r['likelihood']})" if "bits_per_dim" in r else "none"
        kid = f"{r['kid']:.3g} ± {r['kid_se']:.2g}" if "kid" in r else "–"
        lines.append(f"| {row.name} | {_si(t.get('params'))} | {_si(t.get('train_flops'))} | {t.get('images_seen')} | "
                     f"{r.get('nfe', '–')} | {_f(r.get('ms_per_image'))} | "
                     f"{_quality(r)} | {kid} | "
                     f"{_f(r.get('precision'), '.2f')} | {_f(r.get('recall'), '.2f')} | "
                     f"{_f(r.get('density'), '.2f')} | "
                     f"{_f(r.get('coverage'), '.2f')} | {_f(r.get('class_kl'))} | "
                     f"{_f(r.get('asked'), '.1%') if 'asked' in r else '–'} | {_f(r.get('memorization'), '.1%')} | "
                     f"{bpd} |")
    lines += ["", "Share of each digit (the feature network's classifier):", "",
              "| row | " + " | ".join(str(d) for d in range(10)) + " |", "|" + "---|" * 11]
    for row in rows:
        r = recs.get(row.name)
        if r and "class_shares" in r:
            lines.append(f"| {row.name} | " + " | ".join(f"{s:.1%}" for s in r["class_shares"]) + " |")
    stacked = [(row, recs[row.name]) for row in rows if row.stacked and row.name in recs]
    if stacked:
        lines += ["", "Stacked-MNIST (unconditional, each channel classified by the MNIST classifier):", "",
                  "| row | params | images seen | ms/img | modes of 1000 | KL to uniform | n |", "|" + "---|" * 7]
        for row, r in stacked:
            modes = _quality(r) if r.get("diverged") or r.get("nonfinite_samples") else r.get("modes", "–")
            lines.append(f"| {row.name} | {_si(r['train'].get('params'))} | {r['train'].get('images_seen')} | "
                         f"{_f(r.get('ms_per_image'))} | {modes} | {_f(r.get('modes_kl'))} | {r.get('modes_n', '–')} |")
    lines += ["", "Training (wall seconds, with the trainer's final preview and validation after the budget): "
              + "; ".join(f"{name} {r['train'].get('steps')} steps in "
                                           f"{r['train'].get('train_seconds')} s" for name, r in recs.items())]
    if result.get("failed"):
        lines += ["", "Failed rows (this run): " + "; ".join(result["failed"])]
    if result.get("missing"):
        lines += ["", "Missing rows (recipe not in configs/ yet, or not run): " + ", ".join(result["missing"])]
    lines += ["", "## Acceptance", "", "| check | result | detail |", "|---|---|---|"]
    lines += [f"| {c['check']} | {c['result']} | {c['detail']} |" for c in checks]
    paths = {"md": out / "families.md", "json": out / "families.json", "png": out / "families.png"}
    write_atomic(paths["md"], "\n".join(lines) + "\n")
    summary = {"benchmark": "families", "minutes": any_rec.get("minutes"),
               "n": max((r["n"] for r in recs.values() if "n" in r and "fid" in r), default=None),
               "rows": {k: {m: v.get(m) for m in ("fid", "kid", "kid_se", "ms_per_image", "nfe", "bits_per_dim",
                                                   "modes", "modes_kl", "memorization", "asked", "diverged")
                            if v.get(m) is not None} for k, v in recs.items()},
               "acceptance": {c["check"]: c["result"] for c in checks}, "missing": result.get("missing", []),
               "trained": result.get("trained", []), "measured": result.get("measured", [])}
    write_atomic(paths["json"], json.dumps(summary) + "\n")
    plot_quality_cost(recs, paths["png"])
    return paths | {"summary": summary}


def plot_quality_cost(recs: dict[str, Any], out: Path) -> Path | None:
    """FID against sampling ms per image (log x), one labelled point per row (genlab.plots' Agg canvas)."""
    from genlab.plots import _figure, _save

    pts = [(r["ms_per_image"], r["fid"], name) for name, r in recs.items()
           if "fid" in r and "ms_per_image" in r and math.isfinite(r["fid"])]
    if not pts:
        return None
    fig = _figure((6.5, 4.5))
    ax = fig.add_subplot()
    for ms, fid, name in pts:
        ax.scatter([ms], [fid], s=25)
        ax.annotate(name, (ms, fid), textcoords="offset points", xytext=(4, 3), fontsize=7)
    ax.set_xscale("log")
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    if all(f > 0 for _, f, _ in pts):
        ax.set_yscale("log")
        # FIDs often span less than a decade: label 1, 1.5, 2, 3, 5 and 7 of each, in plain numbers
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 1.5, 2.0, 3.0, 5.0, 7.0)))
        ax.yaxis.set_major_formatter(ScalarFormatter())
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_minor_formatter(NullFormatter())  # minor labels of a log axis overlap
    ax.set(xlabel="sampling ms per image (log)", ylabel="FID (genlab MNIST features)",
           title="quality against sampling cost")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    return _save(fig, out)


def select_rows(spec: str | None) -> list[Row]:
    if not spec:
        return list(ROWS)
    names = [s.strip() for s in spec.split(",") if s.strip()]
    known = {r.name: r for r in ROWS}
    bad = [n for n in names if n not in known]
    if bad:
        raise GenlabError(f"unknown row {bad[0]!r}; choose from: {', '.join(known)}")
    return [known[n] for n in names]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    gpu = torch.cuda.is_available()
    p.add_argument("--minutes", type=float, default=None, help="training minutes a row (default 10 on CPU, "
                   "30 with a GPU; --smoke 0.1)")
    p.add_argument("--n", type=int, default=None, help="samples a row (default 1000, 5000 with a GPU)")
    p.add_argument("--stacked-n", type=int, default=None, help="samples a Stacked-MNIST row (default 10000)")
    p.add_argument("--nll-n", type=int, default=None, help="test images for bits/dim (default 256)")
    p.add_argument("--batch", type=int, default=250, help="images per sampling batch")
    p.add_argument("--rows", default=None, help="comma list of rows (default: all)")
    p.add_argument("--out", default="runs/families", help="output folder")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--note", default="", help="a line for families.md (e.g. the machine state)")
    p.add_argument("--smoke", action="store_true", help="a few seconds a row and tiny samples")
    p.add_argument("--table-only", action="store_true", help="write the table from the stored rows that match "
                   "these settings; train and measure nothing")
    args = p.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(check_int("--threads", args.threads, 1, 1024))
    s = Settings(minutes=args.minutes if args.minutes is not None else (0.1 if args.smoke else 30.0 if gpu else 10.0),
                 n=args.n if args.n is not None else (64 if args.smoke else 5000 if gpu else 1000),
                 stacked_n=args.stacked_n if args.stacked_n is not None else (200 if args.smoke else 10000),
                 nll_n=args.nll_n if args.nll_n is not None else (16 if args.smoke else 256), batch=args.batch)
    check_number("--minutes", s.minutes, 0.001, 24 * 60)
    check_int("--n", s.n, 10, 50_000)
    check_int("--stacked-n", s.stacked_n, 10, 100_000)
    check_int("--nll-n", s.nll_n, 1, 2000)
    check_int("--batch", s.batch, 1, 10_000)
    rows = select_rows(args.rows)
    out = check_output_path(args.out, "--out", folder=True)
    measure = Measure()
    result: dict[str, Any] = {"rows": {}, "trained": [], "measured": [], "missing": [], "failed": []}
    for row in rows:  # the table is rewritten after every row, so a run stopped early still leaves one
        part = run_rows([row], s, out, device="cuda" if gpu else "cpu", measure=measure, keep_going=True,
                        cached_only=args.table_only)
        result["rows"] |= part["rows"]
        for k in ("trained", "measured", "missing", "failed"):
            result[k] += part[k]
        paths = write_table(result, rows, out, note=args.note)
    print(f"wrote {paths['md']}, {paths['png']} and {paths['json']}")
    print(json.dumps(paths["summary"]))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except GenlabError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
