"""The on-disk SQLite index of one manifest: names, inode numbers and attributes of the mount's tree.

Owns the index file format (the schema, `SCHEMA` below, is its only definition), how an index is built
from a manifest (`build_index`), how it is found or built for a bucket's manifest and reused
(`load_index`, `ensure_index`), and the read API that `fs.py` and `dataset.py` query (`Index`).

Nothing here holds a manifest in Python objects. The manifest is streamed once into `entries` (batched
inserts, one transaction per batch); everything else is derived from that table by SQL that runs in C.
Lines go through `manifest.fast_fields` (a tuple straight from a regex, no dict, no Entry; it agrees with
`parse_line` by property test) and only non-canonical or bad lines through json.loads + `parse_entry`.

Only what cannot be computed is stored. An object (a distinct sha256) is not a table: it is the row of
its first line, found through the hash index, which also lists `images/ab/cd` in hash order (a name
there is `<sha256>.<ext>`, so a lookup is one index probe on the hash). The rare later lines of an
object point at that first row (`obj`). `by-id/` is a view of `entries` through its logical_id index;
`by-path/` names are columns of `entries` (`parent_k`, `name`) plus one `pdirs` row per directory,
because a source tree is arbitrary. A 1,000,000-entry index is ~250 MB.

Building, and where the time goes at 1,000,000 lines (2 cores, measured; `build_index` returns the
phases): `ensure_index` runs the build in a child process (`python -m s3fsimg.index build`), so a
mount never holds the builder's memory (~70 MB; its helper ~55 MB). That process parses the first
half of the manifest while a helper process (`... part`) parses the second half, split at a line
boundary, into its own temporary database (~3.5 s for both); it then appends the helper's rows with an
id offset, renumbering its by-path directories into the whole manifest's order of first appearance
(~0.5 s). Then, in SQL: the hash index (~0.7 s), the objects named on several lines and their link
counts (~1.3 s for 50,000 such objects), the logical_id and by-path name indexes (~0.7 s), `lids` and
directory link counts (~0.5 s); ~7.5 s in all. Errors name the manifest line: a helper's line
numbers are offset by the lines before its part.

On-disk layout, under the cache directory::

    <cache_dir>/manifests/<key>.jsonl   local copy of a bucket's manifest; <key> hashes the endpoint, bucket,
    <cache_dir>/manifests/<key>.json    manifest key and ETag; the .json records ETag, Last-Modified, sha256
    <cache_dir>/index/<sha256>.sqlite   the index of the manifest whose bytes hash to <sha256>
    <cache_dir>/index/<sha256>.lock     flock held while building, so two processes never both build

An index is built into `<dest>.tmp-<pid>-<thread>` and renamed into place last, so a half-built index is
never opened. It is opened read-only (`mode=ro`) for serving; its `metadata` (format version, manifest
digest) is checked on open.

Inode numbers: each a function of manifest order only, so stable across rebuilds and remounts of the
same manifest (E = number of entries)::

    1 root   2 images   3 by-id   4 by-path   5 manifest.jsonl
    AB_BASE + 0xab                     images/ab
    ABCD_BASE + 0xabcd                 images/ab/cd
    OBJ_BASE + i                       the object (sha256) whose first line is entry i; all its names share it
    OBJ_BASE + E + i                   by-id/<logical_id>, where entry i is the first line with that id
    OBJ_BASE + 2E + k                  the k-th by-path directory (k >= 1, order of first appearance)

Rules the index adds to the manifest's: lines with the same sha256 must agree on size and content type
(one object has one name under images/); a source_path may be named once and may not also be a
directory of another source_path. A violation is a ManifestError naming the line.

Threads: each thread gets its own read-only connection (`threading.local`), opened with
`check_same_thread=False` only so that `close()` can close them all from one thread. Threads then never
queue on a Python lock, and SQLite serves read-only connections concurrently. Every query is a few
B-tree probes (microseconds with a warm page cache), cheap enough for the trio thread of the mount.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import resource
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, cast

from s3fsimg.config import private_dirs
from s3fsimg.errors import BackendError, ManifestError, NotFound, S3fsimgError
from s3fsimg.manifest import Entry, EntryProblem, extension_for, fast_fields, parse_fields

if TYPE_CHECKING:
    from s3fsimg.config import Config
    from s3fsimg.s3 import S3Store

log = logging.getLogger(__name__)

#: Bump when the schema or the inode layout changes; an index of another version is rebuilt.
FORMAT_VERSION = 3

ROOT_INODE = 1
IMAGES_INODE = 2
BY_ID_INODE = 3
BY_PATH_INODE = 4
MANIFEST_INODE = 5
AB_BASE = 16  # images/ab -> AB_BASE + 0xab
ABCD_BASE = AB_BASE + 256  # images/ab/cd -> ABCD_BASE + 0xabcd
OBJ_BASE = 1 << 17  # first object inode; everything below is a fixed directory or file

#: Names of the root directory, in readdir order (readdir key = position + 1).
ROOT_NAMES = ((b"images", IMAGES_INODE), (b"by-id", BY_ID_INODE), (b"by-path", BY_PATH_INODE),
              (b"manifest.jsonl", MANIFEST_INODE))

_BATCH = 20_000  # rows per insert transaction while streaming the manifest
_PAGE = 512  # rows fetched per readdir query
_PART_BYTES = 64 << 20  # a manifest is parsed in parallel parts of at least this size (one per core, at most 4)
_BUILD_PRAGMAS = ("PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF; PRAGMA cache_size=-16000; "
                  "PRAGMA temp_store=FILE;")

# The whole schema, in one place. Tables are created empty before the load; INDEXES after it.
SCHEMA = """
-- Facts about this index, checked on open. Keys: format_version, manifest_sha256, manifest_bytes,
-- mtime_ns, entry_count, object_count, logical_id_count, pdir_count, name_count, built_at.
CREATE TABLE metadata(
    key   TEXT PRIMARY KEY,   -- name of the fact
    value TEXT NOT NULL       -- its value, as text
) WITHOUT ROWID;

-- One row per manifest line (blank lines skipped), in manifest order. `path` is not stored: it is
-- images/ab/cd/<sha256>.<ext of content_type>, which the manifest parser has checked. An object (a
-- distinct sha256) is the row of its first line: inode OBJ_BASE + id, attributes from that row.
CREATE TABLE entries(
    id           INTEGER PRIMARY KEY,  -- 0-based position among the entries: nth_entry(id)
    sha256       BLOB NOT NULL,        -- object hash, 32 raw bytes (index entries_sha256: images/, in hash order)
    bytes        INTEGER NOT NULL,     -- object size
    content_type TEXT NOT NULL,        -- image/...
    width        INTEGER,              -- pixels, or NULL
    height       INTEGER,              -- pixels, or NULL
    logical_id   TEXT,                 -- by-id/<logical_id>, or NULL
    etag         TEXT,                 -- S3 ETag with its quotes, or NULL
    source_path  TEXT,                 -- by-path/<source_path>, or NULL
    parent_k     INTEGER,              -- by-path: pdirs.k of the directory of source_path (0: by-path), or NULL
    name         TEXT,                 -- by-path: the file's name (source_path's last component), or NULL
    nlink        INTEGER,              -- on an object's first line its st_nlink: 1 (images/) + distinct
                                       -- logical ids + source paths; NULL on the object's later lines
    obj          INTEGER               -- on an object's later lines the id of its first line; NULL on the first
);

