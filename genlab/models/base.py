"""GenerativeModel: the contract every family implements, and the shareable model folder."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from genlab.config import from_dict, to_dict
from genlab.errors import GenlabError
from genlab.files import atomic_path, write_atomic
from genlab.registry import MODELS

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass
class ModelConfig:
    """Base for family configs; families subclass it with their own fields."""


class GenerativeModel(nn.Module):
    """A generative model family.

    - `training_losses(batch) -> dict` with a scalar "loss" entry;
    - `sample(n, cond=None, generator=None, **opts) -> Tensor`;
    - `log_likelihood(x, cond=None)` where the family has one.

    A family whose update rule is not one optimizer on "loss" (GANs) overrides
    `configure_optimizers` and `train_step`; the trainer never branches on the family.
    """

    family: ClassVar[str]
    config_class: ClassVar[type]

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config

    def training_losses(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def sample(self, n: int, cond: Any = None, generator: torch.Generator | None = None, **opts: Any) -> Tensor:
        raise NotImplementedError

    def log_likelihood(self, x: Tensor, cond: Any = None) -> Tensor:
        raise GenlabError(f"the {self.family} family has no log-likelihood")

    # -- hooks the trainer calls (defaults suit single-optimizer image families) -------
    @classmethod
    def build(cls, config: Any, dataset: Any) -> GenerativeModel:
        """Make the model for `dataset` (fill sizes the config leaves to the data); default: cls(config)."""
        return cls(config)

    def prepare_data(self, dataset: Any) -> Any:
        """What the trainer draws batches from: an object with `__len__` and `get_batch(indices) -> dict`."""
        return dataset

    def configure_optimizers(self, train_cfg: Any) -> list[torch.optim.Optimizer]:
        """One AdamW over every trainable parameter (no weight decay on biases and norms)."""
        decay = [p for p in self.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in self.parameters() if p.requires_grad and p.ndim < 2]
        groups = [{"params": decay, "weight_decay": train_cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return [torch.optim.AdamW(groups, lr=train_cfg.lr, betas=tuple(train_cfg.betas))]

    def write_preview(self, stem: Path, sample_cfg: Any, generator: torch.Generator) -> list[Path]:
        """Write a preview of samples (an image grid, a text file) next to `stem`; default: nothing."""
        return []

    def validation_metrics(self, val_data: Any) -> dict[str, float]:
        """Metrics on held-out data (e.g. validation loss, perplexity); default: none."""
        return {}

    # -- the model folder -------------------------------------------------------------
    def save_pretrained(self, directory: str | Path, state_dict: dict[str, Tensor] | None = None) -> Path:
        """Write `config.json` + `model.safetensors` (atomically: temp file, then rename)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        meta = {"family": self.family, "config": to_dict(self.config), "genlab_version": _version()}
        write_atomic(d / CONFIG_NAME, json.dumps(meta, indent=2))
        sd = state_dict if state_dict is not None else self.state_dict()
        sd = {k: v.detach().contiguous().cpu() for k, v in sd.items()}
        with atomic_path(d / WEIGHTS_NAME) as tmp:
            save_file(sd, str(tmp), metadata={"family": self.family})
        return d

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> GenerativeModel:
        """Load a model folder; when called on the base class the family is read from config.json."""
        d, meta = read_model_meta(directory)
        family_cls = MODELS.get(meta.get("family", ""))
        if cls is not GenerativeModel and not issubclass(family_cls, cls):
            raise GenlabError(f"{d} holds a {meta.get('family')} model, not a {cls.family} model")
        if cls is not family_cls and "from_pretrained" in vars(family_cls):
            return family_cls.from_pretrained(d, map_location)  # the family reads folders of its own kinds
        config = from_dict(family_cls.config_class, meta.get("config", {}), prefix="model.")
        model = family_cls.from_folder_config(config, d)
        state = load_weights(d / WEIGHTS_NAME, map_location)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise GenlabError(
                f"{d / WEIGHTS_NAME} does not fit its config: {len(missing)} missing and "
                f"{len(unexpected)} unexpected tensors (e.g. {(missing + unexpected)[0]})"
            )
        return model.to(map_location)

    @classmethod
    def from_folder_config(cls, config: Any, directory: Path) -> GenerativeModel:
        """The untrained model of a folder's config; a family reads its extra files here (e.g. tokenizer.json)."""
        return cls(config)


def with_image_shape(config: Any, dataset: Any, family: str) -> Any:
    """`config` with image_size and channels taken from an image dataset (a key already set must agree)."""
    info = dataset.info
    if info.kind != "image":
        raise GenlabError(f"the {family} family needs an image dataset; {info.name!r} is {info.kind}")
    for key in ("image_size", "channels"):
        ours, theirs = getattr(config, key), getattr(info, key)
        if ours and ours != theirs:
            raise GenlabError(f"model.{key}={ours} but dataset {info.name!r} has {theirs}; drop the key "
                              f"or set data.image_size")
    return dataclasses.replace(config, image_size=info.image_size, channels=info.channels)


def read_model_meta(directory: str | Path) -> tuple[Path, dict[str, Any]]:
    """A model folder's path and its parsed config.json, with one-line errors for a missing or broken file."""
    d = Path(directory)
    cfg_path = d / CONFIG_NAME
    if not cfg_path.is_file():
        raise GenlabError(f"{d} is not a model folder: it has no {CONFIG_NAME}")
    try:
        return d, json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise GenlabError(f"{cfg_path} is not valid JSON ({e.msg}): re-export the model") from None


def resolve_model_dir(path: str | Path) -> Path:
    """A model folder (with config.json), or a run folder whose exported model is in `model/`."""
    p = Path(path).expanduser()
    if (p / CONFIG_NAME).is_file():
        return p
    if (p / "model" / CONFIG_NAME).is_file():
        return p / "model"
    if (p / "checkpoints").is_dir():
        raise GenlabError(f"run folder {p} has no exported model yet: let training finish (or resume it) first")
    raise GenlabError(f"{p} is neither a model folder (config.json) nor a run folder with model/")


def load_weights(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Tensor]:
    """Read a safetensors file, turning a truncated or corrupt file into a one-line error."""
    if not path.is_file():
        raise GenlabError(f"missing weights file {path}")
    try:
        return load_file(str(path), device=str(map_location))
    except (SafetensorError, OSError, ValueError) as e:
        raise GenlabError(f"{path} is truncated or corrupt ({e}); restore it or re-export the model") from None


def _version() -> str:
    from genlab import __version__

    return __version__
