"""`genlab serve` against a real server process on loopback: the official `openai` client draws and edits images,
the job API (progress events, cancel, idempotency), batching, limits, keys, and a corpus of hostile requests.

Images are checked against the same model sampled offline with the same per-item seeds (a request's images do not
depend on what it was batched with), and the PNG text chunk against the response.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

KEY = "test-key-0123456789abcdef"
STEPS = 8  # sampling steps of most requests: the tiny model is fast, the tests are about the server


def make_models(root: Path) -> Path:
    """A tiny class-conditional DDPM (16x16 MNIST, 10 training steps) and an untrained unconditional one."""
    import torch.nn.functional as F

    from genlab.data import load_dataset
    from genlab.models.diffusion import DiffusionConfig, DiffusionModel

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        tiny = dict(image_size=16, channels=1, base_channels=16, channel_mults=(1, 2), num_res_blocks=1,
                    attention_resolutions=())
        model = DiffusionModel(DiffusionConfig(num_classes=10, **tiny))
        ds = load_dataset("mnist").subset(128)
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
        g = torch.Generator().manual_seed(0)
        for _ in range(10):
            batch = ds.get_batch(torch.randint(0, len(ds), (16,), generator=g).tolist())
            batch["x"] = F.interpolate(batch["x"], size=16, mode="bilinear", antialias=True)
            loss = model.training_losses(batch)["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.save_pretrained(root / "tiny")
        DiffusionModel(DiffusionConfig(num_classes=0, class_cond=False, **tiny)).save_pretrained(root / "uncond")
        make_t2i(root / "t2i")
        from genlab.models.vae import VAE, VAEConfig

        VAE(VAEConfig(image_size=16, channels=1, base_channels=8, channel_mults=(1, 2))).save_pretrained(root / "vae")
        (root / "not-a-model").mkdir()
    finally:
        torch.set_num_threads(threads)
    return root


def make_t2i(directory: Path) -> None:
    """A tiny text-conditioned U-Net with random weights: the server reads its text conditioning from the class."""
    from conftest import randomize_weights

    from genlab.data.tokenizer import train_tokenizer
    from genlab.models.t2i import TextDiffusionConfig, TextDiffusionModel

    captions = ["a red circle", "a blue square", "two green stars"]
    tok = train_tokenizer("\n".join(captions * 4), "bpe", 300)
    cfg = TextDiffusionConfig(image_size=8, channels=3, base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
                              attention_resolutions=(4,), head_channels=8, norm_groups=4, timesteps=100,
                              text_width=16, text_depth=1, text_heads=2, vocab_size=tok.vocab_size, max_tokens=16)
    model = TextDiffusionModel(cfg, tokenizer=tok)
    randomize_weights(model)
    model.save_pretrained(directory)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`genlab serve` in a subprocess on a free loopback port."""

    def __init__(self, models: Path, data: Path, *args: str, key: str | None = KEY) -> None:
        self.models, self.data, self.args, self.key = models, data, args, key
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> Server:
        cmd = [sys.executable, "-m", "genlab.cli", "serve", "--models", str(self.models), "--data", str(self.data),
               "--port", str(self.port), *self.args]
        if self.key:
            keyfile = self.data.parent / f"keys-{self.port}.txt"
            keyfile.write_text(f"# test key\nsha256:{hashlib.sha256(self.key.encode()).hexdigest()}\n")
            cmd += ["--api-key-file", str(keyfile)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stdout.read()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError("server did not start")

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=120)

    def openai(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=self.key or "none", max_retries=0, timeout=120)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    return make_models(tmp_path_factory.mktemp("serve-models"))


@pytest.fixture(scope="module")
def server(models_dir, tmp_path_factory):
    s = Server(models_dir, tmp_path_factory.mktemp("serve-data") / "data", "--max-queue", "12", "--max-body-mb",
               "1", "--max-n", "8", "--max-steps", "100").start()
    yield s
    s.stop()


