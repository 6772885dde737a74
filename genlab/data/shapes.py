"""`shapes`: a captioned dataset generated from a seed, with per-object ground truth and held-out compositions.

One to three objects (7 shapes x 10 colors, two sizes) on a white background, never overlapping. Every caption
names every object's color and shape, in a canonical form (used for evaluation prompts) or one of a few
paraphrases. A scene is one of five kinds:

- ``single``   "a red circle"
- ``pair``     "a red circle and a blue square"
- ``relation`` "a red circle left of a blue square" (left of / right of / above / below, by the dominant axis
  of the centres' offset, which is at least 1.5x the other axis)
- ``count``    "two red circles" / "three red circles"
- ``triple``   "a red circle, a blue square and a green star"

Held-out compositions (never in `train` or `test`, in every `heldout` scene): the (color, shape) pairs of
`HELDOUT_PAIRS` (7 of the 70, 10%) and the geometric relations of `HELDOUT_RELATIONS` (shape A left of / above
shape B, in either description: 8 of the 84 ordered pairs of distinct shapes x 2 axes, ~10%). A train scene
contains no held-out pair and no two objects in a held-out relation, whether the caption states it or not.

Geometry is kept in unit coordinates, so a scene renders at 32 or 64 px the same; `objects(i)` gives boxes in
pixels of the dataset's size. Rendering draws at 4x with Pillow and box-filters down (anti-aliased).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

from genlab.data.base import DatasetInfo, ImageDataset
from genlab.errors import GenlabError
from genlab.registry import DATASETS

SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross", "heart")
NOVEL_SHAPES = ("arrow",)  # drawn the same way but in no scene of `shapes`: a concept to teach (DreamBooth)
PLURALS = {"cross": "crosses"}
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "orange": (245, 135, 20), "yellow": (235, 205, 0), "green": (30, 160, 50),
    "cyan": (0, 190, 210), "blue": (30, 60, 220), "purple": (130, 40, 180), "pink": (250, 120, 190),
    "brown": (120, 70, 30), "gray": (120, 120, 120),
}
COLOR_NAMES = tuple(COLORS)
BACKGROUND = (255, 255, 255)
SIZES = {"small": 0.28, "large": 0.44}  # side of the object's box as a fraction of the image side
SIZE_NAMES = tuple(SIZES)
RELATIONS = ("left of", "right of", "above", "below")
INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
KINDS = ("single", "pair", "relation", "count", "triple")
KIND_WEIGHTS = (0.2, 0.2, 0.25, 0.15, 0.2)
NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}
GAP = 0.06  # least distance between two objects' boxes (2 px at 32 px)
MARGIN = 0.03  # least distance from a box to the image border
RELATION_RATIO = 1.5  # a stated relation's axis offset is at least this times the other axis' offset

# 7 of 70 (color, shape) pairs, one per shape and color: never in train/test
HELDOUT_PAIRS = frozenset({
    ("red", "star"), ("green", "circle"), ("blue", "triangle"), ("yellow", "square"),
    ("purple", "heart"), ("orange", "cross"), ("cyan", "diamond"),
})
# (shape A, relation, shape B); its mirror (B, inverse, A) is the same geometry and is held out too
HELDOUT_RELATIONS = frozenset({
    ("circle", "left of", "square"), ("triangle", "above", "star"), ("heart", "left of", "diamond"),
    ("cross", "above", "circle"), ("star", "left of", "heart"), ("square", "above", "cross"),
    ("diamond", "left of", "triangle"), ("heart", "above", "square"),
})
SPLIT_SIZES = {"train": 50_000, "test": 5_000, "heldout": 5_000}
IMAGE_SIZES = (32, 64)
SUPERSAMPLE = 4
LABELS = ("shape", "color", "pair", "count", "kind")
MAX_ITEMS = 1_000_000


@dataclass(frozen=True)
class ShapeObject:
    """One object's ground truth: `box` = (x0, y0, x1, y1), in unit coordinates or pixels (see `in_pixels`)."""

    shape: str
    color: str
    size: str
    box: tuple[float, float, float, float]

    @property
    def center(self) -> tuple[float, float]:
        return ((self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2)

    def in_pixels(self, image_size: int) -> ShapeObject:
        return ShapeObject(self.shape, self.color, self.size, tuple(v * image_size for v in self.box))


@dataclass(frozen=True)
class Scene:
    """A scene's kind, its objects (unit coordinates) and, for `relation`, the stated (i, relation, j)."""

    kind: str
    objects: tuple[ShapeObject, ...]
    relation: tuple[int, str, int] | None = None


# ---------------------------------------------------------------- relations and held-out rules


def relation_of(a: tuple[float, float], b: tuple[float, float]) -> str:
    """Where centre `a` is relative to centre `b`, by the dominant axis of the offset (image y grows down)."""
    dx, dy = a[0] - b[0], a[1] - b[1]
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def is_heldout_relation(shape_a: str, relation: str, shape_b: str) -> bool:
    """True when "A relation B" (or its mirror "B inverse A") is a held-out geometric relation."""
    return (shape_a, relation, shape_b) in HELDOUT_RELATIONS or (shape_b, INVERSE[relation], shape_a) in \
        HELDOUT_RELATIONS


def heldout_elements(objects: tuple[ShapeObject, ...]) -> list[tuple[Any, ...]]:
    """Every held-out pair and held-out relation (as an (A, relation, B) triple) that the objects realize."""
    found: list[tuple[Any, ...]] = [(o.color, o.shape) for o in objects if (o.color, o.shape) in HELDOUT_PAIRS]
    for i, a in enumerate(objects):
        for b in objects[i + 1:]:
            rel = relation_of(a.center, b.center)
            if a.shape != b.shape and is_heldout_relation(a.shape, rel, b.shape):
                found.append((a.shape, rel, b.shape))
    return found


# ---------------------------------------------------------------- captions


def article(color: str) -> str:
    return "an" if color[0] in "aeiou" else "a"


def plural(shape: str) -> str:
    return PLURALS.get(shape, shape + "s")


def noun_phrase(color: str, shape: str, size: str | None = None) -> str:
    words = ([size] if size else []) + [color, shape]
    return f"{article(words[0])} {' '.join(words)}"


def join_phrases(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def canonical_caption(kind: str, pairs: list[tuple[str, str]], relation: str | None = None) -> str:
    """The canonical caption of a scene's content: `pairs` are (color, shape) in order; `relation` for kind relation.

    count: `pairs` repeats one (color, shape) n times -> "two red circles".
    """
    if kind == "count":
        color, shape = pairs[0]
        return f"{NUMBER_WORDS[len(pairs)]} {color} {plural(shape)}"
    phrases = [noun_phrase(c, s) for c, s in pairs]
    if kind == "relation":
        return f"{phrases[0]} {relation} {phrases[1]}"
    return join_phrases(phrases)


def scene_captions(scene: Scene) -> list[str]:
    """The canonical caption first, then the paraphrases; every one names every object's color and shape."""
    objs = scene.objects
    pairs = [(o.color, o.shape) for o in objs]
    if scene.relation is not None:
        i, rel, j = scene.relation
        pairs = [pairs[i], pairs[j]]
    canon = canonical_caption(scene.kind, pairs, scene.relation[1] if scene.relation else None)
    out = [canon, f"an image of {canon}", f"{canon} on a white background"]
    if scene.kind == "count":
        out.append(f"{NUMBER_WORDS[len(objs)]} {objs[0].color} {plural(objs[0].shape)} on white")
    elif scene.kind == "relation":
        i, rel, j = scene.relation
        a, b = objs[i], objs[j]
        words = {"left of": "to the left of", "right of": "to the right of"}.get(rel, rel)
        out.append(f"{noun_phrase(a.color, a.shape, a.size)} {words} {noun_phrase(b.color, b.shape, b.size)}")
        out.append(f"{noun_phrase(b.color, b.shape)} {INVERSE[rel]} {noun_phrase(a.color, a.shape)}")
    else:
        out.append(join_phrases([noun_phrase(o.color, o.shape, o.size) for o in objs]))
        if len(objs) > 1:
            out.append(join_phrases([noun_phrase(o.color, o.shape) for o in reversed(objs)]))
    return out


# ---------------------------------------------------------------- layout


def _box(cx: float, cy: float, side: float) -> tuple[float, float, float, float]:
    return (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)


def _sizes(n: int, rng: random.Random) -> list[str]:
    """Uniform sizes, with at most one large object among three (more rarely fit with their gaps)."""
    while True:
        names = [SIZE_NAMES[int(rng.random() * 2)] for _ in range(n)]
        if n < 3 or names.count("large") <= 1:
            return names


def _apart(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return a[2] + GAP <= b[0] or b[2] + GAP <= a[0] or a[3] + GAP <= b[1] or b[3] + GAP <= a[1]


def place(pairs: list[tuple[str, str]], rng: random.Random, relation: str | None = None,
          candidates: int = 10) -> tuple[ShapeObject, ...]:
    """Non-overlapping boxes for (color, shape) pairs; with `relation`, object 0 is `relation` object 1.

    Each object takes the first of `candidates` uniform centres that keeps `GAP` to the boxes placed before
    (the whole scene is redrawn when none does); a relation is laid out directly (`_relation_centres`).
    """
    while True:
        names = _sizes(len(pairs), rng)
        sides = [SIZES[k] for k in names]
        if relation is not None:
            centres = _relation_centres(sides[0], sides[1], relation, rng)
            boxes = [_box(x, y, side) for (x, y), side in zip(centres, sides)]
        else:
            boxes = []
            for side in sorted(sides, reverse=True):  # large first: the small ones fit in what is left
                lo, hi = MARGIN + side / 2, 1 - MARGIN - side / 2
                for _ in range(candidates):
                    b = _box(rng.uniform(lo, hi), rng.uniform(lo, hi), side)
                    if all(_apart(b, o) for o in boxes):
                        boxes.append(b)
                        break
                else:
                    break
            if len(boxes) < len(pairs):
                continue
            order = sorted(range(len(sides)), key=lambda k: -sides[k])  # stable: the order boxes were placed in
            boxes = [boxes[order.index(k)] for k in range(len(sides))]
        return tuple(ShapeObject(s, c, n, b) for (c, s), n, b in zip(pairs, names, boxes))


def _relation_centres(side_a: float, side_b: float, relation: str, rng: random.Random
                      ) -> list[tuple[float, float]]:
    """Centres with A `relation` B: laid out as "left of" (dx >= 1.5 |dy|, boxes apart), then mirrored/transposed."""
    lo_a, hi_a = MARGIN + side_a / 2, 1 - MARGIN - side_a / 2
    lo_b, hi_b = MARGIN + side_b / 2, 1 - MARGIN - side_b / 2
    while True:
        ya, yb = rng.uniform(lo_a, hi_a), rng.uniform(lo_b, hi_b)
        d_min = max(RELATION_RATIO * abs(ya - yb), (side_a + side_b) / 2 + GAP)
        if d_min > hi_b - lo_a:
            continue
        dx = rng.uniform(d_min, hi_b - lo_a)
        lo, hi = max(lo_a, lo_b - dx), min(hi_a, hi_b - dx)
        if lo > hi:
            continue
        xa = rng.uniform(lo, hi)
        pts = [(xa, ya), (xa + dx, yb)]
        if relation == "right of":
            pts = [(1 - x, y) for x, y in pts]
        elif relation == "above":
            pts = [(y, x) for x, y in pts]
        elif relation == "below":
            pts = [(y, 1 - x) for x, y in pts]
        return pts


# ---------------------------------------------------------------- scenes of a split


def _index(rng: random.Random, n: int) -> int:
    return min(int(rng.random() * n), n - 1)


ALL_PAIRS = [(c, s) for c in COLOR_NAMES for s in SHAPES]
SEEN_PAIRS = [p for p in ALL_PAIRS if p not in HELDOUT_PAIRS]


def _distinct(rng: random.Random, allowed: list[tuple[str, str]], n: int,
              first: tuple[str, str] | None = None) -> list[tuple[str, str]]:
    out = [first] if first else []
    while len(out) < n:
        p = allowed[_index(rng, len(allowed))]
        if p not in out:
            out.append(p)
    return out


def _kind(rng: random.Random) -> str:
    u, acc = rng.random(), 0.0
    for kind, w in zip(KINDS, KIND_WEIGHTS):
        acc += w
        if u < acc:
            return kind
    return KINDS[-1]


def sample_scene(rng: random.Random, heldout: bool) -> Scene:
    """One scene: without held-out elements, or (heldout=True) with at least one."""
    kind = _kind(rng)
    if heldout:
        return _heldout_scene(kind, rng)
    while True:
        scene = scene_of_kind(kind, rng, SEEN_PAIRS)
        if not heldout_elements(scene.objects):
            return scene


def scene_of_kind(kind: str, rng: random.Random, allowed: list[tuple[str, str]],
                  first: tuple[str, str] | None = None) -> Scene:
    """A scene of `kind` from the (color, shape) pairs `allowed` (with `first` as one of its objects)."""
    if kind == "single":
        return Scene(kind, place([first or allowed[_index(rng, len(allowed))]], rng))
    if kind == "count":
        n = 2 + _index(rng, 2)
        return Scene(kind, place([first or allowed[_index(rng, len(allowed))]] * n, rng))
    if kind == "relation":
        rel = RELATIONS[_index(rng, 4)]
        return Scene(kind, place(_distinct(rng, allowed, 2, first), rng, relation=rel), (0, rel, 1))
    pairs = _distinct(rng, allowed, 2 if kind == "pair" else 3, first)
    rng.shuffle(pairs)
    return Scene(kind, place(pairs, rng))


def _heldout_scene(kind: str, rng: random.Random) -> Scene:
    """A scene with a held-out pair (any kind) or, for half the relation scenes, a held-out relation."""
    if kind == "relation" and rng.random() < 0.5:
        a, rel, b = sorted(HELDOUT_RELATIONS)[_index(rng, len(HELDOUT_RELATIONS))]
        if rng.random() < 0.5:
            a, rel, b = b, INVERSE[rel], a
        ca, cb = COLOR_NAMES[_index(rng, len(COLOR_NAMES))], COLOR_NAMES[_index(rng, len(COLOR_NAMES))]
        return Scene(kind, place([(ca, a), (cb, b)], rng, relation=rel), (0, rel, 1))
    held = sorted(HELDOUT_PAIRS)[_index(rng, len(HELDOUT_PAIRS))]
    return scene_of_kind(kind, rng, ALL_PAIRS, first=held)


def item_rng(split: str, seed: int, i: int) -> random.Random:
    """Item i's own generator: scenes are a function of (split, seed, i) alone."""
    return random.Random(f"shapes:{split}:{seed}:{i}")


def sample_item(split: str, seed: int, i: int) -> tuple[Scene, str]:
    """Item i of a split: its scene and the caption it carries (canonical half the time, else a paraphrase)."""
    rng = item_rng(split, seed, i)
    scene = sample_scene(rng, split == "heldout")
    caps = scene_captions(scene)
    u = rng.random()
    return scene, caps[0] if u < 0.5 else caps[1 + _index(rng, len(caps) - 1)]


# ---------------------------------------------------------------- rendering


def _unit_polygon(shape: str) -> list[tuple[float, float]]:
    """The outline of a shape whose bounding box is exactly [-1, 1]^2 (y down)."""
    if shape == "square":
        pts = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
    elif shape == "triangle":
        pts = [(0, -1), (1, 1), (-1, 1)]
    elif shape == "diamond":
        pts = [(0, -1), (1, 0), (0, 1), (-1, 0)]
    elif shape == "cross":
        w = 0.36
        pts = [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w),
               (-1, -w), (-w, -w)]
    elif shape == "star":
        pts = [((1.0 if k % 2 == 0 else 0.42) * math.cos(-math.pi / 2 + k * math.pi / 5),
                (1.0 if k % 2 == 0 else 0.42) * math.sin(-math.pi / 2 + k * math.pi / 5)) for k in range(10)]
    elif shape == "arrow":  # pointing right: a shaft a third of the height, a head over the right 40%
        pts = [(-1, -0.3), (0.2, -0.3), (0.2, -1), (1, 0), (0.2, 1), (0.2, 0.3), (-1, 0.3)]
    elif shape == "heart":
        ts = np.linspace(0, 2 * math.pi, 72, endpoint=False)
        pts = [(16 * math.sin(t) ** 3, -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t)
                                          - math.cos(4 * t))) for t in ts]
    else:
        raise ValueError(shape)
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    return [(2 * (x - x0) / (x1 - x0) - 1, 2 * (y - y0) / (y1 - y0) - 1) for x, y in pts]


