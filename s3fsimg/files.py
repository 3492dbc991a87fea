"""File mechanisms shared by the modules that keep files on disk (the cache, the index, manifests).

One way to do each:
- `atomic_write` / `replace_file`: a file appears complete or not at all. It is written to a temp
  file (in the same directory as its destination, or in a directory the caller names on the same
  file system), optionally fsynced, given its mode, then renamed over the destination (and with
  fsync, the directory is fsynced after the rename, so the new name survives a power loss). On any
  error the temp file is removed and the destination is untouched.
- `flock` and `locked`: advisory whole-file locks between processes and threads (each `locked`
  opens its own descriptor, so threads of one process exclude each other too).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

_PRIVATE = 0o600  # the mode temp files are created with


class PendingFile:
    """A temp file being written by `atomic_write`: `path`, an open descriptor `fd` (write-only),
    `write` (all of the bytes), `open` (a file object on `fd` that leaves it open when closed), and
    `discard` (remove it at the end instead of renaming it)."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self.fd = fd
        self.keep = True

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]

    def open(self, mode: str = "wb", **kwargs: Any) -> IO[Any]:
        """E.g. `with pending.open("w", encoding="utf-8", newline="\\n") as out:` (close it, which
        flushes, before the `atomic_write` block ends)."""
        return open(self.fd, mode, closefd=False, **kwargs)

    def discard(self) -> None:
        self.keep = False


@contextlib.contextmanager
def atomic_write(dest: Path, *, tmp: Path | None = None, mode: int = _PRIVATE,
                 fsync: bool = False) -> Iterator[PendingFile]:
    """Write `dest` atomically: yields a new temp file (created 0600 at `tmp`, or beside `dest` as
    `.<name>.<random>`); when the block ends without an exception (and without `discard`), the file
    is fsynced if asked, given `mode` and renamed over `dest` (see `replace_file`). The caller may do
    more work inside the block after writing (it happens before the rename)."""
    if tmp is None:
        fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
        tmp = Path(name)
    else:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, _PRIVATE)
    pending = PendingFile(tmp, fd)
    renamed = False
    try:
        try:
            yield pending
            if pending.keep and fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        if pending.keep:
            replace_file(tmp, dest, mode=None if mode == _PRIVATE else mode, fsync_dir=fsync)
            renamed = True
    finally:
        if not renamed:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def replace_file(tmp: Path, dest: Path, *, mode: int | None = None, fsync: bool = False,
                 fsync_dir: bool | None = None) -> None:
    """The last step of an atomic write, alone for a temp file written by someone else (SQLite): give
    the complete temp file `tmp` its `mode` (None: leave it), fsync it if asked, rename it over
    `dest`, then fsync the directory (by default when `fsync`)."""
    if mode is not None:
        os.chmod(tmp, mode)
    if fsync:
        fsync_path(tmp)
    os.replace(tmp, dest)
    if fsync if fsync_dir is None else fsync_dir:
        fsync_path(dest.parent, directory=True)


def fsync_path(path: Path, *, directory: bool = False) -> None:
    """fsync a file by name; for a directory, errors are ignored (some file systems refuse it)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | (os.O_DIRECTORY if directory else 0))
    except OSError:
        if directory:
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


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
