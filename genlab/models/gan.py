"""Generative adversarial networks (Goodfellow et al. 2014): a generator G(z, y) of z ~ N(0, I) and a
discriminator D(x, y), trained in alternation by the family's own `train_step`.

Architectures (`arch`): a residual layout without normalization (in the spirit of R3GAN, Huang et al. 2024) and
the DCGAN layout (Radford et al. 2016); with class labels, an embedding in G and a projection discriminator
(Miyato & Koyama 2018). Losses (`loss`): non-saturating, hinge, WGAN-GP and relativistic pairing (RpGAN); the
zero-centred gradient penalties R1 (on real data) and R2 (on generated data); DiffAugment (Zhao et al. 2020) in
front of D for small data. The trainer's EMA of the parameters makes the exported model sample with the EMA of G.
The recipe R3GAN recommends: `loss: relativistic` with both `r1_gamma` and `r2_gamma` (Huang et al. 2024, sec. 2).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from genlab.config import MAX_DEPTH, MAX_IMAGE_SIZE, MAX_WIDTH, check_int, check_number
from genlab.data.images import save_grid
from genlab.errors import GenlabError
from genlab.models.base import (
    Conditioning,
    GenerativeModel,
    Likelihood,
    ModelConfig,
    Output,
    class_labels,
    with_image_shape_and_classes,
)
from genlab.nn.diffaugment import diff_augment
from genlab.nn.gan import ARCHS, Discriminator, Generator
from genlab.registry import MODELS
from genlab.sampling.noise import Generators, randn

MAX_SAMPLES = 10_000


# -- losses on discriminator logits (real: D(x), fake: D(G(z))) -----------------------------------------------------
def nonsaturating_d_loss(real: Tensor, fake: Tensor) -> Tensor:
    """-E[log sigmoid(D(x))] - E[log(1 - sigmoid(D(G(z))))]: the discriminator's side of the minimax game
    (Goodfellow et al. 2014, eq. 1), as softplus(-D(x)) + softplus(D(G(z)))."""
    return F.softplus(-real).mean() + F.softplus(fake).mean()


def nonsaturating_g_loss(real: Tensor | None, fake: Tensor) -> Tensor:
    """-E[log sigmoid(D(G(z)))]: G maximises log D(G(z)) instead of minimising log(1 - D(G(z)))
    (Goodfellow et al. 2014, sec. 3, the non-saturating loss)."""
    return F.softplus(-fake).mean()


def hinge_d_loss(real: Tensor, fake: Tensor) -> Tensor:
    """E[max(0, 1 - D(x))] + E[max(0, 1 + D(G(z)))] (Lim & Ye 2017, eq. 7)."""
    return F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean()


def linear_g_loss(real: Tensor | None, fake: Tensor) -> Tensor:
    """-E[D(G(z))]: the generator's loss of the hinge GAN (Lim & Ye 2017, eq. 8) and of WGAN (Gulrajani et al.
    2017, Algorithm 1)."""
    return -fake.mean()


def wgan_d_loss(real: Tensor, fake: Tensor) -> Tensor:
    """E[D(G(z))] - E[D(x)], the critic's loss before its gradient penalty (Gulrajani et al. 2017, eq. 3)."""
    return fake.mean() - real.mean()


def relativistic_d_loss(real: Tensor, fake: Tensor) -> Tensor:
    """E[softplus(D(G(z)) - D(x))] over pairs (x, z): the relativistic pairing loss RpGAN (Jolicoeur-Martineau
    2019, eq. 6 with f = softplus(-t); Huang et al. 2024, eq. 2)."""
    return F.softplus(fake - real).mean()


def relativistic_g_loss(real: Tensor | None, fake: Tensor) -> Tensor:
    """E[softplus(D(x) - D(G(z)))]: RpGAN with the roles of real and fake swapped (Huang et al. 2024, eq. 2)."""
    return F.softplus(real - fake).mean()


LOSSES: dict[str, tuple[Callable[[Tensor, Tensor], Tensor], Callable[[Tensor | None, Tensor], Tensor]]] = {
    "nonsaturating": (nonsaturating_d_loss, nonsaturating_g_loss),
    "hinge": (hinge_d_loss, linear_g_loss),
    "wgan_gp": (wgan_d_loss, linear_g_loss),
    "relativistic": (relativistic_d_loss, relativistic_g_loss),
}


