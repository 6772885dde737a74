"""One trainer per run folder: an exclusive advisory lock (flock(2)) on `RUN_DIR/.lock`.

The kernel drops the lock when its holder exits, however it exits (Ctrl-C, SIGKILL, a crash), so a stale lock never
blocks a resume; the holder's pid is written into the file for the error message only.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from genlab.errors import GenlabError

LOCK_NAME = ".lock"


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold the run folder's lock for the duration of the block; GenlabError if another process holds it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise GenlabError(f"{run_dir} is in use by another training process (pid {holder}): wait for it to end, "
                              "or train into another folder (--run-dir or --set name=...)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
