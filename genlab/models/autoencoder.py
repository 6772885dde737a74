"""KL-regularized autoencoder (the first stage of latent diffusion, Rombach et al. 2022, sec. 3.1 and app. G).

An encoder maps an image to a diagonal Gaussian posterior q(z|x) = N(mean, exp(logvar)) over a latent of
`z_channels` x (image_size / 2^(levels - 1))^2; a latent is drawn with the reparameterization trick
(Kingma & Welling 2014, eq. 10) and decoded back. The loss is a pixel reconstruction error (L1 or L2) plus a
small KL(q(z|x) || N(0, I)) (Kingma & Welling 2014, app. B), and optionally an adversarial term from a patch
discriminator (Esser et al. 2021, eq. 5, with a fixed weight instead of the adaptive one), trained as a second
optimizer by the family's own `train_step`. Latent diffusion divides latents by their standard deviation on the
training data (`latent_scaling_factor`, Rombach et al. 2022, app. G "scale factor").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from genlab.config import MAX_DEPTH, MAX_IMAGE_SIZE, MAX_WIDTH, check_int
from genlab.data.images import save_grid
from genlab.errors import GenlabError
from genlab.models.base import GenerativeModel, Likelihood, ModelConfig, Output, with_image_shape
from genlab.nn.attention import SelfAttention2d
from genlab.nn.discriminator import PatchDiscriminator, hinge_d_loss
from genlab.nn.resnet import Downsample, Upsample
from genlab.registry import MODELS
from genlab.sampling.noise import Generators, randn

MAX_SAMPLES = 10_000


@dataclass
class AutoencoderConfig(ModelConfig):
    """Image shape, encoder/decoder widths, latent size and loss weights of a KL autoencoder."""

    image_size: int = 0  # 0: take from the data
    channels: int = 0  # 0: take from the data
    base_channels: int = 32
    channel_mults: tuple[int, ...] = (1, 2, 2)  # one level per entry; each level after the first halves the side
    patchify: int = 1  # space-to-depth factor before the first conv (and depth-to-space after the last): cheap 4x
    num_res_blocks: int = 1
    attention: bool = False  # self-attention in the middle of encoder and decoder
    norm_groups: int = 8
    z_channels: int = 4
    reconstruction: str = "l1"  # l1 | l2
    kl_weight: float = 1e-4  # weight of the KL (nats per latent element) against the per-pixel reconstruction
    decoder_scale: float = 0.1  # scale of the Laplace (l1) / Gaussian (l2) decoder used by log_likelihood
    disc_weight: float = 0.0  # 0: no discriminator; else the weight of the generator's -E[D(x_hat)] term
    disc_start: int = 0  # optimizer steps of reconstruction alone before the discriminator joins
    disc_channels: int = 32
    disc_layers: int = 2


def _check(cfg: AutoencoderConfig) -> None:
    if cfg.image_size <= 0 or cfg.channels <= 0:
        raise GenlabError("model.image_size and model.channels must be set (or build the model from a dataset)")
    check_int("model.image_size", cfg.image_size, 1, MAX_IMAGE_SIZE, "activations grow with its square")
    for key in ("channels", "z_channels", "disc_channels"):
        check_int(f"model.{key}", getattr(cfg, key), 1, MAX_WIDTH)
    check_int("model.base_channels", cfg.base_channels * max(cfg.channel_mults, default=1), 1, MAX_WIDTH,
              "base_channels x the largest channel_mult is the widest layer")
    for key in ("num_res_blocks", "disc_layers"):
        check_int(f"model.{key}", getattr(cfg, key), 1, MAX_DEPTH)
    if cfg.reconstruction not in ("l1", "l2"):
        raise GenlabError(f"model.reconstruction={cfg.reconstruction!r} is unknown; choose l1 or l2")
    if not cfg.channel_mults or min(cfg.channel_mults) < 1 or cfg.base_channels < 1 or cfg.num_res_blocks < 1:
        raise GenlabError("model.base_channels, model.channel_mults and model.num_res_blocks must be positive")
    if cfg.patchify < 1:
        raise GenlabError(f"model.patchify={cfg.patchify} must be at least 1")
    factor = cfg.patchify * 2 ** (len(cfg.channel_mults) - 1)
    if cfg.image_size % factor:
        raise GenlabError(f"model.image_size={cfg.image_size} must be divisible by the downsampling factor {factor} "
                          f"(model.patchify x 2 ^ (len(model.channel_mults) - 1)); change data.image_size, "
                          "model.patchify or model.channel_mults")
    for width in {cfg.base_channels * m for m in cfg.channel_mults}:
        if width % cfg.norm_groups:
            raise GenlabError(f"channel width {width} (base_channels x channel_mults) must be divisible by "
                              f"model.norm_groups={cfg.norm_groups}")
    if cfg.z_channels < 1 or cfg.kl_weight < 0 or cfg.decoder_scale <= 0:
        raise GenlabError("model.z_channels must be >= 1, model.kl_weight >= 0 and model.decoder_scale > 0")
    if cfg.disc_weight < 0 or cfg.disc_start < 0 or cfg.disc_layers < 1 or cfg.disc_channels % cfg.norm_groups:
        raise GenlabError("model.disc_weight and model.disc_start must be >= 0, model.disc_layers >= 1 and "
                          f"model.disc_channels a multiple of model.norm_groups={cfg.norm_groups}")


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice with a residual connection, no conditioning (the LDM autoencoder's block,
    Rombach et al. 2022, app. G; He et al. 2016)."""

    def __init__(self, in_ch: int, out_ch: int, norm_groups: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.GroupNorm(norm_groups, in_ch), nn.SiLU(), nn.Conv2d(in_ch, out_ch, 3, padding=1),
            nn.GroupNorm(norm_groups, out_ch), nn.SiLU(), nn.Conv2d(out_ch, out_ch, 3, padding=1),
        )
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.skip(x) + self.block(x)


