"""Shapes-GenEval: prompt adherence of text-to-image models on `shapes`, modelled on GenEval (Ghosh et al. 2023).

GenEval detects the objects of a generated image and checks each attribute the prompt states. Here the
"detector" is a segmentation against the plain background (8-connected components of the pixels that differ
from white) and an attribute reader: a small CNN (`features.ConvNet`, two softmax heads: shape and color) that
reads each component's masked crop, trained on ground-truth crops of real renders and cached under
`$GENLAB_CACHE/geneval/` keyed by its recipe and a hash of its training crops. Size comes from the component's box.

Six categories, each with its own prompt form (always the canonical caption of `shapes`):

- single_object      "a red circle"
- two_objects        "a red circle and a red square"          (one color, two shapes)
- counting           "three red circles"                      (two or three)
- colors             "a red circle and a blue circle"         (one shape, two colors)
- position           "a red circle left of a blue square"     (by the dominant axis of the centres' offset)
- color_attribution  "a red circle and a blue square"         (two colors bound to two shapes)

An image passes when its detected objects are exactly the stated ones (the multiset of (color, shape), so the
count too) and, for position, the stated relation holds. A category's score is its pass rate; overall is the
unweighted mean of the six. Prompt sets (`prompt_specs`) are deterministic: `seen` uses only compositions of
the train split; in `heldout` every prompt has a held-out (color, shape) pair or a held-out relation. The reader
itself is trained on every combination: it is the judge, not a model under test.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import Tensor

from genlab.data import shapes as S
from genlab.errors import GenlabError
from genlab.eval.features import ConvNet, cache_dir, save_feature_network, train_heads
from genlab.files import write_atomic
from genlab.models.base import load_weights

CATEGORIES = ("single_object", "two_objects", "counting", "colors", "position", "color_attribution")
SPLITS = ("seen", "heldout")
PROMPTS_PER_CATEGORY = 100
IMAGES_PER_PROMPT = 4
READER_VERSION = 2
CROP = 24  # side of the reader's input crop
THRESHOLD = 64  # a pixel is foreground when some channel is this far (of 255) below white (at 40, 4 of 4,800
# real renders at 32 px had two objects joined by the quarter-covered pixels of their facing edges; at 64, none)
MIN_AREA = 10 / 32**2  # components smaller than this fraction of the image are specks, not objects
SIZE_SPLIT = sum(S.SIZES.values()) / 2  # a component's larger side above this fraction of the image is "large"


@dataclass(frozen=True)
class PromptSpec:
    """A prompt and what it states: (color, shape) per object (repeated for counts), and object 0 `relation` 1."""

    category: str
    prompt: str
    objects: tuple[tuple[str, str], ...]
    relation: str | None = None
    heldout: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"category": self.category, "prompt": self.prompt, "objects": [list(o) for o in self.objects],
                "relation": self.relation, "heldout": self.heldout}


@dataclass(frozen=True)
class Detection:
    """One object read from an image: its shape, color, size and box (x0, y0, x1, y1) in pixels."""

    shape: str
    color: str
    size: str
    box: tuple[int, int, int, int]

    @property
    def center(self) -> tuple[float, float]:
        return ((self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2)


# ---------------------------------------------------------------- prompts


def _kind(category: str) -> str:
    return {"single_object": "single", "counting": "count", "position": "relation"}.get(category, "pair")


def make_spec(category: str, objects: list[tuple[str, str]], relation: str | None = None) -> PromptSpec:
    """A spec with its canonical prompt (the `shapes` caption of the same content)."""
    if category not in CATEGORIES:
        raise GenlabError(f"unknown Shapes-GenEval category {category!r}; choose one of: {', '.join(CATEGORIES)}")
    held = any(p in S.HELDOUT_PAIRS for p in objects) or (
        relation is not None and S.is_heldout_relation(objects[0][1], relation, objects[1][1]))
    prompt = S.canonical_caption(_kind(category), objects, relation)
    return PromptSpec(category, prompt, tuple(objects), relation, held)


def _draw(category: str, rng: random.Random, heldout: bool) -> PromptSpec:
    """One prompt of a category: seen compositions only, or (heldout) with a held-out pair or relation."""
    pick = lambda seq: seq[min(int(rng.random() * len(seq)), len(seq) - 1)]  # noqa: E731
    pairs = S.ALL_PAIRS if heldout else S.SEEN_PAIRS
    held = pick(sorted(S.HELDOUT_PAIRS)) if heldout else None
    while True:
        relation = None
        if category == "single_object":
            objs = [held or pick(pairs)]
        elif category == "counting":
            objs = [held or pick(pairs)] * (2 + int(rng.random() * 2))
        elif category == "two_objects":  # one color, two shapes
            c, s = held or pick(pairs)
            objs = [(c, s), (c, pick(S.SHAPES))]
        elif category == "colors":  # one shape, two colors
            c, s = held or pick(pairs)
            objs = [(c, s), (pick(S.COLOR_NAMES), s)]
        elif category == "color_attribution":
            objs = [held or pick(pairs), pick(pairs)]
        else:
            relation = pick(S.RELATIONS)
            if heldout and rng.random() < 0.5:  # a held-out relation between any colors
                a, relation, b = pick(sorted(S.HELDOUT_RELATIONS))
                objs = [(pick(S.COLOR_NAMES), a), (pick(S.COLOR_NAMES), b)]
            else:
                objs = [held or pick(pairs), pick(pairs)]
        if rng.random() < 0.5 and category != "counting" and len(objs) == 2:
            objs = objs[::-1]
            relation = S.INVERSE[relation] if relation else None
        distinct = len(objs) == 1 or category == "counting" or objs[0] != objs[1]
        if category == "two_objects":
            distinct = distinct and objs[0][1] != objs[1][1]
        if category == "colors":
            distinct = distinct and objs[0][0] != objs[1][0]
        if category in ("color_attribution", "position"):
            distinct = distinct and objs[0][0] != objs[1][0] and objs[0][1] != objs[1][1]
        spec = make_spec(category, objs, relation) if distinct else None
        if spec is not None and spec.heldout == heldout:
            return spec


def prompt_specs(split: str = "seen", per_category: int = PROMPTS_PER_CATEGORY, seed: int = 0) -> list[PromptSpec]:
    """The prompt set of a split: `per_category` prompts per category (distinct while the category has that many)."""
    if split not in SPLITS:
        raise GenlabError(f"Shapes-GenEval has prompt sets {', '.join(SPLITS)}, not {split!r}")
    out = []
    for category in CATEGORIES:
        rng = random.Random(f"geneval:{split}:{category}:{seed}")
        seen: set[str] = set()
        specs: list[PromptSpec] = []
        misses = 0
        while len(specs) < per_category:
            spec = _draw(category, rng, split == "heldout")
            if spec.prompt in seen and misses < 200:  # repeats only once the distinct prompts run out
                misses += 1
                continue
            seen.add(spec.prompt)
            specs.append(spec)
        out += specs
    return out


def expand(specs: list[PromptSpec], images_per_prompt: int = IMAGES_PER_PROMPT) -> list[PromptSpec]:
    """One spec per image: each prompt repeated `images_per_prompt` times."""
    return [s for s in specs for _ in range(images_per_prompt)]


def render_specs(specs: list[PromptSpec], image_size: int = 32, seed: int = 0) -> Tensor:
    """Real renders of specs (image i laid out from its own seed), (N, 3, H, W) uint8: the evaluator's test."""
    out = torch.empty((len(specs), 3, image_size, image_size), dtype=torch.uint8)
    for i, spec in enumerate(specs):
        rng = random.Random(f"geneval-render:{seed}:{i}")
        objs = S.place(list(spec.objects), rng, relation=spec.relation)
        out[i] = torch.from_numpy(S.render_scene(objs, image_size)).permute(2, 0, 1)
    return out


