"""ControlNet on a trained diffusion model (Zhang et al. 2023): the frozen U-Net of `model.init_from` plus a trainable
copy of its encoder joined by zero convolutions (`genlab.nn.controlnet`), trained with the base's own loss
(Zhang et al. 2023, eq. 5) on controls made from each training image: its Sobel edge map, or (`model.control=boxes`)
the layout of its objects' boxes from the `shapes` ground truth.

Two families: `controlnet` steers a class-conditional (or unconditional) diffusion model, `text_controlnet` a
text-to-image one (its text encoder frozen too; the copy cross-attends to the same prompt tokens). The condition the
denoiser passes is a `ControlCondition` (labels or a `TextCondition`, control images, scales); samplers and guidance
only batch it. Several controls add their residuals weighted by their scales (as diffusers' MultiControlNet). The
model folder holds the base's weights too, so it is self-contained.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from genlab.config import check_number, to_dict
from genlab.data.shapes import ShapesDataset
from genlab.errors import GenlabError
from genlab.models.base import Conditioning, load_model_folder
from genlab.models.diffusion import DiffusionConfig, DiffusionModel
from genlab.models.t2i import TextCondition, TextDiffusionConfig, TextDiffusionModel
from genlab.nn.controlnet import ControlNet, box_layout, combine_residuals, sobel_edges, thin_edges
from genlab.nn.unet import UNet
from genlab.registry import MODELS
from genlab.sampling.controls import Guidance
from genlab.sampling.denoiser import Denoiser, classifier_free_guidance

CONTROLS = ("edges", "thin_edges", "boxes")
CONTROL_KEYS = ("init_from", "control", "edge_threshold")  # a ControlNet's own keys; the rest are its base's
MAX_CONTROLS = 8


@dataclass
class Control:
    """Control images for `sample`: `images` (K, C, H, W) or (K, n, C, H, W) in [0, 1] (white = edge or inside a
    box), one per control (shared by the n samples, or one per sample), and one scale per control."""

    images: Tensor
    scales: tuple[float, ...] = (1.0,)


@dataclass
class ControlCondition:
    """The batched `cond` of a ControlNet model: `labels` (B,) or a `TextCondition` or None, `controls`
    (B, K, C, H, W) in {0, 1}, and the K scales (shared by the batch)."""

    labels: Tensor | TextCondition | None
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
        if isinstance(self.labels, TextCondition) and isinstance(other.labels, TextCondition):
            labels: Any = self.labels.cat(other.labels)
        else:
            labels = torch.cat([self.labels, other.labels]) if self.labels is not None else None
        return ControlCondition(labels, torch.cat([self.controls, other.controls]), self.scales)


@dataclass
class ControlKeys:
    """A ControlNet's own keys; every other key is copied from `init_from` by build."""

    init_from: str | None = None  # the trained diffusion model (or run) folder whose U-Net stays frozen
    control: str = "edges"  # edges: Sobel magnitude of the grey image (in [0, 1]) above edge_threshold; thin_edges:
    # those thinned by non-maximum suppression; boxes: the training image's object boxes filled (shapes data)
    edge_threshold: float = 1.0


@dataclass
class ControlNetConfig(ControlKeys, DiffusionConfig):
    """The base diffusion model's keys (copied from `init_from` by build) plus the control's."""


@dataclass
class TextControlNetConfig(ControlKeys, TextDiffusionConfig):
    """The base text-to-image model's keys (copied from `init_from` by build) plus the control's."""


def control_of(images: Tensor, config: ControlKeys) -> Tensor:
    """The edge control (B, 1, H, W) in {0, 1} made from images (B, C, H, W) in [-1, 1]."""
    if config.control == "thin_edges":
        return thin_edges(images, config.edge_threshold)
    return sobel_edges(images, config.edge_threshold)


def training_control(batch: dict[str, Any], config: ControlKeys, device: torch.device) -> Tensor:
    """The control (B, 1, H, W) in {0, 1} of a training batch: its box layouts (`BoxLayoutData`) for the box
    control, else the edge map of its images."""
    if config.control == "boxes":
        return batch["control"].to(device)
    return control_of(batch["x"].to(device), config)


def _check_control(config: ControlKeys) -> None:
    if config.control not in CONTROLS:
        raise GenlabError(f"model.control={config.control!r} is unknown; choose one of: {', '.join(CONTROLS)}")
    check_number("model.edge_threshold", config.edge_threshold, 0, 4 * 2**0.5,
                 hint="the Sobel magnitude of a grey level in [0, 1] is at most 4 sqrt 2")


