"""A folder of images as a dataset, in the Hugging Face `imagefolder` convention.

Captions come from `metadata.jsonl` (`file_name` and `text` per line) or from sidecar
`.txt` files next to each image. Unreadable images are reported and skipped.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from genlab.data.base import DatasetInfo, ImageDataset
from genlab.errors import GenlabError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"}
DEFAULT_SIZE = 64
MAX_IMAGES = 1_000_000


def _read_metadata(root: Path) -> dict[str, str]:
    meta = root / "metadata.jsonl"
    if not meta.is_file():
        return {}
    captions = {}
    for n, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            captions[str(row["file_name"])] = str(row.get("text", ""))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise GenlabError(
                f"{meta} line {n} is not a JSON object with 'file_name' (and 'text'): fix or remove that line"
            ) from None
    return captions


def load_image_folder(path: str | Path, image_size: int | None = None, channels: int = 3) -> ImageDataset:
    """Load every readable image under `path`, center-cropped square and resized to `image_size`."""
    root = Path(path)
    if not root.is_dir():
        raise GenlabError(f"image folder {root} does not exist")
    size = image_size or DEFAULT_SIZE
    if not 4 <= size <= 1024:
        raise GenlabError(f"data.image_size={size} is out of range; use 4..1024")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if len(files) > MAX_IMAGES:
        raise GenlabError(f"{root} holds {len(files)} images; at most {MAX_IMAGES} fit in memory")
    meta = _read_metadata(root)
    images, captions, bad = [], [], []
    mode = "L" if channels == 1 else "RGB"
    for f in files:
        try:
            with Image.open(f) as im:
                im.load()
                im = _center_square(im.convert("RGBA" if im.mode in ("P", "LA", "RGBA") else "RGB"))
                if im.mode == "RGBA":  # composite transparency over white, as the emoji sets are
                    bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
                    im = Image.alpha_composite(bg, im)
                im = im.convert(mode).resize((size, size), Image.Resampling.LANCZOS)
                images.append(np.asarray(im, dtype=np.uint8))
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
            bad.append(f)
            continue
        rel = f.relative_to(root).as_posix()
        side = f.with_suffix(".txt")
        captions.append(meta.get(rel, side.read_text(encoding="utf-8").strip() if side.is_file() else ""))
    if bad:
        names = ", ".join(p.name for p in bad[:3])
        print(f"genlab: skipped {len(bad)} unreadable image(s) in {root} (first: {names})", file=sys.stderr)
    if not images:
        what = f"none of its {len(files)} image files could be read" if files else "it holds no image files"
        raise GenlabError(f"image folder {root} has no usable images: {what} ({', '.join(sorted(IMAGE_SUFFIXES))})")
    arr = np.stack(images)
    info = DatasetInfo(name=root.name, kind="image", size=len(arr), license="user data",
                       attribution=f"images from {root.name}", channels=channels, image_size=size)
    return ImageDataset(arr, info, captions=captions if any(captions) else None)


def _center_square(im: Image.Image) -> Image.Image:
    w, h = im.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return im.crop((left, top, left + s, top + s))
