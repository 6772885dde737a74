"""DreamBooth (Ruiz et al. 2023) for the text-to-image model: teach a new concept from a handful of images under a rare
token, with the class-specific prior preservation loss of eq. 2:

    E[ w_t ||x_hat(a_t x + s_t eps, c) - x||^2 + lambda w_t' ||x_hat(a_t' x_pr + s_t' eps', c_pr) - x_pr||^2 ]

where x are the instance images under the instance prompt c ("a red sks shape") and x_pr are images the frozen
starting model draws for the class prompt c_pr ("a red shape") before the first update. With the diffusion family's
eps-prediction both terms are its own training loss (Ho et al. 2020, eq. 14), each at its own t and noise.

A recipe with `family: dreambooth` starts from `model.init_from` (a trained text_diffusion model or run folder) and
reads the instance images from `data.name` (any captioned image dataset; `model.instance_prompt` replaces their
captions). With `adapt.lora.rank` only LoRA adapters on the backbone train and the run's `model/` is a peft adapter
folder on the base; without, the whole model trains and `model/` is a plain text_diffusion folder.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from genlab.config import MAX_SAMPLES, MAX_SAMPLING_STEPS, check_int, check_number
from genlab.errors import GenlabError
from genlab.models.base import load_model_folder
from genlab.models.t2i import TextDiffusionConfig, TextDiffusionModel
from genlab.registry import MODELS, SAMPLERS
from genlab.sampling.controls import Guidance

CLASS_BATCH = 32  # class images drawn per sampling call


@dataclass
class DreamBoothConfig(TextDiffusionConfig):
    """The base text-to-image model's keys (copied from `init_from` by build) plus DreamBooth's."""

    cond_drop: float = 0.0  # DreamBooth trains on its prompts as given (the base's empty prompt is left alone)
    instance_prompt: str = ""  # the prompt of every instance image with the rare token; "": each image's caption
    class_prompt: str = ""  # the prompt of the prior-preservation images (the concept's class); "": no prior
    prior_weight: float = 1.0  # lambda of eq. 2
    class_images: int = 64  # images the starting model draws for class_prompt
    class_sampler: str = "dpmpp_2m"
    class_steps: int = 20
    class_cfg: float = 3.0
    class_seed: int = 0


DREAMBOOTH_KEYS = ("init_from", "cond_drop", "instance_prompt", "class_prompt", "prior_weight", "class_images",
                   "class_sampler", "class_steps", "class_cfg", "class_seed")


def _check(config: DreamBoothConfig) -> None:
    check_number("model.cond_drop", config.cond_drop, 0.0, 1.0, high_open=True)
    check_number("model.prior_weight", config.prior_weight, 0.0, 1e3)
    check_number("model.class_cfg", config.class_cfg, 0.0, 1e3)
    check_int("model.class_steps", config.class_steps, 1, MAX_SAMPLING_STEPS)
    SAMPLERS.get(config.class_sampler)
    if config.class_prompt:
        check_int("model.class_images", config.class_images, 1, MAX_SAMPLES)
    elif config.prior_weight and config.class_images:
        raise GenlabError("prior preservation needs model.class_prompt (e.g. 'a red shape'); or set "
                          "model.prior_weight=0 to train without it")


def prior_preservation_loss(instance_loss: Tensor, prior_loss: Tensor, prior_weight: float) -> Tensor:
    """Ruiz et al. 2023, eq. 2: the instance term plus lambda times the class-prior term."""
    return instance_loss + prior_weight * prior_loss


class PriorPreservationData:
    """Batches of instance images with their prompts, each paired with a class image and the class prompt (item i
    is instance image i mod N with class image i mod M; `len` covers both sets)."""

    def __init__(self, instance: Any, prompts: list[str], class_x: Tensor | None, class_prompt: str) -> None:
        self.instance, self.prompts, self.class_x, self.class_prompt = instance, prompts, class_x, class_prompt

    def __len__(self) -> int:
        return max(len(self.instance), len(self.class_x) if self.class_x is not None else 0)

    def get_batch(self, idx: Tensor | list[int]) -> dict[str, Any]:
        idx = torch.as_tensor(idx, dtype=torch.long)
        inst = idx % len(self.instance)
        batch = {"x": self.instance.get_batch(inst)["x"], "text": [self.prompts[i] for i in inst.tolist()]}
        if self.class_x is not None:
            batch["prior_x"] = self.class_x[idx % len(self.class_x)]
            batch["prior_text"] = [self.class_prompt] * len(idx)
        return batch


@MODELS.register("dreambooth")
class DreamBooth(TextDiffusionModel):
    """A text-to-image model fine-tuned on a handful of instance images under a rare token, with prior
    preservation (Ruiz et al. 2023, eq. 2); as a model, it is the text_diffusion model it was made from."""

    family = "dreambooth"
    config_class = DreamBoothConfig

    def __init__(self, config: DreamBoothConfig, **kwargs: Any) -> None:
        _check(config)
        super().__init__(config, **kwargs)
        self._class_x: Tensor | None = None

    @classmethod
    def build(cls, config: DreamBoothConfig, dataset: Any) -> DreamBooth:
        """The text_diffusion model of `init_from` with this recipe's DreamBooth keys; its own keys stay its own."""
        _check(config)
        base = load_model_folder("model.init_from", config.init_from, "a trained text_diffusion model (or run) folder",
                                 lambda m: type(m) is TextDiffusionModel, needed_by="family dreambooth")
        if base.autoencoder is not None:
            raise GenlabError("DreamBooth here adapts a pixel-space text-to-image model; model.init_from holds a "
                              "latent one (model.autoencoder)")
        defaults = TextDiffusionConfig()
        for f in dataclasses.fields(TextDiffusionConfig):
            ours, theirs = getattr(config, f.name), getattr(base.config, f.name)
            if f.name not in DREAMBOOTH_KEYS and ours != getattr(defaults, f.name) and ours != theirs:
                raise GenlabError(f"model.{f.name}={ours!r} but model.init_from has {theirs!r}; drop the key (the "
                                  "base model's keys are its own)")
        info = dataset.info
        if (info.channels, info.image_size) != (base.config.channels, base.config.image_size):
            raise GenlabError(f"dataset {info.name!r} has {info.channels}-channel {info.image_size}px images but the "
                              f"base model draws {base.config.channels}-channel {base.config.image_size}px ones; "
                              f"set data.image_size={base.config.image_size}")
        kept = {k: getattr(config, k) for k in DREAMBOOTH_KEYS}
        fields = {f.name: getattr(base.config, f.name) for f in dataclasses.fields(TextDiffusionConfig)}
        model = cls(DreamBoothConfig(**{**fields, **kept}), tokenizer=base.tokenizer,
                    text_encoder=base.text_encoder)
        model.load_state_dict(base.state_dict())
        return model

    # -- data ---------------------------------------------------------------------------------
    def prepare_data(self, dataset: Any) -> PriorPreservationData:
        """The instance images with the instance prompt (or their captions), and the class images."""
        cfg = self.config
        if cfg.instance_prompt:
            prompts = [cfg.instance_prompt] * len(dataset)
        else:
            prompts = list(getattr(dataset, "captions", None) or [])
            if len(prompts) != len(dataset):
                raise GenlabError(f"dataset {dataset.info.name!r} has no captions: set model.instance_prompt "
                                  "(e.g. 'a red sks shape')")
        self.tokenize(list(dict.fromkeys(prompts)))  # an overlong prompt is refused before any drawing
        use_prior = bool(cfg.class_prompt and cfg.prior_weight and cfg.class_images)
        return PriorPreservationData(dataset, prompts, self.class_images() if use_prior else None, cfg.class_prompt)

    @torch.no_grad()
    def class_images(self) -> Tensor:
        """`class_images` images of `class_prompt` drawn by the model as it is (before any update: LoRA's B is
        zero), one seed each, rounded to 8 bits as saved images are; drawn once and kept."""
        if self._class_x is None:
            cfg = self.config
            self.tokenize([cfg.class_prompt])
            gens = [torch.Generator().manual_seed(cfg.class_seed + i) for i in range(cfg.class_images)]
            parts = []
            for i in range(0, cfg.class_images, CLASS_BATCH):
                g = gens[i: i + CLASS_BATCH]
                parts.append(self.sample(len(g), cfg.class_prompt, generator=g, sampler=cfg.class_sampler,
                                         steps=cfg.class_steps, guidance=Guidance(cfg.class_cfg)).cpu())
            x = torch.cat(parts)
            self._class_x = ((x + 1) * 127.5).round().clamp(0, 255) / 127.5 - 1
        return self._class_x

    # -- training -----------------------------------------------------------------------------
    def training_losses(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Eq. 2: the diffusion loss on the instance images plus lambda times that on the class images."""
        instance = super().training_losses({"x": batch["x"], "text": batch["text"]})["loss"]
        if "prior_x" not in batch:
            return {"loss": instance}
        prior = super().training_losses({"x": batch["prior_x"].to(batch["x"].device),
                                         "text": batch["prior_text"]})["loss"]
        return {"loss": prior_preservation_loss(instance, prior, self.config.prior_weight),
                "instance_loss": instance.detach(), "prior_loss": prior.detach()}

    def write_preview(self, stem: Path, sample_cfg: Any, generator: torch.Generator) -> list[Path]:
        """The preview grid of the instance prompt and the class prompt (and the base's preview prompts)."""
        cfg = self.config
        prompts = [p for p in (cfg.instance_prompt, cfg.class_prompt) if p] + list(cfg.preview_prompts)[:2]
        self.config = dataclasses.replace(cfg, preview_prompts=list(dict.fromkeys(prompts)))
        try:
            return super().write_preview(stem, sample_cfg, generator)
        finally:
            self.config = cfg

    # -- the model folder ---------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path, state_dict: dict[str, Tensor] | None = None) -> Path:
        """A plain text_diffusion folder (sample, eval, export and the server read it as any): the base's keys."""
        base_keys = {f.name for f in dataclasses.fields(TextDiffusionConfig)}
        config = TextDiffusionConfig(**{k: v for k, v in vars(self.config).items() if k in base_keys})
        plain = TextDiffusionModel(config, tokenizer=self.tokenizer, text_encoder=self.text_encoder)
        return plain.save_pretrained(directory, state_dict if state_dict is not None else self.state_dict())
