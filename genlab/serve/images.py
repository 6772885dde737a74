"""Image jobs: `POST /v1/images/generations` and `/v1/images/edits` in OpenAI's shapes, with genlab's extensions.

What a request may carry follows the model's declared capabilities (`conditioning`, `sample_options`,
`per_item_seeds`), never its family name: a prompt needs text conditioning, a label class-label conditioning,
`steps` / `sampler` / `guidance_scale` the matching sample options, an edit the START option.

Requests with the same model and compatible settings (kind, sampler, steps, schedule, guidance, size, strength,
mask or not) share a batch key, so a worker draws them as one batch; image i of a job uses its own generator
seeded `seed + i` (families with `per_item_seeds`; the others never share a batch), so an image does not depend
on what it was batched with. Every image stores its seed and parameters in a PNG text chunk and in the response.
"""

from __future__ import annotations

import base64
import functools
import io
import json
import math
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, ValidationError

from genlab.commands.sample import _read_image, sampling_params
from genlab.config import SampleConfig, check_int, check_number
from genlab.data.images import save_png, to_uint8
from genlab.errors import GenlabError
from genlab.models.base import Conditioning, GenerativeModel, Output, SampleOption
from genlab.sampling.controls import Guidance, Start
from genlab.sampling.schedules import SCHEDULES
from genlab.sampling.solvers import sampler_options
from genlab.serve.jobs import JobKind, Prepared, WorkerContext, register
from genlab.serve.limits import Limits
from genlab.serve.pool import ModelPool
from genlab.serve.provenance import generator_info, model_hash
from genlab.serve.safety import checker_for
from genlab.serve.store import Job, Store, new_id

MAX_SEED = 2**62  # seeds are stored as SQLite integers (signed 64-bit); seed + i must stay below 2**63
PREVIEW_SIDE = 64  # the per-step preview is at most this many pixels a side


