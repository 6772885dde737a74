"""Request bounds, API keys and the body-size guard of `genlab serve`."""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from genlab.errors import GenlabError

MAX_KEYS = 10_000


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; past `max_queue` jobs queued or running, requests get 429."""

    max_n: int = 16  # images per request
    max_steps: int = 200  # sampling steps per request
    max_prompt_chars: int = 2000
    max_body_bytes: int = 8 * 2**20  # request bodies (an edit's image and mask included)
    max_image_pixels: int = 1024 * 1024  # an uploaded image, decoded
    max_queue: int = 256  # jobs queued or running
    timeout_s: float = 300.0  # a synchronous request waits this long for its job
    max_batch: int = 64  # images one worker draws in one batch
    batch_wait_s: float = 0.02  # after claiming a batch with room, wait this long for compatible requests to join


def hash_key(key: str) -> str:
    """The stored form of an API key: its SHA-256, hex."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def read_key_file(path: str | Path) -> list[str]:
    """SHA-256 digests of the keys in a file: one per line, `sha256:HEX` (stored hashed) or the key itself (hashed
    here, never kept); blank lines and `#` comments skipped."""
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise GenlabError(f"--api-key-file {path}: cannot read it ({e.__class__.__name__}); give a text file with "
                          "one key (or sha256:HEX) per line") from None
    digests = []
    for i, line in enumerate(lines):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("sha256:"):
            digest = line[len("sha256:"):].lower()
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise GenlabError(f"--api-key-file {path}, line {i + 1}: sha256: must be followed by 64 hex digits")
            digests.append(digest)
        else:
            if len(line) < 16:
                raise GenlabError(f"--api-key-file {path}, line {i + 1}: a key needs at least 16 characters")
            digests.append(hash_key(line))
    if not digests:
        raise GenlabError(f"--api-key-file {path} holds no key; add one per line")
    if len(digests) > MAX_KEYS:
        raise GenlabError(f"--api-key-file {path} holds {len(digests)} keys; at most {MAX_KEYS}")
    return digests


def key_matches(authorization: str | None, digests: list[str]) -> bool:
    """Whether an `Authorization: Bearer KEY` header carries one of the keys, compared in constant time (every
    stored digest is compared, whichever matches)."""
    if not authorization or not authorization.startswith("Bearer "):
        return False
    given = hash_key(authorization[len("Bearer "):].strip())
    ok = False
    for d in digests:
        ok |= hmac.compare_digest(given, d)
    return ok


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class BodyLimit:
    """ASGI middleware: a request whose Content-Length passes `max_bytes` gets 413 before its body is read; a body
    sent without one is read only up to the limit, then refused the same way."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                return await _reply(send, 400, "Content-Length is not a number")
            if n > self.max_bytes:
                return await _too_large(send, self.max_bytes)
            return await self.app(scope, receive, send)
        if scope.get("method") in ("GET", "HEAD", "DELETE", "OPTIONS"):
            return await self.app(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await _too_large(send, self.max_bytes)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, sent = b"".join(chunks), False

        async def replay() -> dict[str, Any]:
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)


async def _too_large(send: Any, max_bytes: int) -> None:
    await _reply(send, 413, f"request body is larger than the server's limit of {max_bytes} bytes; send a smaller "
                 "image or fewer fields")


async def _reply(send: Any, status: int, message: str) -> None:
    body = json.dumps(error_body(message)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
