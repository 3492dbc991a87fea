"""Cache warm-up: `s3fsimg warm` and `Dataset.prefetch` (as JuiceFS's `warmup` and CernVM-FS's preload).

Fills the cache with complete, verified objects so that the next pass (a training epoch, a mount
read) reads from disk: each object through `ObjectReader.fetch_path` (single-flight per object in
this process, and across processes through the cache's object locks), many at once from a thread
pool, with a progress bar in bytes on a terminal.

What to warm comes as manifest entries: ids (sha256 or logical_id), paths inside a mount of this
program (`targets_for_path`: a file's object from the name or the `user.s3fsimg.sha256` xattr, a
directory's files by listing it, which never touches S3), a file of ids, or the whole manifest.
Entries naming one object are warmed once, in the order given.

The bound: objects are taken in order while their total size stays within the cache bound
(`DATASET_CACHE_MAX_BYTES`); the first one that would pass it ends the plan, and the report says in
one line how much was left out. Warming past the bound would only evict what was just warmed (the
cache is LRU), so the first N images of an epoch's order are the ones kept. Objects already in the
cache count against the bound too, and are marked used, so they are not the next evicted.
"""

from __future__ import annotations

import os
import re
import stat
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import TYPE_CHECKING

from s3fsimg.errors import NotFound, S3fsimgError, UsageError, quoted
from s3fsimg.manifest import Entry
from s3fsimg.units import format_size

if TYPE_CHECKING:
    from s3fsimg.dataset import Dataset
    from s3fsimg.reader import ObjectReader

DEFAULT_THREADS = 32
SHA_XATTR = "user.s3fsimg.sha256"
_SHA_NAME = re.compile(r"^([0-9a-f]{64})\.[A-Za-z0-9]+$")
_MOUNT_TYPE = "fuse.s3fsimg"


@dataclass
class WarmReport:
    """What a warm-up did. `note()` is the one line that says it stopped at the bound, if it did."""

    requested: int = 0  # distinct objects asked for
    requested_bytes: int = 0
    planned: int = 0  # of those, the ones within the bound
    planned_bytes: int = 0
    fetched: int = 0  # fetched from S3 by this warm-up
    fetched_bytes: int = 0
    cached: int = 0  # already complete in the cache
    failed: int = 0
    first_error: str | None = None
    bound: int = 0
    seconds: float = 0.0

    @property
    def stopped_at_bound(self) -> bool:
        return self.planned < self.requested

    @property
    def warmed(self) -> int:
        return self.fetched + self.cached

    def note(self) -> str | None:
        if not self.stopped_at_bound:
            return None
        return (f"note: stopped at the cache bound ({format_size(self.bound)}): {self.planned} of {self.requested} "
                f"images ({format_size(self.planned_bytes)} of {format_size(self.requested_bytes)}) fit; "
                "raise DATASET_CACHE_MAX_BYTES (--cache-max-bytes) to warm the rest")

    def summary(self, where: str) -> str:
        rate = self.fetched_bytes / self.seconds if self.seconds > 0 else 0.0
        images = "image" if self.warmed == 1 else "images"
        return (f"warmed {self.warmed} {images} ({format_size(self.planned_bytes)}) in {where} in {self.seconds:.1f}s: "
                f"{self.fetched} fetched ({format_size(self.fetched_bytes)}, {format_size(int(rate))}/s), "
                f"{self.cached} already cached" + (f", {self.failed} failed" if self.failed else ""))


def distinct(entries: Iterable[Entry]) -> list[Entry]:
    """One entry per object, in first-seen order."""
    seen: set[str] = set()
    out = []
    for entry in entries:
        if entry.sha256 not in seen:
            seen.add(entry.sha256)
            out.append(entry)
    return out


def plan(entries: list[Entry], bound: int) -> list[Entry]:
    """The longest prefix of `entries` whose total size is within `bound`."""
    total = 0
    for i, entry in enumerate(entries):
        total += entry.bytes
        if total > bound:
            return entries[:i]
    return entries