class GenerationRequest(BaseModel):
    """OpenAI's image request (`prompt`, `n`, `size`, `response_format`) with genlab's extra fields."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    prompt: str | None = None
    n: int = 1
    size: str | None = None
    response_format: Literal["b64_json", "url"] = "b64_json"
    negative_prompt: str | None = None
    label: int | None = None
    negative_label: int | None = None
    steps: int | None = None
    temperature: float | None = None
    sampler: str | None = None
    schedule: str | None = None
    guidance_scale: float | None = None
    seed: int | None = None
    strength: float | None = None  # edits only
    output_format: Literal["png"] | None = None
    stream: Literal[False] | None = None
    image: str | None = None  # edits: the stored input's id (set by the server, never a path)
    mask: str | None = None


# OpenAI's fields that do not change what a genlab model draws: accepted and ignored
OPENAI_IGNORED = ("quality", "style", "user", "background", "moderation", "output_compression", "partial_images",
                  "safety_identifier", "input_fidelity", "complexity")


def validation_message(e: ValidationError) -> str:
    """A pydantic error as one line: `field: problem; ...`."""
    parts = []
    for err in e.errors()[:5]:
        loc = ".".join(str(x) for x in err["loc"]) or "body"
        msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts)


def parse_size(size: str) -> tuple[int, int]:
    w, sep, h = size.lower().partition("x")
    if not sep or not w.isdigit() or not h.isdigit() or len(w) > 6 or len(h) > 6:
        raise GenlabError(f"size={size!r} must look like WIDTHxHEIGHT, e.g. 256x256")
    return int(w), int(h)


def resolve_model(name: str | None, pool: ModelPool) -> str:
    """The requested model, or the one image model served when a request names none."""
    if name is not None:
        return pool.entry(name).name
    images = [e.name for e in pool.entries.values() if e.cls.output is Output.IMAGE]
    if len(images) != 1:
        raise GenlabError(f"give model: one of {', '.join(images) or 'none'} (see GET /v1/models)")
    return images[0]


def prepare(kind: str, raw: dict[str, Any], pool: ModelPool, limits: Limits, store: Store) -> Prepared:
    """Check a request against the limits and the model's declared capabilities; its stored form."""
    if not isinstance(raw, dict):
        raise GenlabError("the request body must be a JSON object")
    try:
        r = GenerationRequest.model_validate({k: v for k, v in raw.items() if k not in OPENAI_IGNORED})
    except ValidationError as e:
        raise GenlabError(validation_message(e)) from None
    name = resolve_model(r.model, pool)
    model = pool.get(name)
    if model.output is not Output.IMAGE:
        raise GenlabError(f"model {name!r} outputs {model.output.value}, not images; use /v1/completions")
    takes_opts, takes_cond = model.sample_options, model.conditioning
    check_int("n", r.n, 1, limits.max_n, "the server's limit per request")
    c, h, w = model.image_shape
    size = f"{w}x{h}"
    if r.size is not None and r.size not in ("auto", size):
        sw, sh = parse_size(r.size)
        raise GenlabError(f"size={sw}x{sh}: model {name!r} draws {size} images; ask for size={size}")

    def refuse(field: str, value: Any, needs: SampleOption | Conditioning) -> None:
        if value is not None and needs not in takes_opts | takes_cond:
            raise GenlabError(f"model {name!r} does not take {field} ({model.takes()})")

    prompt = r.prompt if r.prompt else None  # the edits form always carries one; "" is none
    refuse("a prompt", prompt, Conditioning.TEXT)
    refuse("negative_prompt", r.negative_prompt or None, Conditioning.TEXT)
    refuse("label", r.label, Conditioning.CLASS_LABEL)
    refuse("negative_label", r.negative_label, Conditioning.CLASS_LABEL)
    refuse("sampler", r.sampler, SampleOption.SAMPLER)
    refuse("schedule", r.schedule, SampleOption.SAMPLER)
    refuse("steps", r.steps, SampleOption.STEPS)
    refuse("guidance_scale", r.guidance_scale, SampleOption.GUIDANCE)
    refuse("temperature", r.temperature, SampleOption.TEMPERATURE)
    refuse("an image to edit", r.image, SampleOption.START)
    for field, text in (("prompt", prompt), ("negative_prompt", r.negative_prompt)):
        if text is not None and len(text) > limits.max_prompt_chars:
            raise GenlabError(f"{field} has {len(text)} characters; at most {limits.max_prompt_chars}")
    if Conditioning.TEXT in takes_cond and Conditioning.NONE not in takes_cond and prompt is None:
        raise GenlabError(f"model {name!r} draws from a text prompt: give prompt")
    negative = r.negative_prompt or None if Conditioning.TEXT in takes_cond else r.negative_label
    if prompt is not None and r.label is not None:
        raise GenlabError("give a prompt or a label, not both")
    if negative is not None and (r.guidance_scale == 1 or SampleOption.GUIDANCE not in takes_opts):
        raise GenlabError("a negative condition acts through guidance: raise guidance_scale above 1")
    if r.steps is not None:
        check_int("steps", r.steps, 1, limits.max_steps, "the server's limit")
        model.check_sample_config(SampleConfig(steps=r.steps))
    if r.sampler is not None:
        sampler_options(r.sampler)  # an unknown name lists the samplers
    if r.schedule is not None and r.schedule not in SCHEDULES:
        raise GenlabError(f"schedule={r.schedule!r} is unknown; choose one of: {', '.join(SCHEDULES)}")
    if r.guidance_scale is not None:
        check_number("guidance_scale", r.guidance_scale, 0, 100, hint="1 = no guidance")
    if r.temperature is not None:
        check_number("temperature", r.temperature, 0, 10, hint="1 = the model's own density")
    if r.strength is not None:
        if kind != "image.edit":
            raise GenlabError("strength applies to /v1/images/edits")
        check_number("strength", r.strength, 0, 1, hint="0 keeps the image, 1 ignores it")
    if kind == "image.edit" and r.image is None:
        raise GenlabError("an edit needs an image")
    if kind != "image.edit" and (r.image is not None or r.mask is not None):
        raise GenlabError("image and mask are fields of /v1/images/edits (multipart)")
    for field, input_id in (("image", r.image), ("mask", r.mask)):
        if input_id is not None and not input_path(store, input_id).is_file():
            raise GenlabError(f"{field}: unknown input; upload it to /v1/images/edits")
    # the conditions themselves: labels out of range, a label on an unconditional model, ...
    model.labels_for(r.n, prompt if prompt is not None else r.label)
    if negative is not None:
        model.labels_for(r.n, negative)
    seed = r.seed if r.seed is not None else secrets.randbelow(2**31)
    check_int("seed", seed, 0, MAX_SEED)
    params = {"prompt": prompt, "negative": negative, "label": r.label, "n": r.n, "size": size,
              "steps": r.steps, "sampler": r.sampler, "schedule": r.schedule, "guidance_scale": r.guidance_scale,
              "temperature": r.temperature,
              "response_format": r.response_format, "image": r.image, "mask": r.mask, "strength": r.strength,
              "model_hash": model_hash(pool.entry(name).path)}
    key = {"kind": kind, "model": name, "size": size, **{k: params[k] for k in
           ("steps", "sampler", "schedule", "guidance_scale", "temperature", "strength")},
           "negative": negative is not None, "mask": r.mask is not None}
    if not model.per_item_seeds:  # one generator per batch: a job's images would depend on its batch-mates
        key["alone"] = secrets.token_hex(8)
    return Prepared(name, params, seed, json.dumps(key, sort_keys=True), r.n)


