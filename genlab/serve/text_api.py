"""Text endpoints in OpenAI's shapes: `POST /v1/completions` and `POST /v1/chat/completions`, streamed or not.

Both ride the durable job queue as the job kinds `text.completion` and `text.chat`, which share a batch key per
model: a worker runs them with continuous batching (`textbatch.BatchDecoder`, Yu et al. 2022), taking newly queued
jobs of the same model into the running batch as rows leave. Row k of a job (prompt i, choice j, k = i * n + j)
samples with its own generator seeded `seed + k`. A streamed job publishes its text so far to the store (the job's
preview) and the server turns it into server-sent event chunks. Chat uses genlab's chat template
(`data/chat.py`); an `image_url` part (a data URL) reaches a model that declares image conditioning as its image
prefix (LLaVA-style, `image_prompt`), and any other model refuses it with a 400.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import json
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import torch
from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.concurrency import run_in_threadpool

from genlab.commands.sample import _read_image
from genlab.config import check_int, check_number
from genlab.data.chat import encode_chat
from genlab.errors import GenlabError
from genlab.models.base import Conditioning, GenerativeModel, Output
from genlab.serve.app import ApiError, ServeState, _json_body
from genlab.serve.images import Upload, input_path, store_edit_inputs, validation_message
from genlab.serve.jobs import INVALID, JobKind, Prepared, WorkerContext, register
from genlab.serve.limits import Limits, error_body, key_matches
from genlab.serve.pool import ModelPool
from genlab.serve.store import FINAL, Job, Store
from genlab.serve.textbatch import MAX_TOP_LOGPROBS, BatchDecoder, Sequence, TextRequest

KIND_COMPLETION, KIND_CHAT = "text.completion", "text.chat"
MAX_TOKENS = 4096  # tokens one choice may generate (the model's context bounds it further)
MAX_STOP = 4  # stop strings per request (OpenAI's bound)
MAX_MESSAGES = 1024  # messages per chat request
MAX_STOP_CHARS = 256
MAX_SEED = 2**62  # stored as a signed 64-bit SQLite integer; row k uses seed + k
MAX_COMPLETION_LOGPROBS = 5  # /v1/completions' `logprobs` (OpenAI's bound)
MIN_TEMPERATURE = 1e-6  # logits / temperature must stay finite
MIN_PENALTY = 0.01  # repetition_penalty in [0.01, 100]: logits / penalty must stay finite
CHAT_DEFAULT_TOKENS = 512  # chat's max_tokens when none is given (else the context left, if less)
PUBLISH_S = 0.03  # a streamed job's text is written to the store at most this often
CHECK_S = 0.25  # other running jobs report progress (and learn of cancellation) this often
CLAIM_S = 0.005  # how often a running batch looks for newly queued jobs to take in
JOIN_WINDOW_S = 20.0  # a batch takes in new jobs this long, then drains, so that other models and kinds get a turn
STREAM_POLL_S = 0.03


# -- requests -------------------------------------------------------------------------------------
class _Sampling(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stream: bool = False
    stream_options: dict[str, bool] | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    # genlab's extensions
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None


class CompletionRequest(_Sampling):
    """OpenAI's legacy completions request (`prompt`: a string, strings, token ids or lists of them)."""

    prompt: str | list[str] | list[int] | list[list[int]] = ""
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


class ChatRequest(_Sampling):
    """OpenAI's chat completions request; message contents are strings or lists of text / image_url parts."""

    messages: list[dict[str, Any]]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None


def _image_bytes(url: Any, limits: Limits) -> bytes:
    """The bytes of a `data:image/...;base64,` URL (nothing is fetched from elsewhere)."""
    if not isinstance(url, str) or not url.startswith("data:"):
        raise GenlabError("image_url.url must be a data URL (data:image/png;base64,...); remote URLs are not fetched")
    head, sep, data = url.partition(",")
    if not sep or not head.endswith(";base64") or not head[5:].startswith("image/"):
        raise GenlabError("image_url.url must be data:image/<type>;base64,<data>")
    if len(data) > 4 * limits.max_body_bytes // 3 + 4:
        raise GenlabError(f"the image is larger than the server's limit of {limits.max_body_bytes} bytes")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise GenlabError("image_url.url holds invalid base64 data") from None


