"""The Python API: `Dataset`, a read-through view of one dataset (bucket + prefix + manifest).

    ds = Dataset.from_env()
    for entry in ds.entries(): ...
    path = ds.fetch("DAO-12345")          # sha256 or logical_id -> local path of the verified file
    with ds.open(sha256) as f: ...        # seekable binary file; reads go through the block cache

Safe across fork() (a DataLoader with workers): the S3 client, cache ledger connection, index
connection and thread pool are built lazily per process; a child never uses its parent's (they are
left untouched, not closed, since closing an inherited SQLite connection is unsafe). `fetch` is
safe from many threads and processes at once on one cache directory (see cache.py).
"""

from __future__ import annotations

import io
import logging
import os
import random
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from s3fsimg.config import Config
from s3fsimg.errors import NotFound, UsageError, quoted
from s3fsimg.manifest import SHA256_RE, Entry, is_utf8
from s3fsimg.reader import ObjectReader

if TYPE_CHECKING:
    from s3fsimg.index import Index
    from s3fsimg.warm import WarmReport

_log = logging.getLogger(__name__)
_ABANDONED: list[Any] = []  # a parent's per-process state, kept alive (never closed) in a forked child


class _State:
    """Everything that must not cross a fork."""

    def __init__(self, config: Config) -> None:
        from s3fsimg.index_load import load_index
        from s3fsimg.s3 import S3Store

        self.pid = os.getpid()
        # The manifest's HEAD/GET. One retry: each try may wait half the read deadline (a server that
        # takes connections but never answers), so the first contact fails within about one deadline,
        # and then falls back to the last local copy of the manifest.
        self.store = S3Store(config, default_attempts=1)
        self.reader = ObjectReader(config)  # its own store: retries bounded by the read deadline
        self.index, self.manifest_path = load_index(config, self.store)

    def close(self) -> None:
        self.reader.close()
        self.index.close()


