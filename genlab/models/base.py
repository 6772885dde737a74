"""GenerativeModel: the contract every family implements, and the shareable model folder."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from genlab.config import from_dict, to_dict
from genlab.errors import GenlabError
from genlab.files import atomic_path, write_atomic
from genlab.registry import MODELS

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class Conditioning(str, Enum):
    """What `sample(n, cond=...)` may be conditioned on."""

    NONE = "none"
    CLASS_LABEL = "class label"
    TEXT = "text"
    IMAGE = "image"
    CONTROL_IMAGE = "control image"


class Output(str, Enum):
    """What `sample` returns: images (B, C, H, W) in [-1, 1], or token ids (B, T); an embedding model (CLIP)
    samples nothing and outputs vectors (B, D) from `encode_text` / `encode_image`."""

    IMAGE = "image"
    TEXT = "text"
    EMBEDDING = "embeddings"


class Likelihood(str, Enum):
    """What `log_likelihood` (or an estimator named in `likelihood_estimators`) gives."""

    EXACT = "exact"
    BOUND = "bound"  # a lower bound on log p(x) (ELBO, variational bound)
    NONE = "none"


class SampleOption(str, Enum):
    """Keyword arguments of `sample` beyond (n, cond, generator) that a family may take."""

    SAMPLER = "sampler"  # a registered sampler, its schedule and options (eta, s_churn, ...)
    STEPS = "steps"
    GUIDANCE = "guidance"  # a `genlab.sampling.controls.Guidance`
    START = "start"  # a `genlab.sampling.controls.Start`: img2img and inpainting
    TEMPERATURE = "temperature"  # a float scaling the prior's standard deviation (1 = the model's own density)


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

    What a family takes and gives is declared in the class attributes below; commands, the evaluator and the
    trainer read them and never ask for a family by name.
    """

    family: ClassVar[str]
    config_class: ClassVar[type]
    conditioning: ClassVar[frozenset[Conditioning]] = frozenset({Conditioning.NONE})
    output: ClassVar[Output] = Output.IMAGE
    likelihood: ClassVar[Likelihood] = Likelihood.NONE
    # estimators of genlab.eval.likelihood (vlb, ode), or the family's own, computed by log_likelihood(x, cond,
    # estimator=name); the first is the default; (): log_likelihood(x, cond)
    likelihood_estimators: ClassVar[tuple[str, ...]] = ()
    sample_options: ClassVar[frozenset[SampleOption]] = frozenset()
    per_item_seeds: ClassVar[bool] = False  # sample(generator=[g_0, ..., g_n-1]): item i depends on g_i alone
    lora_targets: ClassVar[tuple[str, ...]] = ()  # names of the linear layers LoRA adapts (`models/lora.py`)
    lora_scope: ClassVar[str] = ""  # the submodule LoRA's targets are confined to ("": anywhere)
    # config keys that `tune_sampling` reads or writes, and the names of the functions of the family's module that
    # only sample: changing them leaves the trained weights as they are (a benchmark keys training without them)
    sampling_keys: ClassVar[tuple[str, ...]] = ()
    sampling_code: ClassVar[tuple[str, ...]] = ()

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

    def labels_for(self, n: int, label: Any = None) -> Any:
        """The `cond` of `sample` for `n` items given a class label (or None); default: the family takes no label."""
        if label is not None:
            raise GenlabError(f"the {self.family} family takes no class label; leave out the label")
        return None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images `sample` returns (and a start image must have); image families override it."""
        raise GenlabError(f"the {self.family} family outputs {self.output.value}, not images")

    def takes(self) -> str:
        """What `sample` takes, in words (for errors that list it)."""
        cond = ", ".join(c.value for c in sorted(self.conditioning, key=list(Conditioning).index))
        opts = ", ".join(o.value for o in sorted(self.sample_options, key=list(SampleOption).index)) or "no options"
        return f"conditioning: {cond}; sampling: {opts}"

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

    def check_sample_config(self, sample_cfg: Any) -> None:
        """Refuse, before training starts, `sample.*` values of a recipe that this model cannot draw its previews
        with (they would fail only at the first preview); default: nothing depends on the model."""

    def tune_sampling(self, make_score: Callable[[], Callable[[Tensor, Any], float]],
                      log: Callable[[str], None] = print) -> dict[str, Any]:
        """After training (EMA weights in place): choose sampling settings of the config that minimise
        `make_score()(images, labels)`, a score against a validation split (never the test split), and return what
        was chosen; `make_score` is called only when there is something to choose. Default: nothing."""
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
        """Load a model folder; when called on the base class the family is read from config.json. A peft
        adapter folder loads its base model (`base_model_name_or_path`) with the adapter on it."""
        from genlab.models.lora import adapter_base, is_adapter_folder, load_adapter

        if is_adapter_folder(directory):
            return load_adapter(cls.from_pretrained(resolve_model_dir(adapter_base(directory)), map_location),
                                directory)
        d, meta = read_model_meta(directory)
        family = meta.get("family")
        if not isinstance(family, str) or not family:
            raise GenlabError(f"{d / CONFIG_NAME} names no model family (a \"family\" string): re-export the model")
        family_cls = MODELS.get(family)
        if cls is not GenerativeModel and not issubclass(family_cls, cls):
            raise GenlabError(f"{d} holds a {family} model, not a {cls.family} model")
        if cls is not family_cls and "from_pretrained" in vars(family_cls):
            return family_cls.from_pretrained(d, map_location)  # the family reads folders of its own kinds
        raw = meta.get("config", {})
        if not isinstance(raw, dict):
            raise GenlabError(f"{d / CONFIG_NAME}: \"config\" must be a JSON object, not {raw!r}: re-export the model")
        config = from_dict(family_cls.config_class, raw, prefix="model.")
        check_weights_fit(family_cls, config, d)  # before anything is allocated
        model = family_cls.from_folder_config(config, d)
        model.load_state_dict(load_weights(d / WEIGHTS_NAME, map_location))
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


def with_image_shape_and_classes(config: Any, dataset: Any, family: str) -> Any:
    """`with_image_shape`, and num_classes from the dataset where a class-conditional config leaves it at 0."""
    num_classes = config.num_classes or (dataset.info.num_classes if config.class_cond else 0)
    return dataclasses.replace(with_image_shape(config, dataset, family), num_classes=num_classes)


def class_labels(n: int, label: Any, num_classes: int) -> Tensor:
    """`n` class labels as a (n,) long tensor from None (classes cycled in blocks: one grid row per class), one
    label for all, or one per item (int, list or tensor), each checked against 0..num_classes - 1."""
    if label is None:
        return torch.arange(n) // -(-n // num_classes)
    labels = torch.as_tensor(label, dtype=torch.long).reshape(-1)
    if labels.numel() == 1:
        labels = labels.expand(n)
    if labels.numel() != n:
        raise GenlabError(f"{labels.numel()} labels for {n} samples; give one label or one per sample")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise GenlabError(f"label out of range: this model has classes 0..{num_classes - 1}")
    return labels.clone()


def read_model_meta(directory: str | Path) -> tuple[Path, dict[str, Any]]:
    """A model folder's path and its parsed config.json, with one-line errors for a missing or broken file."""
    d = Path(directory)
    cfg_path = d / CONFIG_NAME
    if not cfg_path.is_file():
        raise GenlabError(f"{d} is not a model folder: it has no {CONFIG_NAME}")
    try:
        meta = json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise GenlabError(f"{cfg_path} is not valid JSON ({e.msg}): re-export the model") from None
    except UnicodeDecodeError:
        raise GenlabError(f"{cfg_path} is not UTF-8 text: re-export the model") from None
    if not isinstance(meta, dict):
        raise GenlabError(f"{cfg_path} must hold a JSON object, not a {type(meta).__name__}: re-export the model")
    return d, meta


