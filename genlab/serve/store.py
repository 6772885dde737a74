"""The durable state of a server: jobs and the index of outputs in SQLite (WAL), the files under `data/`.

Every process (the server and its worker processes) opens its own connection; a batch of jobs is claimed in one
`BEGIN IMMEDIATE` transaction, so two workers never run the same job. After a crash, `requeue_running` puts the
jobs that were running back in the queue (they run again from scratch with their stored seed).
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STATES = ("queued", "running", "done", "failed", "cancelled")
FINAL = ("done", "failed", "cancelled")

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    model TEXT NOT NULL,
    params TEXT NOT NULL,
    seed INTEGER NOT NULL,
    batch_key TEXT NOT NULL,
    cost INTEGER NOT NULL DEFAULT 1,
    state TEXT NOT NULL DEFAULT 'queued',
    progress REAL NOT NULL DEFAULT 0,
    preview BLOB,
    result TEXT,
    error TEXT,
    idempotency_key TEXT UNIQUE,
    request_hash TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    watchers INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    worker TEXT,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, seq);
CREATE TABLE IF NOT EXISTS outputs (
    id TEXT PRIMARY KEY,
    job_id TEXT NOT NULL,
    filename TEXT NOT NULL,
    media_type TEXT NOT NULL,
    created REAL NOT NULL
);
"""


def new_id(prefix: str) -> str:
    """An opaque, unguessable id (128 random bits) such as `job_3f2a...`."""
    return f"{prefix}_{secrets.token_hex(16)}"


@dataclass
class Job:
    id: str
    kind: str
    model: str
    params: dict[str, Any]
    seed: int
    batch_key: str
    cost: int
    state: str
    progress: float
    result: dict[str, Any] | None
    error: str | None
    idempotency_key: str | None
    cancel_requested: bool
    attempts: int
    created: float
    updated: float
    seq: int

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Job:
        return cls(id=row["id"], kind=row["kind"], model=row["model"], params=json.loads(row["params"]),
                   seed=row["seed"], batch_key=row["batch_key"], cost=row["cost"], state=row["state"],
                   progress=row["progress"], result=json.loads(row["result"]) if row["result"] else None,
                   error=row["error"], idempotency_key=row["idempotency_key"],
                   cancel_requested=bool(row["cancel_requested"]), attempts=row["attempts"],
                   created=row["created"], updated=row["updated"], seq=row["seq"])


_JOB_COLUMNS = ("seq, id, kind, model, params, seed, batch_key, cost, state, progress, result, error, "
                "idempotency_key, cancel_requested, attempts, created, updated")