def offline(models_dir: Path, name: str, seeds: list[int], labels: list[int] | None, **kw) -> np.ndarray:
    """The same images drawn in this process, one generator per image: (n, H, W) uint8."""
    from genlab.data.images import to_uint8
    from genlab.models.base import GenerativeModel

    model = GenerativeModel.from_pretrained(models_dir / name).eval()
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    x = model.sample(len(seeds), cond=labels, generator=gens, **kw)
    return to_uint8(x)[..., 0]


def png_array(data: bytes) -> tuple[np.ndarray, dict]:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im), json.loads(im.text["genlab"])


# -- the openai client -----------------------------------------------------------------------
def test_models_list_reads_capabilities(server):
    from genlab.models.diffusion import DiffusionModel

    models = server.openai().models.list()
    ids = sorted(m.id for m in models.data)
    assert ids == ["t2i", "tiny", "uncond", "vae"]  # the folder that is no model is not offered
    tiny = next(m for m in models.data if m.id == "tiny").model_dump()
    assert tiny["family"] == "diffusion"
    caps = tiny["capabilities"]
    assert set(caps["conditioning"]) == {c.value for c in DiffusionModel.conditioning}
    assert set(caps["sample_options"]) == {o.value for o in DiffusionModel.sample_options}
    assert caps["per_item_seeds"] is DiffusionModel.per_item_seeds and caps["text_prompt"] is False


def test_generate_matches_offline_sampling_with_the_same_seeds(server, models_dir):
    client = server.openai()
    res = client.images.generate(model="tiny", prompt="", n=3, size="16x16", response_format="b64_json",
                                 extra_body={"label": 7, "steps": STEPS, "seed": 1234, "sampler": "ddim",
                                             "guidance_scale": 2.0})
    assert len(res.data) == 3
    want = offline(models_dir, "tiny", [1234, 1235, 1236], [7, 7, 7], sampler="ddim", steps=STEPS,
                   guidance=__import__("genlab.sampling.controls", fromlist=["Guidance"]).Guidance(2.0))
    for i, item in enumerate(res.data):
        extra = item.model_dump()
        img, params = png_array(base64.b64decode(item.b64_json))
        assert img.shape == (16, 16)
        assert np.abs(img.astype(int) - want[i].astype(int)).max() <= 1
        assert params["seed"] == extra["seed"] == 1234 + i
        assert params["label"] == 7 and params["steps"] == STEPS and params["cfg"] == 2.0
        assert extra["params"] == params


def test_prompts_reach_a_text_conditioned_model_and_batch_together(server, models_dir):
    from genlab.sampling.controls import Guidance

    with server.client() as c:
        blocker = c.post("/v1/jobs", json={"kind": "image.generation", "params": {"model": "tiny", "steps": 30}})
        bodies = [{"model": "t2i", "prompt": p, "n": 2, "steps": STEPS, "seed": s, "negative_prompt": neg}
                  for p, s, neg in (("a red circle", 3, "a blue square"), ("two green stars", 7, "a red circle"))]
        ids = [c.post("/v1/jobs", json={"kind": "image.generation", "params": b}).json()["id"] for b in bodies]
        jobs = [wait_job(c, i) for i in ids]
        wait_job(c, blocker.json()["id"])
        got = [png_array(c.get(f"/v1/outputs/{d['id']}").content) for j in jobs for d in j["result"]["data"]]
        assert c.post("/v1/images/generations", json={"model": "t2i", "prompt": "a cat", "label": 1}).status_code == 400
        assert c.post("/v1/images/generations", json={"model": "t2i", "prompt": "x" * 3000}).status_code == 400
    assert all(j["result"]["batch"]["images"] == 4 for j in jobs)  # two prompts, one sample call
    assert [p["prompt"] for _, p in got] == ["a red circle"] * 2 + ["two green stars"] * 2
    assert [p["negative"] for _, p in got] == ["a blue square"] * 2 + ["a red circle"] * 2
    from genlab.data.images import to_uint8
    from genlab.models.base import GenerativeModel

    model = GenerativeModel.from_pretrained(models_dir / "t2i").eval()
    for k, body in enumerate(bodies):
        gens = [torch.Generator().manual_seed(body["seed"] + i) for i in range(2)]
        want = to_uint8(model.sample(2, cond=model.labels_for(2, body["prompt"]), generator=gens, steps=STEPS,
                                     guidance=Guidance(negative=[body["negative_prompt"]] * 2)))
        for i in range(2):
            assert np.abs(got[2 * k + i][0].astype(int) - want[i].astype(int)).max() <= 1


