"""Reference features of real data, cached per dataset, split and feature network weights (with the n they hold)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from genlab.config import DataConfig
from genlab.data import ImageDataset, load_dataset
from genlab.errors import GenlabError
from genlab.eval.features import FeatureNetwork, cache_dir, data_hash
from genlab.files import atomic_path


@dataclass
class Reference:
    """Features (and classifier logits) of one real split in one feature network."""

    dataset: str
    split: str
    features: Tensor
    logits: Tensor | None
    network: dict[str, Any]
    data_hash: str
    image_size: int  # the side the split was loaded at (the generated images' side), before the network's resize

    @property
    def n(self) -> int:
        return len(self.features)

    def describe(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "split": self.split, "n": self.n, "image_size": self.image_size,
                "data_hash": self.data_hash[:16]}


def load_images(data: DataConfig | str, split: str, image_size: int | None = None) -> ImageDataset:
    """An image split as a dataset, with a one-line error for text data."""
    cfg = DataConfig(name=data) if isinstance(data, str) else DataConfig(**asdict(data))
    if image_size is not None:
        cfg.image_size = image_size
    cfg.max_items = None  # a reference is always the whole split (a run's quick `max_items` must not shrink it)
    ds = load_dataset(cfg, split=split)
    if not isinstance(ds, ImageDataset):
        raise GenlabError(f"dataset {cfg.name!r} is text: image metrics need an image dataset")
    return ds


def all_images(ds: ImageDataset) -> Tensor:
    """Every image of a dataset as one float tensor in [-1, 1]."""
    return ds.get_batch(torch.arange(len(ds)))["x"]


def reference_features(fnet: FeatureNetwork, data: DataConfig | str = "mnist", split: str = "test",
                       refresh: bool = False, image_size: int | None = None) -> Reference:
    """Features of every image of a real split, computed once and cached next to the feature network.

    `image_size` is the side of the generated images they will be compared with (default: a run's
    `data.image_size` when `data` is its config, else the network's own side): the split is loaded at that side by
    the data pipeline's own resize, the one a model was trained on, and then takes the generated images' path into
    the network (`FeatureNetwork.preprocess`).
    """
    name = data if isinstance(data, str) else data.name
    size = image_size or (None if isinstance(data, str) else data.image_size) or fnet.meta["image_size"]
    ds = load_images(data, split, image_size=size)
    digest = data_hash(ds)
    slug = Path(name).name or "data"
    # keyed by the network's weights, not only its recipe hash: a network retrained under the same hash (another
    # machine, another library version) must not reuse features computed in the old weights
    path = cache_dir() / "reference" / f"{slug}-{split}-{fnet.hash}-{fnet.weights_digest}-{digest[:16]}.safetensors"
    if path.is_file() and not refresh:
        try:
            t = load_file(str(path))
            return Reference(name, split, t["features"], t.get("logits"), fnet.describe(), digest, size)
        except (SafetensorError, OSError):
            pass  # a torn cache file: recompute it below
    feats, logits = fnet.embed(all_images(ds), with_logits=True, progress=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"features": feats} | ({"logits": logits} if logits is not None else {})
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"network": json.dumps(fnet.describe()), "n": str(len(feats))})
    return Reference(name, split, feats, logits, fnet.describe(), digest, size)