def warm_entries(reader: ObjectReader, entries: Iterable[Entry], *, bound: int, threads: int = DEFAULT_THREADS,
                 progress: bool | None = None) -> WarmReport:
    """Fill the cache with `entries`' objects, within `bound` bytes, `threads` at once.

    Returns when every planned object is in the cache or failed (a failure does not stop the
    others: `report.failed`, `report.first_error`). Ctrl-C cancels what has not started.
    """
    from s3fsimg.progress import progress_bar

    wanted = distinct(entries)
    todo = plan(wanted, bound)
    report = WarmReport(requested=len(wanted), requested_bytes=sum(e.bytes for e in wanted), planned=len(todo),
                        planned_bytes=sum(e.bytes for e in todo), bound=bound)
    started = time.monotonic()

    def one(entry: Entry) -> bool:
        """True when it was fetched now, False when it was already in the cache (now marked used)."""
        if reader.cache.object_path(entry.sha256, entry.ext) is not None:
            return False
        reader.fetch_path(entry)
        return True

    pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="s3fsimg-warm")
    try:
        with progress_bar(total=report.planned_bytes, unit="B", desc="warm", enabled=progress, unit_scale=True,
                          unit_divisor=1024) as bar:
            pending: dict[Future[bool], Entry] = {}
            queue: Iterator[Entry] = iter(todo)
            window = max(1, threads) * 4  # submitted ahead of the threads: a million entries are not a million futures
            while True:
                for entry in queue:
                    pending[pool.submit(one, entry)] = entry
                    if len(pending) >= window:
                        break
                if not pending:
                    break
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    entry = pending.pop(fut)
                    try:
                        if fut.result():
                            report.fetched += 1
                            report.fetched_bytes += entry.bytes
                        else:
                            report.cached += 1
                    except S3fsimgError as exc:
                        report.failed += 1
                        if report.first_error is None:
                            report.first_error = str(exc)
                    bar.update(entry.bytes)
    finally:  # a failure or Ctrl-C does not wait for the fetches not yet started
        pool.shutdown(wait=False, cancel_futures=True)
    report.seconds = time.monotonic() - started
    return report


# -- what to warm -------------------------------------------------------------------------------


def mount_root_of(path: str) -> str | None:
    """The mountpoint of the s3fsimg mount that holds `path` (an absolute, resolved path), or None."""
    best: str | None = None
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields, tail = left.split(), right.split()
                if len(fields) < 5 or not tail or tail[0] != _MOUNT_TYPE:
                    continue
                mp = _unescape(fields[4])
                if (path == mp or path.startswith(mp.rstrip("/") + "/")) and (best is None or len(mp) > len(best)):
                    best = mp
    except OSError:
        return None
    return best


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _sha_of_file(path: str, name: str, in_named_tree: bool) -> str | None:
    """The sha256 of a file of the mount: from its name under images/ and by-id/ (`<sha256>.<ext>`),
    else from its `user.s3fsimg.sha256` attribute; None for a file that is no image (manifest.jsonl)."""
    if in_named_tree and (m := _SHA_NAME.match(name)):
        return m.group(1)
    try:
        return os.getxattr(path, SHA_XATTR).decode("ascii")
    except OSError:
        return None


def shas_for_path(arg: str) -> Iterator[str]:
    """The sha256 of every image at or under `arg`, a file or directory inside a mount of this program."""
    path = os.path.realpath(arg)
    try:
        st = os.stat(path)
    except OSError as exc:
        raise UsageError(f"{quoted(arg)}: {exc.strerror}") from None
    root = mount_root_of(path)
    if root is None:
        raise UsageError(f"{quoted(arg)}: not inside a mount of s3fsimg (name images by id, or by a path in a mount)")
    rel = os.path.relpath(path, root)
    top = rel.split(os.sep, 1)[0]
    named = top in ("images", "by-id")
    if not stat.S_ISDIR(st.st_mode):
        sha = _sha_of_file(path, os.path.basename(path), named)
        if sha is None:
            raise UsageError(f"{quoted(arg)}: not an image of the mount")
        yield sha
        return
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        sub = os.path.relpath(dirpath, root).split(os.sep, 1)[0]
        in_named = sub in ("images", "by-id")
        for name in sorted(filenames):
            sha = _sha_of_file(os.path.join(dirpath, name), name, in_named)
            if sha is not None:
                yield sha


def _is_path(arg: str) -> bool:
    return "/" in arg or arg in (".", "..")


def entries_for(ds: Dataset, targets: Iterable[str]) -> Iterator[Entry]:
    """Entries named by ids (sha256 or logical_id) and by paths in a mount (see `shas_for_path`). An
    argument with a '/' is a path (a logical_id has none); another is an id, or, when no entry has that
    id, a path that exists."""
    for arg in targets:
        if not _is_path(arg):
            try:
                yield ds.resolve(arg)
                continue
            except NotFound:
                if not os.path.lexists(arg):
                    raise
        for sha in shas_for_path(arg):
            entry = ds.index.by_sha256(sha)
            if entry is None:
                raise NotFound(f"{quoted(arg)}: the mount serves an image ({sha[:12]}...) that is not in "
                               f"{ds.config.where(ds.config.manifest_key)}: warm with the mount's configuration")
            yield entry


def read_id_file(path: str) -> Iterator[str]:
    """Ids (or paths) from a file, one a line; blank lines and lines starting with '#' skipped; '-' is stdin."""
    import sys

    try:
        f = sys.stdin if path == "-" else open(path, encoding="utf-8")  # noqa: SIM115
    except OSError as exc:
        raise UsageError(f"--from {quoted(path)}: {exc.strerror}") from None
    try:
        for line in f:
            text = line.strip()
            if text and not text.startswith("#"):
                yield text
    except UnicodeDecodeError:
        raise UsageError(f"--from {quoted(path)}: not UTF-8 text") from None
    finally:
        if f is not sys.stdin:
            f.close()
