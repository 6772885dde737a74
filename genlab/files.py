"""Files written whole or not at all, and JSON-lines logs read back.

A write goes to a temporary file beside the target, is flushed to disk, then renamed over the target
(rename(2) is atomic on POSIX), so a reader or a killed writer never leaves a half-written file in its place.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from genlab.errors import GenlabError


def fsync_path(path: str | Path) -> None:
    """Flush a file's (or a folder's entries') data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` for a writer that takes a path (safetensors, PIL, matplotlib); when the block
    ends it is fsynced and renamed over `path`, and on an error it is removed. It keeps the suffix, so writers that
    choose a format by suffix still do."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write text (UTF-8) or bytes to `path` atomically and return the path."""
    with atomic_path(path) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding="utf-8")
    return Path(path)


def jsonl_records(text: str, what: str, form: str) -> Iterator[tuple[int, Any]]:
    """(line number from 1, record) of every non-blank line of JSONL `text`. A text split by characters may cut its
    first or last line: such a line that is not JSON is skipped; any other is a one-line error naming `what` and
    the `form` each line must have."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if i in (0, len(lines) - 1):
                continue
            raise GenlabError(f"line {i + 1} of the {what} is not JSON; each line must be {form}") from None
        yield i + 1, record


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file (none when it does not exist). A last line that is not JSON is the torn
    write of a killed process and is skipped; a bad line before it is a one-line error."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise GenlabError(f"line {i + 1} of {path} is not JSON: repair or delete that line") from None
    return records