class Dataset:
    """A dataset read through the local cache. See the module docstring."""

    def __init__(self, config: Config) -> None:
        self.config = config
        config.require_bucket()
        self._state_obj: _State | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_env(cls, **overrides: Any) -> Dataset:
        """The same configuration as the CLI: `.env` < environment < `overrides` (Config field names)."""
        return cls(Config.load(overrides))

    # -- per-process state ---------------------------------------------------------------------------
    def _state(self) -> _State:
        state = self._state_obj
        if state is not None and state.pid == os.getpid():
            return state
        if state is not None:  # forked: leave the parent's objects alone
            _ABANDONED.append(state)
            self._lock = threading.Lock()
        with self._lock:
            if self._state_obj is None or self._state_obj.pid != os.getpid():
                self._state_obj = _State(self.config)
            return self._state_obj

    def close(self) -> None:
        state = self._state_obj
        if state is not None and state.pid == os.getpid():
            state.close()
        self._state_obj = None

    def __enter__(self) -> Dataset:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:  # picklable for spawn-based DataLoader workers
        return {"config": self.config}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["config"])  # type: ignore[misc]

    # -- the API -------------------------------------------------------------------------------------
    @property
    def index(self) -> Index:
        return self._state().index

    @property
    def reader(self) -> ObjectReader:
        return self._state().reader

    def __len__(self) -> int:
        return int(self.index.entry_count())

    def entries(self) -> Iterator[Entry]:
        """Every manifest entry, in manifest order."""
        return iter(self.index.iter_entries())

    def resolve(self, ident: str) -> Entry:
        """The entry named by a sha256 or a logical_id; NotFound names the id."""
        index = self.index
        entry = index.by_sha256(ident) if SHA256_RE.match(ident) else None
        if entry is None and is_utf8(ident):  # a logical_id is UTF-8: other bytes (argv) name nothing
            entry = index.by_logical_id(ident)
        if entry is None:
            raise NotFound(f"{quoted(ident)}: no image with this sha256 or logical_id in "
                           f"{self.config.where(self.config.manifest_key)}")
        return entry

    def fetch(self, ident: str | Entry) -> Path:
        """Local path of the complete, verified object (sha256 or logical_id)."""
        entry = ident if isinstance(ident, Entry) else self.resolve(ident)
        return self.reader.fetch_path(entry)

    def fetch_many(self, idents: Iterable[str], *, threads: int = 8, progress: bool = False) -> list[Path]:
        """Paths of many objects, fetched in parallel; every id is resolved before anything is fetched.
        UsageError, before anything is fetched, when the distinct objects do not fit in the cache bound
        together: the first paths would be evicted by the fetches after them (use `prefetch`, which
        stops at the bound, or fetch fewer at once)."""
        from s3fsimg.progress import progress_bar
        from s3fsimg.units import format_size

        entries = [self.resolve(i) for i in idents]
        from s3fsimg.warm import distinct

        total = sum(e.bytes for e in distinct(entries))
        if total > self.config.cache_max_bytes:
            raise UsageError(f"the {len(entries)} images asked ({format_size(total)}) do not fit in the cache "
                             f"bound ({format_size(self.config.cache_max_bytes)}, DATASET_CACHE_MAX_BYTES): "
                             "their paths could not all stay; fetch fewer at once or raise the bound")
        reader = self.reader
        paths: list[Path] = []
        pool = ThreadPoolExecutor(max_workers=threads)
        try:
            with progress_bar(total=len(entries), unit="img", desc="fetch", enabled=None if progress else False) as bar:
                for path in pool.map(reader.fetch_path, entries):
                    paths.append(path)
                    bar.update(1)
        finally:  # a failure or Ctrl-C does not wait for the fetches not yet started
            pool.shutdown(wait=False, cancel_futures=True)
        return paths

    def prefetch(self, idents: Iterable[str | Entry], *, threads: int = 32, progress: bool = False) -> WarmReport:
        """Fill the cache with these objects (sha256, logical_id or Entry), many in flight; return when done.

        Within the cache bound: objects are taken in the order given while they fit, and a warning
        says how many were left out (`report.stopped_at_bound`). A fetch that fails does not stop the
        others (`report.failed`, `report.first_error`). Every id is resolved before anything is fetched.
        See warm.py.
        """
        from s3fsimg.warm import warm_entries

        entries = [i if isinstance(i, Entry) else self.resolve(i) for i in idents]
        report = warm_entries(self.reader, entries, bound=self.config.cache_max_bytes, threads=threads,
                              progress=None if progress else False)
        if note := report.note():
            _log.warning("prefetch: %s", note.removeprefix("note: "))
        return report

    def open(self, ident: str | Entry) -> IO[bytes]:
        """A seekable, buffered binary file over the object; reads go through the block cache."""
        entry = ident if isinstance(ident, Entry) else self.resolve(ident)
        raw = _RawObjectFile(self.reader, entry)
        return io.BufferedReader(raw, buffer_size=max(io.DEFAULT_BUFFER_SIZE, 128 << 10))

    def sample(self, n: int, *, seed: int | None = None) -> list[Entry]:
        """n distinct random entries (all of them when n exceeds the count)."""
        index = self.index
        total = int(index.entry_count())
        if total == 0:
            raise UsageError(f"{self.config.where(self.config.manifest_key)}: the manifest has no entries")
        picks = random.Random(seed).sample(range(total), min(n, total))
        return [index.nth_entry(i) for i in picks]


class _RawObjectFile(io.RawIOBase):
    """Raw, seekable file interface over `ObjectReader.read` (which keeps no state per open file)."""

    def __init__(self, reader: ObjectReader, entry: Entry) -> None:
        super().__init__()
        self._reader = reader
        self._entry = entry
        self._opened_at = reader.failure_generation(entry)  # see ObjectReader._check_generation
        self._size = entry.bytes
        self._pos = 0
        self.name = entry.path

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data = self._reader.read(self._entry, self._pos, len(view), opened_at=self._opened_at)
        n = len(data)
        view[:n] = data
        self._pos += n
        return n

    def readall(self) -> bytes:
        data = self._reader.read(self._entry, self._pos, max(0, self._size - self._pos),
                                 opened_at=self._opened_at)
        self._pos += len(data)
        return data

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        elif whence == io.SEEK_END:
            pos = self._size + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if pos < 0:
            raise OSError(22, "negative seek position")
        self._pos = pos
        return pos

    def tell(self) -> int:
        return self._pos

