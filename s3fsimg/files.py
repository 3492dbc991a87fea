"""File mechanisms shared by the modules that keep files on disk (the cache, the index, manifests).

One way to do each: `flock` and `locked` (advisory whole-file locks between processes and
threads: each call opens its own descriptor, so threads of one process exclude each other too).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path


def open_lock_file(path: Path | str) -> int:
    """A descriptor of the lock file `path` (created 0600 when missing; not inherited by children)."""
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)


def flock(fd: int, *, shared: bool = False, wait: bool = True, unlock: bool = False) -> bool:
    """Take (exclusive, or `shared`) or release (`unlock`) the flock of `fd`. With `wait` False, False
    when another holder prevents it; True otherwise."""
    if unlock:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return True
    mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    try:
        fcntl.flock(fd, mode if wait else mode | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


@contextlib.contextmanager
def locked(path: Path | str, *, deadline: float | None = None) -> Iterator[None]:
    """Hold an exclusive flock on the lock file `path`. Without `deadline`, waits as long as it takes;
    with one (a `time.monotonic()` value), polls with a growing delay (2 ms to 50 ms) and raises
    TimeoutError once it has passed."""
    fd = open_lock_file(path)
    try:
        if deadline is None:
            flock(fd)
        else:
            delay = 0.002
            while not flock(fd, wait=False):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{path}: still locked by another process")
                time.sleep(delay)
                delay = min(delay * 2, 0.05)
        yield
    finally:
        os.close(fd)  # releases the lock
