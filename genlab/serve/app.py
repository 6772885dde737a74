"""The FastAPI application of `genlab serve`: OpenAI-shaped endpoints over the durable job queue.

Every endpoint that draws something submits a job (`submit`) and the synchronous ones wait for it (`wait`); the
workers (a thread of this process and, with `--workers N`, N - 1 worker processes) claim batches from the store.
Every error is a 4xx (or 429/504) in OpenAI's error shape; nothing a client sends reaches a file path: jobs and
outputs are looked up by opaque ids in the store.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import importlib
import importlib.util
import json
import re
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from genlab.errors import GenlabError
from genlab.serve import images, safety, studio
from genlab.serve.jobs import INVALID, JOB_KINDS, Worker, get_kind, load_kinds
from genlab.serve.limits import BodyLimit, Limits, error_body, key_matches
from genlab.serve.pool import ModelPool
from genlab.serve.store import FINAL as FINAL_STATES
from genlab.serve.store import Job, Store

JOB_ID = re.compile(r"^job_[0-9a-f]{32}$")
OUTPUT_ID = re.compile(r"^img_[0-9a-f]{32}$")
IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")
RETRY_AFTER_S = 2

# serve-text's router (/v1/completions, /v1/chat/completions): an `APIRouter` named `router` in this module,
# included when the module exists; it reaches the queue through `request.app.state.serve` (a `ServeState`)
TEXT_ROUTER_MODULE = "genlab.serve.text_api"


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None,
                 type_: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.headers, self.type = status, message, headers, type_


class Waiter:
    """Futures of jobs that requests wait on, resolved by one polling task (one query for all of them), so the
    waiting costs the same whichever process runs the job."""

    def __init__(self, store: Store, poll_s: float = 0.02) -> None:
        self.store, self.poll_s = store, poll_s
        self.futures: dict[str, list[asyncio.Future[str]]] = {}
        self.task: asyncio.Task[None] | None = None
        self.changed = asyncio.Event()
        self.loop = asyncio.get_running_loop()

    def notify(self) -> None:
        """A job ended in this process (any thread): look now rather than at the next poll."""
        self.loop.call_soon_threadsafe(self.changed.set)

    async def wait(self, job_id: str, timeout: float) -> str | None:
        """The job's final state, or None after `timeout` seconds."""
        fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.futures.setdefault(job_id, []).append(fut)
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self._poll())
        try:
            return await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            return None
        finally:
            waiting = self.futures.get(job_id, [])
            if fut in waiting:
                waiting.remove(fut)
            if not waiting:
                self.futures.pop(job_id, None)

    async def _poll(self) -> None:
        while self.futures:
            states = await run_in_threadpool(self.store.states, list(self.futures))
            for job_id, state in states.items():
                if state in FINAL_STATES:
                    for fut in self.futures.pop(job_id, []):
                        if not fut.done():
                            fut.set_result(state)
            try:
                await asyncio.wait_for(self.changed.wait(), self.poll_s)
            except asyncio.TimeoutError:
                pass
            self.changed.clear()


