"""Scanning a directory of images: walk, recognise by bytes, hash, measure, name.

Owns the walk of DIR (stable order; symlinks followed only while they stay inside DIR), image
recognition by content (Pillow reads the header only), SHA-256 hashing in parallel threads
(hashlib releases the GIL), and the logical map (CSV `filename,logical_id`, UTF-8 with or without a BOM).

What the walk cannot put in a manifest it skips with a reason, and the run goes on: a name that is
not valid UTF-8 (JSON cannot hold it; a directory so named is skipped whole), a symlink that leads
outside DIR, is broken or loops, a FIFO, socket or device, an unreadable file or directory. Only
regular files are ever opened, and with O_NONBLOCK, so a FIFO swapped in after the walk cannot hang
the scan. A skipped file is reported under a printable name (`shown`).

`scan(...)` yields one `FileResult` per file in a stable order with bounded look-ahead, so memory
does not grow with the number of files. The uploader passes an `on_file` hook that receives the very
bytes that were hashed, so what it uploads is exactly what the key names. A `HashCache` lets a
re-run skip reading files that have not changed since they were hashed.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import errno
import hashlib
import io
import logging
import os
import sqlite3
import stat
import threading
import unicodedata
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from s3fsimg.errors import ConfigError, UsageError
from s3fsimg.manifest import Entry, is_utf8, logical_id_problem, object_path, source_path_problem

log = logging.getLogger(__name__)

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
        self.unmatched: list[tuple[str, int]] = []  # rows no file matched (filename, line): see check_against

    @classmethod
    def empty(cls) -> LogicalMap:
        return cls({}, {}, "")

    @classmethod
    def load(cls, path: Path) -> LogicalMap:
        """Parse and check the whole map; any invalid line raises UsageError naming it."""
        by_path: dict[str, tuple[str, int]] = {}
        by_name: dict[str, tuple[str, int]] = {}
        try:
            raw = Path(path).read_bytes()
        except OSError as exc:
            # DATASET_LOGICAL_MAP / --logical-map names it: a configuration error (exit 2), before any work
            raise ConfigError(f"{path}: cannot read the logical map: {exc.strerror}") from None
        # A BOM (what Excel and Notepad write) is not part of the first row's filename
        body = raw[3:] if raw.startswith(codecs.BOM_UTF8) else raw
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            lineno = body.count(b"\n", 0, exc.start) + 1
            column = exc.start - body.rfind(b"\n", 0, exc.start)
            raise UsageError(f"{path}:{lineno}: not UTF-8 (byte {body[exc.start:exc.start + 1]!r} at column "
                             f"{column})") from None
        # (the line each row starts on, the row): a quoted field may span lines, so rows are numbered by line
        rows: list[tuple[int, list[str]]] = []
        reader = csv.reader(io.StringIO(text, newline=""))
        try:
            start = 1
            for row in reader:
                rows.append((start, row))
                start = reader.line_num + 1
        except csv.Error as exc:
            raise UsageError(f"{path}:{reader.line_num}: not a readable CSV row: {exc}") from None
        for lineno, row in rows:
            if not row or all(not c.strip() for c in row):
                continue
            if lineno == 1 and [c.strip().lower() for c in row] == ["filename", "logical_id"]:
                continue
            if len(row) != 2:
                raise UsageError(f"{path}:{lineno}: expected 2 columns (filename,logical_id), found {len(row)}")
            name, lid = _nfc(row[0].strip()), row[1].strip()
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
        rel = _nfc(rel)
        hit = self.by_path.get(rel)
        if hit is None:
            hit = self.by_name.get(rel.rsplit("/", 1)[-1])
        return hit[0] if hit else None

    def check_against(self, rels: Iterator[str]) -> None:
        """A basename row that matches several files (not named by path) is ambiguous: raise. Rows that
        match no file are kept in `unmatched` (the commands say so: a typo must not pass silently)."""
        seen: dict[str, str] = {}
        paths_seen: set[str] = set()
        for rel in rels:
            rel = _nfc(rel)
            if rel in self.by_path:
                paths_seen.add(rel)
                continue
            base = rel.rsplit("/", 1)[-1]
            if base in self.by_name:
                if base in seen:
                    lineno = self.by_name[base][1]
                    raise UsageError(f"{self.source}:{lineno}: {base!r} is ambiguous: it matches "
                                     f"{seen[base]!r} and {rel!r} (name them by relative path)")
                seen[base] = rel
        self.unmatched = sorted([(name, line) for name, (_, line) in self.by_path.items() if name not in paths_seen]
                                + [(name, line) for name, (_, line) in self.by_name.items() if name not in seen],
                                key=lambda item: item[1])

    def unmatched_note(self) -> str | None:
        """One line for the commands' output when rows matched no file, else None."""
        if not self.unmatched:
            return None
        name, line = self.unmatched[0]
        return (f"note: {len(self.unmatched)} row(s) of the logical map {self.source} match no file "
                f"(first: {shown(name)!r}, line {line})")


