"""Scanning a directory of images: walk, recognise by bytes, hash, measure, name.

Owns the walk of DIR (stable order; symlinks followed only while they stay inside DIR), image
recognition by content (Pillow reads the header only), SHA-256 hashing in parallel threads
(hashlib releases the GIL), and the logical map (CSV `filename,logical_id`).

`scan(...)` yields one `FileResult` per file in a stable order with bounded look-ahead, so memory
does not grow with the number of files. The uploader passes an `on_file` hook that receives the very
bytes that were hashed, so what it uploads is exactly what the key names. A `HashCache` lets a
re-run skip reading files that have not changed since they were hashed.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import sqlite3
import stat
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from s3fsimg.errors import UsageError
from s3fsimg.manifest import Entry, logical_id_problem, object_path, source_path_problem

T = TypeVar("T")


@dataclass(frozen=True)
class Skipped:
    rel: str
    reason: str


class LogicalMap:
    """filename -> logical_id from a two-column CSV; rows match a relative path, else a basename."""

    def __init__(self, by_path: dict[str, tuple[str, int]], by_name: dict[str, tuple[str, int]], source: str):
        self.by_path = by_path
        self.by_name = by_name
        self.source = source

    @classmethod
    def empty(cls) -> LogicalMap:
        return cls({}, {}, "")

    @classmethod
    def load(cls, path: Path) -> LogicalMap:
        """Parse and check the whole map; any invalid line raises UsageError naming it."""
        by_path: dict[str, tuple[str, int]] = {}
        by_name: dict[str, tuple[str, int]] = {}
        try:
            f = open(path, newline="", encoding="utf-8")  # noqa: SIM115
        except OSError as exc:
            raise UsageError(f"{path}: cannot read the logical map: {exc.strerror}") from None
        with f:
            try:
                rows = list(enumerate(csv.reader(f), 1))
            except (csv.Error, UnicodeDecodeError) as exc:
                raise UsageError(f"{path}: not a readable CSV file: {exc}") from None
        for lineno, row in rows:
            if not row or all(not c.strip() for c in row):
                continue
            if lineno == 1 and [c.strip().lower() for c in row] == ["filename", "logical_id"]:
                continue
            if len(row) != 2:
                raise UsageError(f"{path}:{lineno}: expected 2 columns (filename,logical_id), found {len(row)}")
            name, lid = row[0].strip(), row[1].strip()
            if not name:
                raise UsageError(f"{path}:{lineno}: empty filename")
            problem = source_path_problem(name.replace(os.sep, "/"))
            if problem:
                raise UsageError(f"{path}:{lineno}: filename {name!r} {problem}")
            problem = logical_id_problem(lid)
            if problem:
                raise UsageError(f"{path}:{lineno}: logical_id {lid!r} {problem}")
            table = by_path if "/" in name else by_name
            if name in table and table[name][0] != lid:
                raise UsageError(f"{path}:{lineno}: {name!r} is ambiguous: line {table[name][1]} "
                                 f"gives it {table[name][0]!r}, this line {lid!r}")
            table[name] = (lid, lineno)
        return cls(by_path, by_name, str(path))

    def __len__(self) -> int:
        return len(self.by_path) + len(self.by_name)

    def lookup(self, rel: str) -> str | None:
        hit = self.by_path.get(rel)
        if hit is None:
            hit = self.by_name.get(rel.rsplit("/", 1)[-1])
        return hit[0] if hit else None

    def check_against(self, rels: Iterator[str]) -> None:
        """A basename row that matches several files (not named by path) is ambiguous: raise."""
        seen: dict[str, str] = {}
        for rel in rels:
            if rel in self.by_path:
                continue
            base = rel.rsplit("/", 1)[-1]
            if base in self.by_name:
                if base in seen:
                    lineno = self.by_name[base][1]
                    raise UsageError(f"{self.source}:{lineno}: {base!r} is ambiguous: it matches "
                                     f"{seen[base]!r} and {rel!r} (name them by relative path)")
                seen[base] = rel


def walk(root: Path, skipped: list[Skipped] | None = None) -> Iterator[tuple[str, Path]]:
    """(relative POSIX path, absolute path) of every regular file under root, in a stable order.

    Symlinks are followed only when their target stays inside root; directory loops are cut."""
    root = root.resolve()
    seen_dirs: set[tuple[int, int]] = set()

    def note(rel: str, reason: str) -> None:
        if skipped is not None:
            skipped.append(Skipped(rel, reason))

    def inside(p: Path) -> bool:
        try:
            p.resolve().relative_to(root)
            return True
        except (ValueError, OSError, RuntimeError):
            return False

    def visit(directory: Path, rel_dir: str) -> Iterator[tuple[str, Path]]:
        try:
            st = directory.stat()
            names = sorted(os.listdir(directory))
        except OSError as exc:
            note(rel_dir or ".", f"unreadable directory: {exc.strerror}")
            return
        key = (st.st_dev, st.st_ino)
        if key in seen_dirs:
            note(rel_dir, "directory loop")
            return
        seen_dirs.add(key)
        for name in names:
            path = directory / name
            rel = f"{rel_dir}/{name}" if rel_dir else name
            try:
                lst = path.lstat()
                if stat.S_ISLNK(lst.st_mode):
                    if not inside(path):
                        note(rel, "symlink leads outside DIR")
                        continue
                    lst = path.stat()
            except OSError as exc:
                note(rel, f"unreadable: {exc.strerror}")
                continue
            if stat.S_ISDIR(lst.st_mode):
                yield from visit(path, rel)
            elif stat.S_ISREG(lst.st_mode):
                yield rel, path
            else:
                note(rel, "not a regular file")
        seen_dirs.discard(key)

    yield from visit(root, "")


def identify(data: bytes) -> tuple[str, int | None, int | None] | None:
    """(content type, width, height) of image bytes, from the header; None if not an image."""
    # Imported here: a re-upload answered from the hash cache never needs Pillow (a tenth of its start-up).
    from PIL import Image, UnidentifiedImageError

    Image.MAX_IMAGE_PIXELS = None  # we read headers only; huge scans are legitimate datasets
    try:
        with Image.open(io.BytesIO(data)) as im:
            mime = Image.MIME.get(im.format or "")
            if not mime or not mime.startswith("image/"):
                return None
            width, height = im.size
            return mime, (width or None), (height or None)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return None
    except Exception:  # Pillow plugins raise a variety of errors on hostile headers
        return None


@dataclass(frozen=True)
class FileResult:
    rel: str
    entry: Entry | None
    skipped: str | None


class HashCache:
    """What earlier runs learnt of each file, keyed by relative path and checked against the file's
    size, mtime, ctime, inode and device: an unchanged file is not read or hashed again.

    On disk: one SQLite file (a table `files`, schema below). The ctime cannot be set by a user, so
    any write to a file makes its row stale. Used to decide what a manifest line says; the uploader
    still reads and hashes every byte it PUTs.
    """

    _SCHEMA = """
    CREATE TABLE IF NOT EXISTS files(
        rel TEXT PRIMARY KEY,     -- path relative to the scanned directory
        stat TEXT NOT NULL,       -- "size:mtime_ns:ctime_ns:ino:dev" when hashed
        sha256 TEXT,              -- NULL: not an image
        content_type TEXT,
        width INTEGER,
        height INTEGER
    ) WITHOUT ROWID;
    """

    def __init__(self, path: Path) -> None:
        old = os.umask(0o077)  # the cache directory and everything in it are private (0700/0600)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
            self._db.execute("PRAGMA user_version")  # creates the file now, under the umask
        finally:
            os.umask(old)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(self._SCHEMA)
        self._lock = threading.Lock()
        self._pending: list[tuple[object, ...]] = []

    @staticmethod
    def stamp(st: os.stat_result) -> str:
        return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}:{st.st_dev}"

    def get(self, rel: str, st: os.stat_result) -> tuple[str | None, str | None, int | None, int | None] | None:
        with self._lock:
            row = self._db.execute("SELECT stat, sha256, content_type, width, height FROM files WHERE rel=?",
                                   (rel,)).fetchone()
        if row is None or row[0] != self.stamp(st):
            return None
        return row[1], row[2], row[3], row[4]

    def put(self, rel: str, st: os.stat_result, entry: Entry | None) -> None:
        row = (rel, self.stamp(st), entry and entry.sha256, entry and entry.content_type, entry and entry.width,
               entry and entry.height)
        with self._lock:
            self._pending.append(row)
            if len(self._pending) >= 500:
                self._flush_locked()

    def _flush_locked(self) -> None:
        if self._pending:
            self._db.execute("BEGIN")
            self._db.executemany("INSERT OR REPLACE INTO files VALUES (?,?,?,?,?,?)", self._pending)
            self._db.execute("COMMIT")
            self._pending.clear()

    def close(self) -> None:
        with self._lock:
            self._flush_locked()
            self._db.close()


#: Called with each image's entry and, when the file was read, the very bytes that were hashed
#: (None when the hash cache vouched for an unchanged file); returns the entry to write.
OnFile = Callable[[Entry, "bytes | None", Path], Entry]


def entry_from_bytes(rel: str, data: bytes, logical_map: LogicalMap) -> Entry | None:
    """The manifest entry of a file's bytes, or None when they are not an image."""
    info = identify(data)
    if info is None:
        return None
    content_type, width, height = info
    sha = hashlib.sha256(data).hexdigest()
    return Entry(sha256=sha, path=object_path(sha, content_type), bytes=len(data), content_type=content_type,
                 width=width, height=height, logical_id=logical_map.lookup(rel), source_path=rel)