# ---------------------------------------------------------------- segmentation and crops


def to_uint8_hwc(images: Tensor | np.ndarray) -> np.ndarray:
    """(N, 3, H, W) float in [-1, 1] or uint8 -> (N, H, W, 3) uint8."""
    x = images.detach().cpu() if isinstance(images, Tensor) else torch.from_numpy(np.asarray(images))
    if x.ndim != 4 or x.shape[1] != 3:
        raise GenlabError(f"Shapes-GenEval reads RGB images (N, 3, H, W), not shape {tuple(x.shape)}")
    if x.dtype != torch.uint8:
        x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def segment(img: np.ndarray) -> list[tuple[tuple[int, int, int, int], np.ndarray]]:
    """8-connected components of the non-background pixels of one (H, W, 3) uint8 image: (box, mask) each,
    box = (x0, y0, x1, y1) with x1, y1 exclusive; specks under `MIN_AREA` are dropped."""
    h, w = img.shape[:2]
    fg = (255 - img.astype(np.int16)).max(-1) >= THRESHOLD
    labels, n = ndimage.label(fg, structure=np.ones((3, 3), dtype=int))
    out = []
    for k, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        mask = labels == k
        if mask.sum() < MIN_AREA * h * w:
            continue
        out.append(((sl[1].start, sl[0].start, sl[1].stop, sl[0].stop), mask))
    return out