def test_a_family_without_samplers_serves_and_refuses_what_it_does_not_take(server, models_dir):
    with server.client() as c:
        r = c.post("/v1/images/generations", json={"model": "vae", "n": 2, "seed": 11})
        assert r.status_code == 200, r.text
        got = [png_array(base64.b64decode(d["b64_json"]))[0] for d in r.json()["data"]]
        for field, value in (("steps", 4), ("sampler", "ddim"), ("guidance_scale", 2.0), ("label", 1),
                             ("temperature", 0.5)):
            r = c.post("/v1/images/generations", json={"model": "vae", field: value})
            assert r.status_code == 400 and "take" in r.json()["error"]["message"], (field, r.text)
    want = offline(models_dir, "vae", [11, 12], None)
    for g, w in zip(got, want):
        assert np.abs(g.astype(int) - w.astype(int)).max() <= 1


def test_url_response_and_outputs_by_opaque_id(server):
    res = server.openai().images.generate(model="uncond", prompt="", response_format="url",
                                          extra_body={"steps": 4, "seed": 3})
    url = res.data[0].url
    assert url.startswith(server.url + "/v1/outputs/img_")
    with server.client() as c:
        r = c.get(url)
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        img, params = png_array(r.content)
        assert params["seed"] == 3 and params["label"] is None
        assert httpx.get(url).status_code == 401  # outputs need the key like every other endpoint


