"""The server's durable store, worker loop, model pool and keys, in-process (fast): atomic claims, batching by
batch key, crash recovery, cancellation, idempotency, LRU unloading, hashed keys."""

from __future__ import annotations

import hashlib
import threading

import pytest
import torch

pytest.importorskip("fastapi")

from genlab.errors import GenlabError  # noqa: E402
from genlab.serve.limits import Limits, hash_key, key_matches, read_key_file  # noqa: E402
from genlab.serve.store import Store  # noqa: E402


def submit(store: Store, key: str = "a", cost: int = 1, **kw):
    return store.submit("image.generation", "m", {"x": 1}, 0, key, cost, **kw)[0]


def test_each_job_is_claimed_once_by_concurrent_workers(tmp_path):
    store = Store(tmp_path)
    ids = {submit(store, key=f"k{i % 3}").id for i in range(60)}
    claimed: list[str] = []
    lock = threading.Lock()

    def worker(name: str) -> None:
        own = Store(tmp_path)  # its own connection, as a worker process has
        while jobs := own.claim(name, ["image.generation"], 4):
            with lock:
                claimed.extend(j.id for j in jobs)
            assert len({j.batch_key for j in jobs}) == 1 and len(jobs) <= 4
        own.close()

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == sorted(ids)  # every job once, none twice


def test_claim_takes_the_oldest_job_and_its_batch_mates_up_to_the_cost(tmp_path):
    store = Store(tmp_path)
    a1, b1, a2, a3, a4 = (submit(store, key=k, cost=c) for k, c in
                          (("a", 2), ("b", 1), ("a", 3), ("a", 1), ("a", 1)))
    batch = store.claim("w", ["image.generation"], 6)
    assert [j.id for j in batch] == [a1.id, a2.id, a3.id]  # 2 + 3 + 1; a4 would pass 6
    assert [j.id for j in store.claim("w", ["image.generation"], 6)] == [b1.id]
    assert store.claim("w", ["other.kind"], 6) == []
    assert store.queue_position(store.get(a4.id)) == 0
    assert store.get(a1.id).state == "running" and store.get(a1.id).attempts == 1


def test_a_crash_requeues_running_jobs_and_keeps_outputs(tmp_path):
    store = Store(tmp_path)
    done, running, queued = submit(store), submit(store, key="b"), submit(store, key="c")
    store.claim("w", ["image.generation"], 1)
    (store.outputs_dir / "img_x.png").write_bytes(b"png")
    assert store.finish(done.id, {"data": []}, [("img_x", "img_x.png", "image/png")])
    store.claim("w", ["image.generation"], 1)  # `running` is running when the server dies
    del store
    store = Store(tmp_path)  # the restarted server
    assert store.requeue_running() == 1
    assert store.get(running.id).state == "queued" and store.get(queued.id).state == "queued"
    assert store.get(done.id).state == "done"
    path, media = store.output("img_x")
    assert path.read_bytes() == b"png" and media == "image/png"
    again = store.claim("w", ["image.generation"], 1)[0]
    assert again.id == running.id and again.attempts == 2 and again.seed == running.seed


def test_cancel_queued_and_running(tmp_path):
    store = Store(tmp_path)
    a, b = submit(store), submit(store, key="b")
    store.claim("w", ["image.generation"], 1)
    assert store.cancel(b.id) == "cancelled"  # queued: leaves the queue at once
    assert store.claim("w", ["image.generation"], 1) == []
    assert store.cancel(a.id) == "running"  # running: marked, stops at its next step
    assert store.step({a.id: (0.5, b"preview")}) == {a.id}
    assert store.get(a.id).state == "cancelled"
    assert not store.finish(a.id, {"data": []})  # nothing is indexed for a cancelled job
    assert store.cancel("job_nope") is None


def test_previews_are_asked_for_while_someone_follows_the_events(tmp_path):
    store = Store(tmp_path)
    a, b = submit(store), submit(store)
    store.claim("w", ["image.generation"], 2)
    assert store.step_watched({a.id: (0.1, None), b.id: (0.1, None)}) == (set(), set())
    store.watch(b.id, 1)
    assert store.step_watched({a.id: (0.2, None), b.id: (0.2, b"png")}) == (set(), {b.id})
    assert store.preview(b.id) == b"png" and store.preview(a.id) is None
    store.watch(b.id, -1)
    store.watch(b.id, -1)  # never below zero
    assert store.step_watched({a.id: (0.3, None), b.id: (0.3, None)})[1] == set()
    assert store.get(b.id).progress == 0.3 and store.preview(b.id) == b"png"  # the last preview stays