@dataclass
class ServeState:
    """What the endpoints share (`app.state.serve`): the store, the pool, the limits, the key digests."""

    store: Store
    pool: ModelPool
    limits: Limits
    key_digests: list[str] = field(default_factory=list)
    wake: threading.Event = field(default_factory=threading.Event)
    waiter: Waiter | None = None

    async def submit(self, kind_name: str, raw: Any, idempotency_key: str | None,
                     same_request: Any = None) -> tuple[Job, bool]:
        """Check a request (the kind's `prepare`) and queue it; with a known Idempotency-Key, that job.
        `same_request` is what makes two requests the same for the key (default: `raw`; an edit gives its fields
        and the digests of its uploads, since its stored inputs get new ids each time)."""
        kind = get_kind(kind_name)
        if idempotency_key is not None:
            if not IDEMPOTENCY_KEY.match(idempotency_key):
                raise ApiError(400, "Idempotency-Key must be 1-255 printable ASCII characters without spaces")
        basis = raw if same_request is None else same_request
        request_hash = hashlib.sha256(json.dumps([kind_name, basis], sort_keys=True, default=str).encode()).hexdigest()
        if idempotency_key is None and self.store.pending() >= self.limits.max_queue:
            raise ApiError(429, f"the queue is full ({self.limits.max_queue} jobs); retry later",
                           {"Retry-After": str(RETRY_AFTER_S)}, "rate_limit_error")
        if idempotency_key is not None:
            job = await run_in_threadpool(self.store.get_by_key, idempotency_key)
            if job is not None:
                return self._same(job, request_hash, idempotency_key)
            if self.store.pending() >= self.limits.max_queue:
                raise ApiError(429, f"the queue is full ({self.limits.max_queue} jobs); retry later",
                               {"Retry-After": str(RETRY_AFTER_S)}, "rate_limit_error")
        try:
            safety.check_request(self.store.root, raw)  # the prompt filter: a 400 naming the matched rule
            prepared = await run_in_threadpool(kind.prepare, raw, self.pool, self.limits, self.store)
        except GenlabError as e:
            raise ApiError(400, str(e)) from None
        try:
            job, created = self.store.submit(kind_name, prepared.model, prepared.params, prepared.seed,
                                             prepared.batch_key, prepared.cost, idempotency_key, request_hash)
        except KeyError:
            raise ApiError(409, "this Idempotency-Key was used for a different request; use a new key") from None
        self.wake.set()
        return job, created

    def _same(self, job: Job, request_hash: str, key: str) -> tuple[Job, bool]:
        if self.store.request_hash(job.id) not in (None, request_hash):
            raise ApiError(409, "this Idempotency-Key was used for a different request; use a new key")
        return job, False

    async def result(self, job: Job, base_url: str) -> dict[str, Any]:
        """Wait (up to the request timeout) for a job and give its response; a timed-out job is cancelled."""
        assert self.waiter is not None
        state = job.state if job.state in FINAL_STATES else await self.waiter.wait(job.id, self.limits.timeout_s)
        if state is None:
            self.store.cancel(job.id)
            raise ApiError(504, f"the request timed out after {self.limits.timeout_s:g} s and its job {job.id} was "
                           "cancelled; ask for fewer images or steps, or use POST /v1/jobs", type_="timeout")
        done = self.store.get(job.id)
        assert done is not None
        if done.state == "done":
            return JOB_KINDS[done.kind].respond(done, self.store, base_url)
        if done.state == "cancelled":
            raise ApiError(409, f"job {done.id} was cancelled")
        error = done.error or "failed"
        if error.startswith(INVALID):
            raise ApiError(400, error[len(INVALID):])
        raise ApiError(500, f"job {done.id} failed: {error}", type_="server_error")

    def describe(self, job: Job, base_url: str) -> dict[str, Any]:
        """`GET /v1/jobs/{id}`: the job's state, queue position, progress and, once done, its result."""
        out = {"id": job.id, "object": "job", "kind": job.kind, "model": job.model, "state": job.state,
               "queue_position": self.store.queue_position(job), "progress": round(job.progress, 4),
               "seed": job.seed, "params": job.params, "created": job.created, "updated": job.updated,
               "attempts": job.attempts, "error": _public_error(job.error), "result": None}
        if job.state == "done":
            out["result"] = JOB_KINDS[job.kind].respond(job, self.store, base_url)
        return out


def _public_error(error: str | None) -> str | None:
    return error[len(INVALID):] if error and error.startswith(INVALID) else error


def _job_or_404(state: ServeState, job_id: str) -> Job:
    job = state.store.get(job_id) if JOB_ID.match(job_id) else None
    if job is None:
        raise ApiError(404, f"no job {job_id[:80]!r}; job ids look like job_<32 hex digits>")
    return job


async def _json_body(request: Request) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise ApiError(400, "the request body is not valid JSON") from None


