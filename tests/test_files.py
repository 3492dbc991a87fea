"""s3fsimg/files.py on real files: the atomic write (complete or absent, modes, no temp file left) and
the flock helpers between processes."""

from __future__ import annotations

import multiprocessing
import os
import stat
import time
from pathlib import Path
from typing import Any

import pytest

from s3fsimg.files import atomic_write, flock, locked, open_lock_file, replace_file

pytestmark = pytest.mark.timeout(60)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_write_appears_whole_with_its_mode_and_leaves_no_temp(tmp_path: Path) -> None:
    dest = tmp_path / "out.bin"
    dest.write_bytes(b"old")
    with atomic_write(dest, fsync=True) as pending:
        pending.write(b"new " * 1000)
        assert dest.read_bytes() == b"old"  # nothing changes before the block ends
        assert pending.path.parent == tmp_path and _mode(pending.path) == 0o600
    assert dest.read_bytes() == b"new " * 1000
    assert _mode(dest) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]

    with atomic_write(dest, mode=0o644) as pending, pending.open("w", encoding="utf-8", newline="\n") as out:
        out.write("text\n")
    assert dest.read_text() == "text\n" and _mode(dest) == 0o644


def test_atomic_write_failure_or_discard_keeps_the_old_file(tmp_path: Path) -> None:
    dest = tmp_path / "out.bin"
    dest.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_write(dest) as pending:
        pending.write(b"half")
        raise RuntimeError("killed halfway")
    with atomic_write(dest) as pending:
        pending.write(b"unwanted")
        pending.discard()
    assert dest.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_atomic_write_with_a_named_temp_and_a_missing_directory(tmp_path: Path) -> None:
    tmp = tmp_path / "tmp-1"
    with pytest.raises(FileNotFoundError), atomic_write(tmp_path / "no" / "such" / "dir", tmp=tmp) as pending:
        pending.write(b"x")
    assert not tmp.exists()  # the rename failed: the temp file is removed
    with atomic_write(tmp_path / "dest", tmp=tmp) as pending:
        pending.write(b"x")
    assert (tmp_path / "dest").read_bytes() == b"x" and not tmp.exists()


def test_replace_file_sets_the_mode_of_a_file_written_elsewhere(tmp_path: Path) -> None:
    tmp = tmp_path / "built"
    tmp.write_bytes(b"db")
    os.chmod(tmp, 0o644)
    replace_file(tmp, tmp_path / "index.sqlite", mode=0o600, fsync=True)
    assert _mode(tmp_path / "index.sqlite") == 0o600 and not tmp.exists()


def _hold(path: str, seconds: float, started: Any) -> None:
    with locked(path):
        started.set()
        time.sleep(seconds)


def test_locked_excludes_other_processes_and_honours_a_deadline(tmp_path: Path) -> None:
    lock = tmp_path / "lock"
    ctx = multiprocessing.get_context("fork")
    started = ctx.Event()
    holder = ctx.Process(target=_hold, args=(str(lock), 1.0, started))
    holder.start()
    try:
        assert started.wait(10)
        with pytest.raises(TimeoutError), locked(lock, deadline=time.monotonic() + 0.2):
            pass
        fd = open_lock_file(lock)
        try:
            assert not flock(fd, wait=False)
            assert not flock(fd, shared=True, wait=False)
        finally:
            os.close(fd)
        with locked(lock, deadline=time.monotonic() + 20):  # taken once the holder lets go
            pass
    finally:
        holder.join(10)
    assert holder.exitcode == 0


def test_shared_flocks_coexist(tmp_path: Path) -> None:
    a, b = open_lock_file(tmp_path / "l"), open_lock_file(tmp_path / "l")
    try:
        assert flock(a, shared=True) and flock(b, shared=True, wait=False)
        assert not flock(a, wait=False)  # b still holds it shared
        flock(b, unlock=True)
        assert flock(a, wait=False)  # upgraded to exclusive
        assert _mode(tmp_path / "l") == 0o600
    finally:
        os.close(a)
        os.close(b)
