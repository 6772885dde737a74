"""Denoising diffusion (Ho et al. 2020) with an eps-predicting backbone, classifier-free guidance
(Ho & Salimans 2022) and the samplers of `genlab.sampling.solvers`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from genlab.config import MAX_DEPTH, MAX_IMAGE_SIZE, MAX_TIMESTEPS, MAX_WIDTH, check_int, from_dict, to_dict
from genlab.data.images import save_grid
from genlab.errors import GenlabError
from genlab.models.autoencoder import AutoencoderConfig, AutoencoderKL, encode_dataset, latent_scaling_factor
from genlab.models.base import (
    Conditioning,
    GenerativeModel,
    Likelihood,
    ModelConfig,
    Output,
    SampleOption,
    class_labels,
    load_model_folder,
    with_image_shape_and_classes,
)
from genlab.models.parameterization import (
    PRECONDITIONINGS,
    PREDICTIONS,
    denoised,
    edm_loss_weight,
    edm_scalings,
    edm_training_sigmas,
    min_snr_weight,
    vp_scalings,
    vp_target,
)
from genlab.registry import BACKBONES, MODELS, SAMPLERS
from genlab.sampling.controls import Callback, Guidance, Start, paste
from genlab.sampling.denoiser import Denoiser, classifier_free_guidance
from genlab.sampling.noise import Generators, randn
from genlab.sampling.schedules import (
    BETA_SCHEDULES,
    ZERO_SNR_ALPHA_BAR,
    alpha_bar_from_betas,
    alpha_bar_from_sigma,
    exponential_sigmas,
    get_sigmas,
    karras_sigmas,
    make_betas,
    rescale_zero_terminal_snr,
    sigma_from_alpha_bar,
    sigma_to_t,
)
from genlab.sampling.solvers import noise_sampler_for, sampler_options

MAX_SAMPLES = 10_000


def _images(images: Tensor, n: int, device: torch.device) -> Tensor:
    """(H, W), (C, H, W) or (B, C, H, W) images as a float (1 or n, C, H, W) batch on `device`."""
    x = torch.as_tensor(images, dtype=torch.float32, device=device)
    while x.ndim < 4:
        x = x.unsqueeze(0)
    if x.shape[0] not in (1, n):
        raise GenlabError(f"{x.shape[0]} init images or masks for n={n} samples; give one or n")
    return x
DEFAULT_GUIDANCE = Guidance()
LATENT_SCALE_ITEMS = 256  # training items whose latents set the latent scale (262k numbers at 16x16x4)


@dataclass
class DiffusionConfig(ModelConfig):
    """A pixel-space DDPM: data shape, backbone size, noise schedule and training options."""

    image_size: int = 0  # 0: take from the data
    channels: int = 0  # 0: take from the data
    num_classes: int = 0  # 0: take from the data (when class_cond); the label embedding adds a null class
    class_cond: bool = True  # condition on the dataset's labels when it has any
    backbone: str = "unet"
    base_channels: int = 32
    channel_mults: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (7,)  # feature-map sizes with self-attention (the middle always has it)
    head_channels: int = 32
    norm_groups: int = 8
    dropout: float = 0.0
    cond_drop: float = 0.1  # rate at which training labels become the null class (for guidance)
    schedule: str = "linear"  # linear | cosine | sigmoid (vp)
    timesteps: int = 1000  # vp: training steps; edm: size of the sigma table that step spacings index
    beta_start: float = 1e-4
    beta_end: float = 0.02
    zero_terminal_snr: bool = False  # rescale the vp schedule to alpha_bar_T = 0 (Lin et al. 2024); needs v or x0
    prediction: str = "eps"  # eps | v | x0 (vp); edm has its own output scaling
    preconditioning: str = "vp"  # vp: discrete timesteps; edm: continuous sigma (Karras et al. 2022)
    min_snr_gamma: float = 0.0  # > 0: Min-SNR-gamma loss weights (Hang et al. 2023, e.g. 5); vp only
    sigma_data: float = 0.5  # edm
    P_mean: float = -1.2  # edm: ln(sigma) ~ N(P_mean, P_std^2) in training
    P_std: float = 1.2
    sigma_min: float = 0.002  # edm: the sampling range
    sigma_max: float = 80.0
    clip_denoised: bool = True  # clamp the predicted x0 to [-1, 1] while sampling (pixel space only)
    # DiT backbone (backbone: dit; Peebles & Xie 2023)
    patch_size: int = 2
    hidden_size: int = 256
    depth: int = 6
    num_heads: int = 4
    mlp_ratio: float = 4.0
    long_skip: bool = False  # U-ViT long skips between shallow and deep blocks (Bao et al. 2023)
    final_conv: bool = False  # U-ViT's 3x3 convolution on the unpatchified output
    # latent diffusion (Rombach et al. 2022): image_size and channels then describe the latents
    autoencoder: str | None = None  # a trained autoencoder_kl model (or run) folder, read by build
    autoencoder_config: dict[str, Any] = field(default_factory=dict)  # filled by build; its weights are ours
    latent_scale: float = 0.0  # latents are multiplied by this; 0: 1 / std of training latents (build)
    init_from: str | None = None  # a trained model (or run) folder of this family to fine-tune, or to adapt (LoRA)


def _check(cfg: DiffusionConfig) -> None:
    if cfg.image_size <= 0 or cfg.channels <= 0:
        raise GenlabError("model.image_size and model.channels must be set (or build the model from a dataset)")
    check_int("model.image_size", cfg.image_size, 1, MAX_IMAGE_SIZE, "activations grow with its square")
    check_int("model.channels", cfg.channels, 1, MAX_WIDTH)
    check_int("model.timesteps", cfg.timesteps, 2, MAX_TIMESTEPS, "its noise tables are built with the model")
    check_int("model.base_channels", cfg.base_channels * max(cfg.channel_mults, default=1), 1, MAX_WIDTH,
              "base_channels x the largest channel_mult is the widest layer")
    check_int("model.hidden_size", cfg.hidden_size, 1, MAX_WIDTH)
    for key in ("num_res_blocks", "depth"):
        check_int(f"model.{key}", getattr(cfg, key), 1, MAX_DEPTH)
    if cfg.prediction not in PREDICTIONS:
        raise GenlabError(f"model.prediction={cfg.prediction!r} is unknown; choose one of: {', '.join(PREDICTIONS)}")
    if cfg.preconditioning not in PRECONDITIONINGS:
        raise GenlabError(f"model.preconditioning={cfg.preconditioning!r} is unknown; choose one of: "
                          f"{', '.join(PRECONDITIONINGS)}")
    if cfg.schedule not in BETA_SCHEDULES:
        raise GenlabError(f"model.schedule={cfg.schedule!r} is unknown; choose one of: {', '.join(BETA_SCHEDULES)}")
    if cfg.zero_terminal_snr and cfg.prediction == "eps":
        raise GenlabError("model.zero_terminal_snr needs model.prediction=v (or x0): eps says nothing at zero SNR")
    if cfg.min_snr_gamma < 0:
        raise GenlabError(f"model.min_snr_gamma={cfg.min_snr_gamma} must be >= 0 (0 = off)")
    if cfg.preconditioning == "edm":
        if cfg.min_snr_gamma or cfg.zero_terminal_snr:
            raise GenlabError("model.min_snr_gamma and model.zero_terminal_snr apply to vp; edm weights its loss by "
                              "lambda(sigma); leave them at 0 / false")
        if not 0 < cfg.sigma_min < cfg.sigma_max or cfg.sigma_data <= 0 or cfg.P_std <= 0:
            raise GenlabError("model.sigma_min < model.sigma_max, model.sigma_data and model.P_std must be positive")
    if not 0.0 <= cfg.cond_drop < 1.0:
        raise GenlabError(f"model.cond_drop={cfg.cond_drop} must be in [0, 1)")
    if not cfg.channel_mults or min(cfg.channel_mults) < 1 or cfg.base_channels < 1 or cfg.num_res_blocks < 1:
        raise GenlabError("model.base_channels, model.channel_mults and model.num_res_blocks must be positive")
    for width in {cfg.base_channels * m for m in cfg.channel_mults}:
        if width % cfg.norm_groups or (width > cfg.head_channels and width % cfg.head_channels):
            raise GenlabError(
                f"channel width {width} (base_channels x channel_mults) must be divisible by "
                f"model.norm_groups={cfg.norm_groups} and (when wider) model.head_channels={cfg.head_channels}"
            )


def _frozen_autoencoder(config: DiffusionConfig) -> AutoencoderKL | None:
    """The first-stage autoencoder of a latent model (weights come with this model's own), frozen; else None."""
    if not config.autoencoder_config:
        return None
    if config.latent_scale <= 0:
        raise GenlabError("model.latent_scale must be positive for a latent model (or 0 with model.autoencoder "
                          "set, to compute it from the data)")
    ae = AutoencoderKL(from_dict(AutoencoderConfig, config.autoencoder_config, prefix="model.autoencoder_config."))
    return ae.requires_grad_(False).eval()


@MODELS.register("diffusion")
class DiffusionModel(GenerativeModel):
    """DDPM trained with the simple loss ||eps - eps_theta(x_t, t, y)||^2 (Ho et al. 2020, eq. 14), or with a v / x0
    target, or EDM-preconditioned (Karras et al. 2022); sampled through one denoiser D(x, sigma, y)."""

    family = "diffusion"
    config_class = DiffusionConfig
    conditioning = frozenset({Conditioning.NONE, Conditioning.CLASS_LABEL})
    output = Output.IMAGE
    likelihood = Likelihood.BOUND
    likelihood_estimators = ("vlb", "ode")  # the variational bound and the probability-flow ODE over `denoise`
    sample_options = frozenset({SampleOption.SAMPLER, SampleOption.STEPS, SampleOption.GUIDANCE, SampleOption.START})
    per_item_seeds = True
    # LoRA (adapt.lora) on the backbone's self- and cross-attention projections, its convolutions (U-Net) and its
    # patch embedding and MLPs (DiT)
    lora_targets = ("qkv", "proj", "q", "kv", "conv1", "conv2", "conv", "x_embedder", r"blocks\.\d+\.mlp\.[02]")
    lora_scope = "net"

    def __init__(self, config: DiffusionConfig) -> None:
        super().__init__(config)
        _check(config)
        self.num_classes = config.num_classes if config.class_cond else 0
        self.net = BACKBONES.get(config.backbone).from_config(config, self.num_classes, **self.backbone_kwargs())
        self.autoencoder = _frozen_autoencoder(config)  # latent diffusion; None in pixel space
        if self.autoencoder is not None:  # its bounds would be over latents, not pixels
            self.likelihood, self.likelihood_estimators = Likelihood.NONE, ()
        self.edm = config.preconditioning == "edm"
        if self.edm:  # a table of sigmas (log-spaced over the sampling range) for step spacings and likelihoods
            log_sigma = torch.tensor([config.sigma_min, config.sigma_max], dtype=torch.float64).log()
            alpha_bar = alpha_bar_from_sigma(torch.linspace(*log_sigma, config.timesteps, dtype=torch.float64).exp())
        else:
            betas = make_betas(config.schedule, config.timesteps, config.beta_start, config.beta_end)
            if config.zero_terminal_snr:
                betas = rescale_zero_terminal_snr(betas)
            alpha_bar = alpha_bar_from_betas(betas)
            if config.zero_terminal_snr:
                alpha_bar[-1] = ZERO_SNR_ALPHA_BAR
        self.register_buffer("alpha_bar", alpha_bar.float(), persistent=False)
        self.register_buffer("sigmas", sigma_from_alpha_bar(alpha_bar).float(), persistent=False)

    def backbone_kwargs(self) -> dict[str, Any]:
        """Extra keyword arguments of the backbone's `from_config` (a text family adds its `context_dim`)."""
        return {}

    def backbone(self, x: Tensor, t: Tensor, cond: Any) -> Tensor:
        """The network F(x, t, cond); a family with another kind of condition unpacks it here."""
        return self.net(x, t, cond)

    @classmethod
    def build(cls, config: DiffusionConfig, dataset: Any) -> DiffusionModel:
        """Fill image_size, channels and num_classes from `dataset.info` where the config leaves them at 0."""
        if config.init_from:
            return cls.continued(config, dataset)
        config = with_image_shape_and_classes(config, dataset, cls.family)
        return cls._with_autoencoder(config, dataset) if config.autoencoder else cls(config)

    @classmethod
    def continued(cls, config: DiffusionConfig, dataset: Any) -> DiffusionModel:
        """The trained model of `config.init_from` (this family) to fine-tune or adapt: its own keys and weights,
        with the recipe's `cond_drop` and `init_from`; its images must be the dataset's size."""
        model = load_model_folder("model.init_from", config.init_from, f"a trained {cls.family} model (or run) folder",
                                  lambda m: type(m) is cls)
        ours = model.config.autoencoder_config or to_dict(model.config)
        info = dataset.info
        if (ours["channels"], ours["image_size"]) != (info.channels, info.image_size):
            raise GenlabError(f"model.init_from={config.init_from!r} draws {ours['channels']}-channel "
                              f"{ours['image_size']}px images but dataset {info.name!r} has {info.channels}-channel "
                              f"{info.image_size}px ones; set data.image_size={ours['image_size']}")
        model.config = dataclasses.replace(model.config, cond_drop=config.cond_drop, init_from=config.init_from)
        return model

    @classmethod
    def _with_autoencoder(cls, config: DiffusionConfig, dataset: Any, **kwargs: Any) -> DiffusionModel:
        """Latent diffusion (Rombach et al. 2022, sec. 3.3): load the trained autoencoder, take the latent scale
        as 1 / std of the first LATENT_SCALE_ITEMS training latents (app. G) unless the config sets it, and size
        the denoiser for latents. The autoencoder's weights become part of this model's, so its folder is
        self-contained."""
        ae = load_model_folder("model.autoencoder", config.autoencoder, "the model folder of a trained autoencoder_kl",
                               lambda m: isinstance(m, AutoencoderKL))
        ae_shape, data_shape = (ae.config.channels, ae.config.image_size), (config.channels, config.image_size)
        if ae_shape != data_shape:
            raise GenlabError(f"the autoencoder was trained on {ae_shape[0]}-channel {ae_shape[1]}px images but the "
                              f"data has {data_shape[0]}-channel {data_shape[1]}px ones; set data.image_size="
                              f"{ae_shape[1]} or use another autoencoder")
        scale = config.latent_scale
        if scale <= 0:
            scale = latent_scaling_factor(encode_dataset(ae, dataset, limit=LATENT_SCALE_ITEMS).latents)
        c, h, _ = ae.latent_shape
        model = cls(dataclasses.replace(config, image_size=h, channels=c, autoencoder_config=to_dict(ae.config),
                                        latent_scale=scale), **kwargs)
        model.autoencoder.load_state_dict(ae.state_dict())
        return model

    def prepare_data(self, dataset: Any) -> Any:
        """Pixel space: the dataset; latent space: its images encoded once into scaled latents."""
        if self.autoencoder is None:
            return dataset
        return encode_dataset(self.autoencoder, dataset, scale=self.config.latent_scale)

    # -- training -----------------------------------------------------------------------
    def training_losses(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """vp: t ~ U{0..T-1}, x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps, MSE on the eps / v / x0 target
        (Min-SNR-gamma weighted if set); edm: ln sigma ~ N(P_mean, P_std^2), lambda(sigma) ||D(x0 + sigma eps) - x0||^2
        (Karras et al. 2022, eq. 2 and table 1)."""
        x0 = batch["x"]
        B = x0.shape[0]
        cfg = self.config
        if self.edm:
            sigma = edm_training_sigmas(B, cfg.P_mean, cfg.P_std, x0.device)
        else:
            t = torch.randint(0, cfg.timesteps, (B,), device=x0.device)
            sigma = self.sigmas[t]
        eps = torch.randn_like(x0)
        y = self.training_labels(batch, x0.device)
        if self.edm:
            per_item = ((self.denoise(x0 + sigma.view(B, 1, 1, 1) * eps, sigma, y) - x0) ** 2).flatten(1).mean(1)
            return {"loss": (edm_loss_weight(sigma, cfg.sigma_data) * per_item).mean()}
        per_item = self.vp_errors(x0, t, eps, y)
        if not cfg.min_snr_gamma:
            return {"loss": per_item.mean()}
        return {"loss": (min_snr_weight(sigma, cfg.min_snr_gamma, cfg.prediction) * per_item).mean()}

    def vp_errors(self, x0: Tensor, t: Tensor, eps: Tensor, y: Any) -> Tensor:
        """||target - F(x_t, t, y)||^2 per item (mean over its elements), x_t = sqrt(alpha_bar_t) x0 +
        sqrt(1 - alpha_bar_t) eps, target eps / v / x0 (Ho et al. 2020, eq. 14; Salimans & Ho 2022, eq. 9)."""
        alpha_bar = self.alpha_bar[t].view(-1, *([1] * (x0.ndim - 1)))
        x_t = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * eps
        target = vp_target(x0, eps, self.sigmas[t], self.config.prediction)
        return ((self.backbone(x_t, t, y) - target) ** 2).flatten(1).mean(1)

    def training_labels(self, batch: dict[str, Any], device: torch.device) -> Tensor | None:
        """The batch's labels for the backbone (None when unconditional): unlabeled items (-1) train the null
        class, and `cond_drop` of them become the null class in training, for classifier-free guidance."""
        if not self.num_classes:
            return None
        y = batch["label"].to(device)
        y = torch.where(y < 0, self.num_classes, y)
        return self.net.label_embed.drop(y, self.config.cond_drop if self.training else 0.0)

    # -- sampling -----------------------------------------------------------------------
    def denoise(self, x: Tensor, sigma: Tensor, cond: Tensor | None = None, quantize: bool = True) -> Tensor:
        """D(x, sigma, y) = c_skip x + c_out F(c_in x, c_noise, y) (Karras et al. 2022, eq. 7 and table 1): vp feeds
        the nearest training timestep t(sigma) as c_noise (fractional with quantize=False), edm ln(sigma) / 4."""
        if self.edm:
            c_skip, c_out, c_in, c_noise = edm_scalings(sigma, self.config.sigma_data)
        else:
            c_skip, c_out, c_in = vp_scalings(sigma, self.config.prediction)
            c_noise = sigma_to_t(sigma, self.sigmas, quantize)
        return denoised(x, self.backbone(x * c_in.view(-1, 1, 1, 1), c_noise, cond), c_skip, c_out)

    def sampling_sigmas(self, steps: int, spacing: str = "leading", schedule: str | None = None) -> Tensor:
        """The sigmas of a `steps`-step sampler, ending in 0: the `schedule` (karras, exponential, uniform, or a
        timestep spacing) over the training sigmas, by default the `spacing` of timesteps; edm: the Karras
        (rho = 7, Karras et al. 2022, eq. 5) or exponential schedule from sigma_max to sigma_min."""
        if self.edm:
            if schedule not in (None, "karras", "exponential"):
                raise GenlabError(f"schedule={schedule!r}: an edm model samples continuous sigmas; use karras or "
                                  "exponential")
            make = exponential_sigmas if schedule == "exponential" else karras_sigmas
            return make(steps, self.config.sigma_min, self.config.sigma_max).to(self.sigmas)
        return get_sigmas(schedule or spacing, self.sigmas, steps)

    def guided_denoiser(self, guidance: Guidance | None = None, labels: Tensor | None = None) -> Denoiser:
        """The denoiser the samplers call: classifier-free guidance when its scale != 1 (against the null class, or
        the negative labels), with guidance rescale, then x0 clamped to [-1, 1]; None: no guidance."""
        denoiser: Denoiser = self.denoise
        if labels is not None and guidance is not None and guidance.scale != 1.0:
            n = len(labels)
            null = self.labels_for(n, guidance.negative).to(labels.device) if guidance.negative is not None \
                else torch.full_like(labels, self.num_classes)
            denoiser = classifier_free_guidance(denoiser, guidance.scale, null, guidance.rescale)
        if not self.config.clip_denoised or self.autoencoder is not None:
            return denoiser
        inner = denoiser
        return lambda x, sigma, cond: inner(x, sigma, cond).clamp(-1.0, 1.0)

    def labels_for(self, n: int, cond: Any = None) -> Tensor | None:
        """Labels as a (n,) long tensor (`class_labels`); None on an unconditional model."""
        if not self.num_classes:
            if cond is not None:
                raise GenlabError("this model is unconditional; leave out the label")
            return None
        return class_labels(n, cond, self.num_classes)

    def sampling_condition(self, n: int, cond: Any, device: torch.device) -> Any:
        """The `cond` the denoiser is called with for `sample(n, cond)`: labels on `device` (None: unconditional)."""
        labels = self.labels_for(n, cond)
        return labels.to(device) if labels is not None else None

    @torch.no_grad()
    def sample(self, n: int, cond: Any = None, generator: Generators = None, *, sampler: str = "ddim",
               steps: int = 50, spacing: str = "leading", schedule: str | None = None,
               guidance: Guidance = DEFAULT_GUIDANCE, start: Start | None = None, callback: Callback | None = None,
               progress: bool = False, **sampler_opts: Any) -> Tensor:
        """`n` images in [-1, 1]: x_T ~ N(0, I), then `sampler` over the `schedule` sigmas (default: `steps`
        timesteps with `spacing`) on the `guidance`-wrapped denoiser; a `start` image composes img2img or
        inpainting from `genlab.sampling.controls`.

        `sampler_opts` go to the sampler (eta, s_churn, order, ...); `callback` gets each step's dict (its
        `denoised` is the preview). `generator` may be a list of n generators: image i then depends on
        generator i only.
        """
        if not 1 <= n <= MAX_SAMPLES:
            raise GenlabError(f"n={n} is out of range; use 1..{MAX_SAMPLES}")
        run = SAMPLERS.get(sampler)
        opts = sampler_options(sampler, **sampler_opts)
        device = self.alpha_bar.device
        labels = self.sampling_condition(n, cond, device)
        sigmas = self.sampling_sigmas(steps, spacing, schedule).to(device)
        c, s = self.config.channels, self.config.image_size
        noise = randn((n, c, s, s), generator, device)
        denoiser = self.guided_denoiser(guidance, labels)
        x = noise * (1 + sigmas[0] ** 2).sqrt()
        mask = None
        if start is not None:
            init = self._model_space(start.image, n)
            mask = self._model_space_mask(start.mask, n) if start.mask is not None else None
            run, denoiser, sigmas, x = start.compose(sampler, run, denoiser, sigmas, noise, init, mask)
        noise_sampler = noise_sampler_for(sampler, x, generator)
        was_training = self.training
        self.eval()
        try:
            out = run(denoiser, x, sigmas, cond=labels, noise_sampler=noise_sampler, callback=callback,
                      progress=progress, **opts)
        finally:
            self.train(was_training)
        if mask is not None:
            out = paste(out, init, mask)
        if self.autoencoder is not None:
            out = self.autoencoder.decode(out / self.config.latent_scale)
            if start is not None and start.mask is not None:  # the decoder only approximates the known pixels
                out = paste(out, _images(start.image, n, device), _images(start.mask, n, device))
        return out.clamp(-1.0, 1.0)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the pixels: the autoencoder's for a latent model."""
        cfg = self.autoencoder.config if self.autoencoder is not None else self.config
        return cfg.channels, cfg.image_size, cfg.image_size

    def _model_space(self, images: Tensor, n: int) -> Tensor:
        """Images in [-1, 1] (one, or one per sample) in the sampler's space: pixels, or scaled latent means."""
        x = _images(images, n, self.alpha_bar.device)
        if tuple(x.shape[1:]) != self.image_shape:
            c, h, w = self.image_shape
            raise GenlabError(f"init image is {tuple(x.shape[1:])} but this model makes {c}x{h}x{w} images; "
                              "resize it")
        if self.autoencoder is None:
            return x.expand(n, -1, -1, -1)
        return self.autoencoder.encode(x)[0].expand(n, -1, -1, -1) * self.config.latent_scale

    def _model_space_mask(self, mask: Tensor, n: int) -> Tensor:
        """A mask (1 = generate) in the sampler's space; a latent is generated where any of its pixels is."""
        m = _images(mask, n, self.alpha_bar.device)
        if m.min() < 0 or m.max() > 1:
            raise GenlabError("mask values must be in [0, 1] (1 = generate, 0 = keep)")
        if self.autoencoder is not None:
            m = F.adaptive_max_pool2d(m, self.config.image_size)
        return m.expand(n, -1, -1, -1)

    def check_sample_config(self, sample_cfg: Any) -> None:
        """The preview's steps must fit this model's schedule (e.g. at most model.timesteps with a spacing)."""
        try:
            self.sampling_sigmas(sample_cfg.steps)
        except GenlabError as e:
            raise GenlabError(f"sample.steps={sample_cfg.steps} does not fit this model: {e}") from None

    def write_preview(self, stem: Path, sample_cfg: Any, generator: torch.Generator) -> list[Path]:
        """A PNG grid of samples, one row per class when the model is class-conditional."""
        n, nrow = sample_cfg.n, None
        if self.num_classes:
            nrow = max(1, sample_cfg.n // self.num_classes)
            n = nrow * self.num_classes
        x = self.sample(n, generator=generator, sampler=sample_cfg.sampler, steps=sample_cfg.steps,
                        guidance=Guidance(sample_cfg.cfg), eta=sample_cfg.eta)
        params = {"sampler": sample_cfg.sampler, "steps": sample_cfg.steps, "cfg": sample_cfg.cfg,
                  "eta": sample_cfg.eta, "n": n, "seed": sample_cfg.seed}
        return [save_grid(x, Path(stem).with_suffix(".png"), nrow=nrow, params=params)]