def build_router(state: ServeState) -> APIRouter:
    async def require_key(request: Request) -> None:
        if state.key_digests and not key_matches(request.headers.get("authorization"), state.key_digests):
            raise ApiError(401, "missing or wrong API key: send Authorization: Bearer YOUR_KEY",
                           type_="authentication_error")

    r = APIRouter(prefix="/v1", dependencies=[Depends(require_key)])

    @r.get("/models")
    async def list_models() -> dict[str, Any]:
        state.pool.entries = await run_in_threadpool(_rescan, state.pool)
        return {"object": "list", "data": [e.describe() for e in state.pool.entries.values()]}

    @r.get("/models/{model_id}")
    async def get_model(model_id: str) -> dict[str, Any]:
        try:
            return state.pool.entry(model_id).describe()
        except GenlabError as e:
            raise ApiError(404, str(e)) from None

    @r.post("/images/generations")
    async def generations(request: Request) -> dict[str, Any]:
        job, _ = await state.submit("image.generation", await _json_body(request),
                                    request.headers.get("idempotency-key"))
        return await state.result(job, str(request.base_url))

    @r.post("/images/edits")
    async def edits(request: Request) -> dict[str, Any]:
        raw, same = await _edit_fields(request, state)
        job, _ = await state.submit("image.edit", raw, request.headers.get("idempotency-key"), same)
        return await state.result(job, str(request.base_url))

    @r.post("/embeddings")
    async def embeddings(request: Request) -> dict[str, Any]:
        job, _ = await state.submit("embeddings", await _json_body(request), request.headers.get("idempotency-key"))
        return await state.result(job, str(request.base_url))

    @r.post("/jobs", status_code=202)
    async def create_job(request: Request) -> JSONResponse:
        body = await _json_body(request)
        if not isinstance(body, dict) or set(body) - {"kind", "params"} or not isinstance(body.get("params"), dict):
            raise ApiError(400, 'give {"kind": KIND, "params": {...}}, e.g. kind "image.generation" with the '
                           "params of /v1/images/generations")
        job, created = await state.submit(body.get("kind"), body["params"], request.headers.get("idempotency-key"))
        return JSONResponse(state.describe(job, str(request.base_url)), status_code=202 if created else 200)

    @r.get("/jobs/{job_id}")
    async def get_job(job_id: str, request: Request) -> dict[str, Any]:
        return state.describe(_job_or_404(state, job_id), str(request.base_url))

    @r.delete("/jobs/{job_id}")
    async def cancel_job(job_id: str, request: Request) -> dict[str, Any]:
        job = _job_or_404(state, job_id)
        if job.state in FINAL_STATES:
            raise ApiError(409, f"job {job.id} is already {job.state}; nothing to cancel")
        state.store.cancel(job.id)
        return state.describe(_job_or_404(state, job_id), str(request.base_url))

    @r.get("/jobs/{job_id}/events")
    async def job_events(job_id: str, request: Request) -> StreamingResponse:
        job = _job_or_404(state, job_id)
        return StreamingResponse(_events(state, job, str(request.base_url), request), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @r.get("/outputs/{output_id}")
    async def get_output(output_id: str) -> FileResponse:
        found = state.store.output(output_id) if OUTPUT_ID.match(output_id) else None
        if found is None or not found[0].is_file():
            raise ApiError(404, f"no output {output_id[:80]!r}")
        return FileResponse(found[0], media_type=found[1])

    return r


def _rescan(pool: ModelPool) -> dict[str, Any]:
    from genlab.serve.pool import scan

    return scan(pool.models_dir)


async def _events(state: ServeState, job: Job, base_url: str, request: Request) -> AsyncIterator[str]:
    """Server-sent events: `progress` (progress, state, a base64 PNG preview of the current denoised image) as it
    changes, then one `done` / `failed` / `cancelled` event with the job; closes after the request timeout."""
    await run_in_threadpool(state.store.watch, job.id, 1)  # the worker draws previews while someone follows
    try:
        async for event in _job_events(state, job, base_url, request):
            yield event
    finally:
        await run_in_threadpool(state.store.watch, job.id, -1)


async def _job_events(state: ServeState, job: Job, base_url: str, request: Request) -> AsyncIterator[str]:
    last: tuple[str, float] | None = None
    deadline = time.monotonic() + state.limits.timeout_s
    while time.monotonic() < deadline:
        if await request.is_disconnected():
            return
        job = await run_in_threadpool(state.store.get, job.id) or job
        if job.state in FINAL_STATES:
            yield f"event: {job.state}\ndata: {json.dumps(state.describe(job, base_url))}\n\n"
            return
        if (job.state, job.progress) != last:
            last = (job.state, job.progress)
            preview = await run_in_threadpool(state.store.preview, job.id) if job.state == "running" else None
            data = {"id": job.id, "state": job.state, "progress": round(job.progress, 4),
                    "queue_position": state.store.queue_position(job),
                    "preview": base64.b64encode(preview).decode() if preview else None}
            yield f"event: progress\ndata: {json.dumps(data)}\n\n"
        await asyncio.sleep(0.05)
    yield f"event: timeout\ndata: {json.dumps({'id': job.id, 'state': job.state})}\n\n"


async def _edit_fields(request: Request, state: ServeState) -> tuple[dict[str, Any], dict[str, Any]]:
    """The multipart fields of an edit: the image (and mask) saved under opaque ids, the rest typed; and what
    identifies the request for an Idempotency-Key (the fields and the uploads' SHA-256)."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise ApiError(400, "send /v1/images/edits as multipart/form-data with an image file")
    try:
        form = await request.form(max_files=2, max_fields=64, max_part_size=state.limits.max_body_bytes)
    except HTTPException as e:
        raise ApiError(400, f"malformed multipart body: {e.detail}") from None
    except Exception as e:  # python-multipart's parse errors
        raise ApiError(400, f"malformed multipart body ({e.__class__.__name__})") from None
    files: dict[str, images.Upload] = {}
    fields: dict[str, str] = {}
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            if key in ("image", "image[]") and "image" not in files:
                files["image"] = images.Upload(value.filename or "", await value.read())
            elif key == "mask" and "mask" not in files:
                files["mask"] = images.Upload(value.filename or "", await value.read())
            else:
                raise ApiError(400, f"unexpected file field {key[:40]!r}; send image and optionally mask")
        elif key in ("image", "mask"):
            raise ApiError(400, f"{key} must be an uploaded file")
        else:
            fields[key] = value
    if "image" not in files:
        raise ApiError(400, "an edit needs an image file (field image)")
    try:
        raw = images.edit_form(fields)
        image_id, mask_id = await run_in_threadpool(images.store_edit_inputs, state.store, files["image"],
                                                    files.get("mask"), state.limits)
    except GenlabError as e:
        raise ApiError(400, str(e)) from None
    same = {**fields, **{k: hashlib.sha256(f.data).hexdigest() for k, f in files.items()}}
    return {**raw, "image": image_id, "mask": mask_id}, same


def _error(status: int, message: str, headers: dict[str, str] | None = None,
           type_: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse(error_body(message, type_), status_code=status, headers=headers)


def create_app(state: ServeState, cors_origins: list[str] | None = None, worker_thread: bool = True,
               worker_name: str = "worker-0") -> FastAPI:
    """The application; with `worker_thread`, one worker (named `worker_name` in the store) runs in this process
    (a thread)."""
    load_kinds()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.waiter = Waiter(state.store)
        state.store.on_end = state.waiter.notify
        stop = threading.Event()
        thread = None
        if worker_thread:
            worker = Worker(state.store, state.pool, state.limits, worker_name, stop=stop, wake=state.wake)
            thread = threading.Thread(target=worker.run_forever, name=f"genlab-{worker_name}", daemon=True)
            thread.start()
        yield
        stop.set()
        state.wake.set()

    app = FastAPI(title="genlab", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serve = state

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return _error(e.status, e.message, e.headers, e.type)

    @app.exception_handler(GenlabError)
    async def genlab_error(request: Request, e: GenlabError) -> JSONResponse:
        return _error(400, str(e))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        return _error(e.status_code, str(e.detail), getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()))
        return _error(400, f"{where}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception) -> JSONResponse:  # a bug: still OpenAI's shape
        return _error(500, f"internal error ({e.__class__.__name__}); the server keeps serving", type_="server_error")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "queued_or_running": state.store.pending()}

    app.include_router(build_router(state))
    studio.mount(app, ApiError)  # the web studio at / and its gallery and queue endpoints
    if importlib.util.find_spec(TEXT_ROUTER_MODULE) is not None:  # the text endpoints, once they exist
        app.include_router(importlib.import_module(TEXT_ROUTER_MODULE).router)
    if cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["Authorization", "Content-Type", "Idempotency-Key"])
    app.add_middleware(BodyLimit, max_bytes=state.limits.max_body_bytes)
    return app
