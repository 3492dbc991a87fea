"""`s3fsimg validate`: check a manifest (a local file, or the bucket's) line by line in bounded memory.

Reports every error with its line number and field through `echo` (every independent problem of a
line, see `manifest.Validator`); with `check_objects`, also HEADs every distinct object (in parallel
threads, bounded in flight) and compares its size: once, for the first line of it that has no problem.
"""

from __future__ import annotations

import tempfile
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from s3fsimg.config import Config
from s3fsimg.errors import ManifestError
from s3fsimg.manifest import Validator, object_path
from s3fsimg.s3 import S3Store


class _Stop(Exception):
    pass


def validate(config: Config, manifest: Path | None, *, check_objects: bool = False, max_errors: int = 0,
             echo: Callable[[str], None] = print, workers: int = 16) -> tuple[int, int]:
    """Validate; returns (number of errors, number of valid entries)."""
    store: S3Store | None = None
    if manifest is None or check_objects:
        store = S3Store(config, max_pool=workers + 2)
    with tempfile.TemporaryDirectory(prefix="s3fsimg-manifest-") as tmp:
        if manifest is None:
            assert store is not None
            where = store.where(config.manifest_key)
            manifest = Path(tmp) / "manifest.jsonl"
            with open(manifest, "wb") as f:
                store.download_file(config.manifest_key, f)
        else:
            where = str(manifest)
        return _validate_file(manifest, where, store if check_objects else None, max_errors, echo, workers)


def _validate_file(path: Path, where: str, store: S3Store | None, max_errors: int, echo: Callable[[str], None],
                   workers: int) -> tuple[int, int]:
    errors = 0

    def report(line: str) -> None:
        nonlocal errors
        errors += 1
        echo(line)
        if max_errors and errors >= max_errors:
            raise _Stop

    try:
        f = open(path, "rb")  # noqa: SIM115
    except OSError as exc:
        raise ManifestError(f"{where}: cannot read: {exc.strerror}") from None
    pool = ThreadPoolExecutor(max_workers=workers) if store else None
    pending: deque[tuple[int, str, int, Future[Any]]] = deque()  # line, object path, bytes, its HEAD

    def drain(limit: int) -> None:
        while len(pending) > limit:
            lineno, obj_path, size, fut = pending.popleft()
            head = fut.result()
            assert store is not None
            if head is None:
                report(f"{where}:{lineno}: path: {store.where(obj_path)} does not exist")
            elif head["size"] != size:
                report(f"{where}:{lineno}: bytes: manifest says {size}, the object has {head['size']}")

    try:
        with f, Validator() as validator:
            for lineno, raw in enumerate(f, 1):
                for problem in validator.check_line(lineno, raw):
                    report(problem.format(where))
                fields = validator.fields
                if store is not None and pool is not None and validator.new_object and fields is not None:
                    obj_path = object_path(fields[0], fields[2])  # HEAD each object once
                    pending.append((lineno, obj_path, fields[1], pool.submit(store.stat, obj_path)))
                    drain(workers * 8)
            drain(0)
            entries = validator.entries
    except _Stop:
        echo(f"{where}: stopped after {errors} errors (--max-errors)")
        return errors, 0
    finally:
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
    if entries == 0 and errors == 0:
        report(f"{where}: the manifest has no entries")
    return errors, entries