-- One row per distinct logical id: the by-id/<logical_id> directories, in readdir order.
CREATE TABLE lids(
    id INTEGER PRIMARY KEY       -- entries.id of the first line with this logical id
);

-- One row per by-path directory (its files are the entries rows with parent_k = k).
CREATE TABLE pdirs(
    k        INTEGER PRIMARY KEY,  -- directory number (inode OBJ_BASE + 2E + k), order of first appearance
    parent_k INTEGER NOT NULL,     -- its parent's k; 0 is by-path itself
    name     TEXT NOT NULL,        -- its name in the parent
    nlink    INTEGER NOT NULL      -- st_nlink: 2 + subdirectories
);
"""

INDEXES = (
    "CREATE INDEX entries_sha256 ON entries(sha256)",  # objects: images/ lookup, readdir by hash; duplicates
    "CREATE INDEX entries_logical_id ON entries(logical_id) WHERE logical_id IS NOT NULL",  # by-id
    # by-path files: lookup, readdir by name; a source_path named twice
    "CREATE UNIQUE INDEX entries_name ON entries(parent_k, name) WHERE parent_k IS NOT NULL",
    "CREATE UNIQUE INDEX pdirs_name ON pdirs(parent_k, name)",  # by-path directories: lookup, readdir by name
)


def _hash_bound(d: int) -> bytes:
    """The smallest blob >= every sha256 of the directories images/ab/cd with 0xabcd >= d (d <= 0x10000)."""
    return bytes((d >> 8, d & 0xFF)) if d < 0x10000 else b"\xff" * 33


@dataclass(frozen=True, slots=True)
class Attr:
    """What getattr needs to know about an inode."""

    inode: int
    is_dir: bool
    size: int
    nlink: int
    sha256: str | None = None  # objects only


# ----------------------------------------------------------------------------------------------
# Building
# ----------------------------------------------------------------------------------------------

def build_index(manifest_file: Path, dest: Path, *, manifest_digest: str, where: str | None = None,
                mtime_ns: int | None = None, parts: int | None = None) -> dict[str, float]:
    """Compile `manifest_file` into the index `dest`, atomically, in this process (and `parts - 1`
    helper processes that parse the later parts of the manifest; default: one part per 64 MB, at most
    one per core and 4). Returns where the time went (seconds per phase).

    `manifest_digest` is the sha256 of the manifest's bytes, recorded in the metadata. `where` names
    the manifest in error messages (`s3://bucket/key`); `mtime_ns` is the mtime every file and
    directory of the mount shows (default: the manifest file's own mtime). A bad line raises
    ManifestError naming `where:LINE`; nothing is left at `dest` (or beside it) on any failure.
    """
    name = where or str(manifest_file)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{dest.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    tmp.unlink(missing_ok=True)
    try:
        stat = manifest_file.stat()
    except OSError as exc:
        raise ManifestError(f"{name}: cannot read the manifest: {exc.strerror}") from None
    if parts is None:
        parts = max(1, min(4, len(os.sched_getaffinity(0)), stat.st_size // _PART_BYTES))
    times: dict[str, float] = {}
    try:
        db = sqlite3.connect(tmp, isolation_level=None)
        try:
            _build(db, manifest_file, tmp, name=name, size=stat.st_size, parts=parts, times=times)
            meta = {"format_version": FORMAT_VERSION, "manifest_sha256": manifest_digest,
                    "manifest_bytes": stat.st_size, "built_at": time.time_ns(),
                    "mtime_ns": stat.st_mtime_ns if mtime_ns is None else mtime_ns}
            db.executemany("INSERT OR REPLACE INTO metadata VALUES (?,?)", [(k, str(v)) for k, v in meta.items()])
        finally:
            db.close()
        started = time.perf_counter()
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, 0o600)
        os.replace(tmp, dest)
        _fsync_dir(dest.parent)
        times["fsync"] = time.perf_counter() - started
    except sqlite3.Error as exc:
        raise ManifestError(f"{name}: cannot build the index at {dest}: {exc}") from None
    finally:
        tmp.unlink(missing_ok=True)
        Path(f"{tmp}-journal").unlink(missing_ok=True)
    return times


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class _LineError(Exception):
    """A bad line of one part of the manifest: its line number within the part, and the problem."""

    def __init__(self, lineno: int, problem: str) -> None:
        super().__init__(lineno, problem)
        self.lineno, self.problem = lineno, problem


@dataclass
class _Part:
    """What parsing one part of the manifest produced (its rows are in the part's database)."""

    entries: int = 0  # lines with an entry
    lines: int = 0  # lines, blank ones included (the next part's line numbers start after them)
    nlinks: int = 0  # sum of the rows' default nlink (before objects named on several lines are merged)
    dirs: dict[str, int] | None = None  # by-path directory -> the part's own k (1, 2, ... in order of appearance)


def _split(manifest_file: Path, size: int, parts: int) -> list[int]:
    """Byte offsets [0, b1, ..., size] cutting the manifest into `parts` runs of whole lines."""
    cuts = [0]
    with open(manifest_file, "rb") as f:
        for j in range(1, parts):
            f.seek(max(cuts[-1], size * j // parts - 1))
            f.readline()  # to the start of the next line
            cuts.append(min(f.tell(), size))
    cuts.append(size)
    return cuts


def _parse_part(db: sqlite3.Connection, manifest_file: Path, start: int, end: int) -> _Part:
    """Stream the lines starting in bytes [start, end) of the manifest into `db`'s entries, with ids
    0, 1, ... and by-path directories numbered 1, 2, ... in order of appearance within this part."""
    dirs: dict[str, int] = {}  # by-path directory -> k: directories only, never files
    part = _Part(dirs=dirs)
    rows: list[tuple[Any, ...]] = []
    insert = "INSERT INTO entries VALUES (?,?,?,?,?,?,?,?,?,?,?,?,NULL)"

    def pdir(path: str) -> int:
        k = dirs.get(path)
        if k is None:
            head = path.rpartition("/")[0]
            if head:
                pdir(head)  # parents first: a directory's parent always has the smaller k
            k = dirs[path] = len(dirs) + 1
        return k

    n = nlinks = lineno = 0
    fromhex = bytes.fromhex
    for raw in _lines(manifest_file, start, end):
        lineno += 1
        # The fast path (no dict, no Entry) for canonical lines; parse_line for the rest and for errors.
        fields = fast_fields(raw)
        if fields is None:
            if not raw.strip():
                continue
            try:
                fields = parse_fields(raw)
            except EntryProblem as exc:
                raise _LineError(lineno, str(exc)) from None
        sha, size, ctype, width, height, lid, etag, src = fields
        link = 1 + (lid is not None)
        if src is None:
            rows.append((n, fromhex(sha), size, ctype, width, height, lid, etag, None, None, None, link))
        else:
            head, _, base = src.rpartition("/")
            link += 1
            rows.append((n, fromhex(sha), size, ctype, width, height, lid, etag, src,
                         pdir(head) if head else 0, base, link))
        nlinks += link
        n += 1
        if len(rows) >= _BATCH:
            db.execute("BEGIN")
            db.executemany(insert, rows)
            db.execute("COMMIT")
            rows.clear()
    db.execute("BEGIN")
    db.executemany(insert, rows)
    db.execute("COMMIT")
    part.entries, part.lines, part.nlinks = n, lineno, nlinks
    return part


def _lines(manifest_file: Path, start: int, end: int, chunk: int = 1 << 20) -> Iterator[bytes]:
    """The lines in bytes [start, end) of a file (both at line starts), without their newlines; read
    a MB at a time (3x faster than iterating over the file)."""
    with open(manifest_file, "rb") as f:
        f.seek(start)
        left = end - start
        carry = b""
        while left > 0:
            data = f.read(min(chunk, left))
            if not data:
                break
            left -= len(data)
            data = carry + data
            if left > 0:
                cut = data.rfind(b"\n")
                if cut < 0:
                    carry = data
                    continue
                carry = data[cut + 1:]
                data = data[:cut]
            else:
                carry = b""
                if data.endswith(b"\n"):
                    data = data[:-1]
            yield from data.split(b"\n")
        if carry:
            yield carry


def _start_part(manifest_file: Path, start: int, end: int, out: Path) -> subprocess.Popen[bytes]:
    """A helper process parsing bytes [start, end) of the manifest into the database `out`."""
    return subprocess.Popen([sys.executable, "-m", "s3fsimg.index", "part", str(manifest_file), str(start),
                             str(end), str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_child_env())


def _child_env() -> dict[str, str]:
    """The environment of a helper process: this one's, with this package importable."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def _part_main(manifest_file: Path, start: int, end: int, out: Path) -> int:
    """`python -m s3fsimg.index part`: parse one part into a new database `out`; report on stdout."""
    db = sqlite3.connect(out, isolation_level=None)
    try:
        db.executescript(_BUILD_PRAGMAS)
        db.executescript(SCHEMA)
        try:
            part = _parse_part(db, manifest_file, start, end)
        except _LineError as exc:
            print(json.dumps({"line": exc.lineno, "problem": exc.problem}))
            return 3
        db.execute("CREATE TABLE part_dirs(k INTEGER PRIMARY KEY, path TEXT NOT NULL)")
        db.execute("BEGIN")
        db.executemany("INSERT INTO part_dirs VALUES (?,?)", [(k, p) for p, k in (part.dirs or {}).items()])
        db.execute("COMMIT")
    finally:
        db.close()
    print(json.dumps({"entries": part.entries, "lines": part.lines, "nlinks": part.nlinks,
                      "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
    return 0


def _build(db: sqlite3.Connection, manifest_file: Path, tmp: Path, *, name: str, size: int, parts: int,
           times: dict[str, float]) -> None:
    """Parse the manifest (part 0 here, the others in helper processes at the same time), merge the
    parts into `db` in order, then derive everything else."""
    started = time.perf_counter()
    db.executescript(_BUILD_PRAGMAS)
    db.executescript(SCHEMA)
    cuts = _split(manifest_file, size, parts) if parts > 1 else [0, size]
    helpers: list[tuple[subprocess.Popen[bytes], Path]] = []
    try:
        for j in range(1, len(cuts) - 1):
            out = tmp.with_name(f"{tmp.name}.part{j}")
            out.unlink(missing_ok=True)
            helpers.append((_start_part(manifest_file, cuts[j], cuts[j + 1], out), out))
        try:
            first = _parse_part(db, manifest_file, cuts[0], cuts[1])
        except _LineError as exc:
            raise ManifestError(f"{name}:{exc.lineno}: {exc.problem}") from None
        times["parse"] = time.perf_counter() - started
        dirs = dict(first.dirs or {})
        n, lines, nlinks = first.entries, first.lines, first.nlinks
        for proc, out in helpers:
            stdout, stderr = proc.communicate()
            report = json.loads(stdout or b"{}") if proc.returncode in (0, 3) else {}
            if "problem" in report:
                raise ManifestError(f"{name}:{lines + report['line']}: {report['problem']}")
            if proc.returncode != 0 or "entries" not in report:
                tail = stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no message"]
                raise ManifestError(f"{name}: a helper parsing the manifest failed (exit {proc.returncode}): "
                                    f"{tail[0]}")
            times["parse_helpers_maxrss_mb"] = max(times.get("parse_helpers_maxrss_mb", 0.0),
                                                   report["maxrss_kb"] / 1024)
            _merge(db, out, offset=n, dirs=dirs)
            out.unlink()
            n, lines, nlinks = n + report["entries"], lines + report["lines"], nlinks + report["nlinks"]
        times["parse+merge"] = time.perf_counter() - started
    finally:
        for proc, out in helpers:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
            out.unlink(missing_ok=True)
    rows = []
    for path, k in dirs.items():
        head, _, base = path.rpartition("/")
        rows.append((k, dirs[head] if head else 0, base))
    db.execute("BEGIN")
    db.executemany("INSERT INTO pdirs VALUES (?,?,?,2)", rows)
    db.execute("COMMIT")
    _derive(db, manifest_file, name=name, entry_count=n, pdir_count=len(dirs), nlinks=nlinks, times=times)


def _merge(db: sqlite3.Connection, part_db: Path, *, offset: int, dirs: dict[str, int]) -> None:
    """Append the entries of a helper's database after the `offset` entries already in `db`, numbering
    its by-path directories as the whole manifest does (`dirs`, extended here in order of appearance)."""
    db.execute("ATTACH DATABASE ? AS part", (str(part_db),))
    try:
        kmap = []
        for k, path in db.execute("SELECT k, path FROM part.part_dirs ORDER BY k").fetchall():
            kmap.append((k, dirs.setdefault(path, len(dirs) + 1)))
        db.execute("BEGIN")
        db.execute("CREATE TEMP TABLE kmap(k INTEGER PRIMARY KEY, global_k INTEGER NOT NULL)")
        db.executemany("INSERT INTO kmap VALUES (?,?)", [(0, 0), *kmap])
        db.execute("INSERT INTO entries SELECT id + ?, sha256, bytes, content_type, width, height, logical_id, etag, "
                   "source_path, (SELECT global_k FROM kmap WHERE kmap.k = p.parent_k), name, nlink, obj "
                   "FROM part.entries p ORDER BY id", (offset,))
        db.execute("DROP TABLE kmap")
        db.execute("COMMIT")
    finally:
        db.execute("DETACH DATABASE part")


def _lineno(manifest_file: Path, entry: int) -> int:
    """The line number of entry `entry` (0-based, blank lines skipped): only for error messages."""
    seen = -1
    with open(manifest_file, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if raw.strip():
                seen += 1
                if seen == entry:
                    return lineno
    return 0


def _derive(db: sqlite3.Connection, manifest_file: Path, *, name: str, entry_count: int, pdir_count: int,
            nlinks: int, times: dict[str, float]) -> None:
    """Objects, logical ids, link counts and indexes, from the loaded tables (all in SQL).

    Objects are not a table: the hash index finds the few sha256 named on several lines, whose later
    lines then point at the first (`obj`) and whose first line gets the link count of all of them.
    """
    started = time.perf_counter()

    def lap(phase: str) -> None:
        nonlocal started
        now = time.perf_counter()
        times[phase] = now - started
        started = now

    db.execute("BEGIN")
    db.execute(INDEXES[0])
    lap("index sha256")
    db.execute("CREATE TEMP TABLE dups(sha256 BLOB PRIMARY KEY, first INTEGER NOT NULL) WITHOUT ROWID")
    db.execute("INSERT INTO dups SELECT sha256, min(id) FROM entries GROUP BY sha256 HAVING count(*) > 1")
    lap("duplicates")
    # (CROSS JOIN: the few duplicated hashes drive every join; the planner has no statistics to know that)
    bad = db.execute("SELECT d.first, e.id FROM dups d CROSS JOIN entries f ON f.id = d.first "
                     "CROSS JOIN entries e ON e.sha256 = d.sha256 WHERE e.bytes != f.bytes "
                     "OR e.content_type != f.content_type ORDER BY d.first, e.id LIMIT 1").fetchone()
    if bad is not None:
        sha = db.execute("SELECT sha256 FROM entries WHERE id=?", (bad[0],)).fetchone()[0]
        raise ManifestError(f"{name}:{_lineno(manifest_file, bad[1])}: sha256 {bytes(sha).hex()} has another "
                            f"size or content_type on line {_lineno(manifest_file, bad[0])}")
    # One name in by-id per distinct logical id; in by-path one per line.
    before, later = db.execute("SELECT coalesce(sum(e.nlink), 0), coalesce(sum(e.id != d.first), 0) FROM dups d "
                               "CROSS JOIN entries e ON e.sha256 = d.sha256").fetchone()
    db.execute("UPDATE entries SET nlink = fix.n FROM (SELECT d.first, 1 + count(DISTINCT e.logical_id) + "
               "count(e.source_path) AS n FROM dups d CROSS JOIN entries e ON e.sha256 = d.sha256 GROUP BY d.first) "
               "AS fix WHERE entries.id = fix.first")
    after = db.execute("SELECT coalesce(sum(e.nlink), 0) FROM dups d CROSS JOIN entries e ON e.id = d.first"
                       ).fetchone()[0]
    db.execute("UPDATE entries SET nlink = NULL, obj = (SELECT first FROM dups WHERE dups.sha256 = entries.sha256) "
               "WHERE id IN (SELECT e.id FROM dups d CROSS JOIN entries e ON e.sha256 = d.sha256 "
               "WHERE e.id != d.first)")
    db.execute("DROP TABLE dups")
    lap("objects")
    db.execute(INDEXES[1])
    lap("index logical_id")
    try:
        db.execute(INDEXES[2])
    except sqlite3.IntegrityError:
        _explain_name_conflict(db, manifest_file, name)
        raise
    db.execute(INDEXES[3])
    lap("index by-path names")
    row = db.execute("SELECT e.id, e.source_path FROM pdirs d CROSS JOIN entries e ON e.parent_k = d.parent_k "
                     "AND e.name = d.name ORDER BY e.id LIMIT 1").fetchone()
    if row is not None:
        raise ManifestError(f"{name}:{_lineno(manifest_file, row[0])}: source_path: {row[1]!r} is also a "
                            "directory of another source_path")
    db.execute("INSERT INTO lids(id) SELECT min(id) FROM entries WHERE logical_id IS NOT NULL "
               "GROUP BY logical_id ORDER BY 1")
    n_lids = db.execute("SELECT count(*) FROM lids").fetchone()[0]
    db.execute("UPDATE pdirs SET nlink = 2 + sub.n FROM (SELECT parent_k, count(*) AS n FROM pdirs "
               "GROUP BY parent_k) AS sub WHERE pdirs.k = sub.parent_k")
    lap("lids, pdirs")
    meta = {"entry_count": entry_count, "object_count": entry_count - later, "logical_id_count": n_lids,
            "pdir_count": pdir_count, "name_count": nlinks - before + after}
    db.executemany("INSERT INTO metadata VALUES (?,?)", [(k, str(v)) for k, v in meta.items()])
    db.execute("COMMIT")
    lap("commit")


def _explain_name_conflict(db: sqlite3.Connection, manifest_file: Path, name: str) -> None:
    """Raise ManifestError for the first source_path named twice."""
    row = db.execute("SELECT parent_k, name FROM entries WHERE parent_k IS NOT NULL GROUP BY parent_k, name "
                     "HAVING count(*) > 1 ORDER BY min(id) LIMIT 1").fetchone()
    if row is None:
        return
    ids = [r[0] for r in db.execute("SELECT id FROM entries WHERE parent_k=? AND name=? ORDER BY id", row)]
    src = db.execute("SELECT source_path FROM entries WHERE id=?", (ids[-1],)).fetchone()[0]
    raise ManifestError(f"{name}:{_lineno(manifest_file, ids[-1])}: source_path: {src!r} is already named on "
                        f"line {_lineno(manifest_file, ids[0])}")


# ----------------------------------------------------------------------------------------------
# Serving
# ----------------------------------------------------------------------------------------------

_ENTRY_COLUMNS = "sha256, bytes, content_type, width, height, logical_id, etag, source_path"


def _entry(row: tuple[Any, ...] | sqlite3.Row) -> Entry:
    sha = bytes(row[0]).hex()
    ctype = row[2]
    return Entry(sha256=sha, path=f"images/{sha[0:2]}/{sha[2:4]}/{sha}.{extension_for(ctype)}", bytes=row[1],
                 content_type=ctype, width=row[3], height=row[4], logical_id=row[5], etag=row[6],
                 source_path=row[7])


def _sha_from_name(name: bytes) -> tuple[bytes, bytes] | None:
    """(raw sha256, ext) of a `<sha256>.<ext>` name, or None."""
    if len(name) < 66 or name[64:65] != b".":
        return None
    try:
        return bytes.fromhex(name[:64].decode("ascii")), name[65:]
    except (UnicodeDecodeError, ValueError):
        return None


class Index:
    """A read-only view of a built index. Thread-safe: one SQLite connection per thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._uri = f"file:{path}?mode=ro"
        self._local = threading.local()
        self._lock = threading.Lock()
        self._conns: list[sqlite3.Connection] = []
        self._closed = False
        self.metadata: dict[str, str] = dict(self._db().execute("SELECT key, value FROM metadata").fetchall())
        self.manifest_sha256 = self.metadata.get("manifest_sha256", "")
        self.mtime_ns = int(self.metadata.get("mtime_ns", "0"))
        self.manifest_bytes = int(self.metadata.get("manifest_bytes", "0"))
        self._entries = int(self.metadata.get("entry_count", "0"))
        self._objects = int(self.metadata.get("object_count", "0"))
        self._lids = int(self.metadata.get("logical_id_count", "0"))
        self._pdirs = int(self.metadata.get("pdir_count", "0"))
        self.iddir_base = OBJ_BASE + self._entries
        self.pdir_base = OBJ_BASE + 2 * self._entries
        self._top_attrs: dict[int, Attr] = {}  # see getattr

    @classmethod
    def open(cls, path: Path, *, manifest_digest: str | None = None) -> Index:
        """Open `path` read-only; ManifestError when it is not an index of this format (or, when
        `manifest_digest` is given, not the index of that manifest)."""
        if not path.is_file():
            raise ManifestError(f"{path}: no such index")
        try:
            index = cls(path)
        except sqlite3.Error as exc:
            raise ManifestError(f"{path}: not a usable index ({exc})") from None
        version = index.metadata.get("format_version")
        if version != str(FORMAT_VERSION):
            index.close()
            raise ManifestError(f"{path}: index format {version}, expected {FORMAT_VERSION}")
        if manifest_digest is not None and index.manifest_sha256 != manifest_digest:
            index.close()
            raise ManifestError(f"{path}: index of manifest {index.manifest_sha256[:12]}, "
                                f"expected {manifest_digest[:12]}")
        return index

    def _db(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            if self._closed:
                raise S3fsimgError(f"{self.path}: the index is closed")
            conn = sqlite3.connect(self._uri, uri=True, check_same_thread=False, isolation_level=None)
            conn.execute("PRAGMA cache_size=-8000")  # at most 8 MB of page cache per thread
            conn.execute("PRAGMA query_only=1")
            self._local.conn = conn
            with self._lock:
                self._conns.append(conn)
        return conn

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conns, self._conns = self._conns, []
        for conn in conns:
            with contextlib.suppress(sqlite3.Error):
                conn.close()

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- inode classes -------------------------------------------------------------------------
    def is_object(self, inode: int) -> bool:
        return OBJ_BASE <= inode < self.iddir_base

    def _iddir_entry(self, inode: int) -> int | None:
        """The entry id of a by-id directory inode, or None when `inode` is not one."""
        if self.iddir_base <= inode < self.pdir_base:
            i = inode - self.iddir_base
            if self._db().execute("SELECT 1 FROM lids WHERE id=?", (i,)).fetchone():
                return i
        return None

    def _pdir_k(self, inode: int) -> int | None:
        """k of a by-path directory inode (0 for by-path itself), or None."""
        if inode == BY_PATH_INODE:
            return 0
        k = inode - self.pdir_base
        return k if 1 <= k <= self._pdirs else None

    def _abcd_exists(self, lo: int, hi: int) -> int | None:
        """The first 0xabcd in [lo, hi) whose directory images/ab/cd holds an object, or None."""
        row = self._db().execute("SELECT sha256 FROM entries WHERE sha256 >= ? AND sha256 < ? ORDER BY sha256 "
                                 "LIMIT 1", (_hash_bound(lo), _hash_bound(hi))).fetchone()
        return None if row is None else (row[0][0] << 8) | row[0][1]

    # -- tree ----------------------------------------------------------------------------------
    def lookup(self, parent_inode: int, name: bytes) -> int | None:
        """The inode of `name` in directory `parent_inode`, or None."""
        db = self._db()
        if name == b".":
            attr = self.getattr(parent_inode)
            return parent_inode if attr is not None and attr.is_dir else None
        if name == b"..":
            return self.parent(parent_inode)
        if parent_inode == ROOT_INODE:
            return dict(ROOT_NAMES).get(name)
        if parent_inode == IMAGES_INODE or AB_BASE <= parent_inode < ABCD_BASE:
            if len(name) != 2:
                return None
            try:
                v = int(name, 16)
            except ValueError:
                return None
            if name != name.lower() or not name.isalnum():
                return None
            if parent_inode == IMAGES_INODE:
                return AB_BASE + v if self._abcd_exists(v << 8, (v + 1) << 8) is not None else None
            d = ((parent_inode - AB_BASE) << 8) + v
            return ABCD_BASE + d if self._abcd_exists(d, d + 1) is not None else None
        if ABCD_BASE <= parent_inode < ABCD_BASE + 65536:
            parsed = _sha_from_name(name)
            if parsed is None:
                return None
            sha, ext = parsed
            if (sha[0] << 8) | sha[1] != parent_inode - ABCD_BASE:
                return None
            row = db.execute("SELECT id, content_type FROM entries WHERE sha256=? AND nlink IS NOT NULL",
                             (sha,)).fetchone()
            if row is None or extension_for(row[1]).encode() != ext:
                return None
            return OBJ_BASE + int(row[0])
        if parent_inode == BY_ID_INODE:
            try:
                lid = name.decode("utf-8")
            except UnicodeDecodeError:
                return None
            row = db.execute("SELECT min(id) FROM entries WHERE logical_id=?", (lid,)).fetchone()
            return None if row[0] is None else self.iddir_base + int(row[0])
        first = self._iddir_entry(parent_inode)
        if first is not None:
            parsed = _sha_from_name(name)
            if parsed is None:
                return None
            for ctype, obj in db.execute("SELECT content_type, coalesce(obj, id) FROM entries WHERE logical_id = "
                                         "(SELECT logical_id FROM entries WHERE id=?) AND sha256=?",
                                         (first, parsed[0])):
                if extension_for(ctype).encode() == parsed[1]:
                    return OBJ_BASE + int(obj)
            return None
        k = self._pdir_k(parent_inode)
        if k is not None:
            try:
                text = name.decode("utf-8")
            except UnicodeDecodeError:
                return None
            row = db.execute("SELECT k FROM pdirs WHERE parent_k=? AND name=?", (k, text)).fetchone()
            if row is not None:
                return self.pdir_base + int(row[0])
            row = db.execute("SELECT coalesce(obj, id) FROM entries WHERE parent_k=? AND name=?", (k, text)).fetchone()
            return None if row is None else OBJ_BASE + int(row[0])
        return None

    def parent(self, inode: int) -> int | None:
        """The inode of '..' of directory `inode` (the root is its own parent), or None."""
        if inode in (ROOT_INODE, IMAGES_INODE, BY_ID_INODE, BY_PATH_INODE):
            return ROOT_INODE
        if AB_BASE <= inode < ABCD_BASE:
            return IMAGES_INODE if self.getattr(inode) else None
        if ABCD_BASE <= inode < ABCD_BASE + 65536:
            return AB_BASE + ((inode - ABCD_BASE) >> 8) if self.getattr(inode) else None
        if self._iddir_entry(inode) is not None:
            return BY_ID_INODE
        k = self._pdir_k(inode)
        if k:
            row = self._db().execute("SELECT parent_k FROM pdirs WHERE k=?", (k,)).fetchone()
            return BY_PATH_INODE if row[0] == 0 else self.pdir_base + int(row[0])
        return None

    def getattr(self, inode: int) -> Attr | None:
        """Attributes of `inode`, or None when there is no such inode. The top directories' (the root,
        images/, by-id/, by-path/ and the <= 256 images/ab: their nlink counts children with up to 256
        index probes) are computed once and kept."""
        if inode < ABCD_BASE:
            attr = self._top_attrs.get(inode)
            if attr is None:
                attr = self._getattr(inode)
                if attr is not None:
                    self._top_attrs[inode] = attr
            return attr
        return self._getattr(inode)

    def _getattr(self, inode: int) -> Attr | None:
        db = self._db()
        if self.is_object(inode):
            row = db.execute("SELECT bytes, nlink, sha256 FROM entries WHERE id=? AND nlink IS NOT NULL",
                             (inode - OBJ_BASE,)).fetchone()
            return Attr(inode, False, row[0], row[1], bytes(row[2]).hex()) if row else None
        if inode == MANIFEST_INODE:
            return Attr(inode, False, self.manifest_bytes, 1)
        if inode == ROOT_INODE:
            return Attr(inode, True, 0, 5)
        if inode in (IMAGES_INODE, BY_ID_INODE, BY_PATH_INODE):
            if inode == IMAGES_INODE:
                nlink = 2 + self._count_ab()
            elif inode == BY_ID_INODE:
                nlink = 2 + self._lids
            else:
                nlink = 2 + int(db.execute("SELECT count(*) FROM pdirs WHERE parent_k=0").fetchone()[0])
            return Attr(inode, True, 0, nlink)
        if AB_BASE <= inode < ABCD_BASE:
            n = sum(1 for _ in self.readdir_attrs(inode))  # at most 256 index probes
            return Attr(inode, True, 0, 2 + n) if n else None
        if ABCD_BASE <= inode < ABCD_BASE + 65536:
            d = inode - ABCD_BASE
            return Attr(inode, True, 0, 2) if self._abcd_exists(d, d + 1) is not None else None
        if self._iddir_entry(inode) is not None:
            return Attr(inode, True, 0, 2)
        k = self._pdir_k(inode)
        if k:
            row = db.execute("SELECT nlink FROM pdirs WHERE k=?", (k,)).fetchone()
            return Attr(inode, True, 0, int(row[0])) if row else None
        return None

    def _count_ab(self) -> int:
        return sum(1 for _ in self._ab_keys(0))

    def _ab_keys(self, after: int) -> Iterator[int]:
        """The ab values (0..255) of existing images/ab directories, greater than or equal to `after`."""
        ab = after
        while ab < 256:
            d = self._abcd_exists(ab << 8, 1 << 16)
            if d is None:
                return
            ab = d >> 8
            yield ab
            ab += 1

    def readdir(self, inode: int, after: int = 0) -> Iterator[tuple[bytes, int, int]]:
        """(name, inode, next_key) of directory `inode` whose key is greater than `after`, in key order.
        Pass the last next_key back as `after` to continue. Queries a page at a time."""
        for name, attr, key in self.readdir_attrs(inode, after):
            yield name, attr.inode, key

    def readdir_attrs(self, inode: int, after: int = 0) -> Iterator[tuple[bytes, Attr, int]]:
        """Like readdir, with each child's attributes (for readdirplus: no lookup per name)."""
        db = self._db()
        if inode == ROOT_INODE:
            for i, (name, child) in enumerate(ROOT_NAMES):
                if i + 1 > after:
                    attr = self.getattr(child)
                    assert attr is not None
                    yield name, attr, i + 1
            return
        if inode == IMAGES_INODE:
            for ab in self._ab_keys(after):
                attr = self.getattr(AB_BASE + ab)
                if attr is not None:
                    yield f"{ab:02x}".encode(), attr, ab + 1
            return
        if AB_BASE <= inode < ABCD_BASE:
            ab = inode - AB_BASE
            cd = after
            while cd < 256:
                d = self._abcd_exists((ab << 8) + cd, (ab + 1) << 8)
                if d is None:
                    return
                cd = d & 0xFF
                yield f"{cd:02x}".encode(), Attr(ABCD_BASE + d, True, 0, 2), cd + 1
                cd += 1
            return
        if ABCD_BASE <= inode < ABCD_BASE + 65536:
            # Objects in hash order; the key is the inode, and a listing resumes after that object's hash.
            d = inode - ABCD_BASE
            hi = _hash_bound(d + 1)
            if after:
                row = db.execute("SELECT sha256 FROM entries WHERE id=?", (after - OBJ_BASE,)).fetchone()
                if row is None:
                    return
                lo, op = row[0], ">"
            else:
                lo, op = _hash_bound(d), ">="
            while True:
                rows = db.execute(f"SELECT id, bytes, nlink, sha256, content_type FROM entries WHERE sha256 {op} ? "
                                  "AND sha256 < ? AND nlink IS NOT NULL ORDER BY sha256 LIMIT ?",
                                  (lo, hi, _PAGE)).fetchall()
                for i, size, nlink, sha, ctype in rows:
                    hexsha = bytes(sha).hex()
                    child = OBJ_BASE + i
                    yield f"{hexsha}.{extension_for(ctype)}".encode(), Attr(child, False, size, nlink, hexsha), child
                if len(rows) < _PAGE:
                    return
                lo, op = rows[-1][3], ">"
        if inode == BY_ID_INODE:
            while True:
                rows = db.execute("SELECT l.id, e.logical_id FROM lids l JOIN entries e ON e.id = l.id "
                                  "WHERE l.id >= ? ORDER BY l.id LIMIT ?", (after, _PAGE)).fetchall()
                for i, lid in rows:
                    yield lid.encode("utf-8"), Attr(self.iddir_base + i, True, 0, 2), i + 1
                if len(rows) < _PAGE:
                    return
                after = rows[-1][0] + 1
        first = self._iddir_entry(inode)
        if first is not None:
            # The files of by-id/<id>: one per distinct object among the lines with that id.
            rows = db.execute(
                f"SELECT e.id, e.sha256, e.content_type, {OBJ_BASE} + o.id, o.bytes, o.nlink FROM entries e "
                "JOIN entries o ON o.id = coalesce(e.obj, e.id) WHERE e.logical_id = "
                "(SELECT logical_id FROM entries WHERE id=?) AND e.id >= ? ORDER BY e.id",
                (first, after)).fetchall()
            seen: set[bytes] = set()
            for i, sha, ctype, child, size, nlink in rows:
                hexsha = bytes(sha).hex()
                name = f"{hexsha}.{extension_for(ctype)}".encode()
                if name in seen or db.execute("SELECT 1 FROM entries WHERE logical_id = (SELECT logical_id FROM "
                                              "entries WHERE id=?) AND sha256=? AND id<? LIMIT 1",
                                              (first, sha, i)).fetchone():
                    continue
                seen.add(name)
                yield name, Attr(child, False, size, nlink, hexsha), i + 1
            return
        k = self._pdir_k(inode)
        if k is not None:
            yield from self._readdir_by_path(k, after)

    def _readdir_by_path(self, k: int, after: int) -> Iterator[tuple[bytes, Attr, int]]:
        """A by-path directory: its subdirectories (key: their k, 1..P), then its files (key: P + 1 + entry
        id), each in name order; a listing resumes after the name of the key's directory or file."""
        db = self._db()
        files_from = self._pdirs + 1
        last: str | None = None
        if after < files_from:
            if after:
                row = db.execute("SELECT name FROM pdirs WHERE k=?", (after,)).fetchone()
                if row is None:
                    return
                last = row[0]
            while True:
                rows = db.execute("SELECT k, name, nlink FROM pdirs WHERE parent_k=? AND name > ? ORDER BY name "
                                  "LIMIT ?", (k, "" if last is None else last, _PAGE)).fetchall()
                for child_k, name, nlink in rows:
                    yield name.encode(), Attr(self.pdir_base + child_k, True, 0, nlink), child_k
                if len(rows) < _PAGE:
                    break
                last = rows[-1][1]
            last = None
        else:
            row = db.execute("SELECT name FROM entries WHERE id=?", (after - files_from,)).fetchone()
            if row is None or row[0] is None:
                return
            last = row[0]
        while True:
            rows = db.execute(
                f"SELECT e.id, e.name, {OBJ_BASE} + o.id, o.bytes, o.nlink, o.sha256 FROM entries e JOIN entries o "
                "ON o.id = coalesce(e.obj, e.id) WHERE e.parent_k=? AND e.name > ? ORDER BY e.name LIMIT ?",
                (k, "" if last is None else last, _PAGE)).fetchall()
            for i, name, child, size, nlink, sha in rows:
                yield name.encode(), Attr(child, False, size, nlink, bytes(sha).hex()), files_from + i
            if len(rows) < _PAGE:
                return
            last = rows[-1][1]

    # -- objects and entries -------------------------------------------------------------------
    def object_for_inode(self, inode: int) -> Entry:
        """The manifest entry (first line) of the object `inode`; NotFound if it is not an object."""
        row = None
        if self.is_object(inode):
            row = self._db().execute(f"SELECT {_ENTRY_COLUMNS} FROM entries WHERE id=? AND nlink IS NOT NULL",
                                     (inode - OBJ_BASE,)).fetchone()
        if row is None:
            raise NotFound(f"inode {inode}: not an object of this manifest")
        return _entry(row)

    def xattrs(self, inode: int) -> dict[str, bytes]:
        """The contract's `user.s3fsimg.*` attributes of an object (those it has); {} for others."""
        try:
            e = self.object_for_inode(inode)
        except NotFound:
            return {}
        values = {"sha256": e.sha256, "logical_id": e.logical_id, "width": e.width, "height": e.height,
                  "content_type": e.content_type, "etag": e.etag}
        return {f"user.s3fsimg.{k}": str(v).encode() for k, v in values.items() if v is not None}

    def by_sha256(self, sha256: str) -> Entry | None:
        """The first entry of the object with this hash."""
        try:
            raw = bytes.fromhex(sha256)
        except ValueError:
            return None
        row = self._db().execute(f"SELECT {_ENTRY_COLUMNS} FROM entries WHERE sha256=? AND nlink IS NOT NULL",
                                 (raw,)).fetchone()
        return _entry(row) if row else None

    def by_logical_id(self, logical_id: str) -> Entry | None:
        """The first entry with this logical id."""
        row = self._db().execute(f"SELECT {_ENTRY_COLUMNS} FROM entries WHERE id = "
                                 "(SELECT min(id) FROM entries WHERE logical_id=?)", (logical_id,)).fetchone()
        return _entry(row) if row else None

    def inode_for_sha256(self, sha256: str) -> int | None:
        row = self._db().execute("SELECT id FROM entries WHERE sha256=? AND nlink IS NOT NULL",
                                 (bytes.fromhex(sha256),)).fetchone()
        return OBJ_BASE + int(row[0]) if row else None

    def entry_count(self) -> int:
        return self._entries

    def object_count(self) -> int:
        return self._objects

    def logical_id_count(self) -> int:
        return self._lids

    def name_count(self) -> int:
        """Files in the tree: one per object under images/, per (logical id, object), per source_path."""
        return int(self.metadata.get("name_count", "0")) + 1  # + manifest.jsonl

    def iter_entries(self) -> Iterator[Entry]:
        """Every entry in manifest order, a page at a time."""
        db = self._db()
        after = -1
        while True:
            rows = db.execute(f"SELECT id, {_ENTRY_COLUMNS} FROM entries WHERE id>? ORDER BY id LIMIT 1000",
                              (after,)).fetchall()
            for row in rows:
                yield _entry(row[1:])
            if len(rows) < 1000:
                return
            after = rows[-1][0]

    def nth_entry(self, i: int) -> Entry:
        """The i-th entry (0-based, manifest order); IndexError when out of range."""
        row = self._db().execute(f"SELECT {_ENTRY_COLUMNS} FROM entries WHERE id=?", (i,)).fetchone()
        if row is None:
            raise IndexError(i)
        return _entry(row)


# ----------------------------------------------------------------------------------------------
# Finding or building the index of a bucket's manifest
# ----------------------------------------------------------------------------------------------

def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def ensure_index(manifest_file: Path, index_dir: Path, *, digest: str | None = None, where: str | None = None,
                 mtime_ns: int | None = None) -> Index:
    """The open index of a local manifest, built under `index_dir/<sha256>.sqlite` if missing (under an
    flock, so concurrent processes build it once)."""
    digest = digest or _sha256_file(manifest_file)
    private_dirs(index_dir)
    dest = index_dir / f"{digest}.sqlite"
    with contextlib.suppress(ManifestError):
        return Index.open(dest, manifest_digest=digest)
    with _flock(index_dir / f"{digest}.lock"):
        try:
            return Index.open(dest, manifest_digest=digest)  # another process built it meanwhile
        except ManifestError:
            pass
        started = time.monotonic()
        report = _build_in_child(manifest_file, dest, digest=digest, where=where, mtime_ns=mtime_ns)
        log.info("built the index of %s in %.1fs (builder process peak RSS %.0f MB, its parsing helpers %.0f MB)",
                 where or manifest_file, time.monotonic() - started, report.get("maxrss_mb", 0),
                 report.get("parse_helpers_maxrss_mb", 0))
        log.debug("index build phases (s): %s", {k: round(v, 2) for k, v in report.items()})
    return Index.open(dest, manifest_digest=digest)


def _build_in_child(manifest_file: Path, dest: Path, *, digest: str, where: str | None,
                    mtime_ns: int | None) -> dict[str, float]:
    """`build_index` in a fresh interpreter (`python -m s3fsimg.index build`), so that the memory the
    build needs (SQLite's sorter and page cache, the parser's batches) is never held by the calling
    process, a mount that then serves for days. Returns the child's report (phase times, peak RSS)."""
    cmd = [sys.executable, "-m", "s3fsimg.index", "build", str(manifest_file), str(dest), "--digest", digest]
    if where is not None:
        cmd += ["--where", where]
    if mtime_ns is not None:
        cmd += ["--mtime-ns", str(mtime_ns)]
    proc = subprocess.run(cmd, capture_output=True, env=_child_env(), check=False)
    lines = proc.stdout.decode(errors="replace").strip().splitlines()
    try:
        report = json.loads(lines[-1]) if lines else {}
    except ValueError:
        report = {}
    if proc.returncode == 3 and "error" in report:
        raise ManifestError(report["error"])
    if proc.returncode != 0 or not isinstance(report, dict):
        tail = proc.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no message"]
        raise ManifestError(f"{where or manifest_file}: building the index failed (exit {proc.returncode}): "
                            f"{tail[0]}")
    return report


def load_index(config: Config, store: S3Store) -> tuple[Index, Path]:
    """The index of the bucket's manifest and the path of its local copy.

    The manifest is HEAD-ed; a local copy with the same ETag is reused, otherwise it is downloaded
    (atomically) into `<cache_dir>/manifests/`. When S3 cannot be reached, the most recent local
    copy of this bucket's manifest is used, with a warning, so a mount serves cached data while S3
    is away. An invalid manifest raises ManifestError naming `s3://bucket/key:LINE`.
    """
    where = store.where(config.manifest_key)
    manifests = private_dirs(config.cache_dir / "manifests")
    ident = f"{config.endpoint_url or 'aws'}|{store.bucket}|{store.key(config.manifest_key)}"
    try:
        info = _head_manifest(store, config.manifest_key, where)
    except BackendError as exc:
        cached = _latest_copy(manifests, ident)
        if cached is None:
            raise ManifestError(f"{where}: cannot read the manifest: {exc}") from None
        log.warning("%s: S3 cannot be reached (%s); serving the local copy of the manifest from %s",
                    where, exc, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(cached["fetched_at"])))
        local = manifests / cached["file"]
        index = ensure_index(local, config.cache_dir / "index", digest=cached["sha256"], where=where,
                             mtime_ns=cached["mtime_ns"])
        return index, local
    key = hashlib.sha256(f"{ident}|{info['etag']}".encode()).hexdigest()[:32]
    local = manifests / f"{key}.jsonl"
    sidecar = manifests / f"{key}.json"
    meta = _read_sidecar(sidecar)
    if meta is None or not local.is_file() or local.stat().st_size != meta.get("size"):
        meta = _download_manifest(store, config.manifest_key, where, local, sidecar, ident, info)
    else:
        meta["fetched_at"] = time.time()
        _write_json(sidecar, meta)  # the most recent copy for an S3-down mount
    index = ensure_index(local, config.cache_dir / "index", digest=meta["sha256"], where=where,
                         mtime_ns=meta["mtime_ns"])
    return index, local


def _head_manifest(store: S3Store, relative: str, where: str) -> dict[str, Any]:
    try:
        info = store.stat(relative)
    except BackendError:
        raise
    except S3fsimgError as err:
        raise ManifestError(f"{where}: cannot read the manifest: {err}") from None
    if info is None:
        raise ManifestError(f"{where}: no manifest in the bucket (upload a dataset first)")
    modified = info.get("last_modified")
    mtime_ns = int(modified.timestamp() * 1e9) if modified is not None else 0
    return {"etag": str(info.get("etag") or ""), "size": int(info["size"]), "mtime_ns": mtime_ns}


def _download_manifest(store: S3Store, relative: str, where: str, local: Path, sidecar: Path, ident: str,
                       info: dict[str, Any]) -> dict[str, Any]:
    fd, tmp = tempfile.mkstemp(prefix=f".{local.name}.", dir=local.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            hashing = _HashingWriter(f)  # hashed as it arrives: the copy is not read back
            got = store.download_file(relative, cast(IO[bytes], hashing))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        digest = hashing.hash.hexdigest()
        os.replace(tmp, local)
    except NotFound:
        raise ManifestError(f"{where}: no manifest in the bucket (upload a dataset first)") from None
    except BackendError as exc:
        raise ManifestError(f"{where}: cannot read the manifest: {exc}") from None
    finally:
        Path(tmp).unlink(missing_ok=True)
    meta = {"ident": ident, "file": local.name, "etag": got.get("etag") or info["etag"], "size": got["size"],
            "sha256": digest, "mtime_ns": info["mtime_ns"], "fetched_at": time.time()}
    _write_json(sidecar, meta)
    return meta


class _HashingWriter:
    """A binary file's `write`, hashing what goes through it."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f = f
        self.hash = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        return self.f.write(data)


def _read_sidecar(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and "sha256" in data and "file" in data else None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _latest_copy(manifests: Path, ident: str) -> dict[str, Any] | None:
    best: dict[str, Any] | None = None
    for sidecar in manifests.glob("*.json"):
        meta = _read_sidecar(sidecar)
        if meta is None or meta.get("ident") != ident or not (manifests / meta["file"]).is_file():
            continue
        if best is None or meta.get("fetched_at", 0) > best.get("fetched_at", 0):
            best = meta
    return best


__all__ = ["BY_ID_INODE", "BY_PATH_INODE", "FORMAT_VERSION", "IMAGES_INODE", "MANIFEST_INODE", "OBJ_BASE",
           "ROOT_INODE", "Attr", "Index", "build_index", "ensure_index", "load_index"]


def _main(argv: list[str]) -> int:
    """`python -m s3fsimg.index build MANIFEST DEST --digest SHA256 [--where W] [--mtime-ns N] [--parts N]`
    (what `ensure_index` runs), or `... part MANIFEST START END OUT` (a parsing helper of a build).
    The last line on stdout is a JSON report; exit 3 with {"error": ...} for a bad manifest."""
    if argv[:1] == ["part"] and len(argv) == 5:
        return _part_main(Path(argv[1]), int(argv[2]), int(argv[3]), Path(argv[4]))
    import argparse

    parser = argparse.ArgumentParser(prog="python -m s3fsimg.index build")
    parser.add_argument("manifest", type=Path)
    parser.add_argument("dest", type=Path)
    parser.add_argument("--digest", required=True)
    parser.add_argument("--where")
    parser.add_argument("--mtime-ns", type=int)
    parser.add_argument("--parts", type=int)
    args = parser.parse_args(argv[1:] if argv[:1] == ["build"] else ["--help"])
    try:
        report = build_index(args.manifest, args.dest, manifest_digest=args.digest, where=args.where,
                             mtime_ns=args.mtime_ns, parts=args.parts)
    except ManifestError as exc:
        print(json.dumps({"error": str(exc)}))
        return 3
    report["maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