def _nfc(name: str) -> str:
    """A name in Unicode NFC: a map typed on one system matches files named on another (macOS writes
    decomposed NFD names, most editors composed NFC)."""
    return name if unicodedata.is_normalized("NFC", name) else unicodedata.normalize("NFC", name)


def shown(name: str) -> str:
    """`name` as printable text on one line, for messages: bytes that are not UTF-8 as `\\xNN`,
    control and other unprintable characters backslash-escaped (`\\n`). Printable names are unchanged."""
    if name.isprintable():
        return name
    text = os.fsencode(name).decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


_KINDS = ((stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
          (stat.S_ISBLK, "block device"), (stat.S_ISDIR, "directory"))


def not_regular(mode: int) -> str:
    """The skip reason of a file that is not a regular file: `not a regular file (FIFO)`."""
    kind = next((name for test, name in _KINDS if test(mode)), "special file")
    return f"not a regular file ({kind})"


class NotRegularFile(OSError):
    """What was opened turned out not to be a regular file (replaced since the walk saw it)."""

    def __init__(self, mode: int) -> None:
        super().__init__(errno.EINVAL, not_regular(mode))


def read_regular(path: Path) -> tuple[os.stat_result, bytes]:
    """The status and bytes of the regular file at `path`, as read through one descriptor.

    Opened with O_NONBLOCK (no effect on a regular file) so that a FIFO or device put in the file's
    place since it was listed is refused at once (NotRegularFile) instead of blocking the read."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with open(fd, "rb", closefd=True) as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFile(st.st_mode)
        return st, f.read()


def walk(root: Path, skipped: list[Skipped] | None = None) -> Iterator[tuple[str, Path]]:
    """(relative POSIX path, absolute path) of every regular file under root, in a stable order.

    Symlinks are followed only when their target stays inside root; directory loops are cut. What is
    not yielded is noted in `skipped` (under its `shown` name) with the reason."""
    root = root.resolve()
    seen_dirs: set[tuple[int, int]] = set()

    def note(rel: str, reason: str) -> None:
        if skipped is not None:
            skipped.append(Skipped(shown(rel), reason))

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
                    try:
                        lst = path.stat()
                    except OSError as exc:
                        if exc.errno == errno.ELOOP:
                            note(rel, "symlink loop")
                        elif exc.errno == errno.ENOENT:
                            note(rel, "broken symlink")
                        else:
                            note(rel, f"unreadable: {exc.strerror}")
                        continue
                    if not inside(path):
                        note(rel, "symlink leads outside DIR")
                        continue
            except OSError as exc:
                note(rel, f"unreadable: {exc.strerror}")
                continue
            if not is_utf8(name):  # a manifest is JSON text: it cannot name this file
                if stat.S_ISDIR(lst.st_mode):
                    note(rel, "directory name is not valid UTF-8 (nothing under it is scanned)")
                else:
                    note(rel, "name is not valid UTF-8")
            elif stat.S_ISDIR(lst.st_mode):
                yield from visit(path, rel)
            elif stat.S_ISREG(lst.st_mode):
                yield rel, path
            else:
                note(rel, not_regular(lst.st_mode))
        seen_dirs.discard(key)

    yield from visit(root, "")


#: Pillow formats whose files are files of another content type. An MPO (multi-picture JPEG, what
#: phones and cameras write) is a JPEG file: any JPEG decoder reads its first picture, and browsers
#: and S3 clients know image/jpeg, not Pillow's image/mpo.
_SAME_BYTES_AS = {"MPO": "image/jpeg"}


def identify(data: bytes) -> tuple[str, int | None, int | None] | None:
    """(content type, width, height) of image bytes, from the header; None if not an image."""
    # Imported here: a re-upload answered from the hash cache never needs Pillow (a tenth of its start-up).
    from PIL import Image, UnidentifiedImageError

    Image.MAX_IMAGE_PIXELS = None  # we read headers only; huge scans are legitimate datasets
    try:
        with Image.open(io.BytesIO(data)) as im:
            mime = _SAME_BYTES_AS.get(im.format or "") or Image.MIME.get(im.format or "")
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
    rel: str  # the entry's source_path; of a skipped file, its `shown` name
    entry: Entry | None
    skipped: str | None  # why it is not in the manifest


class HashCache:
    """What earlier runs learnt of each file, keyed by relative path and checked against the file's
    size, mtime, ctime, inode and device: an unchanged file is not read or hashed again.

    On disk: one SQLite file (a table `files`, schema below). The ctime cannot be set by a user, so
    any write to a file makes its row stale. Used to decide what a manifest line says; the uploader
    still reads and hashes every byte it PUTs.

    The file's `user_version` is `VERSION`: a file of any other version (an older scanner's, whose
    rows may say what this one would not, such as image/mpo) is emptied when opened.

    It is only a cache, so it never fails the work that uses it: a file that is not a database (torn,
    foreign) is replaced; any other error, when it is opened or at any later read or write (the cache
    directory is a file, read-only or full, the file is locked by another run for too long), logs one
    WARNING naming the file and the reason and turns the cache off for the rest of the run (`get` finds
    nothing, `put` keeps nothing), so every file is hashed. What was committed before stays valid.
    """

    #: Bumped whenever a row's meaning changes. 0: no version (rows may say image/mpo); 1: MPO is image/jpeg.
    VERSION = 1

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
        self.path = path
        self._lock = threading.Lock()
        self._pending: list[tuple[object, ...]] = []
        self._db: sqlite3.Connection | None = None
        try:
            try:
                self._db = self._open(path)
            except sqlite3.OperationalError:  # cannot open, write or lock: the file may be fine, keep it
                raise
            except sqlite3.DatabaseError as exc:  # not a database (a torn or foreign file): start a new one
                log.warning("hash cache %s is unusable (%s); starting a new one", path, exc)
                for stale in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
                    stale.unlink(missing_ok=True)
                self._db = self._open(path)
        except (OSError, sqlite3.Error) as exc:
            self._give_up(exc)

    @staticmethod
    def _open(path: Path) -> sqlite3.Connection:
        db: sqlite3.Connection | None = None
        try:
            old = os.umask(0o077)  # the cache directory and everything in it are private (0700/0600)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
                db.execute("PRAGMA user_version")  # creates the file now, under the umask
            finally:
                os.umask(old)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("BEGIN IMMEDIATE")  # two runs opening one old file: one of them upgrades it
            (version,) = db.execute("PRAGMA user_version").fetchone()
            if version != HashCache.VERSION:
                db.execute("DROP TABLE IF EXISTS files")
                db.execute(f"PRAGMA user_version={int(HashCache.VERSION)}")
            db.execute(HashCache._SCHEMA)
            db.execute("COMMIT")
        except BaseException:
            if db is not None:
                db.close()  # an open transaction is rolled back
            raise
        return db

    def _give_up(self, exc: BaseException) -> None:
        """Log why the cache cannot be used (once) and use it no more; call with the lock held or before
        any other thread has the object."""
        if isinstance(exc, OSError):
            # FileExistsError comes from mkdir(exist_ok=True): the name is there, but not a directory
            reason = "exists and is not a directory" if isinstance(exc, FileExistsError) else exc.strerror or str(exc)
            if exc.filename is not None and os.fspath(exc.filename) != os.fspath(self.path):
                reason = f"{shown(os.fsdecode(exc.filename))}: {reason}"
        else:
            reason = str(exc)
        log.warning("hash cache %s unusable (%s); hashing every file", shown(os.fspath(self.path)), reason)
        db, self._db = self._db, None
        self._pending.clear()
        if db is not None:
            with contextlib.suppress(sqlite3.Error):
                db.close()  # what is uncommitted is rolled back; what was committed stays valid

    @staticmethod
    def stamp(st: os.stat_result) -> str:
        return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}:{st.st_dev}"

    def get(self, rel: str, st: os.stat_result) -> tuple[str | None, str | None, int | None, int | None] | None:
        with self._lock:
            if self._db is None:
                return None
            try:
                row = self._db.execute("SELECT stat, sha256, content_type, width, height FROM files WHERE rel=?",
                                       (rel,)).fetchone()
            except sqlite3.Error as exc:
                self._give_up(exc)
                return None
        if row is None or row[0] != self.stamp(st):
            return None
        return row[1], row[2], row[3], row[4]

    def put(self, rel: str, st: os.stat_result, entry: Entry | None) -> None:
        row = (rel, self.stamp(st), entry and entry.sha256, entry and entry.content_type, entry and entry.width,
               entry and entry.height)
        with self._lock:
            if self._db is None:
                return
            self._pending.append(row)
            if len(self._pending) >= 500:
                self._flush_locked()

    def _flush_locked(self) -> None:
        if self._pending and self._db is not None:
            try:
                self._db.execute("BEGIN")
                self._db.executemany("INSERT OR REPLACE INTO files VALUES (?,?,?,?,?,?)", self._pending)
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._give_up(exc)
                return
            self._pending.clear()

    def close(self) -> None:
        with self._lock:
            self._flush_locked()
            db, self._db = self._db, None
            if db is not None:
                try:
                    db.close()
                except sqlite3.Error as exc:
                    self._db = db
                    self._give_up(exc)


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
        if not stat.S_ISREG(st.st_mode):  # replaced since the walk: never open a FIFO or a device
            return FileResult(shown(rel), None, not_regular(st.st_mode))
        cached = hash_cache.get(rel, st) if hash_cache is not None else None
        data: bytes | None = None
        if cached is not None:
            sha, content_type, width, height = cached
            if sha is None or content_type is None:
                return FileResult(shown(rel), None, "not an image")
            entry: Entry | None = Entry(sha256=sha, path=object_path(sha, content_type), bytes=st.st_size,
                                        content_type=content_type, width=width, height=height,
                                        logical_id=logical_map.lookup(rel), source_path=rel)
        else:
            st, data = read_regular(path)
            entry = entry_from_bytes(rel, data, logical_map)
            if hash_cache is not None and len(data) == st.st_size:
                hash_cache.put(rel, st, entry)
    except NotRegularFile as exc:
        return FileResult(shown(rel), None, exc.strerror)
    except OSError as exc:
        return FileResult(shown(rel), None, f"unreadable: {exc.strerror}")
    if entry is None:
        return FileResult(shown(rel), None, "not an image")
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
    line is a UsageError naming it), and the number of results `scan` will yield (files and walk
    skips, for the progress bar) — in one walk of DIR."""
    if not root.is_dir():
        raise UsageError(f"{root}: not a directory")
    lmap = LogicalMap.load(map_path) if map_path else LogicalMap.empty()
    count = 0
    skipped: list[Skipped] = []

    def counted() -> Iterator[str]:
        nonlocal count
        for rel, _ in walk(root, skipped):
            count += 1
            yield rel

    lmap.check_against(counted())
    return lmap, count + len(skipped)