def _messages(raw: list[dict[str, Any]], limits: Limits, store: Store) -> tuple[list[dict[str, str]], list[str]]:
    """Chat messages as the template's {role, content} (text parts joined), and the stored ids of their images."""
    if not raw:
        raise GenlabError("messages must be a non-empty list of {role, content} objects")
    if len(raw) > MAX_MESSAGES:
        raise GenlabError(f"messages holds {len(raw)} messages; at most {MAX_MESSAGES}")
    out, images, chars = [], [], 0
    for i, m in enumerate(raw):
        role = m.get("role")
        role = "system" if role == "developer" else role
        if role not in ("system", "user", "assistant"):
            raise GenlabError(f"messages[{i}].role must be one of system, developer, user, assistant; got "
                              f"{str(role)[:40]!r}")
        if set(m) - {"role", "content", "name"}:
            raise GenlabError(f"messages[{i}] has unknown fields {sorted(set(m) - {'role', 'content', 'name'})[:3]}")
        content = m.get("content")
        if isinstance(content, str):
            text = content
        elif isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    texts.append(part["text"])
                elif kind == "image_url" and isinstance(part.get("image_url"), dict):
                    data = _image_bytes(part["image_url"].get("url"), limits)
                    image_id, _ = store_edit_inputs(store, Upload("image", data), None, limits)
                    images.append(image_id)
                else:
                    raise GenlabError(f"messages[{i}].content[{j}] must be {{type: text, text}} or "
                                      "{type: image_url, image_url: {url}}")
            text = "".join(texts)
        else:
            raise GenlabError(f"messages[{i}].content must be a string or a list of parts")
        chars += len(text)
        out.append({"role": role, "content": text})
    if chars > limits.max_prompt_chars:
        raise GenlabError(f"the messages hold {chars} characters; at most {limits.max_prompt_chars}")
    return out, images


def _resolve(name: str | None, pool: ModelPool) -> str:
    if name is not None:
        return pool.entry(name).name
    texts = [e.name for e in pool.entries.values() if e.cls.output is Output.TEXT]
    if len(texts) != 1:
        raise GenlabError(f"give model: one of {', '.join(texts) or 'none'} (see GET /v1/models)")
    return texts[0]