UNIT_POLYGONS = {s: _unit_polygon(s) for s in SHAPES + NOVEL_SHAPES if s != "circle"}


def render_scene(objects: tuple[ShapeObject, ...] | list[ShapeObject], image_size: int) -> np.ndarray:
    """(H, W, 3) uint8: objects in unit coordinates drawn at 4x and box-filtered to `image_size`."""
    big = image_size * SUPERSAMPLE
    img = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for o in objects:
        # a continuous coordinate u covers supersampled pixel k when k <= u * big < k + 1; Pillow fills the
        # pixels whose index lies inside the outline, so shift by half a pixel onto the pixel centres
        x0, y0, x1, y1 = (v * big - 0.5 for v in o.box)
        fill = COLORS[o.color]
        if o.shape == "circle":
            draw.ellipse([x0 + 0.5, y0 + 0.5, x1 - 0.5, y1 - 0.5], fill=fill)
        else:
            cx, cy, hx, hy = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
            draw.polygon([(cx + u * hx, cy + v * hy) for u, v in UNIT_POLYGONS[o.shape]], fill=fill)
    return np.array(img.resize((image_size, image_size), Image.Resampling.BOX))


# ---------------------------------------------------------------- the dataset


class ShapesDataset(ImageDataset):
    """An `ImageDataset` generated item by item on first use (and kept), with each item's ground truth.

    `scene(i)` is item i's scene in unit coordinates, `objects(i)` its objects with boxes in pixels,
    `canonical[i]` the canonical caption, `captions[i]` the caption batches carry (canonical or a paraphrase,
    chosen per item from the seed). `get_batch` generates and renders only the items it takes; `images`,
    `captions`, `labels` and `scenes` generate every item not yet generated (~0.2 ms a scene, ~0.2 ms a 32 px
    render on one core).
    """

    def __init__(self, split: str, n: int, seed: int, image_size: int, label: str, info: DatasetInfo) -> None:
        self.split, self.seed, self.image_size, self.label_kind, self.info = split, seed, image_size, label, info
        self._items: list[tuple[Scene, str] | None] = [None] * n
        self._labels = torch.full((n,), -1, dtype=torch.long)
        self._images = torch.empty((n, 3, image_size, image_size), dtype=torch.uint8)
        self._done = torch.zeros(n, dtype=torch.bool)
        self._complete: list[tuple[Scene, str]] | None = None

    def __len__(self) -> int:
        return len(self._items)

    def _item(self, i: int) -> tuple[Scene, str]:
        item = self._items[i]
        if item is None:
            item = self._items[i] = sample_item(self.split, self.seed, i)
            self._labels[i] = label_of(item[0], self.label_kind)
        return item

    def scene(self, i: int) -> Scene:
        return self._item(i)[0]

    def objects(self, i: int) -> tuple[ShapeObject, ...]:
        """Item i's objects with boxes in pixels (x0, y0, x1, y1) of this dataset's image size."""
        return tuple(o.in_pixels(self.image_size) for o in self.scene(i).objects)

    def _all(self) -> list[tuple[Scene, str]]:
        """Every item, generated once (later calls return the same list)."""
        if self._complete is None:
            self._complete = [self._item(i) for i in range(len(self))]
        return self._complete

    @property
    def scenes(self) -> list[Scene]:
        return [scene for scene, _ in self._all()]

    @property
    def captions(self) -> list[str]:  # type: ignore[override]
        return [caption for _, caption in self._all()]

    @property
    def canonical(self) -> list[str]:
        return [scene_captions(s)[0] for s in self.scenes]

    @property
    def labels(self) -> Tensor:  # type: ignore[override]
        self._all()
        return self._labels

    def _render(self, idx: Tensor) -> None:
        todo = idx[~self._done[idx]].unique()
        for i in todo.tolist():
            img = render_scene(self._item(i)[0].objects, self.image_size)
            self._images[i] = torch.from_numpy(img).permute(2, 0, 1)
        self._done[todo] = True

    @property
    def images(self) -> Tensor:  # type: ignore[override]
        self._render(torch.arange(len(self)))
        return self._images

    def get_batch(self, idx: Tensor | list[int]) -> dict[str, Any]:
        idx = torch.as_tensor(idx, dtype=torch.long)
        self._render(idx)
        return {"x": self._images[idx].float().div_(127.5).sub_(1.0), "label": self._labels[idx],
                "text": [self._item(i)[1] for i in idx.tolist()]}

    def subset(self, n: int) -> ShapesDataset:
        out = ShapesDataset.__new__(ShapesDataset)
        out.__dict__.update(self.__dict__)
        out._items, out._labels = self._items[:n], self._labels[:n]
        out._complete = self._complete[:n] if self._complete is not None else None
        out._images, out._done = self._images[:n], self._done[:n]
        return out


