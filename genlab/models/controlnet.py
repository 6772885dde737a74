"""ControlNet on a trained diffusion model (Zhang et al. 2023): the frozen U-Net of `model.init_from` plus a trainable
copy of its encoder joined by zero convolutions (`genlab.nn.controlnet`), trained with the base's own loss
(Zhang et al. 2023, eq. 5) on controls made from each training image: its Sobel edge map.

The condition the denoiser passes is a `ControlCondition` (labels, control images, scales); samplers and guidance
only batch it. Several controls add their residuals weighted by their scales (as diffusers' MultiControlNet). The
model folder holds the base's weights too, so it is self-contained.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from genlab.config import check_number, to_dict
from genlab.errors import GenlabError
from genlab.models.base import Conditioning, GenerativeModel, resolve_model_dir
from genlab.models.diffusion import DiffusionConfig, DiffusionModel
from genlab.nn.controlnet import ControlNet, combine_residuals, sobel_edges, thin_edges
from genlab.nn.unet import UNet
from genlab.registry import MODELS
from genlab.sampling.controls import Guidance
from genlab.sampling.denoiser import Denoiser, classifier_free_guidance

CONTROLS = ("edges", "thin_edges")
MAX_CONTROLS = 8


@dataclass
class Control:
    """Control images for `sample`: `images` (K, C, H, W) or (K, n, C, H, W) in [0, 1] (white = edge), one per
    control (shared by the n samples, or one per sample), and one scale per control."""

    images: Tensor
    scales: tuple[float, ...] = (1.0,)


@dataclass
class ControlCondition:
    """The batched `cond` of a ControlNet model: `labels` (B,) or None, `controls` (B, K, C, H, W) in [-1, 1], and
    the K scales (shared by the batch)."""

    labels: Tensor | None
    controls: Tensor
    scales: tuple[float, ...]

    def __len__(self) -> int:
        return self.controls.shape[0]

    def __getitem__(self, index: Any) -> ControlCondition:
        labels = self.labels[index] if self.labels is not None else None
        return ControlCondition(labels, self.controls[index], self.scales)

    def cat(self, other: ControlCondition) -> ControlCondition:
        if self.scales != other.scales or (self.labels is None) != (other.labels is None):
            raise ValueError("cannot batch control conditions with other scales or without labels")
        labels = torch.cat([self.labels, other.labels]) if self.labels is not None else None
        return ControlCondition(labels, torch.cat([self.controls, other.controls]), self.scales)


@dataclass
class ControlNetConfig(DiffusionConfig):
    """The base diffusion model's keys (copied from `init_from` by build) plus the control's."""

    init_from: str | None = None  # the trained diffusion model (or run) folder whose U-Net stays frozen
    control: str = "edges"  # edges: Sobel magnitude of the grey image (in [0, 1]) above edge_threshold; thin_edges:
    # those thinned by non-maximum suppression
    edge_threshold: float = 1.0


def control_of(images: Tensor, config: ControlNetConfig) -> Tensor:
    """The control (B, 1, H, W) in {0, 1} made from images (B, C, H, W) in [-1, 1]."""
    if config.control == "thin_edges":
        return thin_edges(images, config.edge_threshold)
    return sobel_edges(images, config.edge_threshold)


def _check_control(config: ControlNetConfig) -> None:
    if config.control not in CONTROLS:
        raise GenlabError(f"model.control={config.control!r} is unknown; choose one of: {', '.join(CONTROLS)}")
    check_number("model.edge_threshold", config.edge_threshold, 0, 4 * 2**0.5,
                 hint="the Sobel magnitude of a grey level in [0, 1] is at most 4 sqrt 2")


@MODELS.register("controlnet")
class ControlNetModel(DiffusionModel):
    """A diffusion model steered by control images through a ControlNet; only the ControlNet's parameters train."""

    family = "controlnet"
    config_class = ControlNetConfig
    conditioning = DiffusionModel.conditioning | {Conditioning.CONTROL_IMAGE}

    def __init__(self, config: ControlNetConfig) -> None:
        _check_control(config)
        if config.backbone != "unet" or config.autoencoder_config:
            raise GenlabError("a ControlNet copies a pixel-space U-Net's encoder: model.init_from must hold a "
                              "diffusion model with backbone unet and no autoencoder")
        super().__init__(config)
        if not isinstance(self.net, UNet) or self.net.context_dim:
            raise GenlabError("a ControlNet here steers a class-conditional or unconditional U-Net, not a text one")
        self.net.requires_grad_(False)
        self.controlnet = ControlNet(self.net, control_channels=1)

    @classmethod
    def build(cls, config: ControlNetConfig, dataset: Any) -> ControlNetModel:
        """The base model of `init_from` (frozen) with a ControlNet whose encoder starts as a copy of its own."""
        _check_control(config)
        if not config.init_from:
            raise GenlabError("family controlnet needs model.init_from: a trained diffusion model (or run) folder")
        base = GenerativeModel.from_pretrained(resolve_model_dir(config.init_from))
        if type(base) is not DiffusionModel:
            raise GenlabError(f"model.init_from={config.init_from!r} holds a {base.family} model; give a trained "
                              "diffusion model folder")
        defaults = DiffusionConfig()
        for f in dataclasses.fields(DiffusionConfig):
            ours, theirs = getattr(config, f.name), getattr(base.config, f.name)
            if ours != getattr(defaults, f.name) and ours != theirs:
                raise GenlabError(f"model.{f.name}={ours!r} but model.init_from has {theirs!r}; drop the key (the "
                                  "base model's keys are its own)")
        info = dataset.info
        if (info.channels, info.image_size) != (base.config.channels, base.config.image_size):
            raise GenlabError(f"dataset {info.name!r} has {info.channels}-channel {info.image_size}px images but the "
                              f"base model makes {base.config.channels}-channel {base.config.image_size}px ones")
        if base.num_classes and base.config.class_cond and info.num_classes not in (0, base.num_classes):
            raise GenlabError(f"dataset {info.name!r} has {info.num_classes} classes but the base model has "
                              f"{base.num_classes}; train on the base model's data")
        kept = {f.name: getattr(config, f.name) for f in dataclasses.fields(ControlNetConfig)
                if f.name not in {g.name for g in dataclasses.fields(DiffusionConfig)}}
        model = cls(ControlNetConfig(**{**to_dict(base.config), **kept}))
        model.net.load_state_dict(base.net.state_dict())
        model.controlnet = ControlNet(model.net, control_channels=1)  # the copy of the trained encoder
        return model

    # -- the condition ------------------------------------------------------------------
    def backbone(self, x: Tensor, t: Tensor, cond: Any) -> Tensor:
        """The frozen U-Net with the ControlNet's residuals, summed over the controls by their scales."""
        if not isinstance(cond, ControlCondition):
            return self.net(x, t, cond)
        controls = cond.controls * 2.0 - 1.0
        parts = [self.controlnet(x, t, cond.labels, controls[:, k]) for k in range(controls.shape[1])]
        return self.net(x, t, cond.labels, residuals=combine_residuals(parts, list(cond.scales)))

    def training_labels(self, batch: dict[str, Any], device: torch.device) -> ControlCondition:
        """The base's labels (with its label dropout) and the control made from each training image."""
        x = batch["x"].to(device)
        return ControlCondition(super().training_labels(batch, device), control_of(x, self.config)[:, None], (1.0,))

    def control_condition(self, control: Control, n: int, labels: Tensor | None, device: torch.device
                          ) -> ControlCondition:
        """`control` checked against this model and expanded to `n` samples."""
        images = torch.as_tensor(control.images, dtype=torch.float32, device=device)
        if images.ndim == 4:
            images = images[:, None]
        c, s = 1, self.config.image_size
        k = images.shape[0]
        if images.ndim != 5 or images.shape[1] not in (1, n) or tuple(images.shape[2:]) != (c, s, s):
            raise GenlabError(f"control images are {tuple(images.shape)}; this model takes K x {c}x{s}x{s} (one "
                              f"per control, or K x n x {c}x{s}x{s})")
        if not 1 <= k <= MAX_CONTROLS or len(control.scales) != k:
            raise GenlabError(f"{k} control images and {len(control.scales)} scales; give 1..{MAX_CONTROLS} "
                              "controls and one scale each")
        if images.min() < 0 or images.max() > 1:
            raise GenlabError("control images must be in [0, 1] (1 = edge)")
        controls = images.expand(k, n, c, s, s).transpose(0, 1)
        return ControlCondition(labels, (controls > 0.5).float(), tuple(float(v) for v in control.scales))

    @torch.no_grad()
    def sample(self, n: int, cond: Any = None, generator: Any = None, *, control: Control | None = None,
               **opts: Any) -> Tensor:
        """The base's sampling; with `control`, every denoiser call carries it (a `ControlCondition`)."""
        if control is None:
            return super().sample(n, cond, generator, **opts)
        return super().sample(n, _Controlled(cond, control), generator, **opts)

    def sampling_condition(self, n: int, cond: Any, device: torch.device) -> Any:
        if not isinstance(cond, _Controlled):
            return super().sampling_condition(n, cond, device)
        labels = super().sampling_condition(n, cond.cond, device)
        return self.control_condition(cond.control, n, labels, device)

    def guided_denoiser(self, guidance: Guidance | None = None, labels: Any = None) -> Denoiser:
        """The base's guidance, its null (or negative) half carrying the same controls."""
        if not isinstance(labels, ControlCondition):
            return super().guided_denoiser(guidance, labels)
        denoiser: Denoiser = self.denoise
        if labels.labels is not None and guidance is not None and guidance.scale != 1.0:
            n = len(labels)
            null = self.labels_for(n, guidance.negative).to(labels.controls.device) \
                if guidance.negative is not None else torch.full_like(labels.labels, self.num_classes)
            null_cond = ControlCondition(null, labels.controls, labels.scales)
            denoiser = classifier_free_guidance(denoiser, guidance.scale, null_cond, guidance.rescale)
        if not self.config.clip_denoised:
            return denoiser
        inner = denoiser
        return lambda x, sigma, cond: inner(x, sigma, cond).clamp(-1.0, 1.0)

@dataclass
class _Controlled:
    cond: Any
    control: Control