def test_idempotency_key(tmp_path):
    store = Store(tmp_path)
    job, created = store.submit("k", "m", {}, 0, "a", idempotency_key="key-1", request_hash="h1")
    again, created_again = store.submit("k", "m", {}, 0, "a", idempotency_key="key-1", request_hash="h1")
    assert created and not created_again and again.id == job.id
    with pytest.raises(KeyError):
        store.submit("k", "m", {}, 0, "a", idempotency_key="key-1", request_hash="h2")


def test_keys_are_stored_hashed_and_compared_whole(tmp_path):
    f = tmp_path / "keys.txt"
    secret = "a-long-enough-secret-key"
    f.write_text(f"# comment\n\nsha256:{hashlib.sha256(b'another-secret-key-123').hexdigest()}\n{secret}\n")
    digests = read_key_file(f)
    assert digests[1] == hash_key(secret) and secret not in digests
    assert key_matches(f"Bearer {secret}", digests) and key_matches("Bearer another-secret-key-123", digests)
    for bad in (None, "", secret, f"Bearer {secret}x", f"Bearer {secret[:-1]}", "Bearer "):
        assert not key_matches(bad, digests)
    for text in ("", "# only a comment\n", "short\n", "sha256:zz\n"):
        f.write_text(text)
        with pytest.raises(GenlabError):
            read_key_file(f)
    with pytest.raises(GenlabError):
        read_key_file(tmp_path / "missing.txt")


def test_pool_unloads_the_least_recently_used_model_past_the_budget(tmp_path):
    from genlab.models.diffusion import DiffusionConfig, DiffusionModel
    from genlab.serve.pool import ModelPool

    torch.manual_seed(0)
    cfg = DiffusionConfig(image_size=8, channels=1, num_classes=0, class_cond=False, base_channels=8,
                          channel_mults=(1,), num_res_blocks=1, attention_resolutions=())
    for name in ("a", "b", "c"):
        DiffusionModel(cfg).save_pretrained(tmp_path / "models" / name)
    (tmp_path / "models" / "run").mkdir()  # a run folder without an exported model: not offered
    (tmp_path / "models" / "run" / "checkpoints").mkdir()
    size = (tmp_path / "models" / "a" / "model.safetensors").stat().st_size
    pool = ModelPool(tmp_path / "models", memory_budget_mb=2.5 * size / 2**20)
    assert sorted(pool.entries) == ["a", "b", "c"]
    pool.get("a")
    pool.get("b")
    pool.get("a")  # a is now the most recently used
    pool.get("c")
    assert pool.loaded() == ["a", "c"]
    with pytest.raises(GenlabError, match="choose one of: a, b, c"):
        pool.get("d")
    with pytest.raises(GenlabError):
        pool.get("../a")


def test_limits_defaults_are_bounded():
    lim = Limits()
    assert 1 <= lim.max_n <= 64 and lim.max_steps <= 1000 and lim.max_body_bytes <= 64 * 2**20


@pytest.mark.parametrize("argv, message", [
    (["--models", "MISSING"], "is not a folder"),
    (["--models", "DIR", "--port", "0"], "--port"),
    (["--models", "DIR", "--port", "70000"], "--port"),
    (["--models", "DIR", "--workers", "0"], "--workers"),
    (["--models", "DIR", "--max-queue", "-1"], "--max-queue"),
    (["--models", "DIR", "--timeout", "nan"], "--timeout"),
    (["--models", "DIR", "--max-body-mb", "0"], "--max-body-mb"),
    (["--models", "DIR", "--host", "example.com"], "--host"),
    (["--models", "DIR", "--cors-origin", "evil"], "--cors-origin"),
    (["--models", "DIR", "--device", "tpu"], "--device"),
    (["--models", "DIR", "--data", "FILE"], "--data"),
    (["--models", "DIR", "--api-key-file", "MISSING"], "--api-key-file"),
    (["--models", "DIR", "--api-key-file", "FILE"], "--api-key-file"),
    (["--models", "DIR", "--port", "BUSY"], "cannot listen"),
])
def test_serve_command_refuses_bad_options_in_one_line(tmp_path, capsys, argv, message):
    import socket

    from genlab.cli import main

    (tmp_path / "file").write_text("short\n")
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    subs = {"DIR": str(tmp_path), "MISSING": str(tmp_path / "missing"), "FILE": str(tmp_path / "file"),
            "BUSY": str(busy.getsockname()[1])}
    try:
        assert main(["serve", *[subs.get(a, a) for a in argv]]) == 2
    finally:
        busy.close()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
