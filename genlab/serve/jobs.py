"""Job kinds and the worker loop: every endpoint (images, text) rides the same durable queue.

A job kind is registered once under its name (`register`): `prepare` turns a request's parameters into what is
stored (normalized parameters, the seed, the batch key that says which jobs may run together, and a cost that
bounds a batch) and refuses a bad request with a `GenlabError` before anything is queued; `run` draws a batch of
claimed jobs on one loaded model and ends each of them (`store.finish` / `store.fail`); `respond` gives a finished
job's result in the endpoint's response shape. Modules that register kinds are listed as data in `KIND_MODULES`
and imported by `load_kinds`, so a worker process sees the same kinds as the server.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from genlab.errors import GenlabError
from genlab.models.base import GenerativeModel
from genlab.serve.limits import Limits
from genlab.serve.pool import ModelPool
from genlab.serve.store import Job, Store

log = logging.getLogger("genlab.serve")

# modules that register job kinds when imported (a module not written yet is skipped)
KIND_MODULES = ("genlab.serve.images", "genlab.serve.textbatch", "genlab.serve.text_api", "genlab.serve.embeddings")

MAX_BATCH_WAITS = 5  # slices of batch_wait_s a batch may wait for compatible requests (longer to refill to the last)
INVALID = "invalid: "  # prefix of a job error that was the request's fault (a 400 for a synchronous request)


@dataclass(frozen=True)
class Prepared:
    """A request as stored: its model, normalized parameters, seed, batch key and cost (e.g. images drawn)."""

    model: str
    params: dict[str, Any]
    seed: int
    batch_key: str
    cost: int = 1


@dataclass
class WorkerContext:
    """What a kind's `run` may use: the store (progress, previews, cancellation, `claim_key` to let newly queued
    jobs join a running batch), the limits and the worker's name."""

    store: Store
    limits: Limits
    worker: str
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class JobKind:
    name: str
    prepare: Callable[[dict[str, Any], ModelPool, Limits, Store], Prepared]
    run: Callable[[list[Job], GenerativeModel, WorkerContext], None]
    respond: Callable[[Job, Store, str], dict[str, Any]]  # (job, store, base url) -> response body


JOB_KINDS: dict[str, JobKind] = {}


def register(kind: JobKind) -> JobKind:
    JOB_KINDS[kind.name] = kind
    return kind


def load_kinds() -> dict[str, JobKind]:
    """Import every module of `KIND_MODULES` that exists, so their kinds are registered."""
    for name in KIND_MODULES:
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name)
    return JOB_KINDS


def get_kind(name: Any) -> JobKind:
    load_kinds()
    if not isinstance(name, str) or name not in JOB_KINDS:
        raise GenlabError(f"kind must be one of: {', '.join(sorted(JOB_KINDS))}")
    return JOB_KINDS[name]


class Worker:
    """Claims batches of queued jobs from the store and runs them, until `stop` is set."""

    def __init__(self, store: Store, pool: ModelPool, limits: Limits, name: str,
                 stop: threading.Event | None = None, wake: threading.Event | None = None) -> None:
        self.store, self.pool, self.limits, self.name = store, pool, limits, name
        self.stop = stop or threading.Event()
        self.wake = wake or threading.Event()
        self.ctx = WorkerContext(store, limits, name)
        self.last: dict[str, tuple[int, float]] = {}  # batch key -> (cost, seconds) of its last batch

    def run_forever(self, poll_s: float = 0.05, alive: Callable[[], bool] = lambda: True) -> None:
        load_kinds()
        while not self.stop.is_set() and alive():
            try:
                busy = self.run_once()
            except Exception:  # the store itself failed (a locked or full disk): keep the worker alive, retry
                log.error("worker %s:\n%s", self.name, traceback.format_exc())
                busy = False
                time.sleep(1.0)
            if not busy:
                self.wake.wait(poll_s)
                self.wake.clear()

    def _fill(self, jobs: list[Job]) -> list[Job]:
        """Let compatible requests that are arriving join a claimed batch: wait in `batch_wait_s` slices while they
        keep coming, and, when the last batch of this key was larger (its clients are sending their next requests),
        until the batch is that large again, for at most a tenth of that batch's time (half a second at most)."""
        key, wait = jobs[0].batch_key, self.limits.batch_wait_s
        cost = sum(j.cost for j in jobs)
        target, seconds = self.last.get(key, (0, 0.0))
        deadline = time.monotonic() + max(wait * MAX_BATCH_WAITS, min(0.5, 0.1 * seconds))
        while wait > 0 and cost < self.limits.max_batch and time.monotonic() < deadline:
            time.sleep(wait)
            more = self.store.claim_key(self.name, key, self.limits.max_batch - cost)
            jobs += more
            cost += sum(j.cost for j in more)
            if not more and cost >= target:
                break
        return jobs

    def run_once(self) -> bool:
        """Claim and run one batch; False when the queue was empty."""
        jobs = self.store.claim(self.name, sorted(JOB_KINDS), self.limits.max_batch)
        if not jobs:
            return False
        jobs = self._fill(jobs)
        key, cost, t0 = jobs[0].batch_key, sum(j.cost for j in jobs), time.monotonic()
        kind = JOB_KINDS[jobs[0].kind]
        try:
            model = self.pool.get(jobs[0].model)
            kind.run(jobs, model, self.ctx)
            self.last[key] = (cost, time.monotonic() - t0)
        except GenlabError as e:
            for j in jobs:
                self.store.fail(j.id, INVALID + str(e))
        except Exception as e:  # a bug or a broken model file: the job fails, the worker keeps serving
            log.error("job batch %s failed:\n%s", [j.id for j in jobs], traceback.format_exc())
            for j in jobs:
                self.store.fail(j.id, f"internal: {e.__class__.__name__}: {e}")
        return True


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (a killed server leaves no worker behind)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def worker_process(data_dir: str, models_dir: str, limits: Limits, memory_budget_mb: float, device: str,
                   name: str, parent_pid: int) -> None:
    """Entry point of a worker process (`genlab serve --workers N`): its own store connection and model pool."""
    _die_with_parent()
    if os.getppid() != parent_pid:  # the server died while this process was starting
        return
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1") or 1))
    store = Store(data_dir)
    pool = ModelPool(models_dir, memory_budget_mb, device)
    Worker(store, pool, limits, name).run_forever(alive=lambda: os.getppid() == parent_pid)