def _process(rel: str, path: Path, logical_map: LogicalMap, on_file: OnFile | None,
             hash_cache: HashCache | None) -> FileResult:
    try:
        st = path.stat()
        cached = hash_cache.get(rel, st) if hash_cache is not None else None
        data: bytes | None = None
        if cached is not None:
            sha, content_type, width, height = cached
            if sha is None or content_type is None:
                return FileResult(rel, None, "not an image")
            entry: Entry | None = Entry(sha256=sha, path=object_path(sha, content_type), bytes=st.st_size,
                                        content_type=content_type, width=width, height=height,
                                        logical_id=logical_map.lookup(rel), source_path=rel)
        else:
            data = path.read_bytes()
            entry = entry_from_bytes(rel, data, logical_map)
            if hash_cache is not None and len(data) == st.st_size:
                hash_cache.put(rel, st, entry)
    except OSError as exc:
        return FileResult(rel, None, f"unreadable: {exc.strerror}")
    if entry is None:
        return FileResult(rel, None, "not an image")
    if on_file is not None:
        entry = on_file(entry, data, path)
    return FileResult(rel, entry, None)


def ordered_map(fn: Callable[..., T], items: Iterator[tuple], *, workers: int, window: int) -> Iterator[T]:
    """`fn(*item)` for each item in parallel threads, yielded in input order, at most `window` in flight."""
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="scan") as pool:
        pending: deque[Future[T]] = deque()
        try:
            for item in items:
                pending.append(pool.submit(fn, *item))
                if len(pending) >= window:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for fut in pending:
                fut.cancel()