def test_edit_inpaints_with_the_openai_client(server, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    src = rng.integers(0, 256, (16, 16), dtype=np.uint8)
    Image.fromarray(src).save(tmp_path / "in.png")
    # OpenAI's mask: transparent pixels are edited; here the left half
    alpha = np.full((16, 16), 255, np.uint8)
    alpha[:, :8] = 0
    Image.fromarray(np.dstack([src, src, src, alpha])).save(tmp_path / "mask.png")
    with open(tmp_path / "in.png", "rb") as image, open(tmp_path / "mask.png", "rb") as mask:
        res = server.openai().images.edit(image=image, mask=mask, prompt="", model="tiny", n=2,
                                          extra_body={"steps": STEPS, "seed": 9, "label": 1})
    for item in res.data:
        out, params = png_array(base64.b64decode(item.b64_json))
        assert params["edit"] is True and params["mask"] is True
        assert np.array_equal(out[:, 8:], src[:, 8:])  # the kept half is the input, exactly
        assert not np.array_equal(out[:, :8], src[:, :8])
    # img2img: no mask, strength 0 keeps the input
    with open(tmp_path / "in.png", "rb") as image:
        res = server.openai().images.edit(image=image, prompt="", model="tiny",
                                          extra_body={"steps": STEPS, "strength": 0.0, "label": 1})
    out, params = png_array(base64.b64decode(res.data[0].b64_json))
    assert params["strength"] == 0.0
    assert np.abs(out.astype(int) - src.astype(int)).max() <= 1
    # an edit retried with its Idempotency-Key is the same job; other uploads under that key are refused
    with server.client() as c:
        files = {"image": ("in.png", (tmp_path / "in.png").read_bytes(), "image/png")}
        form = {"model": "tiny", "steps": "4", "label": "1", "prompt": ""}
        first, again = (c.post("/v1/images/edits", files=files, data=form, headers={"Idempotency-Key": "edit-1"})
                        for _ in range(2))
        assert first.status_code == again.status_code == 200 and first.json()["job"] == again.json()["job"]
        other = {"image": ("in.png", (tmp_path / "mask.png").read_bytes(), "image/png")}
        assert c.post("/v1/images/edits", files=other, data=form,
                      headers={"Idempotency-Key": "edit-1"}).status_code == 409


# -- jobs -------------------------------------------------------------------------------------
def wait_job(c: httpx.Client, job_id: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = c.get(f"/v1/jobs/{job_id}").json()
        if job["state"] in ("done", "failed", "cancelled"):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not end")


def test_jobs_events_cancel_and_idempotency(server):
    with server.client() as c:
        slow = c.post("/v1/jobs", json={"kind": "image.generation",
                                        "params": {"model": "tiny", "steps": 60, "n": 2, "seed": 1}})
        assert slow.status_code == 202
        slow_id = slow.json()["id"]
        queued = c.post("/v1/jobs", json={"kind": "image.generation", "params": {"model": "uncond", "steps": 4}})
        queued_id = queued.json()["id"]
        assert c.get(f"/v1/jobs/{queued_id}").json()["queue_position"] in (0, 1)
        # progress events with a preview PNG of the running job
        events, previews = [], 0
        with c.stream("GET", f"/v1/jobs/{slow_id}/events") as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            name = None
            for line in r.iter_lines():
                if line.startswith("event: "):
                    name = line[7:]
                elif line.startswith("data: "):
                    data = json.loads(line[6:])
                    events.append((name, data))
                    if name == "progress" and data["preview"]:
                        img, _ = png_array_noparams(base64.b64decode(data["preview"]))
                        assert img.shape == (16, 16)
                        previews += 1
                    if name == "progress" and data["progress"] > 0.3 and previews >= 2:
                        # cancel the running job: it stops at its next step
                        assert c.delete(f"/v1/jobs/{slow_id}").status_code == 200
        assert events[-1][0] == "cancelled"
        progresses = [d["progress"] for n, d in events if n == "progress"]
        assert progresses == sorted(progresses) and previews >= 2
        assert c.get(f"/v1/jobs/{slow_id}").json()["state"] == "cancelled"
        assert c.delete(f"/v1/jobs/{slow_id}").status_code == 409
        assert wait_job(c, queued_id)["state"] == "done"
        # cancel a queued job: it leaves the queue
        blocker = c.post("/v1/jobs", json={"kind": "image.generation", "params": {"model": "tiny", "steps": 40}})
        victim = c.post("/v1/jobs", json={"kind": "image.generation", "params": {"model": "uncond", "steps": 4}})
        assert c.delete(f"/v1/jobs/{victim.json()['id']}").json()["state"] == "cancelled"
        # Idempotency-Key: a retry gets the same job, another request with the key is refused
        body = {"kind": "image.generation", "params": {"model": "uncond", "steps": 4, "seed": 5}}
        first = c.post("/v1/jobs", json=body, headers={"Idempotency-Key": "abc-1"})
        again = c.post("/v1/jobs", json=body, headers={"Idempotency-Key": "abc-1"})
        assert first.status_code == 202 and again.status_code == 200 and first.json()["id"] == again.json()["id"]
        other = c.post("/v1/jobs", json={**body, "params": {"model": "uncond", "steps": 5}},
                       headers={"Idempotency-Key": "abc-1"})
        assert other.status_code == 409
        done = wait_job(c, first.json()["id"])
        assert done["state"] == "done" and done["result"]["data"][0]["seed"] == 5
        assert wait_job(c, blocker.json()["id"])["state"] == "done"
        assert c.get(f"/v1/jobs/{victim.json()['id']}").json()["state"] == "cancelled"


def png_array_noparams(data: bytes) -> tuple[np.ndarray, None]:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im), None


def test_compatible_requests_run_as_one_batch_each_with_its_own_seed(server, models_dir):
    with server.client() as c:
        blocker = c.post("/v1/jobs", json={"kind": "image.generation", "params": {"model": "tiny", "steps": 30}})
        ids = []
        for seed, label in ((10, 1), (20, 2), (30, 3), (40, 4)):
            params = {"model": "tiny", "steps": STEPS, "seed": seed, "label": label, "n": 2}
            ids.append(c.post("/v1/jobs", json={"kind": "image.generation", "params": params}).json()["id"])
        other = c.post("/v1/jobs", json={"kind": "image.generation",  # other steps: not in that batch
                                         "params": {"model": "tiny", "steps": STEPS + 1, "seed": 1}}).json()["id"]
        jobs = [wait_job(c, i) for i in ids]
        wait_job(c, blocker.json()["id"])
        assert wait_job(c, other)["result"]["batch"]["images"] == 1
    assert all(j["result"]["batch"]["images"] == 8 for j in jobs)  # the four jobs' eight images in one sample call
    seeds = [s for seed in (10, 20, 30, 40) for s in (seed, seed + 1)]
    want = offline(models_dir, "tiny", seeds, [1, 1, 2, 2, 3, 3, 4, 4], sampler="ddim", steps=STEPS)
    with server.client() as c:
        got = [png_array(c.get(f"/v1/outputs/{d['id']}").content)[0] for j in jobs for d in j["result"]["data"]]
    for g, w in zip(got, want):
        assert np.abs(g.astype(int) - w.astype(int)).max() <= 1


# -- limits, keys, hostile requests ----------------------------------------------------------
def test_queue_capacity_gives_429_with_retry_after(server):
    with server.client() as c:
        ids, statuses = [], []
        for _ in range(16):
            r = c.post("/v1/jobs", json={"kind": "image.generation", "params": {"model": "tiny", "steps": 100}})
            statuses.append(r.status_code)
            if r.status_code == 202:
                ids.append(r.json()["id"])
            else:
                assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
                assert r.json()["error"]["type"] == "rate_limit_error"
        assert 429 in statuses and len(ids) <= 12
        for i in ids:
            c.delete(f"/v1/jobs/{i}")
        assert all(wait_job(c, i)["state"] in ("cancelled", "done") for i in ids)


def hostile_requests(tmp_path: Path) -> list[tuple[str, str, dict]]:
    big = b"x" * (2 * 2**20)
    png = io.BytesIO()
    from PIL import Image

    Image.fromarray(np.zeros((16, 16), np.uint8)).save(png, format="PNG")
    gen = "/v1/images/generations"
    return [
        ("POST", gen, {"content": b"{not json", "headers": {"content-type": "application/json"}}),
        ("POST", gen, {"content": b"\xff\xfe\x00", "headers": {"content-type": "application/json"}}),
        ("POST", gen, {"content": b"[" * 100_000 + b"]" * 100_000}),
        ("POST", gen, {"json": []}),
        ("POST", gen, {"json": "a string"}),
        ("POST", gen, {"json": {"model": "tiny", "n": "3"}}),
        ("POST", gen, {"json": {"model": "tiny", "n": 1.5}}),
        ("POST", gen, {"json": {"model": "tiny", "n": True}}),
        ("POST", gen, {"json": {"model": "tiny", "n": 0}}),
        ("POST", gen, {"json": {"model": "tiny", "n": 10**12}}),
        ("POST", gen, {"json": {"model": "tiny", "size": "100000x100000"}}),
        ("POST", gen, {"json": {"model": "tiny", "size": "-1x16"}}),
        ("POST", gen, {"json": {"model": "tiny", "size": "1024x1024"}}),
        ("POST", gen, {"json": {"model": "tiny", "steps": 10**9}}),
        ("POST", gen, {"json": {"model": "tiny", "steps": -3}}),
        ("POST", gen, {"json": {"model": "tiny", "sampler": "nope"}}),
        ("POST", gen, {"json": {"model": "tiny", "schedule": "nope"}}),
        ("POST", gen, {"json": {"model": "tiny", "guidance_scale": 1e308}}),
        ("POST", gen, {"json": {"model": "tiny", "label": 10}}),
        ("POST", gen, {"json": {"model": "tiny", "label": -1}}),
        ("POST", gen, {"json": {"model": "uncond", "label": 1}}),
        ("POST", gen, {"json": {"model": "tiny", "prompt": "a cat"}}),  # no text conditioning
        ("POST", gen, {"json": {"model": "tiny", "negative_label": 2, "guidance_scale": 1.0}}),
        ("POST", gen, {"json": {"model": "tiny", "seed": -1}}),
        ("POST", gen, {"json": {"model": "tiny", "seed": 2**70}}),
        ("POST", gen, {"json": {"model": "tiny", "response_format": "file"}}),
        ("POST", gen, {"json": {"model": "tiny", "stpes": 3}}),
        ("POST", gen, {"json": {"model": "tiny", "stream": True}}),
        ("POST", gen, {"json": {"model": "tiny", "image": "../../../etc/passwd"}}),
        ("POST", gen, {"json": {"model": "nope"}}),
        ("POST", gen, {"json": {"model": "../tiny"}}),
        ("POST", gen, {"json": {"model": "not-a-model"}}),
        ("POST", gen, {"json": {"model": {"$gt": ""}}}),
        ("POST", gen, {"json": {"model": "tiny", "prompt": "x" * 10_000}}),
        ("POST", gen, {"content": big}),
        ("POST", gen, {"content": iter([big[:2**19]] * 4)}),  # chunked, no Content-Length
        ("POST", "/v1/images/edits", {"json": {"model": "tiny"}}),
        ("POST", "/v1/images/edits", {"files": {"image": ("a.png", b"not an image", "image/png")}}),
        ("POST", "/v1/images/edits", {"files": {"image": ("a.png", b"", "image/png")}}),
        ("POST", "/v1/images/edits", {"files": {"image": ("a.gif", b"GIF89a" + b"\0" * 30, "image/gif")}}),
        ("POST", "/v1/images/edits", {"files": {"image": ("a.png", big, "image/png")}}),
        ("POST", "/v1/images/edits", {"data": {"model": "tiny"}, "files": {"mask": ("m.png", png.getvalue())}}),
        ("POST", "/v1/images/edits", {"data": {"model": "tiny", "n": "many"},
                                      "files": {"image": ("a.png", png.getvalue())}}),
        ("POST", "/v1/images/edits", {"data": {"model": "tiny", "strength": "nan"},
                                      "files": {"image": ("a.png", png.getvalue())}}),
        ("POST", "/v1/images/edits", {"data": {"model": "tiny", "strength": "2"},
                                      "files": {"image": ("a.png", png.getvalue())}}),
        ("POST", "/v1/images/edits", {"data": {"model": "tiny"}, "files": {
            "image": ("a.png", png.getvalue()), "mask": ("m.png", _png((8, 8)))}}),
        ("POST", "/v1/images/edits", {"content": b"--x\r\ngarbage", "headers": {
            "content-type": "multipart/form-data; boundary=x"}}),
        ("POST", "/v1/jobs", {"json": {"kind": "nope", "params": {}}}),
        ("POST", "/v1/jobs", {"json": {"kind": "image.generation"}}),
        ("POST", "/v1/jobs", {"json": {"kind": "image.edit", "params": {"model": "tiny", "image": "in_abc"}}}),
        ("POST", "/v1/jobs", {"json": {"kind": "image.edit", "params": {"model": "tiny", "image": "../x"}}}),
        ("POST", "/v1/jobs", {"json": {"kind": "image.generation", "params": {}},
                              "headers": {"Idempotency-Key": "x" * 300}}),
        ("GET", "/v1/jobs/..%2F..%2Fetc%2Fpasswd", {}),
        ("GET", "/v1/jobs/job_" + "0" * 32, {}),
        ("GET", "/v1/jobs/%00", {}),
        ("DELETE", "/v1/jobs/job_../../x", {}),
        ("GET", "/v1/jobs/job_" + "0" * 32 + "/events", {}),
        ("GET", "/v1/outputs/..%2Fgenlab.sqlite3", {}),
        ("GET", "/v1/outputs/img_" + "0" * 32, {}),
        ("GET", "/v1/outputs/genlab.sqlite3", {}),
        ("GET", "/v1/models/nope", {}),
        ("GET", "/v1/nothing", {}),
        ("PUT", "/v1/jobs", {}),
    ]


def _png(size: tuple[int, int]) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.zeros(size, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_hostile_requests_get_4xx_in_openai_shape_and_the_server_keeps_serving(server, tmp_path):
    with server.client() as c:
        for method, path, kw in hostile_requests(tmp_path):
            r = c.request(method, path, **kw)
            assert 400 <= r.status_code < 500, (method, path, str(kw)[:120], r.status_code, r.text[:300])
            err = r.json()["error"]
            assert isinstance(err["message"], str) and err["message"], (path, r.text)
        assert c.get("/health").json()["status"] == "ok"
        r = c.post("/v1/images/generations", json={"model": "uncond", "steps": 2})
        assert r.status_code == 200 and r.json()["data"][0]["b64_json"]


def raw_request(server, head: str, body: bytes = b"") -> tuple[int, str]:
    """A request written on a socket as is (what an HTTP client would refuse to send); the status and body."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
            if b"\r\n\r\n" in data and b'"}}' in data:
                break
    status = int(data.split(b" ", 2)[1])
    return status, data.partition(b"\r\n\r\n")[2].decode(errors="replace")


def test_bodies_are_refused_before_they_are_read(server):
    auth = f"Authorization: Bearer {KEY}\n"
    # a 10 GB body announced and never sent: refused at once from its Content-Length
    t0 = time.monotonic()
    status, body = raw_request(server, f"POST /v1/images/generations HTTP/1.1\nHost: x\n{auth}"
                               "Content-Type: application/json\nContent-Length: 10000000000\n")
    assert status == 413 and "limit" in json.loads(body)["error"]["message"]
    assert time.monotonic() - t0 < 10
    status, _ = raw_request(server, f"POST /v1/images/generations HTTP/1.1\nHost: x\n{auth}"
                            "Content-Length: abc\n", b"{}")
    assert 400 <= status < 500


def test_api_keys(server):
    r = httpx.get(server.url + "/v1/models")
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    for header in ("Bearer wrong-key-0123456789", "Basic " + KEY, KEY, "Bearer", "bearer " + KEY + "x"):
        assert httpx.get(server.url + "/v1/models", headers={"Authorization": header}).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(server.url + "/v1/models", headers=server.headers).status_code == 200


def test_cors_is_off_unless_configured(server):
    r = httpx.options(server.url + "/v1/models", headers={"Origin": "http://evil.example",
                                                          "Access-Control-Request-Method": "GET"})
    assert "access-control-allow-origin" not in r.headers


def test_concurrent_openai_clients(server):
    """Eight concurrent requests (batched by the server) all succeed, each with its own seed."""
    results: list = [None] * 8

    def one(i: int) -> None:
        res = server.openai().images.generate(model="tiny", prompt="", extra_body={"steps": STEPS, "seed": 100 + i,
                                                                                   "label": i % 10})
        results[i] = res.data[0].model_dump()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r["seed"] for r in results] == [100 + i for i in range(8)]
    assert max(r["params"]["seed"] for r in results) == 107
    db = sqlite3.connect(server.data / "genlab.sqlite3")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()


# -- durability (the store-level checks without a server are in test_serve_store.py) ------------
@pytest.mark.slow
def test_sigkill_mid_batch_then_restart_finishes_every_job_and_keeps_outputs(models_dir, tmp_path):
    data = tmp_path / "data"
    server = Server(models_dir, data).start()
    try:
        with server.client() as c:
            first = c.post("/v1/images/generations", json={"model": "uncond", "steps": 4, "seed": 1})
            assert first.status_code == 200
            kept = first.json()["data"][0]["id"]
            kept_bytes = c.get(f"/v1/outputs/{kept}").content
            jobs = {}
            for i in range(4):
                params = {"model": "tiny", "steps": 24, "n": 2, "seed": 50 + 10 * i, "label": i}
                r = c.post("/v1/jobs", json={"kind": "image.generation", "params": params},
                           headers={"Idempotency-Key": f"restart-{i}"})
                jobs[r.json()["id"]] = params
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:  # kill it mid-batch
                states = [c.get(f"/v1/jobs/{j}").json() for j in jobs]
                if any(s["state"] == "running" and s["progress"] > 0.1 for s in states):
                    break
                time.sleep(0.05)
            assert not any(s["state"] == "done" for s in states)
        server.kill()  # SIGKILL
        server = Server(models_dir, data).start()
        with server.client() as c:
            ended = {j: wait_job(c, j, timeout=120) for j in jobs}
            assert all(e["state"] == "done" for e in ended.values())
            assert max(e["attempts"] for e in ended.values()) == 2  # the running batch ran again from scratch
            assert c.get(f"/v1/outputs/{kept}").content == kept_bytes
            for e in ended.values():
                for d in e["result"]["data"]:
                    assert c.get(f"/v1/outputs/{d['id']}").status_code == 200
            # an idempotent retry returns the same job, now done
            job_id, params = next(iter(jobs.items()))
            again = c.post("/v1/jobs", json={"kind": "image.generation", "params": params},
                           headers={"Idempotency-Key": "restart-0"})
            assert again.status_code == 200 and again.json()["id"] == job_id and again.json()["state"] == "done"
            # the rerun used the stored seed: its images are the offline ones
            got = [png_array(c.get(f"/v1/outputs/{d['id']}").content)[0] for d in ended[job_id]["result"]["data"]]
        want = offline(models_dir, "tiny", [50, 51], [0, 0], steps=24)
        for g, w in zip(got, want):
            assert np.abs(g.astype(int) - w.astype(int)).max() <= 1
    finally:
        server.stop()


@pytest.mark.slow
def test_worker_processes_share_the_queue_and_die_with_the_server(models_dir, tmp_path):
    server = Server(models_dir, tmp_path / "data", "--workers", "2", "--timeout", "2", key=None).start()
    try:
        children = Path(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children").read_text().split()
        assert len(children) >= 1
        workers: set[str] = set()
        deadline = time.monotonic() + 240  # the worker process takes a while to import torch on a busy machine
        with server.client() as c:
            while workers != {"worker-0", "worker-1"} and time.monotonic() < deadline:
                ids = []
                for i in range(4):  # two models, so that two batches can run at once
                    params = {"model": ("tiny", "uncond")[i % 2], "steps": 30, "seed": i}
                    ids.append(c.post("/v1/jobs", json={"kind": "image.generation", "params": params}).json()["id"])
                assert all(wait_job(c, j, timeout=180)["state"] == "done" for j in ids)
                db = sqlite3.connect(tmp_path / "data" / "genlab.sqlite3")
                workers = {w for (w,) in db.execute("SELECT worker FROM jobs")}
                db.close()
        assert workers == {"worker-0", "worker-1"}
        with server.client() as c:  # past --timeout a synchronous request gets 504 and its job is cancelled
            r = c.post("/v1/images/generations", json={"model": "tiny", "steps": 100, "n": 16})
            assert r.status_code == 504 and "timed out" in r.json()["error"]["message"]
            job = r.json()["error"]["message"].split("job ")[1].split()[0]
            assert wait_job(c, job)["state"] == "cancelled"
        server.kill()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in children):
            time.sleep(0.1)
        assert not any(Path(f"/proc/{p}/cmdline").exists() and Path(f"/proc/{p}/cmdline").read_bytes()
                       for p in children)
    finally:
        server.stop()
