"""Dataset types: in-memory images with labels/captions, and text corpora."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset


@dataclass
class DatasetInfo:
    """What `genlab data list` shows, and what a model needs to know about its data."""

    name: str
    kind: str  # "image" | "text"
    size: int  # items (images) or characters (text)
    license: str
    attribution: str
    channels: int = 0
    image_size: int = 0
    class_names: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


class ImageDataset(Dataset):
    """Images held in memory as uint8 (N, C, H, W), with optional labels and captions.

    Items (and batches from `get_batch`) are dicts: `x` float in [-1, 1], `label` (long,
    -1 when unlabeled) and `text` (str) where captions exist.
    """

    def __init__(
        self,
        images: np.ndarray,
        info: DatasetInfo,
        labels: np.ndarray | None = None,
        captions: list[str] | None = None,
    ) -> None:
        if images.ndim == 3:
            images = images[:, :, :, None]
        self.images = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()
        self.labels = torch.as_tensor(labels, dtype=torch.long) if labels is not None else None
        self.captions = captions
        self.info = info

    def __len__(self) -> int:
        return self.images.shape[0]

    def get_batch(self, idx: Tensor | list[int]) -> dict[str, Any]:
        idx = torch.as_tensor(idx, dtype=torch.long)
        batch: dict[str, Any] = {"x": self.images[idx].float().div_(127.5).sub_(1.0)}
        batch["label"] = self.labels[idx] if self.labels is not None else torch.full((len(idx),), -1)
        if self.captions is not None:
            batch["text"] = [self.captions[i] for i in idx.tolist()]
        return batch

    def __getitem__(self, i: int) -> dict[str, Any]:
        b = self.get_batch([i])
        return {k: (v[0] if isinstance(v, Tensor | list) else v) for k, v in b.items()}

    def subset(self, n: int) -> ImageDataset:
        """The first `n` items."""
        out = ImageDataset.__new__(ImageDataset)
        out.images = self.images[:n]
        out.labels = self.labels[:n] if self.labels is not None else None
        out.captions = self.captions[:n] if self.captions is not None else None
        out.info = self.info
        return out


class TextDataset:
    """A text corpus split: the raw string; tokenization is the language model's business."""

    def __init__(self, text: str, info: DatasetInfo) -> None:
        self.text = text
        self.info = info

    def __len__(self) -> int:
        return len(self.text)

