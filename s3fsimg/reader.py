"""Serving bytes of content-addressed objects: from the disk cache, else from S3 by byte range.

`ObjectReader` owns the data path policy; `cache.DiskCache` owns the disk. All methods block and
are thread-safe: the Python API calls them from its threads, the filesystem from trio worker
threads (`trio.to_thread.run_sync(..., limiter=...)`), so the event loop never waits on S3.

How a read `(entry, offset, size)` is served (`Stream.read`):
1. A complete, verified object in the cache -> `pread` on a file descriptor kept per stream.
2. Small objects (<= `whole_object_max`) and *suspect* ones (which failed verification before)
   are fetched whole (`fetch_path`): one GET (or parallel part GETs above `part_size`), hashed,
   renamed into the cache; no byte is served before the sha256 matched.
3. Larger objects are read in fixed blocks (`block_size`). A block is taken from the cache, or from
   a GET already in flight in this process for it (single-flight: one GET per block however many
   threads want it), or fetched now by the reading thread, contiguous missing blocks in one ranged
   GET. Sequential reading (a read starting where the stream's previous read ended) schedules
   read-ahead of the following blocks in background threads, in a window that doubles from 4
   blocks up to `max_readahead`, and covers the whole rest of the object once that fits in the
   window; a read waits only for the blocks it needs.
4. Whenever every block of an object is in the cache, the object is assembled, its sha256 checked,
   and it becomes a complete object (blocks dropped). A mismatch drops every block, marks the object
   suspect (so step 2 applies to it from then on) and fails the read that completed it, and every
   later read of each stream that served blocks of it (a read-ahead thread may have been the one to
   complete it): an object whose bytes do not hash to its sha256 never reads back whole without an
   error.

Every S3 response is checked against the manifest: the object's total size (Content-Range) and,
where the manifest has one, the ETag, so an object replaced in the bucket fails the first range that
sees it. S3 faults are retried until `read_deadline` (`S3Store.get_range`), then raise BackendError.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path

from s3fsimg.cache import DiskCache
from s3fsimg.config import Config
from s3fsimg.errors import BackendError, CacheError, IntegrityError, S3fsimgError
from s3fsimg.manifest import Entry
from s3fsimg.s3 import GetResult, S3Store

log = logging.getLogger(__name__)

_HAVE_NOWAIT = hasattr(os, "RWF_NOWAIT") and hasattr(os, "preadv")
PART_SIZE = 8 << 20  # largest single GET of a whole-object fetch or a read-ahead run
BULK_READ = 512 << 10  # a first read at least this large asks for the whole object (see Stream._read_blocks)
MAX_READAHEAD = 8 << 20  # read-ahead window limit per stream
_EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
_GAVE_UP_HOLD = 2.0  # seconds after S3 failed an object in which a read of it is not retried (see ObjectReader._get)


@dataclass
class ReaderStats:
    """Counters of one reader (one process). `snapshot()` is what `s3fsimg stats` shows."""

    reads: int = 0
    bytes_read: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    s3_requests: int = 0
    s3_bytes: int = 0
    readahead_requests: int = 0
    errors: int = 0
    integrity_errors: int = 0
    uncached_writes: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, value in counts.items():
                setattr(self, name, getattr(self, name) + value)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {k: v for k, v in vars(self).items() if not k.startswith("_")}


class ObjectReader:
    """Reads objects through the cache. One per process (not shared across fork())."""

    def __init__(self, config: Config, cache: DiskCache | None = None, store: S3Store | None = None, *,
                 threads: int = 16) -> None:
        self.config = config
        self.block_size = config.block_size
        self.whole_object_max = config.whole_object_max
        self.part_size = max(PART_SIZE, self.block_size)
        self.max_readahead = max(MAX_READAHEAD, self.block_size)
        self.cache = cache or DiskCache(config.cache_dir, config.cache_max_bytes)
        # botocore's own retries are off (max_attempts=0): its backoff (up to 20 s a try) knows
        # nothing of the read deadline; `S3Store.get_range` retries within it instead.
        self.store = store or S3Store(config, max_pool=threads * 2 + 8, max_attempts=0)
        self.stats = ReaderStats()
        self._lock = threading.Lock()
        self._inflight: dict[tuple[str, int], Future[bytes]] = {}
        self._whole: dict[str, Future[Path]] = {}
        self._suspect: set[str] = set()
        self._failures: dict[str, int] = {}
        self._gave_up: dict[str, float] = {}  # sha256 -> when S3 last failed it: see `_get`
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="s3fsimg-fetch")
        self._closed = False

    def close(self) -> None:
        self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.cache.close()

    def __enter__(self) -> ObjectReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open_stream(self, entry: Entry) -> Stream:
        return Stream(self, entry)

    def _deadline(self) -> float:
        return time.monotonic() + self.config.read_deadline

    # -- whole objects -----------------------------------------------------------------------------
    def fetch_path(self, entry: Entry) -> Path:
        """The path of the complete, verified object in the cache, fetching it if needed."""
        path = self.cache.object_path(entry.sha256, entry.ext)
        if path is not None:
            self.stats.add(cache_hits=1)
            return path
        with self._lock:
            fut = self._whole.get(entry.sha256)
            mine = fut is None
            if fut is None:
                fut = self._whole[entry.sha256] = Future()
        if not mine:
            return fut.result()
        try:
            path = self._fetch_whole(entry)
            fut.set_result(path)
            return path
        except BaseException as exc:
            fut.set_exception(exc)
            raise
        finally:
            with self._lock:
                self._whole.pop(entry.sha256, None)

    def _fetch_whole(self, entry: Entry) -> Path:
        deadline = self._deadline()
        with self.cache.object_lock(entry.sha256, deadline):
            path = self.cache.object_path(entry.sha256, entry.ext)
            if path is not None:  # another process fetched it while we waited
                self.stats.add(cache_hits=1)
                return path
            self.stats.add(cache_misses=1)
            data = self.download_verified(entry, deadline)
            path = self.cache.put_object_bytes(data, entry.sha256, entry.ext)
            if path is None:
                raise CacheError(f"{self.cache.root}: cannot store {entry.sha256} in the cache (disk full or "
                                 "not writable)")
            return path

    def download_verified(self, entry: Entry, deadline: float | None = None) -> bytes:
        """All bytes of an object from S3, checked against its sha256 (IntegrityError otherwise)."""
        data = self._download(entry, deadline if deadline is not None else self._deadline())
        digest = hashlib.sha256(data).hexdigest()
        if digest != entry.sha256:
            self._integrity_failure(entry, f"its bytes hash to {digest[:16]}…, not to its sha256")
        with self._lock:
            self._suspect.discard(entry.sha256)
        return data

    def _download(self, entry: Entry, deadline: float) -> bytes:
        """All bytes of an object: one GET, or parallel GETs of `part_size` parts."""
        if entry.bytes == 0:
            return b""
        if entry.bytes <= self.part_size:
            return self._get(entry, 0, entry.bytes, deadline).data
        starts = range(0, entry.bytes, self.part_size)
        futures = [self._pool.submit(self._get, entry, s, min(s + self.part_size, entry.bytes), deadline)
                   for s in starts]
        return b"".join(f.result().data for f in futures)

    def _get(self, entry: Entry, start: int, end: int, deadline: float) -> GetResult:
        """One ranged GET, checked against the manifest's size and ETag.

        When S3 failed this object (after its retries) less than `_GAVE_UP_HOLD` ago, one attempt is
        made, without retries: the kernel re-sends a failed READ (one page, after a failed
        read-ahead), which must not wait a whole deadline again before read(2) returns EIO, and a
        read right after S3 came back still succeeds."""
        now = time.monotonic()
        with self._lock:
            failed_at = self._gave_up.get(entry.sha256)
        if failed_at is not None and now - failed_at < _GAVE_UP_HOLD:
            deadline = min(deadline, now)
        try:
            result = self.store.get_range(entry.path, start, end, deadline=deadline)
        except BackendError:
            now = time.monotonic()
            with self._lock:
                if len(self._gave_up) >= 256:
                    self._gave_up = {k: t for k, t in self._gave_up.items() if now - t < _GAVE_UP_HOLD}
                self._gave_up[entry.sha256] = now
            raise
        if failed_at is not None:
            with self._lock:
                self._gave_up.pop(entry.sha256, None)
        self.stats.add(s3_requests=1, s3_bytes=len(result.data))
        if result.total_size is not None and result.total_size != entry.bytes:
            self._integrity_failure(entry, f"S3 has {result.total_size} bytes, the manifest says {entry.bytes} "
                                           "(object replaced?)")
        if entry.etag and result.etag and result.etag != entry.etag:
            self._integrity_failure(entry, f"S3 returns ETag {result.etag}, the manifest says {entry.etag} "
                                           "(object replaced)")
        return result

    def _integrity_failure(self, entry: Entry, why: str) -> None:
        with self._lock:
            self._suspect.add(entry.sha256)
            self._failures[entry.sha256] = self._failures.get(entry.sha256, 0) + 1
        self.stats.add(integrity_errors=1)
        self.cache.drop_object(entry.sha256, entry.ext)
        raise IntegrityError(f"{self.store.where(entry.path)}: {why}")

    def is_suspect(self, sha256: str) -> bool:
        with self._lock:
            return sha256 in self._suspect

    def failure_count(self, sha256: str) -> int:
        """How many times the object failed verification in this process (see `Stream.read`). A dict
        read is atomic: no lock on this per-read path."""
        return self._failures.get(sha256, 0)

    # -- blocks ------------------------------------------------------------------------------------
    def block_length(self, entry: Entry, index: int) -> int:
        return min(self.block_size, entry.bytes - index * self.block_size)

    def block_count(self, entry: Entry) -> int:
        return (entry.bytes + self.block_size - 1) // self.block_size

    def read_blocks(self, entry: Entry, first: int, last: int, deadline: float) -> tuple[list[bytes], bool]:
        """Blocks first..last (inclusive), in order; and whether any came from S3."""
        got: dict[int, bytes] = {}
        waiting: dict[int, Future[bytes]] = {}
        missing: list[int] = []
        for i in range(first, last + 1):
            with self._lock:
                fut = self._inflight.get((entry.sha256, i))
            if fut is not None:
                waiting[i] = fut
                continue
            data = self.cache.get_block(entry.sha256, self.block_size, i, self.block_length(entry, i))
            if data is not None:
                got[i] = data
            else:
                missing.append(i)
        if got and not missing and not waiting:
            self.stats.add(cache_hits=1)
        fetched = False
        if missing:
            self.stats.add(cache_misses=1)
            runs = self._claim(entry, missing, waiting)
            for run_first, run_last, futures in runs:
                self._fetch_run(entry, run_first, run_last, futures, deadline)
                fetched = True
        for i, fut in waiting.items():
            remaining = max(0.0, deadline - time.monotonic()) + 1.0
            try:
                got[i] = fut.result(timeout=remaining)
            except FutureTimeout:
                raise BackendError(f"{self.store.where(entry.path)}: block {i} was not fetched within the read "
                                   "deadline") from None
        return [got[i] for i in range(first, last + 1)], fetched

    def _claim(self, entry: Entry, wanted: list[int], waiting: dict[int, Future[bytes]],
               max_run: int | None = None) -> list[tuple[int, int, dict[int, Future[bytes]]]]:
        """Register this thread as the fetcher of each wanted block nobody is fetching; group them into
        runs of contiguous blocks. Blocks already in flight go to `waiting`."""
        max_blocks = max(1, (max_run or self.part_size) // self.block_size)
        runs: list[tuple[int, int, dict[int, Future[bytes]]]] = []
        with self._lock:
            for i in wanted:
                key = (entry.sha256, i)
                existing = self._inflight.get(key)
                if existing is not None:
                    waiting[i] = existing
                    continue
                fut: Future[bytes] = Future()
                self._inflight[key] = fut
                waiting[i] = fut
                if runs and runs[-1][1] == i - 1 and i - runs[-1][0] < max_blocks:
                    run_first, _, futures = runs[-1]
                    futures[i] = fut
                    runs[-1] = (run_first, i, futures)
                else:
                    runs.append((i, i, {i: fut}))
        return runs

    def _fetch_run(self, entry: Entry, first: int, last: int, futures: dict[int, Future[bytes]],
                   deadline: float) -> None:
        """GET blocks first..last in one range; resolve their futures; store them in the cache.

        When the run reaches the object's end and every block before it is cached, the object is
        verified in memory and stored complete at once (no block files): the usual case of a file
        read from its start to its end."""
        start = first * self.block_size
        end = min((last + 1) * self.block_size, entry.bytes)
        try:
            result = self._get(entry, start, end, deadline)
        except BaseException as exc:
            self._fail_futures(entry, futures, exc)
            return
        final = last == self.block_count(entry) - 1
        view = memoryview(result.data)
        blocks = {i: bytes(view[(i - first) * self.block_size:(i - first) * self.block_size
                                + self.block_length(entry, i)]) for i in range(first, last + 1)}
        # Readers of the blocks before the object's last one get them at once. The last block is
        # held back until the whole object is verified (below), so a reader can never read an object
        # to its end without that check. Futures stay in `_inflight` until their bytes are on disk,
        # so a read arriving meanwhile takes them from memory instead of making another GET.
        for i in range(first, last if final else last + 1):
            futures[i].set_result(blocks[i])
        completed = False
        if final:
            try:
                completed = self._complete_with(entry, first, result.data)
            except BaseException as exc:
                self._fail_futures(entry, {last: futures[last]}, exc)
                self._forget(entry, futures)
                return
        if not completed:
            for i, block in blocks.items():
                if not self.cache.put_block(entry.sha256, self.block_size, i, block):
                    self.stats.add(uncached_writes=1)
        if final:
            futures[last].set_result(blocks[last])
        self._forget(entry, futures)

    def _forget(self, entry: Entry, futures: dict[int, Future[bytes]]) -> None:
        with self._lock:
            for i in futures:
                self._inflight.pop((entry.sha256, i), None)

    def _fail_futures(self, entry: Entry, futures: dict[int, Future[bytes]], exc: BaseException) -> None:
        with self._lock:
            for i, fut in futures.items():
                self._inflight.pop((entry.sha256, i), None)
                fut.set_exception(exc)

    def _complete_with(self, entry: Entry, first: int, tail: bytes) -> bool:
        """Blocks 0..first-1 from the cache + `tail` = the whole object? Verify it and store it complete.
        Raises IntegrityError on a mismatch; False when earlier blocks are missing or the disk is full."""
        head: list[bytes] = []
        for i in range(first):
            block = self.cache.get_block(entry.sha256, self.block_size, i, self.block_length(entry, i))
            if block is None:
                return False
            head.append(block)
        data = b"".join([*head, tail]) if head else tail
        digest = hashlib.sha256(data).hexdigest()
        if digest != entry.sha256:
            self._integrity_failure(entry, f"its bytes hash to {digest[:16]}…, not to its sha256")
        with self._lock:
            self._suspect.discard(entry.sha256)
        return self.cache.put_object_bytes(data, entry.sha256, entry.ext) is not None

    def prefetch(self, entry: Entry, first: int, last: int) -> None:
        """Start fetching blocks first..last that are neither cached nor in flight; do not wait."""
        if self._closed:
            return
        wanted = [i for i in range(first, last + 1)
                  if (entry.sha256, i) not in self._inflight and not self.cache.has_block(
                      entry.sha256, self.block_size, i)]
        if not wanted:
            return
        deadline = self._deadline()
        for run_first, run_last, futures in self._claim(entry, wanted, {}):
            self.stats.add(readahead_requests=1)
            self._pool.submit(self._prefetch_run, entry, run_first, run_last, futures, deadline)

    def _prefetch_run(self, entry: Entry, first: int, last: int, futures: dict[int, Future[bytes]],
                      deadline: float) -> None:
        self._fetch_run(entry, first, last, futures, deadline)
        if last == self.block_count(entry) - 1:
            with contextlib.suppress(S3fsimgError):
                self.complete_if_whole(entry)

    def complete_if_whole(self, entry: Entry) -> bool:
        """If every block of the object is cached, verify it and make it a complete object (True).
        Raises IntegrityError on a mismatch, like the read that completes an object in one GET."""
        n = self.block_count(entry)
        if not all(self.cache.has_block(entry.sha256, self.block_size, i) for i in range(n)):
            return False
        return self._complete_with(entry, n, b"")


class Stream:
    """Reads of one open file: keeps the sequential-read state and the descriptor of a complete object."""

    def __init__(self, reader: ObjectReader, entry: Entry) -> None:
        self.reader = reader
        self.entry = entry
        self._fd: int | None = None
        self._memory: bytes | None = None  # the verified object, when the cache could not store it
        self._next_offset = -1
        self._window = 0
        self._lock = threading.Lock()
        self._failures_seen = reader.failure_count(entry.sha256)
        self._served_blocks = False  # bytes not yet verified were served (see `read`)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def _adopt(self, fd: int) -> int:
        """Keep `fd` as this stream's descriptor of the complete object, unless a concurrent read
        already set one (then `fd` is closed); returns the one kept."""
        with self._lock:
            if self._fd is None:
                self._fd = fd
            else:
                os.close(fd)
            return self._fd

    def _complete_fd(self) -> int | None:
        if self._fd is None:
            fd = self.reader.cache.open_object(self.entry.sha256, self.entry.ext)
            if fd is not None:
                return self._adopt(fd)
        return self._fd

    def _open_whole(self) -> int | None:
        """Fetch the whole object into the cache and open it; when the cache cannot take it (disk
        full), keep the verified bytes in memory instead (returns None)."""
        try:
            path = self.reader.fetch_path(self.entry)
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except (CacheError, FileNotFoundError):
            self._memory = self.reader.download_verified(self.entry)
            return None
        return self._adopt(fd)

    def read_nowait(self, offset: int, size: int) -> bytes | bytearray | None:
        """The bytes, if they can be had without blocking: the object is complete in the cache, this
        stream has it open already, and the kernel has the range in its page cache (`RWF_NOWAIT`).
        Else None, and the caller uses `read` from a worker thread. Lets the filesystem answer warm
        reads on its event loop without a thread hand-off."""
        fd = self._fd
        if fd is None or not _HAVE_NOWAIT:
            return None
        size = min(size, self.entry.bytes - offset)
        if size <= 0 or offset < 0:
            return b""
        buf = bytearray(size)
        try:
            n = os.preadv(fd, [buf], offset, os.RWF_NOWAIT)
        except (BlockingIOError, OSError):
            return None
        if n != size:
            return None
        self.reader.stats.add(reads=1, bytes_read=n, cache_hits=1)
        return buf  # no copy into bytes: the filesystem replies straight from this buffer

    def read(self, offset: int, size: int) -> bytes:
        """Bytes [offset, offset+size) of the object, short at its end; b"" at or after it."""
        entry, reader = self.entry, self.reader
        size = min(size, entry.bytes - offset)
        if size <= 0 or offset < 0:
            return b""
        try:
            fd = self._complete_fd()
            hit = fd is not None
            if not hit and self._memory is None and (entry.bytes <= reader.whole_object_max
                                                     or reader.is_suspect(entry.sha256)):
                fd = self._open_whole()
            if fd is not None:
                data = os.pread(fd, size, offset)
            elif self._memory is not None:
                data = self._memory[offset:offset + size]
            else:
                data = self._read_blocks(offset, size)
                self._served_blocks = True
            if self._served_blocks and reader.failure_count(entry.sha256) != self._failures_seen:
                # The object failed verification since this stream opened, possibly in a read-ahead
                # thread that completed it: block bytes this stream served may have been wrong, so it
                # never reads on as if nothing happened (a new open reads the object whole, verified).
                raise IntegrityError(f"{reader.store.where(entry.path)}: failed verification while being read")
        except S3fsimgError:
            reader.stats.add(errors=1)
            raise
        reader.stats.add(reads=1, bytes_read=len(data), cache_hits=int(hit))
        return data

    def _read_blocks(self, offset: int, size: int) -> bytes:
        reader, entry, bs = self.reader, self.entry, self.reader.block_size
        first, last = offset // bs, (offset + size - 1) // bs
        sequential = offset == self._next_offset
        self._next_offset = offset + size
        nblocks = reader.block_count(entry)
        if offset == 0 and size >= BULK_READ and entry.bytes <= reader.max_readahead and last + 1 < nblocks:
            # A first read this large is the kernel's read-ahead answering a large read(2): the reader
            # wants the file, so the whole object comes in this read's own GET (one round trip, as a
            # plain GET). A header read (64 KiB asked) reaches us as 256 KiB and stays within block 0.
            reader.prefetch(entry, first, nblocks - 1)
        elif sequential and last >= 1 and last + 1 < nblocks:
            # Not before the reading leaves block 0: the kernel reads 2x what a small header read asks
            # (its own readahead), all of it in block 0, which must not pull in the rest of the object.
            # The prefetch covers this read's own missing blocks too (first..), so the rest of a small
            # object comes in one GET rather than one for this block and one for the following.
            window_max = reader.max_readahead // bs
            self._window = min(window_max, max(4, self._window * 2))
            rest = nblocks - (last + 1)
            ahead = rest if rest <= window_max else self._window
            reader.prefetch(entry, first, last + ahead)
        deadline = reader._deadline()
        blocks, fetched = reader.read_blocks(entry, first, last, deadline)
        if fetched or last == nblocks - 1:
            # The read that completes the object verifies it (and fails if it does not match).
            reader.complete_if_whole(entry)
        start = offset - first * bs
        joined = blocks[0] if len(blocks) == 1 else b"".join(blocks)
        return joined[start:start + size]


def iter_blocks(offset: int, size: int, block_size: int) -> Iterator[tuple[int, int, int]]:
    """(block index, start within block, length) covering [offset, offset+size): the reference
    arithmetic that `Stream._read_blocks` relies on (property-tested)."""
    end = offset + size
    while offset < end:
        index = offset // block_size
        start = offset - index * block_size
        length = min(block_size - start, end - offset)
        yield index, start, length
        offset += length