# -- gradient penalties -----------------------------------------------------------------------------------------
def input_grad_sq_norm(logits: Tensor, x: Tensor) -> Tensor:
    """||grad_x D(x)||^2 per item, (B,), kept in the graph (create_graph) so the penalty can be minimised."""
    (grad,) = torch.autograd.grad(logits.sum(), x, create_graph=True)
    return grad.float().pow(2).flatten(1).sum(1)


def zero_centered_penalty(logits: Tensor, x: Tensor, gamma: float) -> Tensor:
    """gamma / 2 * E[||grad_x D(x)||^2] at the points `x` the `logits` were computed from: R1 on real data, R2 on
    generated data (Mescheder et al. 2018, eq. 9 and 10)."""
    return 0.5 * gamma * input_grad_sq_norm(logits, x).mean()


def wgan_gradient_penalty(critic: Callable[[Tensor], Tensor], real: Tensor, fake: Tensor, eps: Tensor) -> Tensor:
    """E[(||grad D(x_hat)||_2 - 1)^2] at x_hat = eps x + (1 - eps) x_fake, eps ~ U[0, 1] per item (Gulrajani et al.
    2017, eq. 3 and Algorithm 1)."""
    e = eps.view(-1, *([1] * (real.dim() - 1))).to(real.dtype)
    x_hat = (e * real.detach() + (1 - e) * fake.detach()).requires_grad_(True)
    return (input_grad_sq_norm(critic(x_hat), x_hat).sqrt() - 1.0).pow(2).mean()


@dataclass
class GANConfig(ModelConfig):
    """Image shape, architecture and widths of G and D, the loss and its penalties."""

    image_size: int = 0  # 0: take from the data
    channels: int = 0  # 0: take from the data
    num_classes: int = 0  # 0: take from the data (when class_cond)
    class_cond: bool = True  # a label embedding in G and a projection discriminator when the data has labels
    arch: str = "resnet"  # resnet | dcgan
    z_dim: int = 64
    base_channels: int = 32  # width at the image's resolution; each later level halves the side
    channel_mults: tuple[int, ...] = (1, 2, 2)
    num_blocks: int = 1  # residual blocks per level (resnet)
    d_features: int = 128  # width of the discriminator's features phi(x)
    loss: str = "relativistic"  # nonsaturating | hinge | wgan_gp | relativistic
    r1_gamma: float = 0.0  # gamma of R1 (real data); 0: off
    r2_gamma: float = 0.0  # gamma of R2 (generated data); 0: off
    gp_weight: float = 10.0  # lambda of the WGAN-GP penalty (loss=wgan_gp only)
    diffaugment: bool = False  # translation + cutout in front of D (Zhao et al. 2020)


def _check(cfg: GANConfig) -> None:
    if cfg.image_size <= 0 or cfg.channels <= 0:
        raise GenlabError("model.image_size and model.channels must be set (or build the model from a dataset)")
    check_int("model.image_size", cfg.image_size, 1, MAX_IMAGE_SIZE, "activations grow with its square")
    for key in ("channels", "z_dim", "d_features"):
        check_int(f"model.{key}", getattr(cfg, key), 1, MAX_WIDTH)
    check_int("model.num_classes", cfg.num_classes, 0, 1_000_000)
    check_int("model.num_blocks", cfg.num_blocks, 1, MAX_DEPTH)
    if not cfg.channel_mults or min(cfg.channel_mults) < 1:
        raise GenlabError("model.channel_mults must be a non-empty list of positive integers")
    check_int("model.base_channels", cfg.base_channels * max(cfg.channel_mults), 1, MAX_WIDTH,
              "base_channels x the largest channel_mult is the widest layer")
    factor = 2 ** (len(cfg.channel_mults) - 1)
    if cfg.image_size % factor:
        raise GenlabError(f"model.image_size={cfg.image_size} must be divisible by 2 ^ (len(model.channel_mults) - 1)"
                          f" = {factor}; change data.image_size or model.channel_mults")
    if cfg.arch not in ARCHS:
        raise GenlabError(f"model.arch={cfg.arch!r} is unknown; choose one of: {', '.join(ARCHS)}")
    if cfg.loss not in LOSSES:
        raise GenlabError(f"model.loss={cfg.loss!r} is unknown; choose one of: {', '.join(LOSSES)}")
    for key in ("r1_gamma", "r2_gamma", "gp_weight"):
        check_number(f"model.{key}", getattr(cfg, key), 0, hint="0 = off")


