"""Stacked-MNIST: three MNIST digits stacked as the R, G and B channels of one image, 1,000 modes.

The mode-collapse benchmark of Metz et al. 2017 (Unrolled GANs, sec. 3.3.2) and Lin et al. 2018 (PacGAN): each
channel is an independently drawn MNIST digit, so the mode of an image is the three-digit number
100 d_R + 10 d_G + d_B and a generator that covers the data covers all 1,000 of them. The images are drawn once
with a fixed seed from genlab's built-in MNIST split of the same name; `label` is the mode (0..999).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from genlab.data.base import DatasetInfo, ImageDataset
from genlab.data.builtin import MNIST_ATTRIBUTION, _check_split, _npz, _resize
from genlab.registry import DATASETS

NUM_MODES = 1000
SIZES = {"train": 24_000, "test": 6_000}  # three times the MNIST split it draws from
SEEDS = {"train": 0, "test": 1}


@lru_cache(maxsize=2)
def _stack(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(N, 28, 28, 3) uint8 images and (N,) modes, drawn with the split's fixed seed."""
    z = _npz("mnist10k.npz")
    digits, labels = z[f"{split}_images"], z[f"{split}_labels"].astype(np.int64)
    rng = np.random.default_rng(SEEDS[split])
    idx = rng.integers(0, len(digits), size=(SIZES[split], 3))
    images = np.stack([digits[idx[:, c]] for c in range(3)], axis=-1)
    modes = 100 * labels[idx[:, 0]] + 10 * labels[idx[:, 1]] + labels[idx[:, 2]]
    return images, modes


def modes_of_digits(digits: np.ndarray) -> np.ndarray:
    """(N, 3) digits of the R, G, B channels -> (N,) modes 100 d_R + 10 d_G + d_B."""
    digits = np.asarray(digits)
    return 100 * digits[:, 0] + 10 * digits[:, 1] + digits[:, 2]


@DATASETS.register("stacked_mnist")
def stacked_mnist(split: str = "train", image_size: int | None = None, **_: object) -> ImageDataset:
    """Stacked-MNIST: 24,000 train / 6,000 test, 28x28 RGB, each channel a random MNIST digit; label = the mode."""
    _check_split("stacked_mnist", split)
    images, modes = _stack(split)
    info = DatasetInfo(
        name="stacked_mnist", kind="image", size=len(images), license="MIT (package); MNIST (LeCun et al.)",
        attribution=MNIST_ATTRIBUTION, channels=3, image_size=28, class_names=[f"{m:03d}" for m in range(NUM_MODES)],
    )
    ds = ImageDataset(images.copy(), info, labels=modes)
    return _resize(ds, image_size)
