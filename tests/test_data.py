"""Built-in datasets and image folders: sizes and splits from the dataset README, corrupt/empty folders."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from genlab.config import DataConfig
from genlab.data import ImageDataset, TextDataset, load_dataset
from genlab.data.images import read_params, save_grid
from genlab.errors import GenlabError


def test_mnist_split_sizes_and_label_counts() -> None:
    train, test = load_dataset("mnist"), load_dataset(DataConfig(name="mnist", split="test"))
    assert (len(train), len(test)) == (8000, 2000)
    # per-class counts published with the dataset
    assert np.bincount(train.labels.numpy()).tolist() == [805, 896, 797, 811, 789, 695, 805, 859, 767, 776]
    assert np.bincount(test.labels.numpy()).tolist() == [196, 231, 194, 221, 191, 168, 209, 211, 177, 202]
    x = train.get_batch(list(range(64)))["x"]
    assert x.shape == (64, 1, 28, 28) and x.min() == -1 and x.max() == 1


def test_emoji_splits_cover_all_and_categories_are_labels() -> None:
    for name in ("twemoji", "noto"):
        tr = load_dataset(DataConfig(name=name, split="train"))
        te = load_dataset(DataConfig(name=name, split="test", image_size=64))
        assert len(tr) + len(te) == 1911
        assert tr.info.num_classes == 10 and tr.images.shape[1:] == (3, 32, 32)
        assert te.images.shape[1:] == (3, 64, 64)
        assert tr.captions[0] and isinstance(tr.captions[0], str)


def test_text_splits_follow_the_published_rule() -> None:
    val = load_dataset(DataConfig(name="fortunes", split="test"))
    assert isinstance(val, TextDataset)
    # 1,513 validation entries joined by blank lines
    assert val.text.count("\n\n") >= 1512
    train = load_dataset("jargon")
    assert len(train) == 1_456_874


def test_unknown_dataset_names_the_choices() -> None:
    with pytest.raises(GenlabError, match="mnist"):
        load_dataset("minst")


def _folder(tmp: Path, n_good: int, n_bad: int) -> Path:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n_good):
        Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(tmp / f"img{i}.png")
        rows.append({"file_name": f"img{i}.png", "text": f"caption {i}"})
    for i in range(n_bad):
        (tmp / f"broken{i}.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (tmp / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return tmp


def test_image_folder_skips_corrupt_images_and_reports_them(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ds = load_dataset(DataConfig(name=str(_folder(tmp_path, 3, 2)), image_size=16))
    assert isinstance(ds, ImageDataset) and len(ds) == 3
    assert ds.images.shape == (3, 3, 16, 16)
    assert ds.captions == ["caption 0", "caption 1", "caption 2"]
    err = capsys.readouterr().err
    assert "skipped 2 unreadable" in err and "broken0.jpg" in err


def test_image_folder_with_sidecar_captions(tmp_path: Path) -> None:
    Image.new("L", (8, 8), 7).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a grey square\n")
    ds = load_dataset(DataConfig(name=str(tmp_path), image_size=8))
    assert ds.captions == ["a grey square"]
    assert int(ds.images[0, 0, 0, 0]) == 7


def test_image_folder_with_only_corrupt_images_is_an_error(tmp_path: Path) -> None:
    _folder(tmp_path, 0, 2)
    with pytest.raises(GenlabError, match="no usable images: none of its 2"):
        load_dataset(DataConfig(name=str(tmp_path)))


def test_empty_folder_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(GenlabError, match="holds no image files"):
        load_dataset(DataConfig(name=str(tmp_path)))


def test_grid_png_carries_params(tmp_path: Path) -> None:
    ds = load_dataset(DataConfig(name="mnist", max_items=10))
    path = save_grid(ds.get_batch(list(range(10)))["x"], tmp_path / "g.png", params={"seed": 3, "sampler": "x"})
    assert read_params(path) == {"seed": 3, "sampler": "x"}
    with Image.open(path) as im:
        assert im.size == (4 * 30 + 2, 3 * 30 + 2)


def test_cli_data_list_and_show(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "genlab.cli", "data", "list"], capture_output=True, text=True,
                         check=True).stdout
    for name in ("mnist", "twemoji", "noto", "fortunes", "jargon"):
        assert name in out
    assert "CC BY 4.0" in out and "public domain" in out
    r = subprocess.run([sys.executable, "-m", "genlab.cli", "data", "show", "minst"], capture_output=True, text=True)
    assert r.returncode == 2 and "did you mean 'mnist'" in r.stderr and "Traceback" not in r.stderr