# -- running a batch ----------------------------------------------------------------------
class _AllCancelledError(Exception):
    pass


def _sample_kwargs(model: GenerativeModel, p: dict[str, Any], negatives: list[Any] | None,
                   start: Start | None) -> dict[str, Any]:
    kw: dict[str, Any] = {k: p[k] for k in ("sampler", "steps", "schedule", "temperature") if p.get(k) is not None}
    if SampleOption.GUIDANCE in model.sample_options and (p["guidance_scale"] is not None or negatives):
        kw["guidance"] = Guidance(p["guidance_scale"] if p["guidance_scale"] is not None else Guidance.scale,
                                  negative=negatives)
    if start is not None:
        kw["start"] = start
    return kw


def _concat(conds: list[Any]) -> Any:
    """The per-job conditions as one batch's: tensors concatenated, lists joined, None stays None."""
    if all(c is None for c in conds):
        return None
    if all(isinstance(c, torch.Tensor) for c in conds):
        return torch.cat(conds)
    if all(isinstance(c, (list, tuple)) for c in conds):
        return [x for c in conds for x in c]
    if all(isinstance(c, dict) for c in conds):
        return {k: _concat([c[k] for c in conds]) for k in conds[0]}
    raise TypeError("conditions of different kinds")


def _item_cond(cond: Any, i: int) -> Any:
    """Item i's condition as a plain value (a PNG's text chunk and the response)."""
    if isinstance(cond, torch.Tensor):
        return cond[i].tolist()
    if isinstance(cond, (list, tuple)):
        return cond[i]
    return None


def preview_png(x: torch.Tensor) -> bytes:
    """A small PNG of one image in [-1, 1] (C, H, W)."""
    a = to_uint8(x[None])[0]
    im = Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a)
    im.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE))
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def run_batch(jobs: list[Job], model: GenerativeModel, ctx: WorkerContext) -> None:
    """Draw the images of a batch of compatible jobs in one `model.sample` call and end every job."""
    p0 = jobs[0].params
    counts = [j.params["n"] for j in jobs]
    conds = [model.labels_for(j.params["n"], j.params["prompt"] if j.params["prompt"] is not None
                              else j.params["label"]) for j in jobs]
    try:
        cond = _concat(conds)
    except TypeError:  # a family's conditions that do not concatenate: one job at a time
        for j in jobs:
            run_batch([j], model, ctx)
        return
    negatives = [x for j in jobs for x in [j.params["negative"]] * j.params["n"]] if p0["negative"] is not None \
        else None
    start = _start(jobs, model, ctx.store) if p0["image"] is not None else None
    kw = _sample_kwargs(model, p0, negatives, start)
    generator: Any = [torch.Generator().manual_seed(j.seed + i) for j in jobs for i in range(j.params["n"])] \
        if model.per_item_seeds else torch.Generator().manual_seed(jobs[0].seed)
    steps = kw.get("steps") or sampling_params(model, {}).get("steps") or 1
    total = max(1, int(steps * start.resolved_strength) if start is not None else steps)
    offsets = [sum(counts[:k]) for k in range(len(jobs))]
    live = {j.id for j in jobs}
    watched: set[str] = set()
    checker = checker_for(ctx.store.root)  # the output checker, when the server has one

    def shown(x: torch.Tensor) -> bytes:
        """A preview, black when the checker blocks the current denoised image."""
        return preview_png(checker.screen(x[None])[0][0] if checker is not None else x)

    def callback(d: dict[str, Any]) -> None:
        """Progress every step; a preview of the current denoised image for the jobs someone follows."""
        progress = min(0.99, (int(d["i"]) + 1) / total)
        denoised = d.get("denoised")
        updates = {j.id: (progress, shown(denoised[off]) if denoised is not None and j.id in watched else None)
                   for j, off in zip(jobs, offsets) if j.id in live}
        cancelled, now_watched = ctx.store.step_watched(updates)
        live.difference_update(cancelled)
        watched.clear()
        watched.update(now_watched)
        if not live:
            raise _AllCancelledError

    if SampleOption.SAMPLER in model.sample_options:  # the samplers call back once per step
        kw["callback"] = callback
    t0 = time.perf_counter()
    try:
        x = model.sample(sum(counts), cond=cond, generator=generator, **kw)
    except _AllCancelledError:
        return
    seconds = time.perf_counter() - t0
    verdicts = None
    if checker is not None:
        x, verdicts = checker.screen(x)
    _write_outputs(jobs, model, x, cond, kw, ctx.store, live, seconds, verdicts)


