"""The web studio of `genlab serve`: static files at `/` (plain HTML, CSS and JavaScript in `studio/`, no build step)
and the endpoints it needs beyond the OpenAI-shaped API: the gallery of stored outputs (`GET /v1/outputs`, newest
first, paged; `DELETE /v1/outputs/{id}`) and the queue (`GET /v1/queue`). They need the API key like every /v1
endpoint; the static files do not (the page asks for the key when the server answers 401)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from genlab.serve.limits import key_matches
from genlab.serve.store import Store

STATIC = Path(__file__).with_name("studio")
MAX_PAGE = 100
MAX_QUEUE_LIST = 200


def list_outputs(store: Store, limit: int, offset: int) -> tuple[list[dict[str, Any]], int]:
    """Stored image outputs, newest first, with the parameters and seed recorded by their job; and the total."""
    rows, total = store.outputs_page(limit, offset)
    out = []
    for r in rows:
        items = {d["id"]: d for d in (json.loads(r["result"]) if r["result"] else {}).get("data", [])
                 if isinstance(d, dict) and "id" in d}
        item = items.get(r["id"], {})
        out.append({"id": r["id"], "object": "output", "job": r["job_id"], "kind": r["kind"], "model": r["model"],
                    "created": r["created"], "media_type": r["media_type"], "url": f"/v1/outputs/{r['id']}",
                    "seed": item.get("seed"), "params": item.get("params"), "blocked": item.get("blocked", False)})
    return out, total


def list_queue(store: Store) -> list[dict[str, Any]]:
    """Queued and running jobs in queue order, with their position (0: running or next)."""
    return [{"id": j.id, "kind": j.kind, "model": j.model, "state": j.state, "progress": round(j.progress, 4),
             "queue_position": store.queue_position(j), "n": j.params.get("n"), "prompt": j.params.get("prompt"),
             "created": j.created} for j in store.active_jobs(MAX_QUEUE_LIST)]


def build_router(api_error: type[Exception]) -> APIRouter:
    """The endpoints; `api_error(status, message, headers=None, type_=...)` is the app's error (OpenAI's shape)."""

    async def require_key(request: Request) -> None:
        state = request.app.state.serve
        if state.key_digests and not key_matches(request.headers.get("authorization"), state.key_digests):
            raise api_error(401, "missing or wrong API key: send Authorization: Bearer YOUR_KEY",
                            type_="authentication_error")

    r = APIRouter(prefix="/v1", dependencies=[Depends(require_key)])

    @r.get("/outputs")
    async def outputs(request: Request, limit: int = 24, offset: int = 0) -> dict[str, Any]:
        if not 1 <= limit <= MAX_PAGE or offset < 0:
            raise api_error(400, f"limit must be 1..{MAX_PAGE} and offset at least 0")
        data, total = await run_in_threadpool(list_outputs, request.app.state.serve.store, limit, offset)
        return {"object": "list", "data": data, "total": total, "limit": limit, "offset": offset}

    @r.delete("/outputs/{output_id}")
    async def delete(output_id: str, request: Request) -> dict[str, Any]:
        ok = len(output_id) <= 64 and await run_in_threadpool(request.app.state.serve.store.delete_output,
                                                                     output_id)
        if not ok:
            raise api_error(404, f"no output {output_id[:80]!r}")
        return {"id": output_id, "object": "output", "deleted": True}

    @r.get("/studio/options")
    async def options() -> dict[str, Any]:
        """What the studio's pickers offer: the sampler and schedule names."""
        from genlab.registry import SAMPLERS
        from genlab.sampling import solvers  # noqa: F401  (registers the samplers)
        from genlab.sampling.schedules import SCHEDULES

        return {"samplers": list(SAMPLERS), "schedules": list(SCHEDULES)}

    @r.get("/queue")
    async def queue(request: Request) -> dict[str, Any]:
        return {"object": "list", "data": await run_in_threadpool(list_queue, request.app.state.serve.store)}

    return r


def mount(app: FastAPI, api_error: type[Exception]) -> None:
    """The studio's endpoints and its static files (`/` and `/studio/...`)."""
    app.include_router(build_router(api_error))
    app.mount("/studio", StaticFiles(directory=STATIC), name="studio")

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")