def label_of(scene: Scene, label: str) -> int:
    """The class label of a scene: its first object's shape, color or (color, shape) pair, its count or kind."""
    o = scene.objects[0]
    if label == "shape":
        return SHAPES.index(o.shape)
    if label == "color":
        return COLOR_NAMES.index(o.color)
    if label == "pair":
        return ALL_PAIRS.index((o.color, o.shape))
    if label == "count":
        return len(scene.objects) - 1
    return KINDS.index(scene.kind)


def class_names(label: str) -> list[str]:
    return {"shape": list(SHAPES), "color": list(COLOR_NAMES), "pair": [f"{c} {s}" for c, s in ALL_PAIRS],
            "count": ["one", "two", "three"], "kind": list(KINDS)}[label]


@DATASETS.register("shapes")
def shapes(split: str = "train", image_size: int | None = None, label: str | None = None, n: int | None = None,
           seed: int = 0, **_: object) -> ShapesDataset:
    """Generated shapes: 50,000 train / 5,000 test / 5,000 heldout scenes at 32 px (or 64 px), captioned.

    `label`: what `label` holds (shape (default), color, pair, count, kind of the first object / scene).
    """
    if split not in SPLIT_SIZES:
        raise GenlabError(f"dataset 'shapes' has no split {split!r}; choose one of: {', '.join(SPLIT_SIZES)}")
    size = 32 if image_size is None else image_size
    if size not in IMAGE_SIZES:
        raise GenlabError(f"shapes renders at 32 or 64 px, not {size}; set data.image_size to 32 or 64")
    label = label or "shape"
    if label not in LABELS:
        raise GenlabError(f"shapes labels can be one of {', '.join(LABELS)}, not {label!r}")
    n = SPLIT_SIZES[split] if n is None else n
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_ITEMS:
        raise GenlabError(f"shapes n={n!r} is out of range; use 1..{MAX_ITEMS:,}")
    return _shapes(split, size, label, n, seed)