@MODELS.register("gan")
class GAN(GenerativeModel):
    """G(z, y) and D(x, y) trained in alternation: one D step on the loss's discriminator side plus its penalties,
    then one G step on the generator side (Goodfellow et al. 2014, Algorithm 1 with k = 1)."""

    family = "gan"
    config_class = GANConfig
    conditioning = frozenset({Conditioning.NONE, Conditioning.CLASS_LABEL})
    output = Output.IMAGE
    likelihood = Likelihood.NONE
    per_item_seeds = True

    def __init__(self, config: GANConfig) -> None:
        super().__init__(config)
        _check(config)
        self.num_classes = config.num_classes if config.class_cond else 0
        widths = [config.base_channels * m for m in config.channel_mults]
        shape = dict(image_size=config.image_size, channels=config.channels, blocks=config.num_blocks,
                     num_classes=self.num_classes)
        self.generator = Generator(config.arch, config.z_dim, widths, **shape)
        self.discriminator = Discriminator(config.arch, widths, features=config.d_features, **shape)
        self.grad_clip = 0.0  # set from the recipe by configure_optimizers

    @classmethod
    def build(cls, config: GANConfig, dataset: Any) -> GAN:
        """Fill image_size, channels and num_classes from `dataset.info` where the config leaves them at 0."""
        return cls(with_image_shape_and_classes(config, dataset, cls.family))

    def prepare_data(self, dataset: Any) -> Any:
        """The images themselves; a class-conditional model needs a label on every one."""
        labels = getattr(dataset, "labels", None)
        if self.num_classes and (labels is None or bool((labels < 0).any())):
            raise GenlabError("a class-conditional GAN needs a label on every training image; "
                              "set model.class_cond=false")
        return dataset

    # -- training -------------------------------------------------------------------------------------------------
    def critic(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """D's logits (B,) for images `x`, through DiffAugment when it is on (the same policy for real and
        generated images, drawn anew for each; Zhao et al. 2020, sec. 3.2)."""
        return self.discriminator(diff_augment(x) if self.config.diffaugment else x, y)

    def _labels(self, batch: dict[str, Any]) -> Tensor | None:
        return batch["label"].to(batch["x"].device) if self.num_classes else None

    def training_losses(self, batch: dict[str, Any], part: str = "discriminator") -> dict[str, Tensor]:
        """part="discriminator": D's loss on real `batch["x"]` against fresh G(z) (G not differentiated) plus the
        enabled penalties, with D's mean logits on each; part="generator": G's loss on fresh G(z) (with D(x) too
        for the relativistic loss, which pairs them)."""
        cfg = self.config
        x, y = batch["x"], self._labels(batch)
        z = torch.randn(x.shape[0], cfg.z_dim, device=x.device)
        d_loss, g_loss = LOSSES[cfg.loss]
        if part == "generator":
            fake_logits = self.critic(self.generator(z, y), y)
            real_logits = self.critic(x, y) if cfg.loss == "relativistic" else None
            return {"loss": g_loss(real_logits, fake_logits)}
        with torch.no_grad():
            fake = self.generator(z, y)
        real = x.detach().requires_grad_(cfg.r1_gamma > 0)
        fake = fake.detach().requires_grad_(cfg.r2_gamma > 0)
        real_logits, fake_logits = self.critic(real, y), self.critic(fake, y)
        adversarial = d_loss(real_logits, fake_logits)
        out = {"d_loss": adversarial, "d_real": real_logits.mean(), "d_fake": fake_logits.mean()}
        if cfg.r1_gamma > 0:
            out["r1"] = zero_centered_penalty(real_logits, real, cfg.r1_gamma)
        if cfg.r2_gamma > 0:
            out["r2"] = zero_centered_penalty(fake_logits, fake, cfg.r2_gamma)
        if cfg.loss == "wgan_gp":
            eps = torch.rand(x.shape[0], device=x.device)
            out["gp"] = cfg.gp_weight * wgan_gradient_penalty(lambda h: self.critic(h, y), real, fake, eps)
        loss = adversarial
        for key in ("r1", "r2", "gp"):
            loss = loss + out[key] if key in out else loss
        return {"loss": loss, **out}

    def configure_optimizers(self, train_cfg: Any) -> list[torch.optim.Optimizer]:
        """[AdamW over G, AdamW over D], both with the recipe's lr, betas and weight decay; `train.grad_clip` is
        applied to each network's gradient separately."""
        self.grad_clip = train_cfg.grad_clip
        kw = dict(lr=train_cfg.lr, betas=tuple(train_cfg.betas), weight_decay=train_cfg.weight_decay)
        return [torch.optim.AdamW(self.generator.parameters(), **kw),
                torch.optim.AdamW(self.discriminator.parameters(), **kw)]

    def train_step(self, batch: dict[str, Any], optimizers: list[Any], accelerator: Any, objective: Any
                   ) -> dict[str, Tensor]:
        """One D step, then one G step with D frozen, each on the whole batch (train.grad_accum is not split) and
        clipped by its own global norm. Returns both losses, the penalties, D's mean logits on real and fake, and
        "loss" = d_loss + penalties + g_loss (what the trainer checks for divergence)."""
        opt_g, opt_d = optimizers
        max_norm = self.grad_clip if self.grad_clip > 0 else math.inf
        d = objective(batch, part="discriminator")
        opt_d.zero_grad(set_to_none=True)
        accelerator.backward(d["loss"])
        d_norm = accelerator.clip_grad_norm_(self.discriminator.parameters(), max_norm)
        opt_d.step()
        self.discriminator.requires_grad_(False)
        try:
            g = objective(batch, part="generator")
            opt_g.zero_grad(set_to_none=True)
            accelerator.backward(g["loss"])
            g_norm = accelerator.clip_grad_norm_(self.generator.parameters(), max_norm)
            opt_g.step()
        finally:
            self.discriminator.requires_grad_(True)
        out = {k: v.detach().float() for k, v in d.items() if k != "loss"}
        out.update(g_loss=g["loss"].detach().float(), loss=(d["loss"] + g["loss"]).detach().float())
        for key, norm in (("d_grad_norm", d_norm), ("g_grad_norm", g_norm)):
            if norm is not None:
                out[key] = norm.detach().float()
        return out

    # -- the family contract ----------------------------------------------------------------------------------------
    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.config.channels, self.config.image_size, self.config.image_size

    def labels_for(self, n: int, label: Any = None) -> Tensor | None:
        """Labels (n,) for a class-conditional model (None cycles the classes, one grid row each); None otherwise."""
        if not self.num_classes:
            return super().labels_for(n, label)
        return class_labels(n, label, self.num_classes)

    @torch.no_grad()
    def sample(self, n: int, cond: Any = None, generator: Generators = None, **opts: Any) -> Tensor:
        """G(z, y) for z ~ N(0, I) (item i from generator i when given a list), clamped to [-1, 1]; `cond` is a
        label, one per item, or None (classes cycled) for a class-conditional model."""
        if opts:
            raise GenlabError(f"the gan family takes no sampling options, got {', '.join(opts)}")
        if not 1 <= n <= MAX_SAMPLES:
            raise GenlabError(f"n={n} is out of range; use 1..{MAX_SAMPLES}")
        device = next(self.parameters()).device
        y = self.labels_for(n, cond)
        z = randn((n, self.config.z_dim), generator, device)
        return self.generator(z, None if y is None else y.to(device)).float().clamp(-1.0, 1.0)

    def write_preview(self, stem: Path, sample_cfg: Any, generator: torch.Generator) -> list[Path]:
        """A PNG grid of samples, one row per class when the model is class-conditional."""
        n, nrow = sample_cfg.n, None
        if self.num_classes:
            nrow = max(1, sample_cfg.n // self.num_classes)
            n = nrow * self.num_classes
        x = self.sample(n, generator=generator)
        return [save_grid(x, Path(stem).with_suffix(".png"), nrow=nrow,
                          params={"n": n, "seed": sample_cfg.seed, "prior": "N(0, I)"})]