def crop(img: np.ndarray, box: tuple[int, int, int, int], mask: np.ndarray) -> Tensor:
    """The component alone (other pixels white) in a square around its box with a 1-pixel border, resized to
    CROP x CROP (bilinear, antialiased): (3, CROP, CROP) in [-1, 1]."""
    h, w = img.shape[:2]
    x0, y0, x1, y1 = box
    side = max(x1 - x0, y1 - y0) + 2
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    sx, sy = int(round(cx - side / 2)), int(round(cy - side / 2))
    canvas = np.full((side, side, 3), 255, dtype=np.uint8)
    alone = np.where(mask[..., None], img, 255).astype(np.uint8)
    ax0, ay0, ax1, ay1 = max(sx, 0), max(sy, 0), min(sx + side, w), min(sy + side, h)
    canvas[ay0 - sy: ay1 - sy, ax0 - sx: ax1 - sx] = alone[ay0:ay1, ax0:ax1]
    t = torch.from_numpy(canvas).permute(2, 0, 1)[None].float().div(127.5).sub(1)
    return F.interpolate(t, size=(CROP, CROP), mode="bilinear", antialias=True, align_corners=False)[0]


# ---------------------------------------------------------------- the attribute reader


@dataclass
class ReaderRecipe:
    """How the attribute reader is trained; every field enters the cache hash."""

    scenes: int = 4000  # rendered scenes at each of 32 and 64 px (all (color, shape) pairs)
    width: int = 16
    feature_dim: int = 64
    epochs: int = 6
    batch_size: int = 128
    lr: float = 3e-3
    color_jitter: float = 0.08  # per-crop, per-channel shift of the object's pixels (in [-1, 1] units)
    noise: float = 0.03  # Gaussian pixel noise
    degrade_p: float = 0.5  # share of training scenes blurred and noised before segmentation, as generated
    max_blur: float = 1.0  # their Gaussian blur sigma, uniform in [0.2, max_blur] pixels
    max_pixel_noise: float = 8.0  # their pixel noise std, uniform in [0, this] levels of 255
    seed: int = 0