@lru_cache(maxsize=2)
def _shapes(split: str, size: int, label: str, n: int, seed: int) -> ShapesDataset:
    """Datasets are kept in memory (the last two asked for), so their renders are made once."""
    info = DatasetInfo(name="shapes", kind="image", size=n, license="generated (no third-party content)",
                       attribution="shapes, generated by genlab from a seed", channels=3, image_size=size,
                       class_names=class_names(label))
    return ShapesDataset(split, n, seed, size, label, info)


# ---------------------------------------------------------------- a new concept (DreamBooth's instance images)

CONCEPT = ("red", "arrow")  # (color, shape) of `shapes_concept`: a shape no `shapes` scene holds
CONCEPT_CAPTION = "a red sks shape"  # a rare token for it (Ruiz et al. 2023, sec. 4.1) and its class noun
CONCEPT_SIZES = {"train": 5, "test": 5}


def concept_scene(split: str, seed: int, i: int, concept: tuple[str, str] = CONCEPT) -> Scene:
    """Item i of a concept split: the concept alone, small for even i and large for odd i (both sizes in any
    handful), at a uniform place within the margins, as a `single` scene of `shapes`."""
    rng = random.Random(f"shapes_concept:{split}:{seed}:{i}")
    size = SIZE_NAMES[i % 2]
    side = SIZES[size]
    lo, hi = MARGIN + side / 2, 1 - MARGIN - side / 2
    box = _box(rng.uniform(lo, hi), rng.uniform(lo, hi), side)
    return Scene("single", (ShapeObject(concept[1], concept[0], size, box),))


