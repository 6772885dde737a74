"""`genlab serve --ray`: the application as a Ray Serve deployment of two replicas on a local Ray on loopback.

The official `openai` client lists the models and draws images through Ray's proxy; the images equal offline
sampling with the same seeds, and both replicas' model workers draw jobs from the one shared store.
"""

from __future__ import annotations

import base64
import importlib.util
import sqlite3
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from test_serve import STEPS, free_port, models_dir, offline, png_array  # noqa: E402,F401  (models_dir: fixture)

needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                               reason="Ray Serve is an optional extra: pip install 'genlab[ray]'")


def test_without_ray_the_flag_names_the_extra(tmp_path, monkeypatch, capsys):
    from genlab.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as it does where Ray is not installed
    monkeypatch.delitem(sys.modules, "genlab.serve.ray_app", raising=False)
    (tmp_path / "models").mkdir()
    assert main(["serve", "--models", str(tmp_path / "models"), "--ray", "--port", str(free_port())]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'genlab[ray]'" in err[0] and "ray" in err[0]
    assert not (tmp_path / "models" / ".serve").exists()  # refused before anything was written


@pytest.fixture
def ray_server(models_dir, tmp_path):  # noqa: F811
    import ray
    from ray import serve

    from genlab.serve.limits import Limits
    from genlab.serve.ray_app import ReplicaConfig, deploy

    ray.init(address="local", include_dashboard=False, num_cpus=2, log_to_driver=False)
    try:
        port = free_port()
        deploy(ReplicaConfig(str(models_dir), str(tmp_path / "data"), Limits(max_n=8, max_steps=100)), 2,
               "127.0.0.1", port)
        yield f"http://127.0.0.1:{port}", tmp_path / "data"
    finally:
        serve.shutdown()
        ray.shutdown()


@needs_ray
@pytest.mark.slow
def test_two_ray_replicas_serve_the_openai_api_and_match_offline_sampling(ray_server, models_dir):  # noqa: F811
    from genlab.sampling.controls import Guidance

    url, data = ray_server
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
    assert sorted(m.id for m in client.models.list().data) == ["t2i", "tiny", "uncond", "vae"]

    res = client.images.generate(model="tiny", prompt="", n=3, size="16x16", response_format="b64_json",
                                 extra_body={"label": 7, "steps": STEPS, "seed": 1234, "sampler": "ddim",
                                             "guidance_scale": 2.0})
    want = offline(models_dir, "tiny", [1234, 1235, 1236], [7, 7, 7], sampler="ddim", steps=STEPS,
                   guidance=Guidance(2.0))
    assert len(res.data) == 3
    for i, item in enumerate(res.data):
        img, params = png_array(base64.b64decode(item.b64_json))
        assert np.abs(img.astype(int) - want[i].astype(int)).max() <= 1
        assert params["seed"] == 1234 + i and params["label"] == 7

    # each replica runs its own worker on the shared store: concurrent requests for two models (two batches
    # that cannot merge) are drawn by both, until both names appear in the jobs table
    workers: set[str] = set()
    deadline = time.monotonic() + 240
    with ThreadPoolExecutor(4) as pool:
        while len(workers) < 2 and time.monotonic() < deadline:
            def draw(i: int) -> int:
                body = {"model": ("tiny", "uncond")[i % 2], "n": 1, "steps": 30, "seed": i,
                        "response_format": "b64_json"}
                return httpx.post(url + "/v1/images/generations", json=body, timeout=180).status_code

            assert list(pool.map(draw, range(4))) == [200] * 4
            db = sqlite3.connect(Path(data) / "genlab.sqlite3")
            workers = {w for (w,) in db.execute("SELECT worker FROM jobs WHERE state = 'done'")}
            db.close()
    assert len(workers) == 2 and all(w.startswith("replica-") for w in workers)