def _start(jobs: list[Job], model: GenerativeModel, store: Store) -> Start:
    """The edits' start images (and masks), one per image, read back from the stored inputs."""
    c, size, _ = model.image_shape
    images, masks = [], []
    for j in jobs:
        n = j.params["n"]
        images.append(_read_image(str(input_path(store, j.params["image"])), c, size, "image").expand(n, -1, -1, -1))
        if j.params["mask"] is not None:
            masks.append(_read_image(str(input_path(store, j.params["mask"])), 1, size, "mask")
                         .expand(n, -1, -1, -1))
    return Start(torch.cat(images), strength=jobs[0].params["strength"], mask=torch.cat(masks) if masks else None)


def _write_outputs(jobs: list[Job], model: GenerativeModel, x: torch.Tensor, cond: Any, kw: dict[str, Any],
                   store: Store, live: set[str], seconds: float, verdicts: list[Any] | None = None) -> None:
    params = sampling_params(model, {k: v for k, v in kw.items() if k not in ("start", "callback")})
    params.pop("guidance", None)
    params.pop("negative_label", None)
    params = json.loads(json.dumps(params, default=str))  # plain JSON values whatever a family's defaults are
    images = to_uint8(x)
    k = 0
    for j in jobs:
        n = j.params["n"]
        if j.id not in live:
            k += n
            continue
        data, outputs = [], []
        for i in range(n):
            oid = new_id("img")
            item = {**generator_info(), "model": j.model, "model_hash": j.params.get("model_hash"),
                    "family": model.family, **params, "seed": j.seed + i,
                    "prompt": j.params["prompt"], "negative": j.params["negative"],
                    "label": _item_cond(cond, k) if j.params["prompt"] is None else None,
                    "strength": j.params["strength"] if j.params["image"] is not None else None,
                    "edit": j.params["image"] is not None, "mask": j.params["mask"] is not None}
            if verdicts is not None:
                item["safety"] = verdicts[k].as_dict()
            save_png(images[k], store.outputs_dir / f"{oid}.png", item)
            data.append({"id": oid, "seed": j.seed + i, "params": item,
                         "blocked": bool(verdicts is not None and verdicts[k].blocked)})
            outputs.append((oid, f"{oid}.png", "image/png"))
            k += 1
        store.finish(j.id, {"created": int(time.time()), "data": data, "batch_images": len(images),
                            "batch_seconds": round(seconds, 4)}, outputs)


def respond(job: Job, store: Store, base_url: str) -> dict[str, Any]:
    """OpenAI's images response: `created`, `data` [{b64_json | url, revised_prompt}], plus each image's `id`,
    `seed` and `params`, the job's id and its batch (images drawn together, seconds)."""
    result = job.result or {}
    data = []
    for item in result.get("data", []):
        out = {"revised_prompt": item["params"].get("prompt"), "id": item["id"], "seed": item["seed"],
               "params": item["params"], "blocked": item.get("blocked", False)}
        if job.params["response_format"] == "url":
            out["url"] = f"{base_url.rstrip('/')}/v1/outputs/{item['id']}"
        else:
            found = store.output(item["id"])
            out["b64_json"] = base64.b64encode(found[0].read_bytes()).decode() if found else None
        data.append(out)
    return {"created": result.get("created", int(job.created)), "data": data, "job": job.id,
            "batch": {"images": result.get("batch_images"), "seconds": result.get("batch_seconds")}}