class BoxLayoutData:
    """A `shapes` dataset whose batches also carry `control`: each image's object boxes filled (`box_layout`)."""

    def __init__(self, dataset: ShapesDataset) -> None:
        self.dataset, self.info = dataset, dataset.info

    def __len__(self) -> int:
        return len(self.dataset)

    def get_batch(self, idx: Tensor | list[int]) -> dict[str, Any]:
        idx = torch.as_tensor(idx, dtype=torch.long)
        batch = self.dataset.get_batch(idx)
        size = self.dataset.image_size
        batch["control"] = torch.stack([box_layout([o.box for o in self.dataset.objects(i)], size)
                                        for i in idx.tolist()])
        return batch


class _ControlNetFamily:
    """What both ControlNet families share (a mixin before the base family's class): build from a trained base,
    the controlled backbone, training controls, sampling with controls and guidance that keeps them."""

    base_family: ClassVar[type[DiffusionModel]]
    config: Any
    net: UNet
    controlnet: ControlNet
    num_classes: int

    def _attach_controlnet(self) -> None:
        """Freeze everything the base has and add the trainable copy of its encoder."""
        for p in self.parameters():  # type: ignore[attr-defined]
            p.requires_grad_(False)
        self.controlnet = ControlNet(self.net, control_channels=1)

    @classmethod
    def _shell(cls, config: Any, base: Any) -> Any:
        """This family's model for `config` with `base`'s non-weight parts (a tokenizer), weights not yet loaded."""
        return cls(config)  # type: ignore[call-arg]

    @classmethod
    def build(cls, config: Any, dataset: Any) -> Any:
        """The base model of `init_from` (frozen) with a ControlNet whose encoder starts as a copy of its own."""
        _check_control(config)
        base_family = cls.base_family  # type: ignore[attr-defined]
        base = load_model_folder("model.init_from", config.init_from,
                                 f"a trained {base_family.family} model (or run) folder",
                                 lambda m: type(m) is base_family, needed_by=f"family {cls.family}")
        base_config = cls.base_family.config_class
        defaults = base_config()
        for f in dataclasses.fields(base_config):
            if f.name in CONTROL_KEYS:
                continue
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
        kept = {k: getattr(config, k) for k in CONTROL_KEYS}
        model = cls._shell(cls.config_class(**{**to_dict(base.config), **kept}), base)  # type: ignore[attr-defined]
        missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
        assert not unexpected and all(k.startswith("controlnet.") for k in missing), (missing, unexpected)
        model.controlnet = ControlNet(model.net, control_channels=1)  # the copy of the trained encoder
        return model

    def prepare_data(self, dataset: Any) -> Any:
        """The base's data; with the box control, batches that also carry each image's box layout."""
        data = super().prepare_data(dataset)  # type: ignore[misc]
        if self.config.control != "boxes":
            return data
        if not isinstance(dataset, ShapesDataset):
            raise GenlabError(f"model.control=boxes lays out each training image's object boxes; dataset "
                              f"{dataset.info.name!r} has none: train on data.name=shapes")
        return BoxLayoutData(dataset)

    # -- the condition ------------------------------------------------------------------
    def _unet_inputs(self, labels: Any) -> dict[str, Any]:
        """The U-Net's condition keywords for a ControlCondition's `labels`."""
        return {"y": labels}

    def backbone(self, x: Tensor, t: Tensor, cond: Any) -> Tensor:
        """The frozen U-Net with the ControlNet's residuals, summed over the controls by their scales."""
        if not isinstance(cond, ControlCondition):
            return super().backbone(x, t, cond)  # type: ignore[misc]
        kw = self._unet_inputs(cond.labels)
        controls = cond.controls * 2.0 - 1.0
        parts = [self.controlnet(x, t, control=controls[:, k], **kw) for k in range(controls.shape[1])]
        return self.net(x, t, residuals=combine_residuals(parts, list(cond.scales)), **kw)

    def training_labels(self, batch: dict[str, Any], device: torch.device) -> ControlCondition:
        """The base's condition (with its dropout) and the control of each training image."""
        labels = super().training_labels(batch, device)  # type: ignore[misc]
        return ControlCondition(labels, training_control(batch, self.config, device)[:, None], (1.0,))

    def control_condition(self, control: Control, n: int, labels: Any, device: torch.device) -> ControlCondition:
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
            raise GenlabError("control images must be in [0, 1] (1 = edge, or inside a box)")
        controls = images.expand(k, n, c, s, s).transpose(0, 1)
        return ControlCondition(labels, (controls > 0.5).float(), tuple(float(v) for v in control.scales))

    @torch.no_grad()
    def sample(self, n: int, cond: Any = None, generator: Any = None, *, control: Control | None = None,
               **opts: Any) -> Tensor:
        """The base's sampling; with `control`, every denoiser call carries it (a `ControlCondition`)."""
        if control is None:
            return super().sample(n, cond, generator, **opts)  # type: ignore[misc]
        return super().sample(n, _Controlled(cond, control), generator, **opts)  # type: ignore[misc]

    def sampling_condition(self, n: int, cond: Any, device: torch.device) -> Any:
        if not isinstance(cond, _Controlled):
            return super().sampling_condition(n, cond, device)  # type: ignore[misc]
        labels = super().sampling_condition(n, cond.cond, device)  # type: ignore[misc]
        return self.control_condition(cond.control, n, labels, device)

    def _null_labels(self, labels: Any, guidance: Guidance) -> Any:
        """The null (or negative) condition of guidance in place of `labels`."""
        if guidance.negative is not None:
            return self.labels_for(len(labels), guidance.negative).to(labels.device)  # type: ignore[attr-defined]
        return torch.full_like(labels, self.num_classes)

    def guided_denoiser(self, guidance: Guidance | None = None, labels: Any = None) -> Denoiser:
        """The base's guidance, its null (or negative) half carrying the same controls."""
        if not isinstance(labels, ControlCondition):
            return super().guided_denoiser(guidance, labels)  # type: ignore[misc]
        denoiser: Denoiser = self.denoise  # type: ignore[attr-defined]
        if labels.labels is not None and guidance is not None and guidance.scale != 1.0:
            null_cond = ControlCondition(self._null_labels(labels.labels, guidance), labels.controls, labels.scales)
            denoiser = classifier_free_guidance(denoiser, guidance.scale, null_cond, guidance.rescale)
        if not self.config.clip_denoised:
            return denoiser
        inner = denoiser
        return lambda x, sigma, cond: inner(x, sigma, cond).clamp(-1.0, 1.0)