@DATASETS.register("shapes_concept")
def shapes_concept(split: str = "train", image_size: int | None = None, caption: str | None = None,
                   seed: int = 0, **_: object) -> ImageDataset:
    """A handful of images of a new concept: 5 renders of a red arrow (a shape `shapes` never draws) at its own
    places and sizes, each captioned `caption` (data.caption; default "a red sks shape")."""
    if split not in CONCEPT_SIZES:
        raise GenlabError(f"dataset 'shapes_concept' has no split {split!r}; choose one of: "
                          f"{', '.join(CONCEPT_SIZES)}")
    size = 32 if image_size is None else image_size
    if size not in IMAGE_SIZES:
        raise GenlabError(f"shapes renders at 32 or 64 px, not {size}; set data.image_size to 32 or 64")
    text = CONCEPT_CAPTION if caption is None else caption
    if not isinstance(text, str) or not text.strip():
        raise GenlabError("data.caption of shapes_concept must be a non-empty prompt, e.g. 'a red sks shape'")
    n = CONCEPT_SIZES[split]
    images = np.stack([render_scene(concept_scene(split, seed, i).objects, size) for i in range(n)])
    info = DatasetInfo(name="shapes_concept", kind="image", size=n, license="generated (no third-party content)",
                       attribution="shapes_concept, generated by genlab from a seed", channels=3, image_size=size)
    return ImageDataset(images, info, captions=[text] * n)