def reader_training_crops(recipe: ReaderRecipe, split: str = "train") -> tuple[Tensor, Tensor, Tensor]:
    """Crops of real renders with their ground truth: (crops, shape ids, color ids). Scenes are drawn from every
    (color, shape) pair, a share of them blurred and noised (generated images are softer than renders) before
    segmentation; each component is matched to the object whose box holds its centre, and a scene whose
    components are not its objects (blur merged two) is left out."""
    crops, shapes, colors = [], [], []
    tag = 0 if split == "train" else 1
    for size in S.IMAGE_SIZES:
        for i in range(recipe.scenes if split == "train" else recipe.scenes // 4):
            rng = random.Random(f"geneval-reader:{recipe.seed}:{tag}:{size}:{i}")
            kind = S.KINDS[min(int(rng.random() * len(S.KINDS)), len(S.KINDS) - 1)]
            scene = S.scene_of_kind(kind, rng, S.ALL_PAIRS)
            img = S.render_scene(scene.objects, size)
            if rng.random() < recipe.degrade_p:
                img = degrade(img, rng.uniform(0.2, recipe.max_blur) * size / 32,
                              rng.uniform(0, recipe.max_pixel_noise), rng.getrandbits(32))
            comps = segment(img)
            if len(comps) != len(scene.objects):
                continue
            for box, mask in comps:
                obj = _owner(box, [o.in_pixels(size) for o in scene.objects])
                crops.append(crop(img, box, mask))
                shapes.append(S.SHAPES.index(obj.shape))
                colors.append(S.COLOR_NAMES.index(obj.color))
    return torch.stack(crops), torch.tensor(shapes), torch.tensor(colors)


def degrade(img: np.ndarray, blur: float, noise: float, seed: int) -> np.ndarray:
    """An (H, W, 3) uint8 image blurred (Gaussian, `blur` pixels) and noised (`noise` levels), as uint8."""
    x = ndimage.gaussian_filter(img.astype(np.float32), sigma=(blur, blur, 0), mode="nearest")
    x += np.random.default_rng(seed).normal(0, noise, x.shape).astype(np.float32)
    return x.round().clip(0, 255).astype(np.uint8)


def _owner(box: tuple[int, int, int, int], objects: list[S.ShapeObject]) -> S.ShapeObject:
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    for o in objects:
        if o.box[0] <= cx <= o.box[2] and o.box[1] <= cy <= o.box[3]:
            return o
    raise AssertionError(f"a component at {box} belongs to no object")


class AttributeReader:
    """The trained reader: `read(images)` -> detections per image."""

    def __init__(self, net: ConvNet, meta: dict[str, Any]) -> None:
        self.net = net.eval()
        self.meta = meta

    @torch.no_grad()
    def classify(self, crops: Tensor) -> tuple[Tensor, Tensor]:
        logits = torch.cat([self.net(crops[i: i + 1024]) for i in range(0, len(crops), 1024)]) if len(crops) \
            else torch.zeros(0, len(S.SHAPES) + len(S.COLOR_NAMES))
        return logits[:, : len(S.SHAPES)].argmax(-1), logits[:, len(S.SHAPES):].argmax(-1)

    def read(self, images: Tensor | np.ndarray) -> list[list[Detection]]:
        """The objects of each image: segmented, then each crop's shape and color read by the CNN."""
        imgs = to_uint8_hwc(images)
        comps = [segment(img) for img in imgs]
        crops = [crop(img, box, mask) for img, cs in zip(imgs, comps) for box, mask in cs]
        shapes, colors = self.classify(torch.stack(crops) if crops else torch.zeros(0, 3, CROP, CROP))
        out, k = [], 0
        for img, cs in zip(imgs, comps):
            dets = []
            for box, _ in cs:
                side = max(box[2] - box[0], box[3] - box[1]) / img.shape[0]
                dets.append(Detection(S.SHAPES[int(shapes[k])], S.COLOR_NAMES[int(colors[k])],
                                      "large" if side > SIZE_SPLIT else "small", box))
                k += 1
            out.append(dets)
        return out


def _reader_hash(recipe: ReaderRecipe, crops: Tensor, shapes: Tensor, colors: Tensor) -> str:
    h = hashlib.sha256()
    for t in (crops, shapes, colors):
        h.update(t.contiguous().numpy().tobytes())
    h.update(json.dumps({"recipe": asdict(recipe), "version": READER_VERSION, "crop": CROP,
                         "threshold": THRESHOLD, "min_area": MIN_AREA}, sort_keys=True).encode())
    return h.hexdigest()[:16]


def train_reader(recipe: ReaderRecipe, progress: bool = False) -> AttributeReader:
    """Train the reader on ground-truth crops; its held-out crop accuracy is in `meta`."""
    torch.manual_seed(recipe.seed)
    t0 = time.monotonic()
    x, ys, yc = reader_training_crops(recipe)
    vx, vys, vyc = reader_training_crops(recipe, split="val")
    n_out = len(S.SHAPES) + len(S.COLOR_NAMES)
    net = ConvNet(3, CROP, n_out, recipe.width, recipe.feature_dim)
    train_heads(net, x, (ys, yc), (len(S.SHAPES), len(S.COLOR_NAMES)), epochs=recipe.epochs,
                batch_size=recipe.batch_size, lr=recipe.lr, generator=torch.Generator().manual_seed(recipe.seed),
                augment=lambda xb, g: _augment(xb, recipe, g), name="reader", progress=progress)
    reader = AttributeReader(net, {})
    ps, pc = reader.classify(vx)
    reader.meta = {
        "kind": "shapes-geneval-reader", "recipe": asdict(recipe), "version": READER_VERSION,
        "hash": _reader_hash(recipe, x, ys, yc), "train_crops": len(x), "val_crops": len(vx),
        "val_shape_accuracy": float((ps == vys).float().mean()),
        "val_color_accuracy": float((pc == vyc).float().mean()),
        "train_seconds": round(time.monotonic() - t0, 1), "channels": 3, "image_size": CROP, "num_outputs": n_out,
    }
    return reader


def get_reader(recipe: ReaderRecipe | None = None, retrain: bool = False, progress: bool = False) -> AttributeReader:
    """The reader of a recipe, from `$GENLAB_CACHE/geneval/reader-<hash>/` or trained and cached there.

    The key hashes the recipe and its training crops (rendered from code, so a change of the renderer or of
    `shapes` changes the key); rendering them to check the key costs a few seconds."""
    recipe = recipe or ReaderRecipe()
    key = hashlib.sha256(json.dumps({"recipe": asdict(recipe), "version": READER_VERSION, "crop": CROP,
                                     "threshold": THRESHOLD, "min_area": MIN_AREA, "shapes": S.SHAPES,
                                     "colors": S.COLORS, "sizes": S.SIZES, "ss": S.SUPERSAMPLE},
                                    sort_keys=True).encode()).hexdigest()[:16]
    folder = cache_dir() / "geneval" / f"reader-{key}"
    if not retrain and (folder / "meta.json").is_file():
        try:
            meta = json.loads((folder / "meta.json").read_text())
            net = ConvNet(3, CROP, meta["num_outputs"], recipe.width, recipe.feature_dim)
            net.load_state_dict(load_weights(folder / "model.safetensors"))
            return AttributeReader(net, meta)
        except (OSError, KeyError, json.JSONDecodeError, RuntimeError) as e:
            raise GenlabError(f"{folder} is not a Shapes-GenEval reader ({e}); delete it to retrain") from None
    reader = train_reader(recipe, progress=progress)
    save_feature_network(reader.net, reader.meta, folder)
    return reader


def _augment(x: Tensor, recipe: ReaderRecipe, g: torch.Generator) -> Tensor:
    """Shift the object's colour per channel, add pixel noise: generated images are never exact renders."""
    obj = (x < 0.99).any(1, keepdim=True).float()
    shift = (torch.rand(x.shape[0], 3, 1, 1, generator=g) * 2 - 1) * recipe.color_jitter
    noise = torch.randn(x.shape, generator=g) * recipe.noise
    return (x + obj * shift + noise).clamp(-1, 1)


# ---------------------------------------------------------------- verdicts and scores


def passes(spec: PromptSpec, detections: list[Detection]) -> bool:
    """Every stated attribute right: exactly the stated (color, shape) objects, and the relation for position."""
    if Counter((d.color, d.shape) for d in detections) != Counter(spec.objects):
        return False
    if spec.relation is None:
        return True
    a = next(d for d in detections if (d.color, d.shape) == spec.objects[0])
    b = next(d for d in detections if (d.color, d.shape) == spec.objects[1])
    return S.relation_of(a.center, b.center) == spec.relation


def attribute_recall(spec: PromptSpec, detections: list[Detection]) -> dict[str, float]:
    """Finer readings than `passes` for models that rarely pass: the share of the stated (color, shape) objects,
    colors and shapes found (multisets), their mean (`partial`), and whether the object count is right."""
    def recall(want: Counter, got: Counter) -> float:
        return sum((want & got).values()) / sum(want.values())

    out = {"objects": recall(Counter(spec.objects), Counter((d.color, d.shape) for d in detections)),
           "colors": recall(Counter(c for c, _ in spec.objects), Counter(d.color for d in detections)),
           "shapes": recall(Counter(s for _, s in spec.objects), Counter(d.shape for d in detections))}
    return {**out, "partial": sum(out.values()) / 3, "count": float(len(detections) == len(spec.objects))}


def score(images: Tensor | np.ndarray, specs: list[PromptSpec], reader: AttributeReader | None = None
          ) -> dict[str, Any]:
    """Shapes-GenEval of images, one spec per image: per category its pass rate, images and prompts; overall.

    The table holds the categories present; `overall` is the unweighted mean over them (the six of a full set).
    """
    if len(images) != len(specs):
        raise GenlabError(f"{len(images)} images for {len(specs)} prompt specs; give one spec per image")
    reader = reader or get_reader()
    dets = reader.read(images)
    table: dict[str, Any] = {}
    for cat in CATEGORIES:
        rows = [passes(s, d) for s, d in zip(specs, dets) if s.category == cat]
        if rows:
            table[cat] = {"score": sum(rows) / len(rows), "images": len(rows),
                          "prompts": len({s.prompt for s in specs if s.category == cat})}
    return {"categories": table, "overall": float(np.mean([v["score"] for v in table.values()])) if table else 0.0,
            "reader": reader.meta.get("hash")}


def markdown_table(results: dict[str, dict[str, Any]]) -> str:
    """A markdown table of `score` results by prompt split (columns) and category (rows)."""
    splits = list(results)
    lines = ["| category | " + " | ".join(splits) + " |", "|---|" + "---|" * len(splits)]
    for cat in CATEGORIES:
        cells = [f"{r['categories'][cat]['score']:.3f} ({r['categories'][cat]['images']})"
                 if cat in r["categories"] else "-" for r in results.values()]
        lines.append(f"| {cat} | " + " | ".join(cells) + " |")
    lines.append("| **overall** | " + " | ".join(f"**{r['overall']:.3f}**" for r in results.values()) + " |")
    return "\n".join(lines) + "\n"


def write_geneval(results: dict[str, dict[str, Any]], out_dir: str | Path, extra: dict[str, Any] | None = None
                  ) -> dict[str, Path]:
    """`geneval.json` and `geneval.md` in `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {**(extra or {}), "geneval": results}
    write_atomic(out / "geneval.json", json.dumps(payload, indent=2))
    head = "".join(f"- {k}: {json.dumps(v) if isinstance(v, dict | list) else v}\n" for k, v in (extra or {}).items())
    write_atomic(out / "geneval.md", f"# Shapes-GenEval\n\n{head}\nscore (images)\n\n{markdown_table(results)}")
    return {"json": out / "geneval.json", "md": out / "geneval.md"}