class Store:
    """The jobs and outputs of one server data folder (`root`): `root/genlab.sqlite3` and `root/outputs/`."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.outputs_dir = self.root / "outputs"
        self.inputs_dir = self.root / "inputs"
        for d in (self.root, self.outputs_dir, self.inputs_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.path = self.root / "genlab.sqlite3"
        self._local = threading.local()
        self.on_end: Callable[[], None] | None = None  # called when a job of this process ends (wakes waiters)
        db = self._conn()
        db.executescript(SCHEMA)
        columns = {r["name"] for r in db.execute("PRAGMA table_info(jobs)")}
        if "watchers" not in columns:  # a data folder from before previews followed their watchers
            db.execute("ALTER TABLE jobs ADD COLUMN watchers INTEGER NOT NULL DEFAULT 0")

    # -- connections: one per thread, WAL, waiting on a busy database -----------------------
    def _conn(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a committed transaction survives a killed process
            db.execute("PRAGMA busy_timeout=30000")
            self._local.db = db
        return db

    class _Tx:
        def __init__(self, db: sqlite3.Connection, immediate: bool) -> None:
            self.db, self.immediate = db, immediate

        def __enter__(self) -> sqlite3.Connection:
            self.db.execute("BEGIN IMMEDIATE" if self.immediate else "BEGIN")
            return self.db

        def __exit__(self, exc_type: Any, *_: Any) -> None:
            self.db.execute("ROLLBACK" if exc_type else "COMMIT")

    def _tx(self, immediate: bool = True) -> Store._Tx:
        return Store._Tx(self._conn(), immediate)

    # -- jobs -------------------------------------------------------------------------------
    def submit(self, kind: str, model: str, params: dict[str, Any], seed: int, batch_key: str, cost: int = 1,
               idempotency_key: str | None = None, request_hash: str | None = None) -> tuple[Job, bool]:
        """Queue a job; with an `idempotency_key` already used, (that job, False) instead. A key used for another
        request (`request_hash` differs) raises KeyError."""
        now = time.time()
        with self._tx() as db:
            if idempotency_key is not None:
                row = db.execute(f"SELECT {_JOB_COLUMNS}, request_hash FROM jobs WHERE idempotency_key = ?",
                                 (idempotency_key,)).fetchone()
                if row is not None:
                    if request_hash is not None and row["request_hash"] not in (None, request_hash):
                        raise KeyError(idempotency_key)
                    return Job.from_row(row), False
            job_id = new_id("job")
            db.execute("INSERT INTO jobs (id, kind, model, params, seed, batch_key, cost, idempotency_key, "
                       "request_hash, created, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (job_id, kind, model, json.dumps(params, sort_keys=True), seed, batch_key, cost,
                        idempotency_key, request_hash, now, now))
        job = self.get(job_id)
        assert job is not None
        return job, True

    def get(self, job_id: str) -> Job | None:
        row = self._conn().execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return Job.from_row(row) if row else None

    def get_by_key(self, idempotency_key: str) -> Job | None:
        row = self._conn().execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE idempotency_key = ?",
                                   (idempotency_key,)).fetchone()
        return Job.from_row(row) if row else None

    def request_hash(self, job_id: str) -> str | None:
        row = self._conn().execute("SELECT request_hash FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return row["request_hash"] if row else None

    def states(self, job_ids: list[str]) -> dict[str, str]:
        """id -> state of these jobs (one query, for the waiters of the synchronous endpoints)."""
        if not job_ids:
            return {}
        marks = ",".join("?" * len(job_ids))
        rows = self._conn().execute(f"SELECT id, state FROM jobs WHERE id IN ({marks})", job_ids).fetchall()
        return {r["id"]: r["state"] for r in rows}

    def queue_position(self, job: Job) -> int | None:
        """How many queued jobs are ahead of a queued job (0: next); None once it left the queue."""
        if job.state != "queued":
            return None
        return self._conn().execute("SELECT COUNT(*) FROM jobs WHERE state = 'queued' AND seq < ?",
                                    (job.seq,)).fetchone()[0]

    def pending(self) -> int:
        """Jobs queued or running."""
        return self._conn().execute("SELECT COUNT(*) FROM jobs WHERE state IN ('queued', 'running')").fetchone()[0]

    def claim(self, worker: str, kinds: list[str], max_cost: int) -> list[Job]:
        """Atomically take the oldest queued job of `kinds` and the queued jobs that batch with it (same batch key),
        oldest first, up to `max_cost` in all (at least the first); they become running under `worker`."""
        if not kinds:
            return []
        marks = ",".join("?" * len(kinds))
        db = self._conn()
        if db.execute(f"SELECT 1 FROM jobs WHERE state = 'queued' AND kind IN ({marks}) LIMIT 1", kinds).fetchone() \
                is None:  # a cheap read while idle; the write transaction only when a job waits
            return []
        with self._tx() as db:
            first = db.execute(f"SELECT batch_key FROM jobs WHERE state = 'queued' AND kind IN ({marks}) "
                               "ORDER BY seq LIMIT 1", kinds).fetchone()
            return self._take(db, worker, first["batch_key"], max_cost, at_least_one=True) if first else []

    def claim_key(self, worker: str, batch_key: str, max_cost: int) -> list[Job]:
        """Atomically take queued jobs with this batch key, oldest first, up to `max_cost` (possibly none): the
        jobs that join a batch already running (or about to)."""
        if max_cost < 1 or self._conn().execute("SELECT 1 FROM jobs WHERE state = 'queued' AND batch_key = ? "
                                                "LIMIT 1", (batch_key,)).fetchone() is None:
            return []
        with self._tx() as db:
            return self._take(db, worker, batch_key, max_cost, at_least_one=False)

    @staticmethod
    def _take(db: sqlite3.Connection, worker: str, batch_key: str, max_cost: int, at_least_one: bool) -> list[Job]:
        rows = db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE state = 'queued' AND batch_key = ? "
                          "ORDER BY seq LIMIT 256", (batch_key,)).fetchall()
        jobs, total = [], 0
        for row in rows:
            if (jobs or not at_least_one) and total + row["cost"] > max_cost:
                break
            jobs.append(Job.from_row(row))
            total += row["cost"]
        now = time.time()
        db.executemany("UPDATE jobs SET state = 'running', worker = ?, attempts = attempts + 1, progress = 0, "
                       "updated = ? WHERE id = ?", [(worker, now, j.id) for j in jobs])
        for j in jobs:
            j.state, j.attempts, j.progress = "running", j.attempts + 1, 0.0
        return jobs

    def step(self, updates: dict[str, tuple[float, bytes | None]]) -> set[str]:
        """Record progress (and a preview PNG) of running jobs in one transaction; returns the ids among them whose
        cancellation was asked (they become cancelled here)."""
        return self.step_watched(updates)[0]

    def step_watched(self, updates: dict[str, tuple[float, bytes | None]]) -> tuple[set[str], set[str]]:
        """`step`, and also the ids among them that someone follows (`GET /v1/jobs/{id}/events`): only those need
        a preview at the next step."""
        now = time.time()
        with self._tx() as db:
            db.executemany("UPDATE jobs SET progress = ?, preview = COALESCE(?, preview), updated = ? "
                           "WHERE id = ? AND state = 'running'",
                           [(p, preview, now, job_id) for job_id, (p, preview) in updates.items()])
            marks = ",".join("?" * len(updates))
            rows = db.execute(f"SELECT id, cancel_requested, state, watchers FROM jobs WHERE id IN ({marks})",
                              list(updates)).fetchall()
            cancelled = {r["id"] for r in rows if r["cancel_requested"] or r["state"] == "cancelled"}
            watched = {r["id"] for r in rows if r["watchers"] > 0}
            if cancelled:
                db.executemany("UPDATE jobs SET state = 'cancelled', updated = ? WHERE id = ? AND state = 'running'",
                               [(now, i) for i in cancelled])
        if cancelled:
            self._ended()
        return cancelled, watched

    def watch(self, job_id: str, delta: int) -> None:
        """Count a follower of a job's events in (+1) or out (-1)."""
        with self._tx() as db:
            db.execute("UPDATE jobs SET watchers = MAX(0, watchers + ?) WHERE id = ?", (delta, job_id))

    def _ended(self) -> None:
        if self.on_end is not None:
            self.on_end()

    def preview(self, job_id: str) -> bytes | None:
        row = self._conn().execute("SELECT preview FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return row["preview"] if row else None

    def finish(self, job_id: str, result: dict[str, Any], outputs: list[tuple[str, str, str]] = ()) -> bool:
        """A running job is done with `result`; its `outputs` (id, filename, media type) enter the index in the
        same transaction. False when it was cancelled (or requeued) meanwhile: the outputs are not indexed."""
        now = time.time()
        with self._tx() as db:
            cur = db.execute("UPDATE jobs SET state = 'done', progress = 1, result = ?, updated = ? "
                             "WHERE id = ? AND state = 'running' AND cancel_requested = 0",
                             (json.dumps(result), now, job_id))
            if cur.rowcount != 1:
                return False
            db.executemany("INSERT INTO outputs (id, job_id, filename, media_type, created) VALUES (?, ?, ?, ?, ?)",
                           [(oid, job_id, name, media, now) for oid, name, media in outputs])
        self._ended()
        return True

    def fail(self, job_id: str, error: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE jobs SET state = 'failed', error = ?, updated = ? WHERE id = ? AND state = 'running'",
                       (error, time.time(), job_id))
        self._ended()

    def cancel(self, job_id: str) -> str | None:
        """Cancel a job: a queued one leaves the queue at once, a running one is marked and stops at its next
        step. Returns its state afterwards (None: no such job)."""
        now = time.time()
        with self._tx() as db:
            row = db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return None
            if row["state"] == "queued":
                db.execute("UPDATE jobs SET state = 'cancelled', cancel_requested = 1, updated = ? WHERE id = ?",
                           (now, job_id))
                return "cancelled"
            if row["state"] == "running":
                db.execute("UPDATE jobs SET cancel_requested = 1, updated = ? WHERE id = ?", (now, job_id))
            return row["state"]

    def requeue_running(self) -> int:
        """After a crash: jobs left running go back to the queue (cancelled where that was asked)."""
        now = time.time()
        with self._tx() as db:
            db.execute("UPDATE jobs SET state = 'cancelled', updated = ? WHERE state = 'running' "
                       "AND cancel_requested = 1", (now,))
            db.execute("UPDATE jobs SET watchers = 0 WHERE watchers != 0")  # no request outlives its server
            return db.execute("UPDATE jobs SET state = 'queued', progress = 0, preview = NULL, worker = NULL, "
                              "updated = ? WHERE state = 'running'", (now,)).rowcount

    # -- outputs ----------------------------------------------------------------------------
    def output(self, output_id: str) -> tuple[Path, str] | None:
        """The file and media type of an indexed output; the file name comes from the index, never a client."""
        row = self._conn().execute("SELECT filename, media_type FROM outputs WHERE id = ?", (output_id,)).fetchone()
        if row is None:
            return None
        return self.outputs_dir / Path(row["filename"]).name, row["media_type"]

    def outputs_page(self, limit: int, offset: int) -> tuple[list[sqlite3.Row], int]:
        """Indexed outputs, newest first, each with its job's model, kind and result; and the total count."""
        db = self._conn()
        total = db.execute("SELECT COUNT(*) FROM outputs").fetchone()[0]
        rows = db.execute("SELECT o.id, o.job_id, o.created, o.media_type, j.model, j.kind, j.result FROM outputs o "
                          "LEFT JOIN jobs j ON j.id = o.job_id ORDER BY o.created DESC, o.rowid DESC LIMIT ? OFFSET ?",
                          (limit, offset)).fetchall()
        return rows, int(total)

    def delete_output(self, output_id: str) -> bool:
        """Remove an output from the index and then its file; False when there is none."""
        found = self.output(output_id)
        if found is None:
            return False
        with self._tx() as db:
            db.execute("DELETE FROM outputs WHERE id = ?", (output_id,))
        found[0].unlink(missing_ok=True)
        return True

    def active_jobs(self, limit: int) -> list[Job]:
        """Queued and running jobs in queue order, at most `limit`."""
        rows = self._conn().execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE state IN ('queued', 'running') "
                                    "ORDER BY seq LIMIT ?", (limit,)).fetchall()
        return [Job.from_row(r) for r in rows]

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None
