"""Shortcut models (Frans et al. 2024, "One Step Diffusion via Shortcut Models"): a flow-matching network also
conditioned on the step size d, trained without a teacher to jump d at once, and sampled in 1, 2, 4, ... steps.

genlab's flow runs from data (t = 0) to noise (t = 1) on x_t = (1 - t) x0 + t eps with velocity v = eps - x0, so a
shortcut s(x_t, t, d) is the direction of the step x_{t-d} = x_t - d s(x_t, t, d). At d = 0 it is the flow's
velocity, trained by flow matching; a step of 2d is taught to be two steps of d (Frans et al. 2024, eq. 5):
s(x_t, t, 2d) = (s(x_t, t, d) + s(x'_{t-d}, t - d, d)) / 2 with x'_{t-d} = x_t - d s(x_t, t, d), the target under a
stop-gradient. The step sizes are 1 / 2^k down to 1 / `max_steps`, whose two half-steps are taken with d = 0
(the velocity). The target is computed with the current weights, not an EMA (the paper's code can use either).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from genlab.config import check_int, check_number
from genlab.errors import GenlabError
from genlab.models.base import SampleOption
from genlab.models.consistency import few_step_preview
from genlab.models.diffusion import MAX_SAMPLES
from genlab.models.flow_matching import FlowMatchingConfig, FlowMatchingModel
from genlab.models.parameterization import flow_training_times
from genlab.nn.embeddings import TimestepEmbedding
from genlab.registry import MODELS
from genlab.sampling.noise import Generators, randn

MAX_SHORTCUT_STEPS = 1024


@dataclass
class ShortcutConfig(FlowMatchingConfig):
    """A flow-matching model with a step-size input: the finest step and the share of self-consistency items."""

    max_steps: int = 128  # M: the smallest shortcut is d = 1 / M (a power of two; Frans et al. 2024 use 128)
    bootstrap_fraction: float = 0.25  # the share of each batch trained on self-consistency targets (paper: 1/4)


def _check_shortcut(cfg: ShortcutConfig) -> None:
    check_int("model.max_steps", cfg.max_steps, 2, MAX_SHORTCUT_STEPS)
    if cfg.max_steps & (cfg.max_steps - 1):
        raise GenlabError(f"model.max_steps={cfg.max_steps} must be a power of two (2, 4, ..., {MAX_SHORTCUT_STEPS})")
    check_number("model.bootstrap_fraction", cfg.bootstrap_fraction, 0.0, 0.99)


class StepSizeEmbedding(nn.Module):
    """The backbone's timestep embedding plus one of the step size d (Frans et al. 2024, sec. 3: the network is
    conditioned on t and d); `d` is set around each call by `ShortcutModel.shortcut` (None: d = 0)."""

    def __init__(self, time_embed: TimestepEmbedding, scale: float) -> None:
        super().__init__()
        self.time = time_embed
        self.step = TimestepEmbedding(time_embed.freq_dim, time_embed.mlp[-1].out_features)
        self.scale = scale
        self.d: Tensor | None = None

    def forward(self, t: Tensor) -> Tensor:
        d = self.d if self.d is not None else torch.zeros_like(t)
        return self.time(t) + self.step((d * self.scale).expand(t.shape[0]))


def shortcut_steps_ok(steps: int, max_steps: int) -> bool:
    """Whether `steps` uniform shortcut steps use a trained step size 1 / steps (a power of two up to M)."""
    return 1 <= steps <= max_steps and not steps & (steps - 1)


@MODELS.register("shortcut")
class ShortcutModel(FlowMatchingModel):
    """Flow matching at d = 0 plus self-consistency at d > 0 (Frans et al. 2024, eq. 6):
    ||s(x_t, t, 0) - (eps - x0)||^2 on 1 - k of the batch and ||s(x_t, t, 2d) - stopgrad((s(x_t, t, d) +
    s(x'_{t-d}, t - d, d)) / 2)||^2 on k of it; sampled by `steps` uniform shortcut steps of d = 1 / steps."""

    family = "shortcut"
    config_class = ShortcutConfig
    sample_options = frozenset({SampleOption.STEPS})
    lora_targets = ()  # no adapter on a shortcut model has been tested (its step-size embedding is new): no LoRA

    def __init__(self, config: ShortcutConfig) -> None:
        _check_shortcut(config)
        super().__init__(config)
        time_embed = getattr(self.net, "time_embed", None)
        if not isinstance(time_embed, TimestepEmbedding):
            raise GenlabError(f"model.backbone={config.backbone!r} has no timestep embedding to add the step size "
                              "to; use backbone unet")
        self.net.time_embed = StepSizeEmbedding(time_embed, config.timesteps)

    @contextmanager
    def _step_size(self, d: Tensor) -> Iterator[None]:
        embed = self.net.time_embed
        embed.d = d
        try:
            yield
        finally:
            embed.d = None

    def shortcut(self, x_t: Tensor, t: Tensor, d: Tensor, cond: Any = None) -> Tensor:
        """s(x_t, t, d, y) for (B,) times and step sizes; d <= 1 / max_steps is the velocity (d = 0)."""
        d = torch.where(d * self.config.max_steps <= 1.0 + 1e-6, torch.zeros_like(d), d)
        with self._step_size(d):
            return self.net(x_t, t * self.config.timesteps, cond)

    # -- training ------------------------------------------------------------------------------------------------
    def training_losses(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Flow matching on the first 1 - k of the batch (d = 0, t from `t_sampling`) and self-consistency on the
        rest: 2d = 2^-j with j ~ U{0, ..., log2 M - 1}, t ~ U{2d, 4d, ..., 1} (so t - 2d >= 0) (Frans et al. 2024,
        eq. 6 and Algorithm 1)."""
        x0 = batch["x"]
        B = x0.shape[0]
        cfg = self.config
        nb = int(B * cfg.bootstrap_fraction)
        device = x0.device
        y = self.training_labels(batch, device)
        eps = torch.randn_like(x0)
        j = torch.randint(0, int(math.log2(cfg.max_steps)), (nb,), device=device)
        big = 0.5 ** j.float()  # 2d
        t_boot = big * (torch.floor(torch.rand(nb, device=device) / big) + 1)
        t_fm = flow_training_times(B - nb, cfg.t_sampling, cfg.logit_mean, cfg.logit_std, device)
        t = torch.cat([t_boot, t_fm])
        t_ = t.view(-1, *[1] * (x0.ndim - 1))
        x_t = (1 - t_) * x0 + t_ * eps
        target = eps - x0
        if nb:
            d = big / 2
            yb = y[:nb] if y is not None else None
            with torch.no_grad():
                s1 = self.shortcut(x_t[:nb], t_boot, d, yb)
                x_mid = x_t[:nb] - d.view(-1, 1, 1, 1) * s1
                s2 = self.shortcut(x_mid, t_boot - d, d, yb)
            target = torch.cat([(s1 + s2) / 2, target[nb:]])
        d_in = torch.cat([big, torch.zeros(B - nb, device=device)])
        per_item = ((self.shortcut(x_t, t, d_in, y) - target) ** 2).flatten(1).mean(1)
        out = {"loss": per_item.mean(), "loss_fm": per_item[nb:].mean().detach()}
        if nb:
            out["loss_sc"] = per_item[:nb].mean().detach()
        return out

    def denoise(self, x: Tensor, sigma: Tensor, cond: Tensor | None = None, quantize: bool = True) -> Tensor:
        """The flow's denoiser (FlowMatchingModel's) at d = 0."""
        with self._step_size(torch.zeros_like(sigma)):
            return super().denoise(x, sigma, cond, quantize)

    # -- sampling ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, n: int, cond: Any = None, generator: Generators = None, *, steps: int = 1,
               progress: bool = False) -> Tensor:
        """x_1 = eps ~ N(0, I), then `steps` shortcut steps x_{t-d} = x_t - d s(x_t, t, d) with d = 1 / steps
        (Frans et al. 2024, sec. 3), clamped to [-1, 1]; `steps` must be a power of two up to model.max_steps."""
        if not 1 <= n <= MAX_SAMPLES:
            raise GenlabError(f"n={n} is out of range; use 1..{MAX_SAMPLES}")
        self.check_steps(steps)
        cfg = self.config
        device = self.alpha_bar.device
        labels = self.sampling_condition(n, cond, device)
        x = randn((n, cfg.channels, cfg.image_size, cfg.image_size), generator, device)
        d = torch.full((n,), 1.0 / steps, device=device)
        was_training = self.training
        self.eval()
        try:
            for i in range(steps):
                t = torch.full((n,), 1.0 - i / steps, device=device)
                x = x - d.view(-1, 1, 1, 1) * self.shortcut(x, t, d, labels)
        finally:
            self.train(was_training)
        return x.clamp(-1.0, 1.0)

    def check_steps(self, steps: int, key: str = "steps") -> None:
        m = self.config.max_steps
        if not isinstance(steps, int) or not shortcut_steps_ok(steps, m):
            raise GenlabError(f"{key}={steps}: a shortcut model steps by the sizes it was trained for, 1 / 2^k; "
                              f"use 1, 2, 4, ..., {m}")

    def check_sample_config(self, sample_cfg: Any) -> None:
        self.check_steps(sample_cfg.steps, "sample.steps")

    def write_preview(self, stem: Path, sample_cfg: Any, generator: torch.Generator) -> list[Path]:
        return few_step_preview(self, stem, sample_cfg, generator)