def resolve_model_dir(path: str | Path) -> Path:
    """A model folder (with config.json), or a run folder whose exported model is in `model/`."""
    from genlab.models.lora import ADAPTER_CONFIG

    p = Path(path).expanduser()
    for d in (p, p / "model"):
        if (d / CONFIG_NAME).is_file() or (d / ADAPTER_CONFIG).is_file():
            return d
    if (p / "checkpoints").is_dir():
        raise GenlabError(f"run folder {p} has no exported model yet: let training finish (or resume it) first")
    raise GenlabError(f"{p} is neither a model folder (config.json) nor a run folder with model/")


def load_model_folder(key: str, path: str | Path | None, wanted: str, accepts: Callable[[GenerativeModel], bool],
                      needed_by: str = "this recipe", map_location: str | torch.device = "cpu") -> GenerativeModel:
    """The model of the model (or run) folder that `key` (a recipe key such as `model.teacher`) names. An unset key,
    or a folder holding a model that `accepts` refuses, is a one-line error ending in "give `wanted`"."""
    if not path:
        raise GenlabError(f"{needed_by} needs {key}: {wanted}")
    model = GenerativeModel.from_pretrained(resolve_model_dir(path), map_location)
    if not accepts(model):
        raise GenlabError(f"{key}={str(path)!r} holds a {model.family} model; give {wanted}")
    return model


def check_weights_fit(family_cls: type[GenerativeModel], config: Any, directory: Path) -> None:
    """Refuse a folder whose config.json does not fit its weights (another size, another layout), comparing the
    tensors the config makes, built on the meta device (nothing allocated), with the weights file's header."""
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        raise GenlabError(f"missing weights file {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise GenlabError(f"{path} is truncated or corrupt ({e}); restore it or re-export the model") from None
    with torch.device("meta"):
        made = {k: tuple(v.shape) for k, v in family_cls.from_folder_config(config, directory).state_dict().items()}
    for key in sorted(made.keys() | saved.keys()):
        if made.get(key) != saved.get(key):
            raise GenlabError(f"{path} does not fit {directory / CONFIG_NAME}: tensor {key} is {saved.get(key)} in the "
                              f"weights but {made.get(key)} by the config; restore the folder's config.json")


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
