"""The family-agnostic trainer: any GenerativeModel, one recipe, one process or many (accelerate).

The trainer only speaks the GenerativeModel hooks (`build`, `prepare_data`, `configure_optimizers`,
`training_losses`, `validation_metrics`, `write_preview`, `save_pretrained`); it never looks at the family.
A family whose update is not "one optimizer on `loss`" (a GAN) defines

    train_step(batch, optimizers, accelerator, objective) -> dict[str, Tensor]

where `objective(batch, **kw)` runs `training_losses(batch, **kw)` under autocast and, with several
processes, through DistributedDataParallel (so gradients are averaged across processes); the step does
its own backward passes and optimizer steps and returns scalars to log (with a "loss" entry).

A family whose loss is a mean over a varying number of tokens (masked fine-tuning data) defines

    loss_tokens(batch) -> Tensor

(how many tokens `training_losses(batch)` averages over); each micro-batch's loss then counts by its share of
the step's tokens on all processes, so the step's gradient is that of the mean over all its tokens.

`train.batch_size` is the global batch of one optimizer step: it is split over the processes and then
into `grad_accum` micro-batches, so a recipe means the same optimization on any number of processes.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs, gather_object, set_seed
from torch import Tensor, nn
from tqdm.auto import tqdm

from genlab.config import (
    MAX_SAMPLES,
    MAX_SAMPLING_STEPS,
    RunConfig,
    check_int,
    check_number,
    check_seed,
    from_dict,
    to_dict,
)
from genlab.data import load_dataset
from genlab.errors import GenlabError
from genlab.files import read_jsonl, write_atomic
from genlab.models.base import Output
from genlab.plots import plot_eval_metrics, plot_losses
from genlab.registry import MODELS
from genlab.sampling.solvers import sampler_options
from genlab.train.checkpoint import (
    list_checkpoints,
    load_latest,
    prune,
    quarantine,
    remove_leftovers,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from genlab.train.ema import EMA
from genlab.train.lock import run_lock
from genlab.train.schedule import SCHEDULES, make_schedulers

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# config keys that may change when a run is resumed: they steer bookkeeping, not the optimization
RESUME_MAY_CHANGE = ("name", "out_dir", "train.max_minutes", "train.log_every", "train.sample_every",
                     "train.eval_every", "train.eval_n", "train.ckpt_every", "train.keep_last",
                     "train.dist_timeout_minutes", "sample.")
RUN_OUTPUTS = ("checkpoints", "samples", "model", "metrics.jsonl", "config.yaml")
# fp16: steps in a row the loss scaler may skip (halving its scale each time) before the run counts as diverged
MAX_SKIPPED_STEPS = 20


class DataOrder:
    """The order items are drawn in: epoch `e` is the permutation drawn from seed (seed, e) alone.

    The position is (epoch, index into that epoch's permutation), so a run resumes mid-epoch exactly.
    A step that runs past the end of an epoch continues into the next one.
    """

    def __init__(self, n: int, seed: int, epoch: int = 0, index: int = 0) -> None:
        self.n, self.seed, self.epoch, self.index = n, seed, epoch, index
        self._perm: np.ndarray | None = None
        self._perm_epoch = -1

    def permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def take(self, k: int) -> np.ndarray:
        """The next `k` item indices (the same on every process)."""
        out = []
        while k > 0:
            if self._perm_epoch != self.epoch:
                self._perm, self._perm_epoch = self.permutation(self.epoch), self.epoch
            chunk = self._perm[self.index : self.index + k]
            out.append(chunk)
            self.index += len(chunk)
            k -= len(chunk)
            if self.index == self.n:
                self.epoch, self.index = self.epoch + 1, 0
        return np.concatenate(out)


class _Objective(nn.Module):
    """`forward(batch, **kw) = model.training_losses(batch, **kw)`: the module accelerate wraps for DDP and autocast."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, Any], **kw: Any) -> dict[str, Tensor]:
        return self.model.training_losses(batch, **kw)


@contextmanager
def isolated_rng(device: torch.device | None = None) -> Iterator[None]:
    """Run a block (validation, previews) without disturbing the training random streams (on `device`'s GPU too)."""
    state = rng_state(device)
    try:
        yield
    finally:
        set_rng_state(state, device)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_difference(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, old, new) for every resolved-config key that differs and may not change on resume."""
    a, b = _flatten(old), _flatten(new)
    diffs = []
    for key in sorted(set(a) | set(b)):
        if key.startswith(RESUME_MAY_CHANGE) or a.get(key) == b.get(key):
            continue
        diffs.append((key, a.get(key, "<unset>"), b.get(key, "<unset>")))
    return diffs


def _check_train_config(t: Any) -> None:
    """Value checks the dataclass types cannot express; each error names the key."""
    positive = {"steps": t.steps, "batch_size": t.batch_size, "grad_accum": t.grad_accum, "keep_last": t.keep_last,
                "log_every": t.log_every}
    for key, v in positive.items():
        if v < 1:
            raise GenlabError(f"train.{key} must be at least 1, got {v}")
    for key in ("warmup_steps", "sample_every", "ckpt_every", "eval_every", "eval_n", "seed"):
        if getattr(t, key) < 0:
            raise GenlabError(f"train.{key} must be 0 or more, got {getattr(t, key)}")
    if not 0.0 <= t.ema_decay < 1.0:
        raise GenlabError(f"train.ema_decay must be in [0, 1), got {t.ema_decay}")
    if not 0.0 <= t.min_lr_ratio <= 1.0:
        raise GenlabError(f"train.min_lr_ratio must be in [0, 1], got {t.min_lr_ratio}")
    if t.lr_schedule not in SCHEDULES:
        raise GenlabError(f"train.lr_schedule {t.lr_schedule!r} is unknown; choose one of: {', '.join(SCHEDULES)}")
    if t.mixed_precision not in PRECISIONS:
        raise GenlabError(f"train.mixed_precision {t.mixed_precision!r} is unknown; choose one of: "
                          f"{', '.join(PRECISIONS)}")
    if t.max_minutes is not None and t.max_minutes <= 0:
        raise GenlabError(f"train.max_minutes must be positive, got {t.max_minutes}")
    if not 0 < t.dist_timeout_minutes <= 7 * 24 * 60:
        raise GenlabError(f"train.dist_timeout_minutes must be in (0, 10080] (a week), got {t.dist_timeout_minutes}")


def _check_recipe_values(cfg: RunConfig) -> None:
    """The optimizer, data and `sample.*` values, before any work: a bad sampler would otherwise fail only when the
    first preview is drawn (at the end of a run without sample_every), a bad learning rate inside PyTorch."""
    t, s = cfg.train, cfg.sample
    check_int("train.steps", t.steps, 1, 10**9, "at 1,000 steps a second that is 11 days")
    check_int("train.batch_size", t.batch_size, 1, 65_536, "every step holds the whole batch's indices and inputs")
    check_number("train.lr", t.lr, 0, low_open=True)
    check_number("train.weight_decay", t.weight_decay, 0, hint="0 = none")
    for beta in t.betas:
        check_number("train.betas", beta, 0, 1, high_open=True, hint="AdamW's two moment decays")
    check_number("train.grad_clip", t.grad_clip, 0, hint="0 = no clipping")
    if t.warmup_steps > t.steps:
        raise GenlabError(f"train.warmup_steps={t.warmup_steps} is more than train.steps={t.steps}: the learning rate "
                          "would never reach train.lr; lower warmup_steps")
    check_int("train.seed", t.seed, 0, 2**31 - 1, "NumPy's global seed is 32-bit and each process adds its offset")
    if t.eval_n and not t.eval_every:
        raise GenlabError(f"train.eval_n={t.eval_n} does nothing without train.eval_every; set train.eval_every=STEPS "
                          "(or leave eval_n at 0)")
    if cfg.data.max_items is not None:
        check_int("data.max_items", cfg.data.max_items, 1)
    check_int("sample.n", s.n, 1, MAX_SAMPLES)
    check_int("sample.steps", s.steps, 1, MAX_SAMPLING_STEPS)
    check_number("sample.cfg", s.cfg, 0, hint="1 = no guidance")
    check_number("sample.eta", s.eta, 0, 1)
    check_seed("sample.seed", s.seed)
    sampler_options(s.sampler, eta=s.eta)  # the sampler exists and takes eta where it is not 0


def nonfinite_stop(stats: dict[str, float], scaled: bool, skipped: int) -> tuple[str | None, int]:
    """The scalar ("loss" or "grad_norm") whose non-finite value stops the run, or None; and how many steps in a
    row have had one. Without a loss scaler the first such step stops it; fp16's scaler skips such a step and
    halves its scale, so only MAX_SKIPPED_STEPS in a row (which no scale made finite) do."""
    bad = [k for k in ("loss", "grad_norm") if k in stats and not math.isfinite(stats[k])]
    skipped = skipped + 1 if bad else 0
    stop = bool(bad) and (not scaled or skipped >= MAX_SKIPPED_STEPS)
    return (bad[0] if stop else None), skipped


def run_end(step: int, steps: int, done: int, seconds: float, time_left: float | None) -> tuple[int, float | None]:
    """The step a run will stop at and the seconds until then: `steps` at the rate so far (`done` steps in
    `seconds`), or, when `time_left` (of `train.max_minutes`) runs out first, the step it reaches by then.
    Without a rate yet, the time left (None without a limit)."""
    if time_left is not None:
        time_left = max(time_left, 0.0)
    if done <= 0 or seconds <= 0:
        return steps, time_left
    rate = done / seconds
    steps_eta = (steps - step) / rate
    if time_left is None or steps_eta <= time_left:
        return steps, steps_eta
    return min(steps, step + int(rate * time_left)), time_left


class Trainer:
    """Train `cfg.family` on `cfg.data` with AdamW, warmup + cosine LR, clipping, accumulation and EMA.

    Writes the run folder: config.yaml, metrics.jsonl, samples/, checkpoints/step_XXXXXXX/, and at the end
    the EMA weights as a model folder in model/. Resumes from the newest good checkpoint by default.
    Previews and validation run on the EMA weights with the training RNG streams saved and restored, so
    how often they run never changes the trained weights.
    """

    def __init__(self, cfg: RunConfig, run_dir: Path | None = None, resume: bool = True) -> None:
        t = cfg.train
        _check_train_config(t)
        _check_recipe_values(cfg)
        family = MODELS.get(cfg.family)
        model_cfg = from_dict(family.config_class, cfg.model, prefix="model.")
        self.cfg = cfg
        self.run_dir = Path(run_dir) if run_dir is not None else Path(cfg.out_dir) / cfg.name
        self.ckpt_root = self.run_dir / "checkpoints"
        self.samples_dir = self.run_dir / "samples"
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.t_start = time.monotonic()

        cuda = torch.cuda.is_available()
        precision = ("bf16" if cuda else "fp32") if t.mixed_precision == "auto" else t.mixed_precision
        if precision == "fp16" and not cuda:
            raise GenlabError("train.mixed_precision=fp16 needs a CUDA GPU; use bf16 or fp32 on CPU")
        # accelerate forms a (gloo) process group on CPU only when told cpu=True
        multi_cpu = not cuda and int(os.environ.get("WORLD_SIZE", "1")) > 1
        self.accelerator = acc = Accelerator(
            mixed_precision="no" if precision == "fp32" else precision, cpu=multi_cpu,
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True),
                             InitProcessGroupKwargs(timeout=timedelta(minutes=t.dist_timeout_minutes))],
        )
        self.world, self.rank = acc.num_processes, acc.process_index
        if t.batch_size % (self.world * t.grad_accum):
            raise GenlabError(f"train.batch_size={t.batch_size} must be divisible by grad_accum x processes "
                              f"= {t.grad_accum} x {self.world}")

        from genlab.models.lora import check_lora

        check_lora(cfg.adapt.lora, family, model_cfg)  # before the data and the model are loaded
        set_seed(t.seed)  # the same initial weights on every process
        dataset = load_dataset(cfg.data)
        self.model = family.build(model_cfg, dataset)
        self.adapter = None  # a peft model holding LoRA adapters on self.model (adapt.lora.rank > 0)
        if cfg.adapt.lora.rank:
            from genlab.models.lora import add_lora

            self.adapter = add_lora(self.model, cfg.adapt.lora)
        self.model.check_sample_config(cfg.sample)
        self.data = self.model.prepare_data(dataset)
        if len(self.data) == 0:
            raise GenlabError(f"dataset {cfg.data.name!r} has no training items")
        self.val_data = self._validation_data()
        self.evaluator = self._sample_evaluator()
        self.resolved = to_dict(cfg)
        self.resolved["model"] = to_dict(self.model.config)

        if t.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        optimizers = self.model.configure_optimizers(t)
        params = list(self.model.parameters())
        trainable, total = sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
        self.log(f"trainable parameters: {trainable:,} of {total:,}")
        step_fn = getattr(self.model, "train_step", None)
        if step_fn is None and len(optimizers) != 1:
            raise GenlabError(f"the {cfg.family} family has {len(optimizers)} optimizers but no train_step")
        self.step_fn: Callable[..., dict[str, Tensor]] = step_fn or self._train_step
        objective, *self.optimizers = acc.prepare(_Objective(self.model), *optimizers)
        self.objective = torch.compile(objective) if t.compile else objective
        self.schedulers = make_schedulers([o.optimizer for o in self.optimizers], t)
        self.ema = EMA(self.model, t.ema_decay, t.ema_warmup)
        self.step = 0
        self.elapsed_before = 0.0
        self.order = DataOrder(len(self.data), t.seed)
        self.interrupted = False
        self._stop_requested = False
        self._last_plot = time.monotonic()
        self._saved_step = -1

        if not self._start(resume):
            set_seed(t.seed + 1_000_003 * self.rank)  # distinct noise on each process from here on

    # -- setup --------------------------------------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def log(self, msg: str) -> None:
        if self.is_main:
            tqdm.write(msg)

    def _validation_data(self) -> Any:
        """The dataset's test split prepared like the training data, or None where there is none."""
        if self.cfg.data.split == "test" or Path(self.cfg.data.name).expanduser().is_dir():
            return None
        try:
            return self.model.prepare_data(load_dataset(self.cfg.data, split="test"))
        except GenlabError:
            return None

    def _sample_evaluator(self) -> Callable[[Any, int], dict[str, float]] | None:
        """KID/FID of `train.eval_n` samples against the test split, on fixed seeds (image families only). Every
        process draws its shard of the samples; rank 0 measures them."""
        t, s = self.cfg.train, self.cfg.sample
        if not (t.eval_n and t.eval_every and self.val_data is not None and self.model.output is Output.IMAGE):
            return None
        from genlab.eval.report import make_training_evaluator

        return make_training_evaluator(self.cfg.data, n=t.eval_n, sampler=s.sampler, steps=s.steps, guidance=s.cfg)

    def _lock(self) -> AbstractContextManager[None]:
        """The run folder's lock (main process): no second trainer may clear or write the folder meanwhile."""
        return run_lock(self.run_dir) if self.is_main else nullcontext()

    def _start(self, resume: bool) -> bool:
        """Resume from the newest good checkpoint (True), or start the run folder afresh (False)."""
        with self._lock():
            return self._start_locked(resume)

    def _start_locked(self, resume: bool) -> bool:
        found = resume and bool(list_checkpoints(self.ckpt_root))
        if found:
            path, weights, state, broken = load_latest(self.ckpt_root, log=self.log)
            old = json.loads(state["config"])
            diffs = config_difference(old, self.resolved)
            if diffs:
                key, a, b = diffs[0]
                raise GenlabError(f"the config differs from the run in {self.run_dir} at {key} ({a!r} -> {b!r}): "
                                  "use a new run name (--set name=...) or --no-resume")
            self._load_state(weights, state)
            saved_world = int(state.get("world_size", self.world))
            if saved_world != self.world:
                self.log(f"warning: {path.name} was saved by {saved_world} processes and resumes on {self.world}: "
                         "training goes on, but not bit for bit as it would have (each process draws its own "
                         "random numbers, and gradients add up in another order)")
            self.accelerator.wait_for_everyone()
            if self.is_main:
                for p in broken:
                    self.log(f"moved damaged checkpoint aside: {quarantine(p).name}")
                remove_leftovers(self.ckpt_root)
                self._truncate_metrics(self.step)
            self.log(f"resuming {self.run_dir} from {path.name} (step {self.step}/{self.cfg.train.steps})")
        elif self.is_main:
            for name in RUN_OUTPUTS if not resume else ("checkpoints", "metrics.jsonl"):
                p = self.run_dir / name
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_atomic(self.run_dir / "config.yaml", yaml.safe_dump(self.resolved, sort_keys=False))
        self.accelerator.wait_for_everyone()
        return found

    def _load_state(self, weights: dict[str, dict[str, Tensor]], state: dict[str, Any]) -> None:
        self.model.load_state_dict(weights["model"])
        self.ema.load_state_dict(weights["ema"])
        for opt, s in zip(self.optimizers, state["optimizers"], strict=True):
            opt.load_state_dict(s)
        for sched, s in zip(self.schedulers, state["schedulers"], strict=True):
            sched.load_state_dict(s)
        if self.accelerator.scaler is not None and "scaler" in state:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        self.step = self._saved_step = int(state["step"])
        self.elapsed_before = float(state["elapsed"])
        self.order = DataOrder(len(self.data), self.cfg.train.seed, int(state["epoch"]), int(state["index"]))
        rngs = state["rng"]
        if self.rank < len(rngs):
            set_rng_state(rngs[self.rank], self.accelerator.device)
        else:  # more processes than when saved: new ranks get fresh streams
            set_seed(self.cfg.train.seed + 1_000_003 * self.rank + self.step)

    def _truncate_metrics(self, step: int) -> None:
        """Drop log lines past `step` (written by a run killed after its last checkpoint), and any torn line."""
        if not self.metrics_path.exists():
            return
        keep = [rec for rec in read_jsonl(self.metrics_path) if rec.get("step", 0) <= step]
        write_atomic(self.metrics_path, "".join(json.dumps(rec) + "\n" for rec in keep))

    # -- one step -----------------------------------------------------------------------------------------------
    def _next_batch(self) -> dict[str, Any]:
        """This process's share of the next global batch: rows (micro-step, process) of the drawn indices."""
        t = self.cfg.train
        idx = self.order.take(t.batch_size).reshape(t.grad_accum, self.world, -1)[:, self.rank].reshape(-1)
        batch = self.data.get_batch(torch.from_numpy(idx))
        device = self.accelerator.device
        out = {}
        for k, v in batch.items():
            if isinstance(v, Tensor):
                v = v.to(device, non_blocking=True)
                if self.cfg.train.channels_last and v.ndim == 4 and v.is_floating_point():
                    v = v.contiguous(memory_format=torch.channels_last)
            out[k] = v
        return out

    def _train_step(self, batch: dict[str, Any], optimizers: list[Any], accelerator: Accelerator,
                    objective: Callable[..., dict[str, Tensor]]) -> dict[str, Tensor]:
        """One AdamW step on `batch` in `grad_accum` micro-batches; gradients are clipped by global norm."""
        t = self.cfg.train
        (opt,) = optimizers
        n = len(next(v for v in batch.values() if isinstance(v, Tensor | list)))
        micro = n // t.grad_accum
        micro_batches = [{key: v[k * micro : (k + 1) * micro] if isinstance(v, Tensor | list) else v
                          for key, v in batch.items()} for k in range(t.grad_accum)]
        weights = self._micro_batch_weights(micro_batches)
        totals: dict[str, Tensor] = {}
        for k, (mb, weight) in enumerate(zip(micro_batches, weights, strict=True)):
            last = k == t.grad_accum - 1
            with nullcontext() if last else accelerator.no_sync(objective):
                losses = objective(mb)
                accelerator.backward(losses["loss"] * weight)
            for key, v in losses.items():
                if isinstance(v, Tensor) and v.numel() == 1:
                    totals[key] = totals.get(key, 0.0) + v.detach().float() * weight
        max_norm = t.grad_clip if t.grad_clip > 0 else math.inf
        grad_norm = accelerator.clip_grad_norm_(self.model.parameters(), max_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if grad_norm is not None:
            totals["grad_norm"] = grad_norm.detach().float()
        return totals

    def _micro_batch_weights(self, micro_batches: list[dict[str, Any]]) -> list[float]:
        """What each micro-batch's mean loss is multiplied by: 1 / grad_accum, or with `loss_tokens`,
        world x (its tokens) / (the step's tokens on all processes). Processes average their gradients, so
        either way the step's gradient is that of the mean loss over the whole global batch."""
        count = getattr(self.model, "loss_tokens", None)
        if count is None:
            return [1.0 / len(micro_batches)] * len(micro_batches)
        tokens = torch.stack([torch.as_tensor(count(mb), dtype=torch.float32, device=self.accelerator.device)
                              for mb in micro_batches])
        total = tokens.sum()
        if self.world > 1:
            total = self.accelerator.reduce(total, reduction="sum")
        return (tokens * self.world / total.clamp(min=1)).tolist()

    def _reduce(self, out: dict[str, Tensor], flags: list[bool]) -> tuple[dict[str, float], list[bool]]:
        """Average the step's scalars over processes and OR their `flags`, in one all-reduce."""
        keys = sorted(k for k, v in out.items() if isinstance(v, Tensor | float) and torch.as_tensor(v).numel() == 1)
        device = self.accelerator.device
        vals = torch.stack([torch.as_tensor(out[k], dtype=torch.float32, device=device).reshape(()) for k in keys]
                           + [torch.tensor(f, dtype=torch.float32, device=device) for f in flags])
        if self.world > 1:
            vals = self.accelerator.reduce(vals, reduction="sum")
        v = vals.tolist()
        stats = {k: x / self.world for k, x in zip(keys, v[: len(keys)])}
        return stats, [x > 0 for x in v[len(keys) :]]

    # -- the loop -----------------------------------------------------------------------------------------------
    def fit(self) -> Path:
        """Train to `train.steps` (or until Ctrl-C / `max_minutes`), checkpoint, and export the EMA model; with
        several processes, end their process group."""
        with self._lock():
            return self._fit_locked()

    def _fit_locked(self) -> Path:
        t = self.cfg.train
        pbar = tqdm(total=t.steps, initial=self.step, unit="step", dynamic_ncols=True, disable=not self.is_main,
                    desc=self.cfg.name)
        window: dict[str, float] = {}
        window_n, window_t = 0, time.monotonic()
        first_step, loop_start = self.step, window_t
        old_handlers = self._install_signal_handlers()
        interrupted = time_up = False
        skipped = 0  # steps in a row with a non-finite loss or gradient
        try:
            while self.step < t.steps and not (interrupted or time_up):
                lr = self.schedulers[0].get_last_lr()[0]
                out = self.step_fn(self._next_batch(), self.optimizers, self.accelerator, self.objective)
                if "loss" not in out:
                    raise GenlabError(f"the {self.cfg.family} train step returned no 'loss'")
                out_of_time = t.max_minutes is not None and time.monotonic() - self.t_start > 60 * t.max_minutes
                stats, (interrupted, time_up) = self._reduce(out, [self._stop_requested, out_of_time])
                bad, skipped = nonfinite_stop(stats, self.accelerator.scaler is not None, skipped)
                if bad:
                    raise GenlabError(self._nonfinite_message(bad, stats[bad], skipped))
                for sched in self.schedulers:
                    sched.step()
                self.ema.update(self.step)
                self.step += 1
                for k, v in stats.items():
                    window[k] = window.get(k, 0.0) + v
                window_n += 1
                self._time_limited_bar(pbar, self.step - first_step, time.monotonic() - loop_start)
                pbar.update(1)
                pbar.set_postfix(loss=f"{stats['loss']:.4g}", lr=f"{lr:.2e}", refresh=False)
                if self.step % t.log_every == 0 or self.step == t.steps or interrupted or time_up:
                    now = time.monotonic()
                    rec = {k: v / window_n for k, v in window.items()}
                    self._write_metrics({"split": "train", **rec, "lr": lr, "steps_per_s": window_n / (now - window_t),
                                         "epoch": self.order.epoch + self.order.index / self.order.n})
                    window, window_n, window_t = {}, 0, now
                if t.eval_every and self.step % t.eval_every == 0:
                    self._validate()
                if t.sample_every and self.step % t.sample_every == 0:
                    self._preview()
                if t.ckpt_every and self.step % t.ckpt_every == 0:
                    self.save()
        finally:
            pbar.close()
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)
        self.interrupted = interrupted and self.step < t.steps
        if self.step < t.steps:
            reason = "interrupted" if interrupted else f"time limit of {t.max_minutes} minutes reached"
            self.log(f"{reason} at step {self.step}/{t.steps}: saving a checkpoint; run the same command to resume")
        if self._saved_step != self.step:
            self.save()
        if not self.interrupted:  # a final preview and validation, unless they just ran
            if not (t.sample_every and self.step % t.sample_every == 0):
                self._preview()
            if not (t.eval_every and self.step % t.eval_every == 0):
                self._validate()
            self._tune_sampling()
        self.export()
        if self.world > 1 and torch.distributed.is_initialized():
            # end the process group here: left to interpreter exit, gloo's threads can abort the process
            self.accelerator.wait_for_everyone()
            torch.distributed.destroy_process_group()
        return self.run_dir / "model"

    def _time_limited_bar(self, pbar: Any, done: int, seconds: float) -> None:
        """With `train.max_minutes` ending the run before `train.steps`, the bar runs to the step the time limit
        will reach and shows the time left (see `run_end`); otherwise it counts to `train.steps` as usual."""
        limit = self.cfg.train.max_minutes
        if limit is None:
            return
        end, eta = run_end(self.step, self.cfg.train.steps, done, seconds,
                           60 * limit - (time.monotonic() - self.t_start))
        if end < self.cfg.train.steps and eta is not None:
            pbar.total = end
            pbar.bar_format = ("{desc}: {percentage:3.0f}%|{bar}| {n_fmt} steps [{elapsed}<"
                               f"{tqdm.format_interval(eta)} to the {limit:g} min limit, " "{rate_fmt}{postfix}]")
        else:
            pbar.total, pbar.bar_format = self.cfg.train.steps, None

    def _install_signal_handlers(self) -> dict[int, Any]:
        """First Ctrl-C (SIGINT) or SIGTERM (a launcher or scheduler stopping the job): finish the step, save and
        stop. A second signal more than 2 s later aborts at once (launchers such as torchrun forward the first
        one to their workers within milliseconds, so such echoes are ignored). Returns the previous handlers."""
        if threading.current_thread() is not threading.main_thread():
            return {}
        sigs = (signal.SIGINT, signal.SIGTERM)
        first: list[float] = []

        def handler(signum: int, frame: Any) -> None:
            if not first:
                first.append(time.monotonic())
                self._stop_requested = True
                self.log(f"{signal.Signals(signum).name}: stopping after this step (again to abort without saving)")
            elif time.monotonic() - first[0] > 2.0:
                for sig in sigs:
                    signal.signal(sig, old[sig])
                signal.raise_signal(signum)

        old = {sig: signal.getsignal(sig) or signal.SIG_DFL for sig in sigs}
        for sig in sigs:
            signal.signal(sig, handler)
        return old

    def _nonfinite_message(self, key: str, value: float, steps: int = 1) -> str:
        """The one-line error for a `key` that became `value` and stayed non-finite for `steps` steps up to now."""
        good = list_checkpoints(self.ckpt_root)
        where = f"the last good checkpoint is {good[-1][1]}" if good else "no checkpoint was saved yet"
        skipped = f" and stayed so for the {steps} steps the fp16 loss scaler skipped" if steps > 1 else ""
        return (f"{key} became {value} at step {self.step + 2 - steps}{skipped}; stopped without saving ({where}); "
                f"lower train.lr (now {self.cfg.train.lr}) or train.grad_clip and start a new run")

    # -- outputs ------------------------------------------------------------------------------------------------
    def _write_metrics(self, rec: dict[str, Any]) -> None:
        if not self.is_main:
            return
        rec = {"step": self.step, "time": round(self.elapsed_before + time.monotonic() - self.t_start, 3), **rec}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(rec) + "\n")

    @contextmanager
    def _ema_eval(self) -> Iterator[None]:
        """EMA weights, eval mode, no grad, and untouched training RNG streams."""
        was_training = self.model.training
        self.model.eval()
        try:
            with (isolated_rng(self.accelerator.device), torch.no_grad(), self.ema.average_parameters(),
                  self.accelerator.autocast()):
                yield
        finally:
            self.model.train(was_training)

    def _validate(self) -> None:
        if self.val_data is None:
            return
        with self._ema_eval():
            metrics = self.model.validation_metrics(self.val_data) if self.is_main else {}
            if self.evaluator is not None:  # on every process: each draws its shard of the samples
                metrics |= self.evaluator(self.model, self.step)
        if not self.is_main:
            return
        if metrics:
            self._write_metrics({"split": "val", **{k: float(v) for k, v in metrics.items()}})
            self.log(f"step {self.step}: " + ", ".join(f"{k} {float(v):.4g}" for k, v in metrics.items()))
        if self.evaluator is not None:
            plot_eval_metrics(self.metrics_path, self.samples_dir / "eval_metrics.png")

    def _tune_sampling(self) -> None:
        """The family's sampling choices (`tune_sampling`), made on the EMA weights against the training split (the
        test split is never read), kept in the model's config and so in the exported folder."""
        if not self.is_main:
            return
        from genlab.eval.tuning import validation_fid

        with self._ema_eval():
            chosen = self.model.tune_sampling(lambda: validation_fid(self.cfg.data), self.log)
        if chosen:
            self.resolved["model"] = to_dict(self.model.config)
            self._write_metrics({"split": "tune", **chosen})

    def _preview(self) -> None:
        if not self.is_main:
            return
        generator = torch.Generator(self.accelerator.device).manual_seed(self.cfg.sample.seed)
        with self._ema_eval():
            self.model.write_preview(self.samples_dir / f"step_{self.step:07d}", self.cfg.sample, generator)

    def save(self) -> Path | None:
        """Checkpoint everything needed to continue bit-for-bit (collective: every process calls it)."""
        own = rng_state(self.accelerator.device)  # this process's own GPU only, so resuming fits any GPU count
        rngs = gather_object([own]) if self.world > 1 else [own]
        path = None
        if self.is_main:
            state: dict[str, Any] = {
                "step": self.step, "epoch": self.order.epoch, "index": self.order.index,
                "elapsed": self.elapsed_before + time.monotonic() - self.t_start,
                "optimizers": [o.state_dict() for o in self.optimizers],
                "schedulers": [s.state_dict() for s in self.schedulers],
                "rng": rngs, "world_size": self.world, "config": json.dumps(self.resolved),
            }
            if self.accelerator.scaler is not None:
                state["scaler"] = self.accelerator.scaler.state_dict()
            weights = {"model": self.model.state_dict(), "ema": self.ema.state_dict()}
            path = save_checkpoint(self.ckpt_root, self.step, weights, state)
            prune(self.ckpt_root, self.cfg.train.keep_last)
            if time.monotonic() - self._last_plot > 60:  # refresh the loss plot at most once a minute
                plot_losses(self.metrics_path, self.samples_dir / "loss.png")
                self._last_plot = time.monotonic()
        self._saved_step = self.step
        self.accelerator.wait_for_everyone()
        return path

    def export(self) -> Path:
        """The EMA weights as a model folder `run_dir/model/`, and the loss plot."""
        out = self.run_dir / "model"
        if self.is_main and self.adapter is not None:  # peft's adapter folder, the EMA weights in place
            with self.ema.average_parameters():
                self.adapter.save_pretrained(out, save_embedding_layers=False)  # embeddings are not adapted
            plot_losses(self.metrics_path, self.samples_dir / "loss.png")
        elif self.is_main:
            self.model.save_pretrained(out, state_dict=self.ema.model_state_dict(self.model))
            plot_losses(self.metrics_path, self.samples_dir / "loss.png")
        self.accelerator.wait_for_everyone()
        return out


def train(cfg: RunConfig, run_dir: Path | None = None, resume: bool = True) -> Path:
    """Train `cfg` into its run folder and return the folder; Ctrl-C saves a checkpoint, then re-raises."""
    trainer = Trainer(cfg, run_dir, resume)
    trainer.fit()
    if trainer.interrupted:
        raise KeyboardInterrupt
    return trainer.run_dir
