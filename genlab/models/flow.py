"""Normalizing flows over images: RealNVP (Dinh et al. 2017) and Glow (Kingma & Dhariwal 2018).

An invertible map f takes an image x to latents z, and log p(x) = log p(z) + log |det df/dx| (Dinh et al. 2017,
eq. 3). Both architectures are multi-scale (Dinh et al. 2017, sec. 3.6): each level squeezes 2x2 pixels into
channels and, except the last, factors half of its channels out as latents of that level.

- `arch: glow` — each level: squeeze, then `steps` x (actnorm, invertible 1x1 conv with LU weights, affine coupling
  on a channel split with a sigmoid(h + 2) scale) (Kingma & Dhariwal 2018, fig. 2, table 1).
- `arch: realnvp` — each level but the last: `steps` checkerboard couplings, squeeze, `steps` channel couplings;
  the last level: `steps` checkerboard couplings; tanh-bounded log-scales; actnorm after each coupling in place of
  RealNVP's batch normalization (a deterministic per-channel affine map at sampling time either way).

The factored-out half of a level has the prior N(mean, exp(logs)^2) with (mean, logs) a zero-initialized conv of the
kept half (Glow's split prior, Kingma & Dhariwal 2018, code `split2d`); the last level's prior has learned
constants. With `class_cond`, a learned per-class mean is added to every level's prior (Glow's class-conditional
prior). Sampling at temperature T scales the prior's standard deviations by T (Kingma & Dhariwal 2018, sec. 5.3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from genlab.config import MAX_DEPTH, MAX_IMAGE_SIZE, MAX_WIDTH, check_int, check_number
from genlab.data.images import DELTA, bits_per_dim, dequantize, save_grid
from genlab.errors import GenlabError
from genlab.models.base import (
    Conditioning,
    GenerativeModel,
    Likelihood,
    ModelConfig,
    Output,
    SampleOption,
    class_labels,
    with_image_shape_and_classes,
)
from genlab.nn.invertible import (
    ActNorm,
    AffineCoupling,
    InvConv1x1,
    Squeeze,
    ZeroConv2d,
    channel_mask,
    checkerboard_mask,
)
from genlab.registry import MODELS
from genlab.sampling.noise import Generators, randn

MAX_SAMPLES = 10_000
ARCHS = ("glow", "realnvp")
INIT_ITEMS = 512  # training images (the first ones, fixed dequantization noise) for actnorm's data-dependent init
LOG_2PI = math.log(2 * math.pi)


@dataclass
class FlowConfig(ModelConfig):
    """Image shape, architecture and sizes of a multi-scale flow."""

    image_size: int = 0  # 0: take from the data
    channels: int = 0  # 0: take from the data
    arch: str = "glow"  # glow | realnvp
    levels: int = 2  # scales; glow squeezes `levels` times, realnvp `levels - 1` times
    steps: int = 8  # flow steps per level (glow) or couplings per stage (realnvp)
    hidden: int = 64  # width of each coupling network
    class_cond: bool = False  # a learned per-class mean in every level's prior
    num_classes: int = 0  # 0: take from the data (when class_cond)
    preview_temperature: float = 0.7  # temperature of the sample grids written during training


def _check(cfg: FlowConfig) -> None:
    if cfg.image_size <= 0 or cfg.channels <= 0:
        raise GenlabError("model.image_size and model.channels must be set (or build the model from a dataset)")
    if cfg.arch not in ARCHS:
        raise GenlabError(f"model.arch={cfg.arch!r} is unknown; choose one of: {', '.join(ARCHS)}")
    check_int("model.image_size", cfg.image_size, 1, MAX_IMAGE_SIZE, "activations grow with its square")
    check_int("model.channels", cfg.channels, 1, MAX_WIDTH)
    check_int("model.hidden", cfg.hidden, 1, MAX_WIDTH)
    check_int("model.levels", cfg.levels, 1, 8)
    check_int("model.steps", cfg.steps, 1, MAX_DEPTH)
    check_int("model.num_classes", cfg.num_classes, 0, 100_000)
    check_number("model.preview_temperature", cfg.preview_temperature, 0, 10, hint="1 = the model's own density")
    squeezes = cfg.levels if cfg.arch == "glow" else cfg.levels - 1
    if cfg.image_size % 2**squeezes:
        raise GenlabError(f"model.image_size={cfg.image_size} must be divisible by 2^{squeezes} ({cfg.arch} squeezes "
                          f"{squeezes} times with model.levels={cfg.levels}); lower model.levels or change "
                          "data.image_size")
    if cfg.class_cond and cfg.num_classes < 1:
        raise GenlabError("model.class_cond needs model.num_classes >= 1 (or a dataset with labels)")


class Prior(nn.Module):
    """N(mean, exp(logs)^2) over one level's latents (C, S, S): from a zero-initialized conv of the kept half
    (`context` channels), or learned constants when `context` is 0; plus a learned mean per class."""

    def __init__(self, channels: int, size: int, context: int, num_classes: int) -> None:
        super().__init__()
        self.shape = (channels, size, size)
        if context:
            self.conv = ZeroConv2d(context, 2 * channels)
        else:
            self.params = nn.Parameter(torch.zeros(1, 2 * channels, size, size))
        self.class_mean = nn.Embedding(num_classes, channels * size * size) if num_classes else None
        if self.class_mean is not None:
            nn.init.zeros_(self.class_mean.weight)

    def forward(self, h: Tensor | None, y: Tensor | None, batch: int) -> tuple[Tensor, Tensor]:
        stats = self.conv(h) if h is not None else self.params.expand(batch, -1, -1, -1)
        mean, logs = stats.chunk(2, dim=1)
        if self.class_mean is not None and y is not None:
            known = (y >= 0).to(mean.dtype).view(-1, 1, 1, 1)  # unlabeled items (-1) get no class mean
            mean = mean + known * self.class_mean(y.clamp(min=0)).view(-1, *self.shape)
        return mean, logs


def gaussian_log_density(z: Tensor, mean: Tensor, logs: Tensor) -> Tensor:
    """sum over (C, H, W) of log N(z; mean, exp(logs)^2), per item."""
    return (-0.5 * (LOG_2PI + 2 * logs + (z - mean) ** 2 * torch.exp(-2 * logs))).flatten(1).sum(1)


class Level(nn.Module):
    """One scale: invertible layers, then (except the last level) half the channels factored out."""

    def __init__(self, layers: list[nn.Module], prior: Prior, split: bool) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.prior = prior
        self.split = split


def _glow_level(c: int, s: int, hidden: int, steps: int) -> tuple[list[nn.Module], int, int]:
    c, s = 4 * c, s // 2
    layers: list[nn.Module] = [Squeeze()]
    for _ in range(steps):
        layers += [ActNorm(c), InvConv1x1(c), AffineCoupling(c, hidden, channel_mask(c, 0), "sigmoid")]
    return layers, c, s


def _realnvp_level(c: int, s: int, hidden: int, steps: int, last: bool) -> tuple[list[nn.Module], int, int]:
    layers: list[nn.Module] = []
    for k in range(steps):
        layers += [AffineCoupling(c, hidden, checkerboard_mask(c, s, k % 2), "tanh"), ActNorm(c)]
    if last:
        return layers, c, s
    c, s = 4 * c, s // 2
    layers.append(Squeeze())
    for k in range(steps):
        layers += [AffineCoupling(c, hidden, channel_mask(c, k % 2), "tanh"), ActNorm(c)]
    return layers, c, s


@MODELS.register("flow")
class FlowModel(GenerativeModel):
    """A multi-scale normalizing flow with exact log-likelihood; loss = -log p(x + u) - D log DELTA in bits/dim,
    u uniform over each 8-bit bin (Dinh et al. 2017, eq. 3; Theis et al. 2016, eq. 3-4)."""

    family = "flow"
    config_class = FlowConfig
    output = Output.IMAGE
    conditioning = frozenset({Conditioning.NONE, Conditioning.CLASS_LABEL})
    likelihood = Likelihood.EXACT
    sample_options = frozenset({SampleOption.TEMPERATURE})
    per_item_seeds = True

    def __init__(self, config: FlowConfig) -> None:
        super().__init__(config)
        _check(config)
        self.num_classes = config.num_classes if config.class_cond else 0
        c, s = config.channels, config.image_size
        self.levels = nn.ModuleList()
        for i in range(config.levels):
            last = i == config.levels - 1
            if config.arch == "glow":
                layers, c, s = _glow_level(c, s, config.hidden, config.steps)
            else:
                layers, c, s = _realnvp_level(c, s, config.hidden, config.steps, last)
            z_channels = c if last else c - c // 2
            prior = Prior(z_channels, s, 0 if last else c // 2, self.num_classes)
            self.levels.append(Level(layers, prior, split=not last))
            c = c // 2 if not last else c

    @classmethod
    def build(cls, config: FlowConfig, dataset: Any) -> FlowModel:
        """Fill image_size, channels and num_classes from `dataset.info`, then initialize every actnorm from the first
        `INIT_ITEMS` training images (dequantized with fixed noise), so every process gets the same weights."""
        model = cls(with_image_shape_and_classes(config, dataset, cls.family))
        batch = dataset.get_batch(torch.arange(min(INIT_ITEMS, len(dataset))))
        with torch.no_grad():
            model.encode(dequantize(batch["x"], torch.Generator().manual_seed(0)))
        return model

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.config.channels, self.config.image_size, self.config.image_size

    def _labels(self, cond: Any, n: int, device: torch.device) -> Tensor | None:
        if not self.num_classes or cond is None:
            return None
        return torch.as_tensor(cond, dtype=torch.long, device=device).reshape(-1).expand(n)

    # -- the flow ---------------------------------------------------------------------------------------------------
    def encode(self, x: Tensor, cond: Any = None) -> tuple[list[Tensor], Tensor]:
        """x -> (latents of each level, log p(x) in nats per item) = (z, log p(z) + log|det dz/dx|)."""
        y = self._labels(cond, x.shape[0], x.device)
        h, logp, zs = x, x.new_zeros(x.shape[0]), []
        for level in self.levels:
            for layer in level.layers:
                h, logdet = layer(h)
                logp = logp + logdet
            if level.split:
                z, h = h.chunk(2, dim=1)
                mean, logs = level.prior(h, y, x.shape[0])
            else:
                z = h
                mean, logs = level.prior(None, y, x.shape[0])
            logp = logp + gaussian_log_density(z, mean, logs)
            zs.append(z)
        return zs, logp

    def decode(self, zs: list[Tensor]) -> Tensor:
        """Latents of each level -> x (the inverse of `encode`)."""
        h: Tensor | None = None
        for i in reversed(range(len(self.levels))):
            h = self._level_inverse(i, zs[i] if h is None else torch.cat([zs[i], h], dim=1))
        return h

    def latent_shapes(self) -> list[tuple[int, int, int]]:
        """(C, H, W) of each level's latents."""
        return [level.prior.shape for level in self.levels]

    # -- the family contract ----------------------------------------------------------------------------------------
    def log_likelihood(self, x: Tensor, cond: Any = None) -> Tensor:
        """log p(x) in nats per image, a density over continuous x in [-1, 1] (Dinh et al. 2017, eq. 3)."""
        return self.encode(x, cond)[1]

    def training_losses(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Bits/dim of the dequantized batch: (-log p(x + u) - D log DELTA) / (D log 2), u ~ U(bin)
        (Theis et al. 2016, eq. 3-4; Kingma & Dhariwal 2018, sec. 2.1)."""
        x = batch["x"]
        cond = batch.get("label") if self.num_classes else None
        dims = x[0].numel()
        nll = -(self.log_likelihood(dequantize(x), cond) + dims * math.log(DELTA))
        return {"loss": bits_per_dim(nll, dims).mean()}

    @torch.no_grad()
    def sample(self, n: int, cond: Any = None, generator: Generators = None, temperature: float = 1.0) -> Tensor:
        """x = f^-1(z) with each level's z = mean + T exp(logs) eps, eps ~ N(0, I), drawn from the last level down
        (Kingma & Dhariwal 2018, sec. 5.3: T < 1 trades diversity for quality)."""
        if not 1 <= n <= MAX_SAMPLES:
            raise GenlabError(f"n={n} is out of range; use 1..{MAX_SAMPLES}")
        check_number("temperature", temperature, 0, 10, hint="1 = the model's own density; Glow used 0.7")
        if cond is not None and not self.num_classes:
            raise GenlabError("this flow is unconditional; leave out the label")
        device = next(self.parameters()).device
        y = self._labels(cond, n, device)
        shapes = self.latent_shapes()
        eps = {i: randn((n, *shapes[i]), generator, device) for i in reversed(range(len(shapes)))}
        h: Tensor | None = None
        for i in reversed(range(len(self.levels))):
            mean, logs = self.levels[i].prior(h, y, n)
            z = mean + temperature * torch.exp(logs) * eps[i]
            h = self._level_inverse(i, z if h is None else torch.cat([z, h], dim=1))
        return h.clamp(-1.0, 1.0)

    def _level_inverse(self, i: int, h: Tensor) -> Tensor:
        for layer in reversed(self.levels[i].layers):
            h = layer.inverse(h)
        return h

    def labels_for(self, n: int, label: Any = None) -> Tensor | None:
        """None for an unconditional model; else (n,) labels: `label` for all, or classes in blocks (one grid row
        per class) when `label` is None."""
        return class_labels(n, label, self.num_classes) if self.num_classes else super().labels_for(n, label)

    def write_preview(self, stem: Path, sample_cfg: Any, generator: torch.Generator) -> list[Path]:
        """A PNG grid of samples at `preview_temperature`, one row per class when class-conditional."""
        n = min(sample_cfg.n, 64)
        labels = self.labels_for(n)
        nrow = int((labels == 0).sum()) if labels is not None else None
        t = self.config.preview_temperature
        x = self.sample(n, labels, generator=generator, temperature=t)
        return [save_grid(x, Path(stem).with_suffix(".png"), nrow=nrow,
                          params={"n": n, "seed": sample_cfg.seed, "temperature": t})]