def _middle(ch: int, cfg: AutoencoderConfig) -> nn.Sequential:
    attn = [SelfAttention2d(ch, head_channels=ch, norm_groups=cfg.norm_groups)] if cfg.attention else []
    return nn.Sequential(ResnetBlock(ch, ch, cfg.norm_groups), *attn, ResnetBlock(ch, ch, cfg.norm_groups))


class Encoder(nn.Module):
    """x (B, C, H, W) -> (mean, logvar) of q(z|x), each (B, z_channels, H/f, W/f)."""

    def __init__(self, cfg: AutoencoderConfig) -> None:
        super().__init__()
        widths = [cfg.base_channels * m for m in cfg.channel_mults]
        p = cfg.patchify
        self.unshuffle = nn.PixelUnshuffle(p)
        layers: list[nn.Module] = [nn.Conv2d(cfg.channels * p * p, widths[0], 3, padding=1)]
        ch = widths[0]
        for level, width in enumerate(widths):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResnetBlock(ch, width, cfg.norm_groups))
                ch = width
            if level < len(widths) - 1:
                layers.append(Downsample(ch))
        layers += [_middle(ch, cfg), nn.GroupNorm(cfg.norm_groups, ch), nn.SiLU(),
                   nn.Conv2d(ch, 2 * cfg.z_channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mean, logvar = self.net(self.unshuffle(x)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)


class Decoder(nn.Module):
    """z (B, z_channels, h, w) -> image (B, C, h*f, w*f), mirroring the encoder with nearest upsampling."""

    def __init__(self, cfg: AutoencoderConfig) -> None:
        super().__init__()
        widths = [cfg.base_channels * m for m in cfg.channel_mults][::-1]
        ch = widths[0]
        self.conv_in = nn.Conv2d(cfg.z_channels, ch, 3, padding=1)
        self.middle = _middle(ch, cfg)
        self.levels = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for level, width in enumerate(widths):
            blocks = []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(ch, width, cfg.norm_groups))
                ch = width
            self.levels.append(nn.Sequential(*blocks))
            if level < len(widths) - 1:
                self.upsample.append(Upsample(ch))
        p = cfg.patchify
        self.out = nn.Sequential(nn.GroupNorm(cfg.norm_groups, ch), nn.SiLU(),
                                 nn.Conv2d(ch, cfg.channels * p * p, 3, padding=1), nn.PixelShuffle(p))

    def forward(self, z: Tensor) -> Tensor:
        h = self.middle(self.conv_in(z))
        for i, level in enumerate(self.levels):
            h = level(h)
            if i < len(self.upsample):
                h = self.upsample[i](h, (2 * h.shape[-2], 2 * h.shape[-1]))
        return self.out(h)


def kl_standard_normal(mean: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) per element: 0.5 (mean^2 + var - 1 - logvar) (Kingma & Welling 2014,
    app. B)."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)


@MODELS.register("autoencoder_kl")
class AutoencoderKL(GenerativeModel):
    """Encoder, reparameterized Gaussian latent, decoder; loss = rec(x, x_hat) + kl_weight * KL
    (Rombach et al. 2022, sec. 3.1; Kingma & Welling 2014, eq. 10)."""

    family = "autoencoder_kl"
    config_class = AutoencoderConfig
    output = Output.IMAGE
    likelihood = Likelihood.BOUND  # the ELBO
    per_item_seeds = True

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__(config)
        _check(config)
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.discriminator: PatchDiscriminator | None = None
        if config.disc_weight > 0:
            self.discriminator = PatchDiscriminator(config.channels, config.disc_channels, config.disc_layers,
                                                    config.norm_groups)
            self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))  # checkpointed with the weights
            self.train_step = self._adversarial_step  # two optimizers: the trainer calls the family's own step

    @property
    def downsampling(self) -> int:
        """The side ratio f between images and latents."""
        return self.config.patchify * 2 ** (len(self.config.channel_mults) - 1)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(z_channels, h, w) of one latent."""
        s = self.config.image_size // self.downsampling
        return self.config.z_channels, s, s

    @classmethod
    def build(cls, config: AutoencoderConfig, dataset: Any) -> AutoencoderKL:
        """Fill image_size and channels from `dataset.info` where the config leaves them at 0."""
        return cls(with_image_shape(config, dataset, cls.family))

    # -- the two halves ---------------------------------------------------------------------
    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The posterior q(z|x) as (mean, logvar), for images in [-1, 1]."""
        return self.encoder(x)

    def decode(self, z: Tensor) -> Tensor:
        """Images (unclamped, nominally in [-1, 1]) for latents `z`."""
        return self.decoder(z)

    @staticmethod
    def reparameterize(mean: Tensor, logvar: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """z = mean + exp(logvar / 2) * eps, eps ~ N(0, I) (Kingma & Welling 2014, eq. 10)."""
        eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + (0.5 * logvar).exp() * eps

    def _reconstruction(self, x: Tensor, x_hat: Tensor) -> Tensor:
        """Per-image mean reconstruction error, (B,)."""
        err = (x_hat - x).abs() if self.config.reconstruction == "l1" else (x_hat - x).pow(2)
        return err.flatten(1).mean(1)

    # -- training -----------------------------------------------------------------------------
    def training_losses(self, batch: dict[str, Any], part: str = "autoencoder") -> dict[str, Tensor]:
        """loss = mean |x - D(z)| (or squared) + kl_weight * mean KL per latent element, z ~ q(z|x)
        (+ disc_weight * -E[logits of D(x_hat)] once the discriminator is on); with part="discriminator", the
        hinge loss of the patch discriminator on `batch["x"]` against `batch["x_hat"]`."""
        x = batch["x"]
        if part == "discriminator":
            d_loss = hinge_d_loss(self.discriminator(x), self.discriminator(batch["x_hat"]))
            return {"loss": d_loss}
        mean, logvar = self.encode(x)
        x_hat = self.decode(self.reparameterize(mean, logvar))
        rec = self._reconstruction(x, x_hat).mean()
        kl = kl_standard_normal(mean, logvar).mean()
        out = {"loss": rec + self.config.kl_weight * kl, "rec": rec.detach(), "kl": kl.detach()}
        if self._adversarial_on():
            g_loss = -self.discriminator(x_hat).mean()
            out.update(loss=out["loss"] + self.config.disc_weight * g_loss, g_loss=g_loss.detach(),
                       x_hat=x_hat.detach())
        return out

    def _adversarial_on(self) -> bool:
        return self.discriminator is not None and int(self.steps_done) >= self.config.disc_start

    def configure_optimizers(self, train_cfg: Any) -> list[torch.optim.Optimizer]:
        """One AdamW for encoder + decoder; with a discriminator, a second one for it."""
        if self.discriminator is None:
            return super().configure_optimizers(train_cfg)
        ae = [*self.encoder.parameters(), *self.decoder.parameters()]
        kw = dict(lr=train_cfg.lr, betas=tuple(train_cfg.betas), weight_decay=train_cfg.weight_decay)
        return [torch.optim.AdamW(ae, **kw), torch.optim.AdamW(self.discriminator.parameters(), **kw)]

    def _adversarial_step(self, batch: dict[str, Any], optimizers: list[Any], accelerator: Any, objective: Any
                          ) -> dict[str, Tensor]:
        """One step of the autoencoder on its loss, then (once on) one of the discriminator on the hinge loss
        against the fresh reconstructions (Esser et al. 2021, sec. 3.1). The whole batch goes in one pass
        (train.grad_accum is not split) and gradients are not clipped."""
        opt_ae, opt_d = optimizers
        losses = objective(batch)
        opt_ae.zero_grad(set_to_none=True)
        accelerator.backward(losses["loss"])
        opt_ae.step()
        out = {k: v.detach() for k, v in losses.items() if v.numel() == 1}
        if "x_hat" in losses:
            d = objective({"x": batch["x"], "x_hat": losses["x_hat"]}, part="discriminator")
            opt_d.zero_grad(set_to_none=True)
            accelerator.backward(d["loss"])
            opt_d.step()
            out["d_loss"] = d["loss"].detach()
        self.steps_done += 1
        return out

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """D(mean of q(z|x)), clamped to [-1, 1]."""
        return self.decode(self.encode(x)[0]).clamp(-1.0, 1.0)

    @torch.no_grad()
    def validation_metrics(self, val_data: Any, batch_size: int = 256) -> dict[str, float]:
        """Reconstruction loss and PSNR (dB, images in [0, 1], Hore & Ziou 2010) through the posterior mean."""
        device = next(self.parameters()).device
        rec_sum, mse_sum, psnr_sum, n = 0.0, 0.0, 0.0, 0
        for start in range(0, len(val_data), batch_size):
            x = val_data.get_batch(torch.arange(start, min(start + batch_size, len(val_data))))["x"].to(device)
            x_hat = self.reconstruct(x)
            rec_sum += self._reconstruction(x, x_hat).sum().item()
            mse = ((x_hat - x) / 2).pow(2).flatten(1).mean(1)
            mse_sum += mse.sum().item()
            psnr_sum += psnr(mse).sum().item()
            n += x.shape[0]
        return {"rec_loss": rec_sum / n, "psnr": psnr_sum / n,
                "psnr_of_mean_mse": psnr(torch.tensor(mse_sum / n)).item()}

    # -- the family contract --------------------------------------------------------------------
    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.config.channels, self.config.image_size, self.config.image_size

    @torch.no_grad()
    def sample(self, n: int, cond: Any = None, generator: Generators = None, **opts: Any) -> Tensor:
        """Decode `n` prior draws z ~ N(0, I) (poor images: the KL is weak, so the prior is not the aggregate
        posterior; this is why latent diffusion models the latents)."""
        if opts:
            raise GenlabError(f"the autoencoder_kl family takes no sampling options, got {', '.join(opts)}")
        if cond is not None:
            raise GenlabError("the autoencoder is unconditional; leave out the label")
        if not 1 <= n <= MAX_SAMPLES:
            raise GenlabError(f"n={n} is out of range; use 1..{MAX_SAMPLES}")
        z = randn((n, *self.latent_shape), generator, next(self.parameters()).device)
        return self.decode(z).clamp(-1.0, 1.0)

    @torch.no_grad()
    def log_likelihood(self, x: Tensor, cond: Any = None) -> Tensor:
        """The ELBO E_q[log p(x|z)] - KL(q(z|x) || p(z)) in nats per image (Kingma & Welling 2014, eq. 3), with a
        one-sample estimate of the expectation and a Laplace (l1) or Gaussian (l2) decoder of scale
        `decoder_scale` on images in [-1, 1] (a density bound, not a discrete likelihood)."""
        mean, logvar = self.encode(x)
        x_hat = self.decode(self.reparameterize(mean, logvar))
        b = self.config.decoder_scale
        if self.config.reconstruction == "l1":
            log_px = -(x - x_hat).abs() / b - math.log(2 * b)
        else:
            log_px = -0.5 * ((x - x_hat) / b).pow(2) - math.log(b) - 0.5 * math.log(2 * math.pi)
        return log_px.flatten(1).sum(1) - kl_standard_normal(mean, logvar).flatten(1).sum(1)

    def prepare_data(self, dataset: Any) -> Any:
        """The images themselves; the first 8 of the latest dataset prepared (the held-out split, when the trainer
        has one) are kept for the reconstruction preview."""
        keep = torch.arange(min(8, len(dataset)))
        self.preview_x = dataset.get_batch(keep)["x"]
        return dataset

    def write_preview(self, stem: Path, sample_cfg: Any, generator: torch.Generator) -> list[Path]:
        """Two PNG grids: held-out images above their reconstructions, and decoded prior draws."""
        stem = Path(stem)
        paths = []
        preview_x = getattr(self, "preview_x", None)
        if preview_x is not None:
            x = preview_x.to(next(self.parameters()).device)
            pairs = torch.cat([x, self.reconstruct(x)])
            paths.append(save_grid(pairs, stem.with_name(stem.name + "_recon.png"), nrow=x.shape[0],
                                   params={"top": "input", "bottom": "reconstruction"}))
        x = self.sample(min(sample_cfg.n, 64), generator=generator)
        paths.append(save_grid(x, stem.with_suffix(".png"), params={"n": x.shape[0], "seed": sample_cfg.seed,
                                                                    "prior": "N(0, I)"}))
        return paths


def psnr(mse: Tensor) -> Tensor:
    """Peak signal-to-noise ratio 10 log10(1 / MSE) for images in [0, 1] (Hore & Ziou 2010, eq. 2)."""
    return 10.0 * torch.log10(1.0 / mse.clamp(min=1e-12))


class LatentDataset:
    """A dataset's images replaced by autoencoder latents (posterior means) times `scale`, labels and captions kept:
    what latent diffusion trains on (Rombach et al. 2022, sec. 3.3)."""

    def __init__(self, latents: Tensor, labels: Tensor, info: Any, captions: list[str] | None = None) -> None:
        self.latents, self.labels, self.info, self.captions = latents, labels, info, captions

    def __len__(self) -> int:
        return self.latents.shape[0]

    def get_batch(self, idx: Tensor | list[int]) -> dict[str, Any]:
        idx = torch.as_tensor(idx, dtype=torch.long)
        batch: dict[str, Any] = {"x": self.latents[idx], "label": self.labels[idx]}
        if self.captions is not None:
            batch["text"] = [self.captions[i] for i in idx.tolist()]
        return batch


@torch.no_grad()
def encode_dataset(ae: AutoencoderKL, dataset: Any, scale: float = 1.0, limit: int | None = None,
                   batch_size: int = 128) -> LatentDataset:
    """Encode the first `limit` (default: all) items of `dataset` once, in eval mode on the AE's device."""
    device = next(ae.parameters()).device
    n = len(dataset) if limit is None else min(limit, len(dataset))
    was_training = ae.training
    ae.eval()
    latents, labels, captions = [], [], []
    try:
        bar = tqdm(total=n, desc="encoding", unit="img", leave=False)
        for start in range(0, n, batch_size):
            batch = dataset.get_batch(torch.arange(start, min(start + batch_size, n)))
            latents.append(ae.encode(batch["x"].to(device))[0].float().cpu() * scale)
            labels.append(batch["label"])
            captions += batch.get("text", [])
            bar.update(len(batch["label"]))
        bar.close()
    finally:
        ae.train(was_training)
    return LatentDataset(torch.cat(latents), torch.cat(labels), dataset.info, captions if captions else None)


def latent_scaling_factor(latents: Tensor) -> float:
    """1 / std of the latents over all items and elements, so scaled latents have unit variance
    (Rombach et al. 2022, app. G; the "scale_factor" of Stable Diffusion)."""
    std = latents.float().std().item()
    if not math.isfinite(std) or std <= 0:
        raise GenlabError("the autoencoder's latents have zero or non-finite spread; retrain the autoencoder")
    return 1.0 / std
