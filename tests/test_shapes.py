"""The generated `shapes` dataset: determinism, complete captions, held-out compositions, boxes against pixels."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from genlab.cli import main
from genlab.config import DataConfig
from genlab.data import load_dataset
from genlab.data import shapes as S
from genlab.data.images import read_params
from genlab.errors import GenlabError

WORDS = {"two": 2, "three": 3}


def fresh(split: str = "train", n: int = 300, seed: int = 0, image_size: int = 32) -> S.ShapesDataset:
    """A dataset built anew (not the in-memory cache), so determinism is tested across constructions."""
    return S._shapes.__wrapped__(split, image_size, "shape", n, seed)


def test_contract_and_determinism() -> None:
    a, b = fresh(n=40), fresh(n=60)
    batch = a.get_batch([3, 0, 7])
    assert batch["x"].shape == (3, 3, 32, 32) and batch["x"].dtype == torch.float32
    assert batch["x"].min() >= -1 and batch["x"].max() == 1  # white background
    assert batch["label"].dtype == torch.long and len(batch["text"]) == 3
    # the same seed gives the same items whatever n is; item i depends on (split, seed, i) alone
    assert torch.equal(a.images, b.images[:40]) and a.captions == b.captions[:40]
    assert [a.scene(i) for i in range(40)] == [b.scene(i) for i in range(40)]
    other = fresh(n=40, seed=1)
    assert not torch.equal(a.images, other.images)
    test = fresh("test", n=40)
    assert a.canonical != test.canonical
    big = fresh(n=8, image_size=64)
    assert big.get_batch([0])["x"].shape == (1, 3, 64, 64)
    # 64 px renders the same geometry: box-filtered to 32 px it is close to the 32 px render
    x64 = big.images.float().reshape(8, 3, 32, 2, 32, 2).mean((3, 5))
    assert (x64 - a.images[:8].float()).abs().mean() < 2.0


def test_registry_and_load_dataset() -> None:
    ds = load_dataset(DataConfig(name="shapes", split="heldout", max_items=10))
    assert len(ds) == 10 and ds.info.channels == 3 and ds.info.image_size == 32
    full = load_dataset("shapes")
    assert len(full) == 50_000 and full.info.class_names == list(S.SHAPES)
    assert load_dataset(DataConfig(name="shapes", label="pair", max_items=5)).info.num_classes == 70


@pytest.mark.parametrize("kw, msg", [
    ({"split": "val"}, "no split 'val'"), ({"image_size": 48}, "32 or 64"),
    ({"label": "size"}, "labels can be one of"), ({"n": 0}, "out of range"),
])
def test_bad_options_name_the_fix(kw: dict, msg: str) -> None:
    with pytest.raises(GenlabError, match=msg):
        S.shapes(**kw)


def mentions(caption: str) -> Counter:
    """(color, shape) -> how many, read back from a caption with a regex of its own."""
    colors, shapes = "|".join(S.COLOR_NAMES), "|".join(S.SHAPES)
    out: Counter = Counter()
    pattern = rf"\b(a|an|two|three)\s+(?:(?:small|large)\s+)?({colors})\s+({shapes})(e?s)?\b"
    for art, color, shape, pl in re.findall(pattern, caption):
        out[(color, shape)] += WORDS.get(art, 1)
        assert bool(pl) == (art in WORDS), caption
    return out


def test_every_caption_names_every_object() -> None:
    ds = fresh(n=300)
    kinds = Counter()
    for i in range(len(ds)):
        scene = ds.scene(i)
        kinds[scene.kind] += 1
        truth = Counter((o.color, o.shape) for o in scene.objects)
        for caption in S.scene_captions(scene):
            assert mentions(caption) == truth, (caption, scene)
        assert ds.captions[i] in S.scene_captions(scene) and ds.canonical[i] == S.scene_captions(scene)[0]
    assert set(kinds) == set(S.KINDS)
    assert 0.3 < sum(c == k for c, k in zip(ds.captions, ds.canonical)) / len(ds) < 0.7


def pixel_relation(mask_a: np.ndarray, mask_b: np.ndarray) -> str:
    """Where object a is relative to b, from the centroids of their rendered pixels (independent of boxes)."""
    ya, xa = np.argwhere(mask_a).mean(0)
    yb, xb = np.argwhere(mask_b).mean(0)
    if abs(xa - xb) >= abs(ya - yb):
        return "left of" if xa < xb else "right of"
    return "above" if ya < yb else "below"


def object_masks(ds: S.ShapesDataset, i: int, size: int) -> list[np.ndarray]:
    return [(S.render_scene([o], size) != 255).any(-1) for o in ds.scene(i).objects]


def test_heldout_compositions_never_in_train() -> None:
    train, heldout = fresh(n=2000), fresh("heldout", n=300)
    pairs = Counter((o.color, o.shape) for s in train.scenes for o in s.objects)
    assert len(pairs) == 63 and not set(pairs) & S.HELDOUT_PAIRS
    found_relations = Counter()
    for i, s in enumerate(train.scenes[:600]):
        masks = object_masks(train, i, 32)
        for a in range(len(s.objects)):
            for b in range(len(s.objects)):
                if a != b:
                    rel = pixel_relation(masks[a], masks[b])
                    assert (s.objects[a].shape, rel, s.objects[b].shape) not in S.HELDOUT_RELATIONS, s
    for i, s in enumerate(heldout.scenes):
        held = [(o.color, o.shape) for o in s.objects if (o.color, o.shape) in S.HELDOUT_PAIRS]
        if not held:  # a held-out relation: check it on the pixels
            masks = object_masks(heldout, i, 32)
            rel = pixel_relation(masks[0], masks[1])
            triple = (s.objects[0].shape, rel, s.objects[1].shape)
            mirror = (s.objects[1].shape, S.INVERSE[rel], s.objects[0].shape)
            assert triple in S.HELDOUT_RELATIONS or mirror in S.HELDOUT_RELATIONS, s
            found_relations[triple] += 1
    assert len(found_relations) >= 4


def test_boxes_match_rendered_pixels() -> None:
    for size in (32, 64):
        ds = fresh(n=60, image_size=size)
        for i in range(len(ds)):
            img = ds.images[i].permute(1, 2, 0).numpy()
            union = np.zeros((size, size), dtype=bool)
            for o, mask in zip(ds.objects(i), object_masks(ds, i, size)):
                ys, xs = np.nonzero(mask)
                x0, y0, x1, y1 = o.box
                # the pixels an object touches are the ones its box covers, up to one supersampled pixel
                q = 1 / S.SUPERSAMPLE
                assert np.floor(x0 - q) <= xs.min() <= np.floor(x0 + q), (o, xs.min())
                assert np.ceil(x1 - q) - 1 <= xs.max() <= np.ceil(x1 + q) - 1, (o, xs.max())
                assert np.floor(y0 - q) <= ys.min() <= np.floor(y0 + q), (o, ys.min())
                assert np.ceil(y1 - q) - 1 <= ys.max() <= np.ceil(y1 + q) - 1, (o, ys.max())
                assert mask.sum() > 0.3 * (x1 - x0) * (y1 - y0)
                assert (img[mask] != 255).any(-1).mean() > 0.99  # the object is drawn in the scene too
                union |= mask
            assert (img[~union] == 255).all()  # nothing outside the objects
            # stated relations hold on the pixels
            s = ds.scene(i)
            if s.relation:
                a, rel, b = s.relation
                masks = object_masks(ds, i, size)
                assert pixel_relation(masks[a], masks[b]) == rel


def test_colors_are_drawn_as_named() -> None:
    ds = fresh(n=50)
    for i in range(len(ds)):
        img = ds.images[i].permute(1, 2, 0).numpy().astype(int)
        for o in ds.objects(i):
            x0, y0, x1, y1 = (int(round(v)) for v in o.box)
            cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
            if o.shape in ("circle", "square", "diamond", "cross", "heart", "star"):
                assert np.abs(img[cy, cx] - np.array(S.COLORS[o.color])).max() <= 2, o


def test_data_show_writes_a_grid(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "grid.png"
    assert main(["data", "show", "shapes", "--n", "16", "--out", str(out), "--image-size", "64"]) == 0
    assert read_params(out)["dataset"] == "shapes"
    assert main(["data", "show", "shapes", "--image-size", "40", "--out", str(out)]) == 2
    assert main(["data", "show", "shapes", "--split", "validation", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "32 or 64" in err and "heldout" in err and "Traceback" not in err
