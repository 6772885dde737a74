"""Embedding jobs: `POST /v1/embeddings` in OpenAI's shape, from a CLIP model's text tower (Radford et al. 2021).

Each input becomes the unit-length pooled text embedding of the model's `encode_text`. Requests for the same model
run as one batch on the shared queue, like images and text; `usage` counts the tokenizer's tokens of each input.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import torch

from genlab.config import check_int
from genlab.errors import GenlabError
from genlab.models.base import GenerativeModel, Output
from genlab.serve.jobs import INVALID, JobKind, Prepared, WorkerContext, register
from genlab.serve.limits import Limits
from genlab.serve.pool import ModelPool
from genlab.serve.store import Job, Store

MAX_INPUTS = 2048  # OpenAI's own bound on inputs per request
ENCODE_BATCH = 256  # texts per forward pass
FIELDS = {"model", "input", "encoding_format", "user", "dimensions"}


def prepare(raw: Any, pool: ModelPool, limits: Limits, store: Store) -> Prepared:
    """Check a request (a model that outputs embeddings, one string or a list of strings, each within the
    prompt limit); its stored form. Token-id inputs are refused: a CLIP tokenizer is genlab's own, not tiktoken."""
    if not isinstance(raw, dict):
        raise GenlabError("the request body must be a JSON object")
    unknown = sorted(set(raw) - FIELDS)
    if unknown:
        raise GenlabError(f"unknown field(s) {', '.join(unknown)}; an embeddings request takes: "
                          f"{', '.join(sorted(FIELDS))}")
    name = raw.get("model")
    if not isinstance(name, str):
        raise GenlabError("model must be the name of a served CLIP model (see GET /v1/models)")
    name = pool.entry(name).name
    model = pool.get(name)
    if model.output is not Output.EMBEDDING:
        raise GenlabError(f"model {name!r} outputs {model.output.value}, not embeddings; give a CLIP model")
    texts = raw.get("input")
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise GenlabError("input must be a string or a non-empty list of strings (token ids are not taken)")
    check_int("input", len(texts), 1, MAX_INPUTS, "inputs per request")
    for i, t in enumerate(texts):
        if len(t) > limits.max_prompt_chars:
            raise GenlabError(f"input[{i}] has {len(t):,} characters; the server takes at most "
                              f"{limits.max_prompt_chars:,}")
    fmt = raw.get("encoding_format", "float")
    if fmt not in ("float", "base64"):
        raise GenlabError("encoding_format must be 'float' or 'base64'")
    dim = model.config.embed_dim
    if raw.get("dimensions") not in (None, dim):
        raise GenlabError(f"dimensions={raw['dimensions']!r}: model {name!r} gives {dim}-dimensional embeddings; "
                          f"leave dimensions out or give {dim}")
    return Prepared(name, {"input": texts, "encoding_format": fmt}, seed=0, batch_key=f"embeddings:{name}",
                    cost=len(texts))


@torch.no_grad()
def run(jobs: list[Job], model: GenerativeModel, ctx: WorkerContext) -> None:
    """Embed every job's inputs in passes of `ENCODE_BATCH` texts and end each job with its vectors and token
    count."""
    texts = [t for j in jobs for t in j.params["input"]]
    try:
        z = torch.cat([model.encode_text(texts[i:i + ENCODE_BATCH]).float().cpu()
                       for i in range(0, len(texts), ENCODE_BATCH)])
    except GenlabError as e:
        for j in jobs:
            ctx.store.fail(j.id, INVALID + str(e))
        return
    tokens = [len(row) for row in model.tokenizer.encode_batch(texts)]
    start = 0
    for j in jobs:
        k = len(j.params["input"])
        ctx.store.finish(j.id, {"embeddings": z[start:start + k].tolist(), "tokens": sum(tokens[start:start + k])})
        start += k


def respond(job: Job, store: Store, base_url: str) -> dict[str, Any]:
    """OpenAI's embeddings response: `data` [{object, index, embedding}], `model`, `usage`."""
    result = job.result or {}
    as_b64 = job.params["encoding_format"] == "base64"
    data = [{"object": "embedding", "index": i,
             "embedding": base64.b64encode(np.asarray(e, dtype="<f4").tobytes()).decode() if as_b64 else e}
            for i, e in enumerate(result.get("embeddings", []))]
    n = result.get("tokens", 0)
    return {"object": "list", "data": data, "model": job.model, "usage": {"prompt_tokens": n, "total_tokens": n},
            "job": job.id}


register(JobKind("embeddings", prepare, run, respond))
