"""Sampling and evaluation across processes: two CPU processes on gloo (torchrun) draw the same images and give
the same FID as one, and evaluation during a two-process training run finishes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import randomize_weights, tiny_feature_network
from PIL import Image

from genlab.eval import features as F
from genlab.models.diffusion import DiffusionConfig, DiffusionModel
from genlab.sampling.distributed import gather_shards, shard

TESTS = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
TINY_UNET = dict(base_channels=8, channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=(), head_channels=8,
                 norm_groups=4, timesteps=100)


def test_shards_cover_the_items_once_in_order():
    for n, world, batch in [(10, 2, 1), (7, 3, 1), (5, 5, 1), (1000, 8, 1), (11, 2, 4), (20, 3, 8), (6, 4, 250)]:
        parts = [shard(n, r, world, batch) for r in range(world)]
        assert [i for p in parts for i in p] == list(range(n))
        starts = {i for p in parts for i in range(p.start, p.stop, batch)}
        assert starts == set(range(0, n, batch))  # whole batches: the ones one process would draw
        counts = [len(range(p.start, p.stop, batch)) for p in parts]
        assert max(counts) - min(counts) <= 1  # batches spread evenly
        assert parts[0].start == 0 and len(parts[0]) >= min(n, batch)  # rank 0 holds the first batch
    x = torch.arange(6.0).view(3, 2)
    assert gather_shards(x, 3) is x  # one process: nothing to gather


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny feature network saved as a folder, and a tiny random class-conditional diffusion model folder."""
    root = tmp_path_factory.mktemp("dist")
    fnet = tiny_feature_network()
    F.save_feature_network(fnet.net, fnet.meta, root / "fnet")
    model = DiffusionModel(DiffusionConfig(image_size=28, channels=1, num_classes=10, **TINY_UNET)).eval()
    randomize_weights(model.net)
    return root, model.save_pretrained(root / "model")


def _env(root: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS)]), "OMP_NUM_THREADS": "1",
            "GENLAB_CACHE": str(root / "cache"), "GENLAB_TEST_FNET": str(root / "fnet")}


def _run(root: Path, procs: int, port: int, *args: str, timeout: float = 300) -> str:
    """Run the CLI in `procs` processes; returns its stderr."""
    # "--": torchrun's own parser would otherwise take the command's --n for an abbreviation of its options
    launch = [str(BIN / "torchrun"), "--nproc_per_node", str(procs), "--master_port", str(port), "--"] if procs > 1 \
        else [sys.executable]
    proc = subprocess.Popen([*launch, str(TESTS / "fnet_cli.py"), *args], env=_env(root), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and every worker it started
        proc.communicate()
        raise AssertionError(f"{' '.join(args[:1])} with {procs} processes did not finish in {timeout} s") from None
    assert proc.returncode == 0, err[-3000:]
    return err


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("L"))


@pytest.mark.slow
def test_two_processes_sample_the_same_images_as_one(setup):
    root, model = setup
    args = ["sample", str(model), "--n", "11", "--steps", "3", "--sampler", "euler_ancestral", "--seed", "4",
            "--batch", "4"]
    assert "| 11/11 " in _run(root, 1, 0, *args, "--out", str(root / "one.png"), "--out-dir", str(root / "one"))
    err = _run(root, 2, 29581, *args, "--out", str(root / "two.png"), "--out-dir", str(root / "two"))
    assert "| 8/8 " in err and "| 11/11 " not in err  # rank 0's bar: its two batches (rank 1 draws the last 3)
    assert np.array_equal(_pixels(root / "one.png"), _pixels(root / "two.png"))
    one, two = sorted((root / "one").glob("*.png")), sorted((root / "two").glob("*.png"))
    assert [f.name for f in one] == [f.name for f in two] and len(one) == 11  # written once, by rank 0
    assert all(np.array_equal(_pixels(a), _pixels(b)) for a, b in zip(one, two))


@pytest.mark.slow
def test_two_processes_give_the_same_fid_and_grid_as_one(setup):
    root, model = setup
    args = ["eval", str(model), "--data", "mnist", "--metrics", "fid,kid", "--n", "20", "--steps", "2",
            "--kid-subsets", "3", "--batch", "8"]
    _run(root, 1, 0, *args, "--out", str(root / "ev1"))
    _run(root, 2, 29582, *args, "--out", str(root / "ev2"))
    r1, r2 = (json.loads((root / d / "eval.json").read_text()) for d in ("ev1", "ev2"))
    assert r1["fid"] == r2["fid"] and r1["kid"] == r2["kid"] and r1["n_fake"] == r2["n_fake"] == 20
    assert np.array_equal(_pixels(root / "ev1" / "samples.png"), _pixels(root / "ev2" / "samples.png"))


@pytest.mark.slow
def test_evaluation_during_two_process_training_finishes(setup, tmp_path):
    """Every rank draws its shard of `train.eval_n` samples and rank 0 alone measures them; before, rank 0 sampled
    alone and torchmetrics' compute() waited for the other rank forever."""
    root, _ = setup
    recipe = {"name": "evalrun", "family": "diffusion", "out_dir": str(tmp_path),
              "data": {"name": "mnist", "max_items": 32},
              "model": {**TINY_UNET, "channel_mults": [1, 2], "attention_resolutions": []},
              "train": {"steps": 2, "batch_size": 4, "warmup_steps": 0, "log_every": 1, "eval_every": 1,
                        "eval_n": 8, "ckpt_every": 0, "sample_every": 0},
              "sample": {"sampler": "ddim", "steps": 2, "n": 4}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    _run(root, 2, 29583, "train", str(tmp_path / "r.yaml"), timeout=240)
    rows = [json.loads(line) for line in (tmp_path / "evalrun" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "kid" in r] == [1, 2] and all(r["n_fake"] == 8 for r in rows if "kid" in r)
