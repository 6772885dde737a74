"""Variational autoencoder in pixel space (Kingma & Welling 2014), with a beta weight on the KL (Higgins et al. 2017)
and the importance-weighted bound (Burda et al. 2016) for evaluation.

The encoder and decoder are the KL autoencoder's convolutional blocks: q(z|x) = N(mean, exp(logvar)) over a small
spatial latent of `z_channels` x (image_size / f)^2 and a prior p(z) = N(0, I). The decoder's likelihood p(x|z) is one
of (`model.decoder`):

- `logistic`: a discretized logistic per pixel over the 256 levels of 8-bit data (Salimans et al. 2017, eq. 2), with
  a learned location and scale: a probability mass, so the ELBO bounds log P(x) of the 8-bit image directly;
- `gaussian`: N(mean, s^2) per pixel, s learned per pixel (`gaussian_std: 0`) or fixed, a density on [-1, 1];
- `bernoulli`: p(b|z) over binarized pixels b = [intensity > 1/2] (x > 0 in [-1, 1]); it models the binarized image,
  not the 8-bit one, so the model declares no 8-bit likelihood and `genlab eval --metrics nll` refuses it.

`sample` decodes prior draws to the mean of p(x|z) (the logistic location for `logistic`, 2 p - 1 for
`bernoulli`), not to a draw from it.

With `class_cond`, a learned embedding of the label y, broadcast over the pixels, is concatenated to the encoder's
input and to the decoder's latent: q(z|x, y) and p(x|z, y) (a conditional VAE, Sohn et al. 2015). Without a label,
`log_likelihood` bounds log p(x) = log (1/K) sum_y p(x|y) by log (1/K) sum_y exp(bound_y) (a uniform p(y)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genlab.config import MAX_WIDTH, check_int
from genlab.data.images import DELTA, save_grid
from genlab.errors import GenlabError
from genlab.models.autoencoder import AutoencoderConfig, Decoder, Encoder, kl_standard_normal
from genlab.models.autoencoder import _check as check_blocks
from genlab.models.base import (
    Conditioning,
    GenerativeModel,
    Likelihood,
    ModelConfig,
    Output,
    class_labels,
    with_image_shape_and_classes,
)
from genlab.nn.distributions import discretized_logistic_log_prob, to_pixel_levels
from genlab.registry import MODELS
from genlab.sampling.noise import Generators, randn

MAX_SAMPLES = 10_000
MAX_IWAE_SAMPLES = 100_000
DECODERS = ("logistic", "gaussian", "bernoulli")
ESTIMATORS = ("iwae", "elbo")
VAL_ITEMS = 1000  # held-out images behind the validation ELBO


@dataclass
class VAEConfig(ModelConfig):
    """Image shape, encoder/decoder widths (the KL autoencoder's blocks), latent size, likelihood and KL weight."""

    image_size: int = 0  # 0: take from the data
    channels: int = 0  # 0: take from the data
    class_cond: bool = False  # condition encoder and decoder on the dataset's labels
    num_classes: int = 0  # 0: take from the data (when class_cond)
    label_channels: int = 4  # channels of the label embedding map
    base_channels: int = 32
    channel_mults: tuple[int, ...] = (1, 2, 2)  # one level per entry; each level after the first halves the side
    patchify: int = 1
    num_res_blocks: int = 1
    attention: bool = False
    norm_groups: int = 8
    z_channels: int = 2  # latent: z_channels x (image_size / 2^(levels - 1) / patchify)^2
    decoder: str = "logistic"  # logistic | gaussian | bernoulli
    gaussian_std: float = 0.0  # gaussian: 0 = a per-pixel scale from the decoder; > 0 = this fixed scale
    min_log_scale: float = -7.0  # floor of learned log-scales (logistic, gaussian), as in PixelCNN++
    beta: float = 1.0  # weight of the KL (Higgins et al. 2017); 1 = the ELBO
    iwae_samples: int = 64  # k of the importance-weighted bound used by evaluation


def _check(cfg: VAEConfig) -> None:
    check_blocks(_blocks_config(cfg, max(cfg.channels, 1)))
    if cfg.decoder not in DECODERS:
        raise GenlabError(f"model.decoder={cfg.decoder!r} is unknown; choose one of: {', '.join(DECODERS)}")
    if not (math.isfinite(cfg.beta) and cfg.beta >= 0 and math.isfinite(cfg.gaussian_std) and cfg.gaussian_std >= 0):
        raise GenlabError("model.beta and model.gaussian_std must be finite and >= 0 (gaussian_std 0 = learned)")
    if cfg.gaussian_std and cfg.decoder != "gaussian":
        raise GenlabError(f"model.gaussian_std applies to decoder gaussian, not {cfg.decoder}; leave it at 0")
    if not math.isfinite(cfg.min_log_scale):
        raise GenlabError(f"model.min_log_scale={cfg.min_log_scale} must be finite")
    check_int("model.iwae_samples", cfg.iwae_samples, 1, MAX_IWAE_SAMPLES)
    check_int("model.label_channels", cfg.label_channels, 1, MAX_WIDTH)
    if cfg.num_classes < 0 or (cfg.class_cond and cfg.num_classes == 0):
        raise GenlabError("model.class_cond needs labelled data (or model.num_classes >= 1)")


def _blocks_config(cfg: VAEConfig, channels: int, z_channels: int = 0) -> AutoencoderConfig:
    """The autoencoder config that sizes an encoder reading (or a decoder writing) `channels` per pixel, and a
    decoder reading `z_channels` (default the latent's)."""
    return AutoencoderConfig(image_size=cfg.image_size, channels=channels, base_channels=cfg.base_channels,
                             channel_mults=cfg.channel_mults, patchify=cfg.patchify, num_res_blocks=cfg.num_res_blocks,
                             attention=cfg.attention, norm_groups=cfg.norm_groups,
                             z_channels=z_channels or cfg.z_channels)


@MODELS.register("vae")
class VAE(GenerativeModel):
    """q(z|x), p(z) = N(0, I), p(x|z); loss = -E_q[log p(x|z)] + beta KL(q(z|x) || p(z)), per dimension."""

    family = "vae"
    config_class = VAEConfig
    output = Output.IMAGE
    likelihood = Likelihood.BOUND  # the ELBO, or the tighter importance-weighted bound
    likelihood_estimators = ESTIMATORS  # log_likelihood(x, estimator=...): IWAE with iwae_samples (default), ELBO
    conditioning = frozenset({Conditioning.NONE, Conditioning.CLASS_LABEL})
    per_item_seeds = True

    def __init__(self, config: VAEConfig) -> None:
        super().__init__(config)
        _check(config)
        c = config.channels
        learned_scale = config.decoder == "logistic" or (config.decoder == "gaussian" and not config.gaussian_std)
        self.params_per_pixel = 2 if learned_scale else 1  # location (or logit), and a log-scale where learned
        self.num_classes = config.num_classes if config.class_cond else 0
        e = config.label_channels if self.num_classes else 0
        self.label_embedding = nn.Embedding(self.num_classes, e) if self.num_classes else None
        self.encoder = Encoder(_blocks_config(config, c + e))
        self.decoder = Decoder(_blocks_config(config, self.params_per_pixel * c, config.z_channels + e))
        if config.decoder == "bernoulli":  # a bound over binarized images, not 8-bit ones
            self.likelihood, self.likelihood_estimators = Likelihood.NONE, ()

    @classmethod
    def build(cls, config: VAEConfig, dataset: Any) -> VAE:
        """Fill image_size, channels and num_classes from `dataset.info` where the config leaves them at 0."""
        return cls(with_image_shape_and_classes(config, dataset, cls.family))

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.config.channels, self.config.image_size, self.config.image_size

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(z_channels, h, w) of one latent."""
        s = self.config.image_size // (self.config.patchify * 2 ** (len(self.config.channel_mults) - 1))
        return self.config.z_channels, s, s

    def labels_for(self, n: int, label: Any = None) -> Tensor | None:
        """(n,) labels for a class-conditional model (None cycles the classes, one grid row each); else None."""
        return class_labels(n, label, self.num_classes) if self.num_classes else super().labels_for(n, label)

    def _with_label(self, h: Tensor, y: Tensor | None) -> Tensor:
        """h with the label embedding of y broadcast over its pixels as extra channels (h itself if unconditional)."""
        if self.label_embedding is None:
            return h
        if y is None:
            raise GenlabError("this vae is class-conditional: give labels")
        emb = self.label_embedding(torch.as_tensor(y, device=h.device).long().expand(h.shape[0]))
        return torch.cat([h, emb.to(h.dtype)[:, :, None, None].expand(-1, -1, *h.shape[2:])], dim=1)

    # -- the two halves -------------------------------------------------------------------------
    def encode(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The posterior q(z|x, y) as (mean, logvar), for images in [-1, 1]."""
        return self.encoder(self._with_label(x, y))

    def decode(self, z: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """The parameters of p(x|z, y): (location or logit, log-scale or None when fixed or Bernoulli)."""
        out = self.decoder(self._with_label(z, y))
        if self.params_per_pixel == 1:
            return out, None
        loc, log_scale = out.chunk(2, dim=1)
        return loc, log_scale.clamp(min=self.config.min_log_scale)

    def decoder_mean(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        """The mean of p(x|z, y) in [-1, 1] (for `logistic`, its location clamped to [-1, 1])."""
        loc, _ = self.decode(z, y)
        return 2 * torch.sigmoid(loc) - 1 if self.config.decoder == "bernoulli" else loc.clamp(-1.0, 1.0)

    def log_px(self, x: Tensor, z: Tensor, y: Tensor | None = None) -> Tensor:
        """log p(x|z) per image, (B,): for `logistic` the log mass of the 8-bit levels of x (Salimans et al. 2017,
        eq. 2); for `gaussian` the log density of x; for `bernoulli` the log mass of the binarized image."""
        loc, log_scale = self.decode(z, y)
        kind = self.config.decoder
        if kind == "logistic":
            lp = discretized_logistic_log_prob(to_pixel_levels(x), loc, log_scale)
        elif kind == "bernoulli":
            lp = -F.binary_cross_entropy_with_logits(loc, (x > 0).to(loc.dtype), reduction="none")
        else:
            scale = log_scale.exp() if log_scale is not None else torch.full_like(loc, self.config.gaussian_std)
            lp = torch.distributions.Normal(loc, scale).log_prob(x)
        return lp.flatten(1).sum(1)

    @staticmethod
    def reparameterize(mean: Tensor, logvar: Tensor) -> tuple[Tensor, Tensor]:
        """(z, eps) with z = mean + exp(logvar / 2) eps, eps ~ N(0, I) (Kingma & Welling 2014, eq. 10)."""
        eps = torch.randn_like(mean)
        return mean + (0.5 * logvar).exp() * eps, eps

    def elbo_terms(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(log p(x|z, y) with one z ~ q(z|x, y), KL(q(z|x, y) || N(0, I)) in closed form), each in nats per
        image."""
        mean, logvar = self.encode(x, y)
        z, _ = self.reparameterize(mean, logvar)
        return self.log_px(x, z, y), kl_standard_normal(mean, logvar).flatten(1).sum(1)

    # -- training -------------------------------------------------------------------------------
    def training_losses(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Negative beta-ELBO per dimension: (-E_q[log p(x|z)] + beta KL(q(z|x) || p(z))) / D, one z per image
        (Kingma & Welling 2014, eq. 3 and 10; Higgins et al. 2017, eq. 4)."""
        x = batch["x"]
        log_px, kl = self.elbo_terms(x, batch.get("label") if self.num_classes else None)
        dims = x[0].numel()
        rec, kl = -log_px.mean() / dims, kl.mean() / dims
        return {"loss": rec + self.config.beta * kl, "rec": rec.detach(), "kl": kl.detach()}

    @torch.no_grad()
    def validation_metrics(self, val_data: Any, batch_size: int = 250) -> dict[str, float]:
        """On the first VAL_ITEMS held-out images: the negative ELBO (beta = 1) in bits per dimension (for
        `gaussian` with the bin-width conversion -log P ~ -log p - D log(2/255), undequantized; for `bernoulli` per
        binarized pixel) and its KL part."""
        device = next(self.parameters()).device
        n = min(len(val_data), VAL_ITEMS)
        neg_elbo, kl_sum = 0.0, 0.0
        for start in range(0, n, batch_size):
            batch = val_data.get_batch(torch.arange(start, min(start + batch_size, n)))
            y = batch["label"].to(device) if self.num_classes else None
            log_px, kl = self.elbo_terms(batch["x"].to(device), y)
            neg_elbo -= float((log_px - kl).sum())
            kl_sum += float(kl.sum())
        dims = math.prod(self.image_shape)
        if self.config.decoder == "gaussian":
            neg_elbo -= n * dims * math.log(DELTA)
        return {"elbo_bits_per_dim": neg_elbo / (n * dims * math.log(2)), "kl_bits_per_dim":
                kl_sum / (n * dims * math.log(2))}

    # -- the family contract ----------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, n: int, cond: Any = None, generator: Generators = None, **opts: Any) -> Tensor:
        """The mean of p(x|z, y) for `n` prior draws z ~ N(0, I) (labels y from `labels_for(n, cond)`)."""
        if opts:
            raise GenlabError(f"the vae family takes no sampling options, got {', '.join(opts)}")
        if not 1 <= n <= MAX_SAMPLES:
            raise GenlabError(f"n={n} is out of range; use 1..{MAX_SAMPLES}")
        param = next(self.parameters())
        y = self.labels_for(n, cond)
        z = randn((n, *self.latent_shape), generator, param.device, param.dtype)
        return self.decoder_mean(z, None if y is None else y.to(param.device))

    @torch.no_grad()
    def log_likelihood(self, x: Tensor, cond: Any = None, estimator: str = "elbo", samples: int | None = None
                       ) -> Tensor:
        """A lower bound on log p(x) in nats per image, as a density of x in [-1, 1] (for `logistic`, the mass of
        x's 8-bit level over the bin volume, so a dequantized point gives back -log P of the level):
        `elbo`: log p(x|z) - KL(q(z|x) || p(z)), one z (Kingma & Welling 2014, eq. 3);
        `iwae`: log (1/k) sum_i p(x|z_i) p(z_i) / q(z_i|x), k = `samples` (default iwae_samples) draws z_i ~ q(z|x)
        (Burda et al. 2016, eq. 8), which is at least the ELBO on average and rises with k."""
        if self.likelihood is Likelihood.NONE:
            raise GenlabError("the bernoulli decoder models binarized pixels, not 8-bit ones: use model.decoder "
                              "logistic or gaussian for a likelihood")
        if estimator not in ESTIMATORS:
            raise GenlabError(f"estimator={estimator!r} is unknown; choose one of: {', '.join(ESTIMATORS)}")
        k = samples or self.config.iwae_samples
        if self.num_classes and cond is None:  # log (1/K) sum_y exp(bound(x | y)) <= log p(x), uniform p(y)
            per_class = [self._bound(x, torch.full((x.shape[0],), y, device=x.device), estimator, k)
                         for y in range(self.num_classes)]
            bound = torch.logsumexp(torch.stack(per_class), dim=0) - math.log(self.num_classes)
        else:
            bound = self._bound(x, self.labels_for(x.shape[0], cond), estimator, k)
        if self.config.decoder == "logistic":  # a mass per level -> a density over the level's bin
            bound = bound - x[0].numel() * math.log(DELTA)
        return bound

    def _bound(self, x: Tensor, y: Tensor | None, estimator: str, k: int) -> Tensor:
        if y is not None:
            y = y.to(x.device)
        if estimator == "elbo":
            log_px, kl = self.elbo_terms(x, y)
            return log_px - kl
        return self.iwae_bound(x, k, y)

    def iwae_bound(self, x: Tensor, k: int, y: Tensor | None = None) -> Tensor:
        """log (1/k) sum_i w_i, log w_i = log p(x|z_i) + log N(z_i; 0, I) - log q(z_i|x) (Burda et al. 2016, eq. 8),
        one decoder pass per draw."""
        check_int("iwae samples", k, 1, MAX_IWAE_SAMPLES)
        mean, logvar = self.encode(x, y)
        log_w = []
        for _ in range(k):
            z, eps = self.reparameterize(mean, logvar)
            log_pz = -0.5 * (z.pow(2) + math.log(2 * math.pi))
            log_qz = -0.5 * (eps.pow(2) + logvar + math.log(2 * math.pi))
            log_w.append(self.log_px(x, z, y) + (log_pz - log_qz).flatten(1).sum(1))
        return torch.logsumexp(torch.stack(log_w), dim=0) - math.log(k)

    # -- previews ---------------------------------------------------------------------------------
    def prepare_data(self, dataset: Any) -> Any:
        """The images themselves; the first 8 of the latest dataset prepared (the held-out split, when the trainer
        has one) are kept for the reconstruction preview."""
        batch = dataset.get_batch(torch.arange(min(8, len(dataset))))
        self.preview_x, self.preview_y = batch["x"], batch["label"] if self.num_classes else None
        return dataset

    @torch.no_grad()
    def write_preview(self, stem: Path, sample_cfg: Any, generator: torch.Generator) -> list[Path]:
        """Two PNG grids: held-out images above the decoder means at their posterior means, and samples."""
        stem, paths = Path(stem), []
        preview_x = getattr(self, "preview_x", None)
        if preview_x is not None:
            x, y = preview_x.to(next(self.parameters()).device), getattr(self, "preview_y", None)
            y = None if y is None else y.to(x.device)
            pairs = torch.cat([x, self.decoder_mean(self.encode(x, y)[0], y)])
            paths.append(save_grid(pairs, stem.with_name(stem.name + "_recon.png"), nrow=x.shape[0],
                                   params={"top": "input", "bottom": "reconstruction"}))
        n = min(sample_cfg.n, 64)
        x = self.sample(n, generator=generator)
        nrow = -(-n // self.num_classes) if self.num_classes else None  # one row per class
        paths.append(save_grid(x, stem.with_suffix(".png"), nrow=nrow, params={"n": x.shape[0], "seed": sample_cfg.seed,
                                                                    "decoder": self.config.decoder, "shown": "mean"}))
        return paths