def _stops(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP:
        raise GenlabError(f"stop holds {len(stops)} strings; at most {MAX_STOP}")
    for s in stops:
        if not s or len(s) > MAX_STOP_CHARS:
            raise GenlabError(f"each stop string needs 1 to {MAX_STOP_CHARS} characters")
    return stops


def _image_tensor(model: GenerativeModel, store: Store, image_id: str) -> torch.Tensor:
    c, h, _ = model.image_shape
    return _read_image(str(input_path(store, image_id)), c, h, "image")


def _decoder(model: GenerativeModel, image: torch.Tensor | None) -> tuple[Any, torch.Tensor | None]:
    """The language model that decodes and the image's prefix embeddings (P, width) where there is an image."""
    if image is None:
        return model, None
    p = model.image_prompt(image, [""])
    return p.model, p.prefix[0]


def prepare(kind: str, raw: Any, pool: ModelPool, limits: Limits, store: Store) -> Prepared:
    """Check a request against the limits, the model's context and its declared conditioning; its stored form."""
    if not isinstance(raw, dict):
        raise GenlabError("the request body must be a JSON object")
    try:
        r = (ChatRequest if kind == KIND_CHAT else CompletionRequest).model_validate(raw)
    except ValidationError as e:
        raise GenlabError(validation_message(e)) from None
    name = _resolve(r.model, pool)
    model = pool.get(name)
    if model.output is not Output.TEXT:
        raise GenlabError(f"model {name!r} outputs {model.output.value}, not text; use the endpoint for that")
    reads_images, needs_image = Conditioning.IMAGE in model.conditioning, Conditioning.NONE not in model.conditioning
    tok = model.tokenizer
    check_int("n", r.n, 1, limits.max_n, "the server's limit per request")
    if r.logit_bias:
        raise GenlabError("logit_bias is not supported; leave it out")
    images: list[str] = []
    if isinstance(r, ChatRequest):
        if r.response_format not in (None, {"type": "text"}):
            raise GenlabError("response_format: only {type: text} is supported")
        messages, images = _messages(r.messages, limits, store)
        prompts = [encode_chat(tok, messages, add_generation_prompt=True)[0]]
        top = r.top_logprobs if r.logprobs else None
        if r.top_logprobs is not None and not r.logprobs:
            raise GenlabError("top_logprobs needs logprobs: true")
        if top is None and r.logprobs:
            top = 0
        max_tokens = r.max_completion_tokens if r.max_completion_tokens is not None else r.max_tokens
        echo = False
    else:
        if r.suffix:
            raise GenlabError("suffix (insertion) is not supported; leave it out")
        if r.best_of not in (None, r.n):
            raise GenlabError("best_of other than n is not supported; leave it out")
        prompts = _completion_prompts(r.prompt, tok, model, limits)
        top = r.logprobs
        if top is not None:
            check_int("logprobs", top, 0, MAX_COMPLETION_LOGPROBS)
        if r.echo and top is not None:
            raise GenlabError("echo with logprobs is not supported; drop one")
        max_tokens, echo = r.max_tokens, r.echo
    if images and not reads_images:
        raise GenlabError(f"model {name!r} does not read images ({model.takes()}); send text only, or choose a "
                          "model that declares image conditioning")
    if needs_image and not images:
        raise GenlabError(f"model {name!r} answers about an image: add an image_url part to a user message"
                          + ("" if kind == KIND_CHAT else " of /v1/chat/completions"))
    if len(images) > 1:
        raise GenlabError(f"model {name!r} reads one image per conversation; got {len(images)}")
    if top is not None:
        check_int("top_logprobs", top, 0, MAX_TOP_LOGPROBS)
    rows = len(prompts) * r.n
    if rows > limits.max_batch:
        raise GenlabError(f"{len(prompts)} prompts x n={r.n} = {rows} choices; at most {limits.max_batch}")
    image = _image_tensor(model, store, images[0]) if images else None
    decoder, prefix = _decoder(model, image)
    context = int(decoder.config.block_size)
    used = max(len(p) for p in prompts) + (0 if prefix is None else prefix.shape[0])
    if max_tokens is None:
        max_tokens = 16 if kind == KIND_COMPLETION else max(1, min(CHAT_DEFAULT_TOKENS, context - used))
    check_int("max_tokens", max_tokens, 1, MAX_TOKENS)
    if used + max_tokens > context:
        raise GenlabError(f"this model's maximum context length is {context} tokens; the request asks for "
                          f"{used + max_tokens} ({used} in the prompt, {max_tokens} to generate): shorten the "
                          "prompt or lower max_tokens")
    seed = r.seed if r.seed is not None else secrets.randbelow(2**31)
    check_int("seed", seed, 0, MAX_SEED - limits.max_batch)
    params = {"prompts": prompts, "n": r.n, "max_tokens": max_tokens, "stop": _stops(r.stop),
              "temperature": 1.0 if r.temperature is None else r.temperature,
              "top_p": 1.0 if r.top_p is None else r.top_p, "top_k": r.top_k or 0,
              "min_p": r.min_p or 0.0, "repetition_penalty": 1.0 if r.repetition_penalty is None else
              r.repetition_penalty, "presence_penalty": r.presence_penalty or 0.0,
              "frequency_penalty": r.frequency_penalty or 0.0, "logprobs": top, "echo": echo, "stream": r.stream,
              "include_usage": bool((r.stream_options or {}).get("include_usage")), "image": images[0] if images
              else None, "echo_texts": [tok.decode(p) for p in prompts] if echo else None}
    check_number("temperature", params["temperature"], 0, 2, hint="0 is greedy")
    if 0 < params["temperature"] < MIN_TEMPERATURE:
        raise GenlabError(f"temperature={params['temperature']:g}: give 0 (greedy) or at least {MIN_TEMPERATURE:g}")
    check_number("repetition_penalty", params["repetition_penalty"], MIN_PENALTY, 1 / MIN_PENALTY,
                 hint="1 turns it off")
    for key in ("presence_penalty", "frequency_penalty"):
        check_number(key, params[key], -2, 2)
    for req in _requests(params, seed, None):  # the decoder's own checks (top_p, top_k, min_p, ...)
        req.generation_config()
        break
    return Prepared(name, params, seed, json.dumps({"kind": "text", "model": name}), rows)


def _completion_prompts(prompt: Any, tok: Any, model: GenerativeModel, limits: Limits) -> list[list[int]]:
    """Token ids of each prompt: strings after BOS, token-id lists as they are (checked against the vocabulary)."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise GenlabError("prompt is an empty list; give a string, strings or token ids")
    if isinstance(prompt[0], int):
        prompt = [prompt]
    if len(prompt) > limits.max_n:
        raise GenlabError(f"prompt holds {len(prompt)} prompts; at most {limits.max_n}")
    out = []
    for p in prompt:
        if isinstance(p, str):
            if len(p) > limits.max_prompt_chars:
                raise GenlabError(f"prompt has {len(p)} characters; at most {limits.max_prompt_chars}")
            out.append(tok.encode(p, bos=True))
        else:
            if not p or len(p) > limits.max_prompt_chars or any(t < 0 or t >= tok.vocab_size for t in p):
                raise GenlabError(f"a token-id prompt needs 1 to {limits.max_prompt_chars} ids in "
                                  f"[0, {tok.vocab_size})")
            out.append(list(p))
    return out


def _requests(p: dict[str, Any], seed: int, prefix: torch.Tensor | None) -> list[TextRequest]:
    """The rows of a job: prompt i, choice j is row k = i * n + j, seeded seed + k."""
    return [TextRequest(prompt, max_tokens=p["max_tokens"], temperature=p["temperature"], top_p=p["top_p"],
                        top_k=p["top_k"], min_p=p["min_p"], presence_penalty=p["presence_penalty"],
                        frequency_penalty=p["frequency_penalty"], repetition_penalty=p["repetition_penalty"],
                        seed=seed + i * p["n"] + j, stop=p["stop"], logprobs=p["logprobs"], prefix=prefix)
            for i, prompt in enumerate(p["prompts"]) for j in range(p["n"])]


# -- running: continuous batching over the queue ------------------------------------------------------
class _Running:
    """A job in the running batch: its rows and where its text was last published."""

    def __init__(self, job: Job, seqs: list[Sequence]) -> None:
        self.job, self.seqs = job, seqs
        self.published = -1

    def done(self) -> bool:
        return all(s.finish_reason is not None for s in self.seqs)

    def produced(self) -> int:
        return sum(len(s.tokens) for s in self.seqs)

    def partial(self) -> bytes:
        return json.dumps({"choices": [_choice_state(s) for s in self.seqs]}).encode()

    def result(self) -> dict[str, Any]:
        prompt_tokens = sum(s.length for s in self.seqs[:: self.job.params["n"]])
        completion = sum(len(s.tokens) for s in self.seqs)
        return {"created": int(time.time()), "choices": [_choice_state(s) for s in self.seqs],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                          "total_tokens": prompt_tokens + completion}}


def _choice_state(s: Sequence) -> dict[str, Any]:
    """A row's text (what is safe to send while it runs), its tokens' logprobs, finish reason and seed."""
    ev_text = s.text if s.finish_reason is not None else s.text[: s.sent]
    out: dict[str, Any] = {"text": ev_text, "finish_reason": _reason(s.finish_reason), "seed": s.seed}
    if s.req.logprobs is not None:
        infos = s.infos if s.finish_reason is not None else s.infos[: s.sent_tokens]
        out["tokens"] = [[i.text, i.logprob, i.top or []] for i in infos]
    return out


def _reason(reason: str | None) -> str | None:
    return "stop" if reason == "cancelled" else reason


def run_text(jobs: list[Job], model: GenerativeModel, ctx: WorkerContext) -> None:
    """Decode a batch of text jobs with continuous batching, taking in newly queued jobs of the same model (same
    batch key) while rows are free; every job ends (`store.finish` / `fail`) as its last row leaves."""
    store = ctx.store
    batch_key = jobs[0].batch_key
    decoder = None
    running: dict[str, _Running] = {}

    def admit(job: Job) -> None:
        nonlocal decoder
        image = _image_tensor(model, store, job.params["image"]) if job.params["image"] else None
        lm, prefix = _decoder(model, image)
        if decoder is None:
            decoder = BatchDecoder(lm, max_batch=ctx.limits.max_batch)
        running[job.id] = _Running(job, [decoder.add(r) for r in _requests(job.params, job.seed, prefix)])

    for job in jobs:
        try:
            admit(job)
        except GenlabError as e:
            store.fail(job.id, INVALID + str(e))
    try:
        _decode_loop(running, decoder, ctx, batch_key, admit)
    except Exception:  # every job of the batch ends, also those taken in since it started; the worker logs it
        for jid in running:
            store.fail(jid, "internal: text decoding failed")
        raise


def _decode_loop(running: dict[str, _Running], decoder: BatchDecoder | None, ctx: WorkerContext, batch_key: str,
                 admit: Any) -> None:
    store = ctx.store
    started = last_publish = last_check = last_claim = time.monotonic()
    while running and decoder is not None:
        decoder.step()
        now = time.monotonic()
        for jid, run in list(running.items()):
            if run.done():
                errors = [s.error for s in run.seqs if s.finish_reason == "error"]
                if errors:
                    store.fail(jid, f"internal: text decoding failed ({errors[0]})")
                elif not all(s.finish_reason == "cancelled" for s in run.seqs):
                    store.finish(jid, run.result())
                del running[jid]
        publish = now - last_publish >= PUBLISH_S
        check = now - last_check >= CHECK_S
        updates: dict[str, tuple[float, bytes | None]] = {}
        for jid, run in running.items():
            total = len(run.seqs) * run.job.params["max_tokens"]
            progress = min(0.99, run.produced() / total)
            if run.job.params["stream"] and publish and run.published != run.produced():
                run.published = run.produced()
                updates[jid] = (progress, run.partial())
            elif check:
                updates[jid] = (progress, None)
        if updates:
            for jid in store.step(updates):
                for s in running[jid].seqs:
                    s.cancelled = True
                del running[jid]
        if publish:
            last_publish = now
        if check:
            last_check = now
        # newly queued jobs of this model join the running batch, while it has free rows and its window is open
        room = ctx.limits.max_batch - len(decoder.rows) - len(decoder.waiting)
        if room > 0 and now - last_claim >= CLAIM_S and now - started < JOIN_WINDOW_S:
            last_claim = now
            for job in store.claim_key(ctx.worker, batch_key, room):
                try:
                    admit(job)
                except GenlabError as e:
                    store.fail(job.id, INVALID + str(e))


# -- responses ----------------------------------------------------------------------------------------------
def _completion_logprobs(tokens: list[list[Any]], offset: int) -> dict[str, Any]:
    offsets, pos = [], offset
    for t in tokens:
        offsets.append(pos)
        pos += len(t[0])
    return {"tokens": [t[0] for t in tokens], "token_logprobs": [t[1] for t in tokens],
            "top_logprobs": [_top_dict(t[2]) for t in tokens], "text_offset": offsets}


def _top_dict(top: list[Any]) -> dict[str, float]:
    """Alternatives as OpenAI's {token: logprob}, most likely first (two ids with one text keep the likelier)."""
    out: dict[str, float] = {}
    for alt, lp in top:
        out.setdefault(alt, lp)
    return out


def _chat_logprobs(tokens: list[list[Any]]) -> dict[str, Any]:
    def entry(text: str, lp: float) -> dict[str, Any]:
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

    return {"content": [entry(t[0], t[1]) | {"top_logprobs": [entry(a, lp) for a, lp in t[2]]} for t in tokens]}


def respond(job: Job, store: Store, base_url: str) -> dict[str, Any]:
    """OpenAI's completion or chat completion object, with each choice's `seed` and the job's id."""
    result = job.result or {}
    chat = job.kind == KIND_CHAT
    choices = []
    for k, c in enumerate(result.get("choices", [])):
        lp = None
        if "tokens" in c:
            lp = _chat_logprobs(c["tokens"]) if chat else _completion_logprobs(c["tokens"], 0)
        if chat:
            choices.append({"index": k, "message": {"role": "assistant", "content": c["text"]}, "logprobs": lp,
                            "finish_reason": c["finish_reason"], "seed": c["seed"]})
        else:
            echo = job.params["echo_texts"][k // job.params["n"]] if job.params.get("echo_texts") else ""
            choices.append({"index": k, "text": echo + c["text"], "logprobs": lp,
                            "finish_reason": c["finish_reason"], "seed": c["seed"]})
    return {"id": ("chatcmpl-" if chat else "cmpl-") + job.id[4:], "object": "chat.completion" if chat
            else "text_completion", "created": result.get("created", int(job.created)), "model": job.model,
            "choices": choices, "usage": result.get("usage"), "system_fingerprint": None, "seed": job.seed,
            "job": job.id}


register(JobKind(KIND_COMPLETION, functools.partial(prepare, KIND_COMPLETION), run_text, respond))
register(JobKind(KIND_CHAT, functools.partial(prepare, KIND_CHAT), run_text, respond))


# -- the endpoints ------------------------------------------------------------------------------------------
async def _require_key(request: Request) -> None:
    state: ServeState = request.app.state.serve
    if state.key_digests and not key_matches(request.headers.get("authorization"), state.key_digests):
        raise ApiError(401, "missing or wrong API key: send Authorization: Bearer YOUR_KEY",
                       type_="authentication_error")


router = APIRouter(prefix="/v1", dependencies=[Depends(_require_key)])


async def _serve(kind: str, request: Request) -> Any:
    state: ServeState = request.app.state.serve
    job, _ = await state.submit(kind, await _json_body(request), request.headers.get("idempotency-key"))
    if job.params.get("stream"):
        return StreamingResponse(_stream(state, job, request), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await state.result(job, str(request.base_url))


@router.post("/completions")
async def completions(request: Request) -> Any:
    return await _serve(KIND_COMPLETION, request)


@router.post("/chat/completions")
async def chat_completions(request: Request) -> Any:
    return await _serve(KIND_CHAT, request)


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj)}\n\n"


async def _stream(state: ServeState, job: Job, request: Request) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk shapes: text deltas per choice as the job publishes them, a last chunk
    per choice with its finish reason, the usage chunk if asked, then `[DONE]`. A client that goes away cancels
    the job; a job that fails sends OpenAI's error object."""
    chat = job.kind == KIND_CHAT
    head = {"id": ("chatcmpl-" if chat else "cmpl-") + job.id[4:],
            "object": "chat.completion.chunk" if chat else "text_completion", "created": int(job.created),
            "model": job.model, "system_fingerprint": None}
    rows = len(job.params["prompts"]) * job.params["n"]
    sent_text, sent_tokens, ended = [0] * rows, [0] * rows, [False] * rows

    def chunk(k: int, text: str, tokens: list[list[Any]], reason: str | None) -> dict[str, Any]:
        lp = None
        if job.params["logprobs"] is not None and reason is None:
            lp = _chat_logprobs(tokens) if chat else _completion_logprobs(tokens, sent_text[k])
        if chat:
            choice = {"index": k, "delta": {"content": text} if reason is None else {}, "logprobs": lp,
                      "finish_reason": reason}
        else:
            choice = {"index": k, "text": text, "logprobs": lp, "finish_reason": reason}
        return head | {"choices": [choice]}

    def deltas(choices: list[dict[str, Any]], final: bool) -> list[str]:
        out = []
        for k, c in enumerate(choices):
            if ended[k]:
                continue
            text, toks = c["text"][sent_text[k]:], c.get("tokens", [])[sent_tokens[k]:]
            reason = c["finish_reason"] if final else None
            if text or toks:
                out.append(_sse(chunk(k, text, toks, None)))
            if reason:  # the last chunk of a choice carries its finish reason and no text, as OpenAI's do
                out.append(_sse(chunk(k, "", [], reason)))
            sent_text[k], sent_tokens[k] = len(c["text"]), len(c.get("tokens", []))
            ended[k] = reason is not None
        return out

    for k in range(rows):  # chat: the assistant role first; completions with echo: the prompt first
        if chat:
            yield _sse(head | {"choices": [{"index": k, "delta": {"role": "assistant", "content": ""},
                                            "logprobs": None, "finish_reason": None}]})
        elif job.params.get("echo_texts"):
            yield _sse(chunk(k, job.params["echo_texts"][k // job.params["n"]], [], None))
    deadline = time.monotonic() + state.limits.timeout_s
    last_preview = None
    try:
        while True:
            current = await run_in_threadpool(state.store.get, job.id)
            if current is None:
                return
            if current.state in FINAL:
                if current.state == "done":
                    for line in deltas((current.result or {}).get("choices", []), final=True):
                        yield line
                    if job.params["include_usage"]:
                        yield _sse(head | {"choices": [], "usage": (current.result or {}).get("usage")})
                else:
                    message = (current.error or current.state)
                    message = message[len(INVALID):] if message.startswith(INVALID) else message
                    yield _sse(error_body(f"job {job.id} {current.state}: {message}", "server_error"))
                yield "data: [DONE]\n\n"
                return
            if current.state == "running":
                preview = await run_in_threadpool(state.store.preview, job.id)
                if preview and preview != last_preview:
                    last_preview = preview
                    for line in deltas(json.loads(preview)["choices"], final=False):
                        yield line
            if time.monotonic() > deadline:
                state.store.cancel(job.id)
                yield _sse(error_body(f"the request timed out after {state.limits.timeout_s:g} s and its job "
                                      f"{job.id} was cancelled", "timeout"))
                yield "data: [DONE]\n\n"
                return
            if await request.is_disconnected():
                state.store.cancel(job.id)
                return
            await asyncio.sleep(STREAM_POLL_S)
    except asyncio.CancelledError:
        state.store.cancel(job.id)
        raise
