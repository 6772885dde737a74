"""Datasets: built-in (mnist, twemoji, noto, fortunes, jargon), image folders, text files."""

from __future__ import annotations

from pathlib import Path

from genlab.config import DataConfig
from genlab.data.base import DatasetInfo, ImageDataset, TextDataset
from genlab.data.image_pairs import is_pair_folder, load_image_pairs
from genlab.data.imagefolder import load_image_folder
from genlab.errors import GenlabError
from genlab.registry import DATASETS

__all__ = ["DatasetInfo", "ImageDataset", "TextDataset", "load_dataset", "DATASETS"]


def load_dataset(cfg: DataConfig | str, split: str | None = None) -> ImageDataset | TextDataset:
    """A built-in dataset by name, a folder of images, or a UTF-8 text file (split 90/10)."""
    if isinstance(cfg, str):
        cfg = DataConfig(name=cfg)
    split = split or cfg.split
    if cfg.name in DATASETS:
        caption = {"caption": cfg.caption} if cfg.caption else {}  # only datasets with a choice of captions read it
        ds = DATASETS.get(cfg.name)(split=split, image_size=cfg.image_size, label=cfg.label, **caption)
    else:
        path = Path(cfg.name).expanduser()
        if is_pair_folder(path):  # image preference pairs (pairs.jsonl): the data of Diffusion-DPO
            return load_image_pairs(path)  # type: ignore[return-value]
        if path.is_dir():
            ds = load_image_folder(path, cfg.image_size)
        elif path.is_file():
            ds = _text_file(path, split)
        else:
            DATASETS.get(cfg.name)  # raises with the valid names and the closest match
            raise AssertionError
    if cfg.max_items is not None and isinstance(ds, ImageDataset):
        ds = ds.subset(cfg.max_items)
    return ds


def _text_file(path: Path, split: str) -> TextDataset:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise GenlabError(f"{path} is not UTF-8 text (byte {e.start}); convert it to UTF-8") from None
    if not text.strip():
        raise GenlabError(f"text file {path} is empty")
    n = int(0.9 * len(text))
    part = text[:n] if split == "train" else text[n:]
    info = DatasetInfo(name=path.stem, kind="text", size=len(part), license="user data",
                       attribution=f"text from {path.name}")
    return TextDataset(part, info)
