"""Where a read is served: bytes of a content-addressed object from the disk cache, else from S3.

`ObjectReader.read(entry, offset, size)` is the one read of the product: the filesystem (fs.py) and the
Python API (dataset.py) both call it. It returns exactly `min(size, entry.bytes - offset)` bytes, or
raises (`BackendError`: S3 failed within the read deadline; `IntegrityError`: the bytes are not the
object's). Never fewer bytes: a short reply would make the kernel shrink the file (fuse_short_read).

All state is per object, never per open file, so any process serving a mount can answer any request:
- in this process: the descriptor of the complete object, read-ahead state (`_ObjectState`), GETs in
  flight (single-flight per block), the object's block map;
- in the cache directory, shared by every process: complete objects, blocks, block maps, suspect
  markers (an object that failed verification anywhere is from then on only served after a
  whole-object verification), and the CRCs of blocks served before verification (see below).

How a read is served (`read`):
1. a complete, verified object in the cache -> `pread` on its descriptor;
2. small objects (<= `whole_object_max`) and suspect ones: fetched whole (`fetch_path`), hashed, renamed
   into the cache; no byte is served before the sha256 matched;
3. larger objects are read in fixed blocks (`block_size`), from the cache, from a GET in flight, or
   fetched now (contiguous missing blocks in one ranged GET, `_fetch_run`). A run that is the whole
   object (a bulk first read: see `_readahead`) is checked against the sha256 before any block of it
   is served (`VerifiedBlock`) and stored as the complete object. For any other run the object's block
   map (`blocks/ab/cd/<sha256>`, written by the uploader) is fetched beside its first block and kept in
   the cache: with it, every block is checked against its SHA-256 before it is served or stored.
   Without one (another tool uploaded the object), blocks are served unverified (counted in
   `unverified_bytes`) and the CRC of every block served is recorded, so the read that completes the
   object fails when the kernel may hold bytes other than the verified ones.
Read-ahead policy (`_readahead`) lives here, per object: a sequential read schedules the following
blocks in background threads, in a window that doubles from 4 blocks up to `max_readahead`.
Object completion (`_complete`) is decided in one place: after every ranged GET (and again once its
blocks are stored, so that of two runs ending together the later one completes), when every block is at
hand, the object is assembled, its sha256 checked, and it becomes a complete object. A mismatch
marks it suspect (in the cache, for every process), drops its blocks, tells the filesystem that the
kernel's pages of it are not to be trusted (`on_untrusted_pages`), and fails the read.

Every S3 response is checked against the manifest's size (Content-Range) and ETag. S3 faults are retried
until `read_deadline` (`S3Store.get_range`), then raise BackendError.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path

from s3fsimg.blockmap import BlockMap, blockmap_key
from s3fsimg.cache import DiskCache, unchanged_since_verified
from s3fsimg.config import Config
from s3fsimg.counters import Counters
from s3fsimg.errors import BackendError, CacheError, IntegrityError, NotFound, S3fsimgError
from s3fsimg.manifest import Entry
from s3fsimg.s3 import GetResult, S3Store

log = logging.getLogger(__name__)

_HAVE_NOWAIT = hasattr(os, "RWF_NOWAIT") and hasattr(os, "preadv")
PART_SIZE = 8 << 20  # largest single GET of a whole-object fetch or of a read-ahead run
BULK_READ = 512 << 10  # a first read at least this large asks for the whole object (see `_readahead`)
MAX_READAHEAD = 8 << 20  # read-ahead window limit per object
MAX_BLOCKMAP = 4 << 20  # largest block map fetched (a 32 GiB object at 256 KiB blocks)
OBJECT_STATES = 1024  # objects whose per-process state (descriptor, read-ahead, map) is kept
GENERATION_MASK = 0x7FFF  # `failure_generation` bits (a file handle holds them above the inode)
_GAVE_UP_HOLD = 2.0  # seconds after S3 failed an object in which a read of it is not retried (see `_get`)

#: Every counter of a reader, and of a mount (fs.py adds `opens`). `s3fsimg stats` shows them.
COUNTER_NAMES = (
    "opens",               # files opened through the mount
    "reads",               # reads answered (FUSE READ requests, or reads of the Python API)
    "bytes_read",          # bytes those reads returned
    "read_errors",         # reads that failed (EIO in the mount, an exception in the API)
    "cache_hits",          # reads served without S3
    "cache_misses",        # reads (or whole-object fetches) that needed S3
    "s3_requests",         # GETs answered by S3 (objects, ranges and block maps)
    "s3_bytes",            # bytes of those answers
    "readahead_requests",  # ranged GETs started ahead of a read
    "integrity_errors",    # responses or objects that did not match the manifest, a block map or a CRC
    "unverified_bytes",    # bytes served before any hash check (objects without a block map)
    "uncached_writes",     # blocks or objects the cache could not store (disk full): served from memory
)


@dataclass
class _Descriptor:
    """An open descriptor of a complete object, with the reads using it right now: it is closed only once
    retired and unused (a descriptor closed under a read could be reused by another open, and the read
    would return another file's bytes). Guarded by `ObjectReader._lock`."""

    fd: int
    users: int = 0
    retired: bool = False

    def close_if_done(self) -> None:
        if self.retired and self.users == 0 and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass
class _ObjectState:
    """What this process knows of one object (see the module docstring). Guarded by `ObjectReader._lock`,
    except `memory` (only ever set to the verified object's bytes) and `served` (only ever grows, by `_record_served`:
    a race at worst records a CRC twice)."""

    descriptor: _Descriptor | None = None  # of the complete object
    memory: bytes | None = None  # the verified object, when the cache could not store it
    next_offset: int = -1  # where a sequential read would start
    window: int = 0  # read-ahead window in blocks
    ahead_until: int = 0  # read-ahead has asked for every block below this one (`_fetch_ahead`)
    blockmap: BlockMap | None = None
    blockmap_known: bool = False  # True once `blockmap` is decided (None then means: no map)
    blockmap_future: Future[BlockMap | None] | None = None
    served: dict[int, int] = field(default_factory=dict)  # block -> CRC recorded as served (no map)


class VerifiedBlock(bytes):
    """A block cut from bytes checked whole against the object's sha256 (a read-ahead run that was the
    whole object): served without the block map, and without recording its CRC (`_read_blocks`)."""


class ObjectReader:
    """Reads objects through the cache. One per process (build a new one after fork()). Thread-safe."""

    def __init__(self, config: Config, cache: DiskCache | None = None, store: S3Store | None = None, *,
                 threads: int = 16, counters: Counters | None = None) -> None:
        self.config = config
        self.block_size = config.block_size
        self.whole_object_max = config.whole_object_max
        self.part_size = max(PART_SIZE, self.block_size)
        self.max_readahead = max(MAX_READAHEAD, self.block_size)
        self.cache = cache or DiskCache(config.cache_dir, config.cache_max_bytes)
        # botocore's own retries are off (max_attempts=0): its backoff (up to 20 s a try) knows
        # nothing of the read deadline; `S3Store.get_range` retries within it instead.
        self.store = store or S3Store(config, max_pool=threads * 2 + 8, max_attempts=0)
        self.counters = counters or Counters(COUNTER_NAMES)
        #: Called with a sha256 when the kernel may hold pages of that object that must not be read
        #: back (it failed verification): the filesystem drops them (pyfuse3.invalidate_inode).
        self.on_untrusted_pages: Callable[[str], None] | None = None
        self._lock = threading.Lock()
        self._states: OrderedDict[str, _ObjectState] = OrderedDict()
        self._inflight: dict[tuple[str, int], Future[bytes]] = {}
        self._whole: dict[str, Future[Path]] = {}
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="s3fsimg-fetch")
        # Block maps load on their own threads: a read-ahead run on `_pool` waits for its object's map,
        # which must never queue behind such runs.
        self._map_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="s3fsimg-map")
        self._closed = False

    def close(self) -> None:
        self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._map_pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            states, self._states = list(self._states.values()), OrderedDict()
            for st in states:
                self._retire(st)
        self.cache.close()

    def __enter__(self) -> ObjectReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stats(self) -> dict[str, int]:
        return self.counters.snapshot()

    def _deadline(self) -> float:
        return time.monotonic() + self.config.read_deadline

    # -- per-object state ----------------------------------------------------------------------------
    def _state(self, sha256: str) -> _ObjectState:
        with self._lock:
            st = self._states.get(sha256)
            if st is not None:
                self._states.move_to_end(sha256)
                return st
            st = self._states[sha256] = _ObjectState()
            while len(self._states) > OBJECT_STATES:
                _, old = self._states.popitem(last=False)
                self._retire(old)
            return st

    @staticmethod
    def _retire(st: _ObjectState) -> None:
        """Under `_lock`: the state's descriptor is closed once no read uses it."""
        desc, st.descriptor = st.descriptor, None
        if desc is not None:
            desc.retired = True
            desc.close_if_done()

    def _acquire(self, entry: Entry, st: _ObjectState) -> _Descriptor | None:
        """The complete object's descriptor, marked in use (give it back with `_release`), or None. A kept
        descriptor whose file was written to since it was verified (its mtime is no longer the cache's
        stamp) is retired, and the cache checks the file again (`DiskCache.open_object`). The stamp's
        fstat is made outside the lock: a syscall under it queues the other readers' threads behind it."""
        with self._lock:
            desc = st.descriptor
            if desc is not None:
                desc.users += 1
        if desc is not None:
            if unchanged_since_verified(desc.fd):
                return desc
            with self._lock:
                if st.descriptor is desc:
                    self._retire(st)
            self._release(desc)
        fd = self.cache.open_object(entry.sha256, entry.ext)
        if fd is None:
            return None
        with self._lock:
            desc = st.descriptor
            if desc is None:
                desc = _Descriptor(fd)
                if self._states.get(entry.sha256) is st:
                    st.descriptor = desc
                else:  # the state was dropped meanwhile: the descriptor serves this read only
                    desc.retired = True
            else:
                os.close(fd)
            desc.users += 1
            return desc

    def _release(self, desc: _Descriptor) -> None:
        with self._lock:
            desc.users -= 1
            desc.close_if_done()

    def is_complete(self, entry: Entry) -> bool:
        """Whether the object is complete and verified in the cache (or in this process's memory)."""
        with self._lock:
            st = self._states.get(entry.sha256)
            if st is not None and (st.descriptor is not None or st.memory is not None):
                return True
        return self.cache.has_object(entry.sha256, entry.ext)

    def may_keep_pages(self, entry: Entry, generation: int | None = None) -> bool:
        """Whether the kernel may keep the object's pages across opens: only when every byte it may hold
        was verified: a small object (served only whole-verified); a large one that never failed
        verification in any process (else the kernel may hold pages served before the failure, perhaps
        by another process, which cannot drop them: `on_untrusted_pages` reaches only this one's) and is
        complete (every block served unverified was checked against it: `_complete`) or whose block map
        this process holds. Otherwise an open drops the pages, so none is read back unchecked.
        `generation`: the object's `failure_generation`, when the caller has it already."""
        if entry.bytes <= self.whole_object_max:
            return True
        if (self.failure_generation(entry) if generation is None else generation):
            return False
        if self.is_complete(entry):
            return True
        with self._lock:
            st = self._states.get(entry.sha256)
            return st is not None and st.blockmap_known and st.blockmap is not None

    def failure_generation(self, entry: Entry) -> int:
        """What an open file remembers of the object (`read(..., opened_at=)`): how many times it failed
        verification in any process, for objects that can serve bytes before verification (larger than
        `whole_object_max`); 0 for the others. At most 15 bits (it travels in the file handle)."""
        if entry.bytes <= self.whole_object_max:
            return 0
        return self.cache.failure_count(entry.sha256) & GENERATION_MASK

    def _generation_changed(self, entry: Entry, opened_at: int | None) -> bool:
        """Whether the object failed verification (in any process) since the file was opened."""
        return opened_at is not None and self.failure_generation(entry) != opened_at

    def _check_generation(self, entry: Entry, opened_at: int | None) -> None:
        """An open file that may have been served bytes of an object that has failed verification since
        never reads on as if nothing happened: its reads fail (a new open reads the object whole and
        verified). This is what a file remembers per open, in its handle: no state is kept per open."""
        if self._generation_changed(entry, opened_at):
            raise IntegrityError(f"{self.store.where(entry.path)}: failed verification while being read")

    # -- the read ------------------------------------------------------------------------------------
    def read(self, entry: Entry, offset: int, size: int, *, opened_at: int | None = None) -> bytes:
        """Bytes [offset, offset+size) of the object: exactly `min(size, entry.bytes - offset)` of them
        (b"" at or after its end), or an exception. `opened_at`: the `failure_generation` when the file
        was opened (see `_check_generation`). See the module docstring."""
        size = min(size, entry.bytes - offset)
        if size <= 0 or offset < 0:
            return b""
        st = self._state(entry.sha256)
        hit = False
        try:
            self._check_generation(entry, opened_at)
            desc = self._acquire(entry, st)
            if desc is None and st.memory is None and (entry.bytes <= self.whole_object_max
                                                       or self.cache.is_suspect(entry.sha256)):
                desc = self._open_whole(entry, st)
            else:
                hit = desc is not None
            if desc is not None:
                try:
                    data = os.pread(desc.fd, size, offset)
                finally:
                    self._release(desc)
            elif st.memory is not None:
                data = st.memory[offset:offset + size]
            else:
                data, hit = self._read_blocks(entry, st, offset, size)
            if len(data) != size:
                raise IntegrityError(f"{self.store.where(entry.path)}: {len(data)} bytes at {offset} where "
                                     f"{size} were expected (the object is {entry.bytes} bytes)")
        except S3fsimgError:
            self.counters.add("read_errors")
            raise
        self.counters.add_many({"reads": 1, "bytes_read": size, "cache_hits": int(hit)})
        return data

    def read_nowait(self, entry: Entry, offset: int, size: int, *, opened_at: int | None = None,
                    into: bytearray | None = None) -> bytearray | memoryview | None:
        """The bytes, if they can be had without blocking: the object is complete in the cache, this
        process has it open already, and the kernel has the range in its page cache (`RWF_NOWAIT`).
        Else None, and the caller uses `read` from a worker thread. Lets the filesystem answer warm
        reads on its event loop without a thread hand-off. The bytes are read into `into` when it is
        large enough (a view of it is returned: the caller reuses one buffer), else into a new one."""
        if not _HAVE_NOWAIT:
            return None
        size = min(size, entry.bytes - offset)
        if size <= 0 or offset < 0:
            return None
        with self._lock:
            st = self._states.get(entry.sha256)
            if st is None or st.descriptor is None:
                return None
            desc = st.descriptor
        # Only with a descriptor at hand (else `read` checks it, once); `read` raises when it changed.
        if self._generation_changed(entry, opened_at):
            return None
        with self._lock:
            if st.descriptor is not desc:
                return None
            desc.users += 1
        if not unchanged_since_verified(desc.fd):  # (outside the lock: see `_acquire`)
            self._release(desc)
            return None
        buf = memoryview(into)[:size] if into is not None and len(into) >= size else bytearray(size)
        try:
            n = os.preadv(desc.fd, [buf], offset, os.RWF_NOWAIT)
        except OSError:
            return None
        finally:
            self._release(desc)
        if n != size:
            return None
        self.counters.add_many({"reads": 1, "bytes_read": size, "cache_hits": 1})
        return buf  # no copy into bytes: the filesystem replies straight from this buffer

    def _open_whole(self, entry: Entry, st: _ObjectState) -> _Descriptor | None:
        """Fetch the whole object into the cache and open it (marked in use); when the cache cannot
        take it (disk full), keep the verified bytes in memory instead (returns None)."""
        try:
            self.fetch_path(entry)
        except CacheError:
            st.memory = self.download_verified(entry)
            return None
        desc = self._acquire(entry, st)
        if desc is None:  # evicted between the fetch and the open
            st.memory = self.download_verified(entry)
        return desc

    # -- whole objects -------------------------------------------------------------------------------
    def fetch_path(self, entry: Entry) -> Path:
        """The path of the complete, verified object in the cache, fetching it if needed."""
        path = self.cache.object_path(entry.sha256, entry.ext)
        if path is not None:
            self.counters.add("cache_hits")
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
        """Fetch, verify and store the whole object under the cross-process lock. The cache's own trouble
        (a lock file that cannot be created on a full disk, ...) is a CacheError: `read` then serves the
        verified bytes from memory, and `fetch` says the cache cannot take it."""
        try:
            return self._fetch_whole_locked(entry)
        except OSError as exc:
            raise CacheError(f"{self.cache.root}: cannot use the cache for {entry.sha256}: "
                             f"{exc.strerror or exc}") from None

    def _fetch_whole_locked(self, entry: Entry) -> Path:
        deadline = self._deadline()
        with self.cache.object_lock(entry.sha256, deadline):
            path = self.cache.object_path(entry.sha256, entry.ext)
            if path is not None:  # another process fetched it while we waited
                self.counters.add("cache_hits")
                return path
            self.counters.add("cache_misses")
            data = self.download_verified(entry, deadline)
            path = self._store_complete(entry, data)
            if path is None:
                raise CacheError(f"{self.cache.root}: cannot store {entry.sha256} in the cache (disk full or "
                                 "not writable)")
            return path

    def download_verified(self, entry: Entry, deadline: float | None = None) -> bytes:
        """All bytes of an object from S3, checked against its sha256 (IntegrityError otherwise)."""
        data = self._download(entry, deadline if deadline is not None else self._deadline())
        self._verify_whole(entry, data)
        self.cache.clear_suspect(entry.sha256)
        return data

    def _download(self, entry: Entry, deadline: float) -> bytes:
        """All bytes of an object: one GET, or parallel GETs of `part_size` parts."""
        if entry.bytes == 0:
            return b""
        if entry.bytes <= self.part_size:
            return self._get(entry, entry.path, 0, entry.bytes, deadline).data
        starts = range(0, entry.bytes, self.part_size)
        futures = [self._pool.submit(self._get, entry, entry.path, s, min(s + self.part_size, entry.bytes),
                                     deadline) for s in starts]
        return b"".join(f.result().data for f in futures)

    def _store_complete(self, entry: Entry, data: bytes) -> Path | None:
        """Store verified bytes as the complete object; forget what was recorded of its blocks."""
        path = self.cache.put_object_bytes(data, entry.sha256, entry.ext)
        self.cache.forget_served(entry.sha256)
        with self._lock:
            st = self._states.get(entry.sha256)
            if st is not None:
                st.served.clear()
        return path

    def _verify_whole(self, entry: Entry, data: bytes) -> None:
        digest = hashlib.sha256(data).hexdigest()
        if digest != entry.sha256:
            self._integrity_failure(entry, f"its bytes hash to {digest[:16]}…, not to its sha256")

    def _get(self, entry: Entry, key: str, start: int, end: int, deadline: float) -> GetResult:
        """One ranged GET of `key` (the object, or its block map), checked against the manifest's size and
        ETag when it is the object.

        When S3 failed this object (after its retries) less than `_GAVE_UP_HOLD` ago, one attempt is
        made, without retries: the kernel re-sends a failed READ (one page, after a failed
        read-ahead), which must not wait a whole deadline again before read(2) returns EIO, and a
        read right after S3 came back still succeeds."""
        failed_at = self.cache.gave_up_at(entry.sha256)  # in any process: a worker may take the re-sent READ
        if failed_at is not None and 0 <= time.time() - failed_at < _GAVE_UP_HOLD:
            deadline = min(deadline, time.monotonic())
        try:
            result = self.store.get_range(key, start, end, deadline=deadline)
        except BackendError:
            self.cache.mark_gave_up(entry.sha256)
            raise
        if failed_at is not None:
            self.cache.clear_gave_up(entry.sha256)
        self.counters.add_many({"s3_requests": 1, "s3_bytes": len(result.data)})
        if key != entry.path:
            return result
        if result.total_size is not None and result.total_size != entry.bytes:
            self._integrity_failure(entry, f"S3 has {result.total_size} bytes, the manifest says {entry.bytes} "
                                           "(object replaced?)")
        if entry.etag and result.etag and result.etag != entry.etag:
            self._integrity_failure(entry, f"S3 returns ETag {result.etag}, the manifest says {entry.etag} "
                                           "(object replaced)")
        if len(result.data) != end - start:
            raise BackendError(f"{self.store.where(entry.path)}: S3 returned {len(result.data)} bytes of "
                               f"the {end - start} asked at {start}")
        return result

    def _integrity_failure(self, entry: Entry, why: str) -> None:
        """The object failed verification: every process serves it whole-verified from now on, nothing
        cached of it is kept, and the kernel's pages of it are dropped. Raises IntegrityError."""
        self.counters.add("integrity_errors")
        self.cache.mark_suspect(entry.sha256)
        self.cache.drop_object(entry.sha256, entry.ext)
        self.cache.forget_served(entry.sha256)
        with self._lock:  # this process's state of it goes too (descriptor, map, what was served)
            st = self._states.pop(entry.sha256, None)
            if st is not None:
                self._retire(st)
        callback = self.on_untrusted_pages
        if callback is not None:
            callback(entry.sha256)
        raise IntegrityError(f"{self.store.where(entry.path)}: {why}")

    # -- blocks --------------------------------------------------------------------------------------
    def block_length(self, entry: Entry, index: int) -> int:
        return min(self.block_size, entry.bytes - index * self.block_size)

    def block_count(self, entry: Entry) -> int:
        return (entry.bytes + self.block_size - 1) // self.block_size

    def _read_blocks(self, entry: Entry, st: _ObjectState, offset: int, size: int) -> tuple[bytes, bool]:
        """The bytes of a read of a large object, from its blocks; and whether no GET was needed."""
        bs = self.block_size
        first, last = block_span(offset, size, bs)
        ahead = self._readahead(entry, st, offset, size, first, last)
        if ahead is not None:
            self._fetch_ahead(entry, st, *ahead)
        blocks, fetched = self._blocks(entry, st, first, last, self._deadline())
        blockmap = self._blockmap_now(st)
        if blockmap is None and not all(isinstance(b, VerifiedBlock) for b in blocks):
            self._record_served(entry, st, first, blocks)
            self.counters.add("unverified_bytes", size)
        start = offset - first * bs
        joined = blocks[0] if len(blocks) == 1 else b"".join(blocks)
        return joined[start:start + size], not fetched

    def _readahead(self, entry: Entry, st: _ObjectState, offset: int, size: int, first: int,
                   last: int) -> tuple[int, int] | None:
        """The read-ahead policy: which blocks to fetch ahead of this read (first, last), or None."""
        nblocks = self.block_count(entry)
        with self._lock:
            sequential = offset == st.next_offset
            st.next_offset = offset + size
            if offset == 0 and size >= BULK_READ and entry.bytes <= self.max_readahead and last + 1 < nblocks:
                # A first read this large is the kernel's read-ahead answering a large read(2): the
                # reader wants the file, so the whole object comes in this read's own GET (one round
                # trip, as a plain GET). A header read (64 KiB asked) reaches us as 256 KiB at most
                # and stays within block 0.
                return first, nblocks - 1
            if sequential and last >= 1 and last + 1 < nblocks:
                # Not before the reading leaves block 0: the kernel reads 2x what a small header read
                # asks (its own readahead), all of it in block 0, which must not pull in the rest of
                # the object. The range starts at this read's own first block, so the rest of a
                # small object comes in one GET rather than one for this block and one for the next.
                window_max = self.max_readahead // self.block_size
                st.window = min(window_max, max(4, st.window * 2))
                rest = nblocks - (last + 1)
                return first, last + (rest if rest <= window_max else st.window)
        return None

    def _fetch_ahead(self, entry: Entry, st: _ObjectState, first: int, last: int) -> None:
        """Start fetching blocks first..last that are neither cached nor in flight; do not wait. Blocks
        an earlier read-ahead asked for are not looked at again (one stat per new block, not one per block
        of the window on every read): one that is missing after all (its GET failed, it was evicted) is
        fetched by the read that needs it (a failed run lowers the mark: the next read-ahead asks again)."""
        if self._closed:
            return
        with self._lock:
            # The mark counts only while this stream is the one that set it (a read behind it, after a
            # seek back, or far ahead of it, gets its read-ahead as if there were none).
            start = st.ahead_until if first <= st.ahead_until <= last + 1 else first
            st.ahead_until = last + 1
        wanted = [i for i in range(start, last + 1)
                  if (entry.sha256, i) not in self._inflight and not self.cache.has_block(
                      entry.sha256, self.block_size, i)]
        if not wanted:
            return
        deadline = self._deadline()
        for run_first, run_last, futures in self._claim(entry, wanted, {}):
            self.counters.add("readahead_requests")
            self._pool.submit(self._fetch_run, entry, st, run_first, run_last, futures, deadline)

    def _blocks(self, entry: Entry, st: _ObjectState, first: int, last: int,
                deadline: float) -> tuple[list[bytes], bool]:
        """Blocks first..last (inclusive), in order, each checked against the block map when there is
        one; and whether any had to come from S3 (fetched now, or in flight). The map is asked for only
        when a block comes from the cache (a run fetched here asks for it itself; one in flight that is the
        whole object needs none: `_fetch_run`)."""
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
        if missing:
            self.counters.add("cache_misses")
            for run_first, run_last, futures in self._claim(entry, missing, waiting):
                self._fetch_run(entry, st, run_first, run_last, futures, deadline)
        # Blocks from the cache were checked against the map when they were fetched; checked again here
        # (a block cached before this process knew the map, or damaged on disk behind a valid CRC).
        blockmap = self._blockmap_result(entry, st, self._blockmap_future(entry, st, deadline), deadline) \
            if got else None
        if blockmap is not None:
            for i, data in got.items():
                if not blockmap.check_block(i, data):
                    self._integrity_failure(entry, f"cached block {i} does not match its block map")
        for i, fut in waiting.items():
            remaining = max(0.0, deadline - time.monotonic()) + 1.0
            try:
                got[i] = fut.result(timeout=remaining)
            except FutureTimeout:
                raise BackendError(f"{self.store.where(entry.path)}: block {i} was not fetched within the read "
                                   "deadline") from None
        return [got[i] for i in range(first, last + 1)], bool(missing or waiting)

    def _claim(self, entry: Entry, wanted: list[int], waiting: dict[int, Future[bytes]],
               ) -> list[tuple[int, int, dict[int, Future[bytes]]]]:
        """Register this thread as the fetcher of each wanted block nobody is fetching; group them into
        runs of contiguous blocks. Blocks already in flight go to `waiting`."""
        max_blocks = max(1, self.part_size // self.block_size)
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

    def _fetch_run(self, entry: Entry, st: _ObjectState, first: int, last: int,
                   futures: dict[int, Future[bytes]], deadline: float) -> None:
        """GET blocks first..last in one range; check them; resolve the futures; store the blocks; then try
        to complete the object. A run that is the whole object (a bulk read: `_readahead`) is checked
        against the sha256 before any block is handed out, and needs no block map; any other run is
        checked block by block against the map (fetched beside it, the first time).

        The object's last block is handed out only after the completion attempt, so a reader cannot read
        an object to its end without the whole-object check when every block was at hand."""
        start = first * self.block_size
        end = min((last + 1) * self.block_size, entry.bytes)
        nblocks = self.block_count(entry)
        whole = first == 0 and last == nblocks - 1
        verified: bytes | None = None
        try:
            map_future = None if whole else self._blockmap_future(entry, st, deadline)
            result = self._get(entry, entry.path, start, end, deadline)
            if whole:
                self._verify_whole(entry, result.data)
                verified = result.data
            blockmap = None if whole else self._blockmap_result(entry, st, map_future, deadline)
            view = memoryview(result.data)
            blocks: dict[int, bytes] = {}
            for i in range(first, last + 1):
                lo = (i - first) * self.block_size
                hi = lo + self.block_length(entry, i)
                if whole:
                    blocks[i] = VerifiedBlock(view[lo:hi])
                    continue
                block = bytes(view[lo:hi])
                if blockmap is not None and not blockmap.check_block(i, block):
                    self._integrity_failure(entry, f"block {i} does not match its block map")
                blocks[i] = block
        except BaseException as exc:
            with self._lock:
                st.ahead_until = min(st.ahead_until, first)
            self._fail_futures(entry, futures, exc)
            return
        final = last == nblocks - 1
        for i in range(first, last if final else last + 1):
            futures[i].set_result(blocks[i])
        try:
            if not self._complete(entry, blocks, verified=verified):
                for i, block in blocks.items():
                    if not self.cache.put_block(entry.sha256, self.block_size, i, block):
                        self.counters.add("uncached_writes")
                # Another run of this object may have looked for these blocks before they were stored, as
                # this one did for its: look again now that they are (the run that stores last completes).
                self._complete(entry, blocks)
        except BaseException as exc:
            if final:
                self._fail_futures(entry, {last: futures[last]}, exc)
            self._forget(entry, futures)
            return
        if final:
            futures[last].set_result(blocks[last])
        # Futures stay in `_inflight` until the bytes are on disk, so a read arriving meanwhile takes
        # them from memory instead of making another GET.
        self._forget(entry, futures)

    def _complete(self, entry: Entry, fetched: dict[int, bytes], *, verified: bytes | None = None) -> bool:
        """THE place an object read by blocks becomes complete (`fetch_path` stores whole fetches): after
        each ranged GET (twice when its blocks had to be stored first), when every block is at hand
        (`fetched` from S3 just now, the others from the cache), assemble, verify against the sha256 and
        the CRCs of blocks served before verification, and store it as a complete object. `verified`: the
        whole object, already checked against its sha256 (fetched in one run). False when a block is
        missing (or the disk is full); IntegrityError on a mismatch."""
        n = self.block_count(entry)
        if verified is not None:
            data = verified
            parts = [fetched[i] for i in range(n)]
        else:
            # From the end: in a sequential read the missing blocks are the later ones (one stat, not n).
            others = [i for i in range(n - 1, -1, -1) if i not in fetched]
            if not all(self.cache.has_block(entry.sha256, self.block_size, i) for i in others):
                return False
            parts = []
            for i in range(n):
                block = fetched.get(i)
                if block is None:
                    block = self.cache.get_block(entry.sha256, self.block_size, i, self.block_length(entry, i))
                    if block is None:
                        return False
                parts.append(block)
            data = b"".join(parts)
            self._verify_whole(entry, data)
        served = self.cache.served_crcs(entry.sha256, self.block_size)
        for i, crc in served.items():
            if i < n and zlib.crc32(parts[i]) != crc:
                self._integrity_failure(entry, f"block {i} was served with other bytes than the verified object "
                                               "has (fetched again since)")
        self.cache.clear_suspect(entry.sha256)
        return self._store_complete(entry, data) is not None

    def _record_served(self, entry: Entry, st: _ObjectState, first: int, blocks: list[bytes]) -> None:
        """Record the CRC of each block of an object without a map served to a reader, in the cache (every
        process sees it): `_complete` then fails when the verified object has other bytes there. A block
        recorded earlier with other bytes means the kernel may hold pages of both: the object is failed."""
        for i, block in enumerate(blocks, start=first):
            crc = zlib.crc32(block)
            if st.served.get(i) == crc:
                continue
            if not self.cache.record_served(entry.sha256, self.block_size, i, crc):
                self._integrity_failure(entry, f"block {i} was served before with other bytes")
            st.served[i] = crc

    def _forget(self, entry: Entry, futures: dict[int, Future[bytes]]) -> None:
        with self._lock:
            for i in futures:
                self._inflight.pop((entry.sha256, i), None)

    def _fail_futures(self, entry: Entry, futures: dict[int, Future[bytes]], exc: BaseException) -> None:
        with self._lock:
            for i, fut in futures.items():
                self._inflight.pop((entry.sha256, i), None)
                if not fut.done():
                    fut.set_exception(exc)

    # -- block maps ----------------------------------------------------------------------------------
    def _blockmap_now(self, st: _ObjectState) -> BlockMap | None:
        with self._lock:
            return st.blockmap if st.blockmap_known else None

    def _blockmap_future(self, entry: Entry, st: _ObjectState, deadline: float) -> Future[BlockMap | None] | None:
        """None when the map is known (or not needed); else the future of its fetch, started now if nobody
        has started it (from the cache, else from S3, in parallel with the caller's GET)."""
        if entry.bytes <= self.whole_object_max:
            return None
        with self._lock:
            if st.blockmap_known:
                return None
            if st.blockmap_future is None:
                st.blockmap_future = self._map_pool.submit(self._load_blockmap, entry, deadline)
            return st.blockmap_future

    def _blockmap_result(self, entry: Entry, st: _ObjectState, fut: Future[BlockMap | None] | None,
                         deadline: float) -> BlockMap | None:
        if fut is not None:
            try:
                blockmap = fut.result(timeout=max(0.0, deadline - time.monotonic()) + 1.0)
            except FutureTimeout:
                raise BackendError(f"{self.store.where(blockmap_key(entry.sha256))}: the block map was not "
                                   "fetched within the read deadline") from None
            except BaseException:
                with self._lock:
                    if st.blockmap_future is fut:
                        st.blockmap_future = None  # the next read tries again
                raise
            with self._lock:
                st.blockmap, st.blockmap_known = blockmap, True
        return self._blockmap_now(st)

    def _load_blockmap(self, entry: Entry, deadline: float) -> BlockMap | None:
        """The object's block map from the cache, else from S3 (then kept in the cache); None when the
        object has none, or one of another block size. IntegrityError when it is malformed."""
        raw = self.cache.get_blockmap(entry.sha256)
        from_s3 = raw is None
        if raw is None:
            key = blockmap_key(entry.sha256)
            try:
                raw = self._get(entry, key, 0, MAX_BLOCKMAP, deadline).data
            except NotFound:
                log.debug("%s has no block map: its blocks are served unverified", entry.sha256)
                return None
            except BackendError as exc:  # the read that fails is the image's: name it first
                raise BackendError(f"{self.store.where(entry.path)}: its block map ({key}) could not be "
                                   f"fetched: {exc}") from None
        try:
            blockmap = BlockMap.from_bytes(raw, sha256=entry.sha256, size=entry.bytes)
        except IntegrityError:
            if not from_s3:
                self.cache.drop_blockmap(entry.sha256)
            self._integrity_failure(entry, "its block map is malformed")
            raise  # unreachable: _integrity_failure raises
        if from_s3 and not self.cache.put_blockmap(entry.sha256, raw):
            self.counters.add("uncached_writes")
        if blockmap.block_size != self.block_size:
            log.debug("%s: block map of %d-byte blocks, reading in %d: served unverified", entry.sha256,
                      blockmap.block_size, self.block_size)
            return None
        return blockmap


def block_span(offset: int, size: int, block_size: int) -> tuple[int, int]:
    """The first and last block (inclusive) holding bytes [offset, offset+size), size > 0: the block
    arithmetic of every read (property-tested against a byte-by-byte model)."""
    return offset // block_size, (offset + size - 1) // block_size