@MODELS.register("controlnet")
class ControlNetModel(_ControlNetFamily, DiffusionModel):
    """A diffusion model steered by control images through a ControlNet; only the ControlNet's parameters train."""

    family = "controlnet"
    config_class = ControlNetConfig
    base_family = DiffusionModel
    conditioning = DiffusionModel.conditioning | {Conditioning.CONTROL_IMAGE}
    lora_targets = ()  # its base stays frozen and the ControlNet trains whole: no LoRA

    def __init__(self, config: ControlNetConfig) -> None:
        _check_control(config)
        if config.backbone != "unet" or config.autoencoder_config:
            raise GenlabError("a ControlNet copies a pixel-space U-Net's encoder: model.init_from must hold a "
                              "diffusion model with backbone unet and no autoencoder")
        super().__init__(config)
        if not isinstance(self.net, UNet) or self.net.context_dim:
            raise GenlabError("family controlnet steers a class-conditional or unconditional U-Net; for a "
                              "text-to-image one use family text_controlnet")
        self._attach_controlnet()


@MODELS.register("text_controlnet")
class TextControlNetModel(_ControlNetFamily, TextDiffusionModel):
    """A text-to-image diffusion model steered by control images through a ControlNet that cross-attends to the
    same prompt; the U-Net and the text encoder stay frozen, only the ControlNet trains."""

    family = "text_controlnet"
    config_class = TextControlNetConfig
    base_family = TextDiffusionModel
    conditioning = TextDiffusionModel.conditioning | {Conditioning.CONTROL_IMAGE}
    lora_targets = ()

    def __init__(self, config: TextControlNetConfig, **kwargs: Any) -> None:
        _check_control(config)
        if config.backbone != "unet" or config.autoencoder_config:
            raise GenlabError("a ControlNet copies a pixel-space U-Net's encoder: model.init_from must hold a "
                              "text_diffusion model with backbone unet and no autoencoder")
        super().__init__(config, **kwargs)
        if not isinstance(self.net, UNet):
            raise GenlabError("a ControlNet copies a U-Net's encoder; model.init_from has another backbone")
        self._attach_controlnet()

    @classmethod
    def _shell(cls, config: Any, base: Any) -> TextControlNetModel:
        return cls(config, tokenizer=base.tokenizer)

    def _unet_inputs(self, labels: Any) -> dict[str, Any]:
        return {"y": None, "context": labels.tokens, "context_mask": labels.mask}

    def _null_labels(self, labels: Any, guidance: Guidance) -> TextCondition:
        return self._condition(len(labels), "" if guidance.negative is None else guidance.negative)


@dataclass
class _Controlled:
    cond: Any
    control: Control