def scan(root: Path, *, logical_map: LogicalMap | None = None, workers: int | None = None,
         on_file: OnFile | None = None, hash_cache: HashCache | None = None) -> Iterator[FileResult]:
    """One FileResult per regular file under root, in walk order (stable across runs)."""
    if not root.is_dir():
        raise UsageError(f"{root}: not a directory")
    lmap = logical_map or LogicalMap.empty()
    workers = workers or max(2, (os.cpu_count() or 2) * 2)
    walk_skipped: list[Skipped] = []
    items = ((rel, path, lmap, on_file, hash_cache) for rel, path in walk(root, walk_skipped))
    for result in ordered_map(_process, items, workers=workers, window=workers * 4):
        while walk_skipped:
            s = walk_skipped.pop(0)
            yield FileResult(s.rel, None, s.reason)
        yield result
    for s in walk_skipped:
        yield FileResult(s.rel, None, s.reason)


def prepare(root: Path, map_path: Path | None) -> tuple[LogicalMap, int]:
    """Before any hashing or upload: the logical map, checked against DIR's names (a bad or ambiguous
    line is a UsageError naming it), and the number of files under DIR (for the progress bar) — in
    one walk of DIR."""
    if not root.is_dir():
        raise UsageError(f"{root}: not a directory")
    lmap = LogicalMap.load(map_path) if map_path else LogicalMap.empty()
    count = 0

    def counted() -> Iterator[str]:
        nonlocal count
        for rel, _ in walk(root):
            count += 1
            yield rel

    lmap.check_against(counted())
    return lmap, count