# -- the uploads of an edit ---------------------------------------------------------------
@dataclass(frozen=True)
class Upload:
    filename: str
    data: bytes


def input_path(store: Store, input_id: str) -> Path:
    if not isinstance(input_id, str) or not input_id.startswith("in_") or not input_id[3:].isalnum():
        raise GenlabError("unknown input image")
    return store.inputs_dir / f"{input_id}.png"


def _decode(upload: Upload, what: str, limits: Limits) -> Image.Image:
    """An uploaded file as a PIL image, refused unless it is a PNG, JPEG or WebP of bounded size."""
    if not upload.data:
        raise GenlabError(f"{what} is empty; upload a PNG image")
    Image.MAX_IMAGE_PIXELS = limits.max_image_pixels
    try:
        im = Image.open(io.BytesIO(upload.data))
        if im.format not in ("PNG", "JPEG", "WEBP"):
            raise GenlabError(f"{what} is {im.format or 'not an image'}; upload a PNG (or JPEG, WebP)")
        w, h = im.size
        if w * h > limits.max_image_pixels or w < 1 or h < 1:
            raise GenlabError(f"{what} is {w}x{h} pixels; at most {limits.max_image_pixels} pixels")
        im.load()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        raise GenlabError(f"{what} is not a readable image; upload a PNG") from None
    return im


def _alpha_mask(im: Image.Image) -> Image.Image | None:
    """OpenAI's mask convention: fully transparent pixels are edited; as genlab's mask (white = generate)."""
    if "A" not in im.getbands() and "transparency" not in im.info:
        return None
    alpha = im.convert("RGBA").getchannel("A")
    return alpha.point(lambda v: 255 if v < 128 else 0)


def store_edit_inputs(store: Store, image: Upload, mask: Upload | None, limits: Limits) -> tuple[str, str | None]:
    """Save an edit's image (and mask, white = generate, or taken from transparency as OpenAI's API does) as PNGs
    under opaque ids in the data folder; returns the ids."""
    im = _decode(image, "image", limits)
    if mask is not None:
        m = _decode(mask, "mask", limits)
        mask_im = _alpha_mask(m) or m.convert("L")
        if mask_im.size != im.size:
            raise GenlabError(f"mask is {mask_im.size[0]}x{mask_im.size[1]} but image is {im.size[0]}x{im.size[1]}; "
                              "give them the same size")
    else:
        mask_im = _alpha_mask(im)
        if mask_im is not None and mask_im.getextrema()[1] == 0:
            mask_im = None  # an opaque image: img2img
    image_id = f"in_{secrets.token_hex(16)}"
    _save(im.convert("RGB"), input_path(store, image_id))
    mask_id = None
    if mask_im is not None:
        mask_id = f"in_{secrets.token_hex(16)}"
        _save(mask_im, input_path(store, mask_id))
    return image_id, mask_id


def _save(im: Image.Image, path: Path) -> None:
    import numpy as np

    a = np.asarray(im)
    save_png(a[..., None] if a.ndim == 2 else a, path)


def edit_form(form: dict[str, str]) -> dict[str, Any]:
    """The text fields of a multipart edit request as typed values (form fields arrive as strings)."""
    ints = ("n", "label", "negative_label", "steps", "seed")
    floats = ("guidance_scale", "strength", "temperature")
    out: dict[str, Any] = {}
    for key, value in form.items():
        if key in ints:
            try:
                out[key] = int(value)
            except ValueError:
                raise GenlabError(f"{key}: {value[:40]!r} is not an integer") from None
        elif key in floats:
            try:
                out[key] = float(value)
            except ValueError:
                raise GenlabError(f"{key}: {value[:40]!r} is not a number") from None
            if not math.isfinite(out[key]):
                raise GenlabError(f"{key} must be a finite number")
        else:
            out[key] = value
    return out


register(JobKind("image.generation", functools.partial(prepare, "image.generation"), run_batch, respond))
register(JobKind("image.edit", functools.partial(prepare, "image.edit"), run_batch, respond))
