"""The on-disk SQLite index of one manifest: names, inode numbers and attributes of the mount's tree.

Owns the index file format (the schema, `SCHEMA` below, is its only definition), how an index is built
from a manifest (`build_index`), how it is found or built for a bucket's manifest and reused
(`load_index`, `ensure_index`), and the read API that `fs.py` and `dataset.py` query (`Index`).

Nothing here holds a manifest in Python objects. The manifest is streamed once into `entries` (batched
inserts, one transaction per batch); everything else is derived from that table by SQL that runs in C.
Lines go through `manifest.fast_fields` (a tuple straight from a regex, no dict, no Entry; it agrees with
`parse_line` by property test) and only non-canonical or bad lines through json.loads + `parse_entry`.
Where the build time goes at 1,000,000 lines (2 cores, measured): parsing ~4.5 s, inserts ~4.5 s, the
GROUP BY that makes `objects` ~3.5 s (a sort of every entries row), indexes ~2 s.
Only what cannot be computed is stored: `images/` and `by-id/` are *views* of `entries`/`objects`
answered through their indexes (a name there is `<sha256>.<ext>`, so a lookup is one index probe on
the hash), while `by-path/` names are real rows (`pnames`), because a source tree is arbitrary. This
keeps a 1,000,000-entry index at about half the size of a table of every name, and its build short.

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
import sqlite3
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from s3fsimg.errors import BackendError, ManifestError, NotFound, S3fsimgError
from s3fsimg.manifest import Entry, EntryProblem, extension_for, fast_fields, parse_fields

if TYPE_CHECKING:
    from s3fsimg.config import Config
    from s3fsimg.s3 import S3Store

log = logging.getLogger(__name__)

#: Bump when the schema or the inode layout changes; an index of another version is rebuilt.
FORMAT_VERSION = 2

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

# The whole schema, in one place. Tables are created empty before the load; INDEXES after it.
SCHEMA = """
-- Facts about this index, checked on open. Keys: format_version, manifest_sha256, manifest_bytes,
-- mtime_ns, entry_count, object_count, logical_id_count, pdir_count, built_at.
CREATE TABLE metadata(
    key   TEXT PRIMARY KEY,   -- name of the fact
    value TEXT NOT NULL       -- its value, as text
) WITHOUT ROWID;

-- One row per manifest line (blank lines skipped), in manifest order. `path` is not stored: it is
-- images/ab/cd/<sha256>.<ext of content_type>, which the manifest parser has checked.
CREATE TABLE entries(
    id           INTEGER PRIMARY KEY,  -- 0-based position among the entries: nth_entry(id)
    sha256       BLOB NOT NULL,        -- object hash, 32 raw bytes
    bytes        INTEGER NOT NULL,     -- object size
    content_type TEXT NOT NULL,        -- image/...
    width        INTEGER,              -- pixels, or NULL
    height       INTEGER,              -- pixels, or NULL
    logical_id   TEXT,                 -- by-id/<logical_id>, or NULL
    etag         TEXT,                 -- S3 ETag with its quotes, or NULL
    source_path  TEXT                  -- by-path/<source_path>, or NULL
);

-- One row per distinct object: the inode every name of it shares.
CREATE TABLE objects(
    inode  INTEGER PRIMARY KEY,  -- OBJ_BASE + entries.id of the object's first line
    sha256 BLOB NOT NULL,        -- 32 raw bytes (unique index objects_sha256)
    dir    INTEGER NOT NULL,     -- 0xabcd: its directory images/ab/cd (index objects_dir: readdir order)
    bytes  INTEGER NOT NULL,     -- st_size
    nlink  INTEGER NOT NULL      -- st_nlink: 1 (images/) + distinct logical ids + source paths
);

-- One row per distinct logical id: the by-id/<logical_id> directories, in readdir order.
CREATE TABLE lids(
    id INTEGER PRIMARY KEY       -- entries.id of the first line with this logical id
);

-- One row per by-path directory.
CREATE TABLE pdirs(
    k        INTEGER PRIMARY KEY,  -- directory number (inode OBJ_BASE + 2E + k), order of first appearance
    parent_k INTEGER NOT NULL,     -- its parent's k; 0 is by-path itself
    nlink    INTEGER NOT NULL      -- st_nlink: 2 + subdirectories
);

-- One row per name under by-path/ (files and directories).
CREATE TABLE pnames(
    id       INTEGER PRIMARY KEY,  -- readdir key: stable, increasing within a directory
    parent_k INTEGER NOT NULL,     -- pdirs.k of the directory holding the name; 0 is by-path itself
    name     BLOB NOT NULL,        -- the name's bytes (UTF-8)
    entry    INTEGER,              -- a file: entries.id of its line (NULL for a directory)
    child_k  INTEGER               -- a directory: its pdirs.k (NULL for a file)
);
"""

INDEXES = (
    "CREATE UNIQUE INDEX objects_sha256 ON objects(sha256)",          # by_sha256, images/ lookup
    "CREATE INDEX objects_dir ON objects(dir)",                       # images/ab/cd readdir (dir, inode)
    "CREATE INDEX entries_logical_id ON entries(logical_id) WHERE logical_id IS NOT NULL",  # by-id
    "CREATE UNIQUE INDEX pnames_name ON pnames(parent_k, name)",      # by-path lookup; duplicate check
    "CREATE INDEX pnames_parent ON pnames(parent_k)",                 # by-path readdir (parent_k, id)
)


def _dir16(sha: bytes) -> int:
    """0xabcd of the directory images/ab/cd of a raw sha256."""
    return (sha[0] << 8) | sha[1]



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
                mtime_ns: int | None = None) -> None:
    """Compile `manifest_file` into the index `dest`, atomically.

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
    try:
        db = sqlite3.connect(tmp, isolation_level=None)
        try:
            _build(db, manifest_file, name=name)
            meta = {"format_version": FORMAT_VERSION, "manifest_sha256": manifest_digest,
                    "manifest_bytes": stat.st_size, "built_at": time.time_ns(),
                    "mtime_ns": stat.st_mtime_ns if mtime_ns is None else mtime_ns}
            db.executemany("INSERT OR REPLACE INTO metadata VALUES (?,?)", [(k, str(v)) for k, v in meta.items()])
        finally:
            db.close()
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, 0o600)
        os.replace(tmp, dest)
        _fsync_dir(dest.parent)
    except sqlite3.Error as exc:
        raise ManifestError(f"{name}: cannot build the index at {dest}: {exc}") from None
    finally:
        tmp.unlink(missing_ok=True)
        Path(f"{tmp}-journal").unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _build(db: sqlite3.Connection, manifest_file: Path, *, name: str) -> None:
    db.executescript("PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF; PRAGMA cache_size=-32000;"
                     "PRAGMA temp_store=FILE;")
    db.executescript(SCHEMA)
    pdirs: dict[str, int] = {}  # by-path directory -> k: directories only, never files
    rows: list[tuple[Any, ...]] = []
    prows: list[tuple[int, bytes, int | None, int | None]] = []
    drows: list[tuple[int, int, int]] = []

    def flush() -> None:
        db.execute("BEGIN")
        db.executemany("INSERT INTO entries VALUES (?,?,?,?,?,?,?,?,?)", rows)
        db.executemany("INSERT INTO pnames(parent_k, name, entry, child_k) VALUES (?,?,?,?)", prows)
        db.executemany("INSERT INTO pdirs VALUES (?,?,?)", drows)
        db.execute("COMMIT")
        rows.clear()
        prows.clear()
        drows.clear()

    def pdir(path: str) -> int:
        k = pdirs.get(path)
        if k is None:
            head, _, base = path.rpartition("/")
            parent_k = pdir(head) if head else 0
            k = len(pdirs) + 1
            pdirs[path] = k
            drows.append((k, parent_k, 2))
            prows.append((parent_k, base.encode(), None, k))
        return k

    n = 0
    fromhex = bytes.fromhex
    try:
        f = open(manifest_file, "rb")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise ManifestError(f"{name}: cannot read the manifest: {exc.strerror}") from None
    with f:
        for lineno, raw in enumerate(f, 1):
            # The fast path (no dict, no Entry) for canonical lines; parse_line for the rest and for errors.
            fields = fast_fields(raw)
            if fields is None:
                if not raw.strip():
                    continue
                try:
                    fields = parse_fields(raw)
                except EntryProblem as exc:
                    raise ManifestError(f"{name}:{lineno}: {exc}") from None
            sha, size, ctype, width, height, lid, etag, src = fields
            rows.append((n, fromhex(sha), size, ctype, width, height, lid, etag, src))
            if src is not None:
                head, _, base = src.rpartition("/")
                prows.append((pdir(head) if head else 0, base.encode(), n, None))
            n += 1
            if len(rows) >= _BATCH:
                flush()
    flush()
    _derive(db, manifest_file, name=name, entry_count=n, pdir_count=len(pdirs))


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


def _derive(db: sqlite3.Connection, manifest_file: Path, *, name: str, entry_count: int, pdir_count: int) -> None:
    """Objects, logical ids, link counts and indexes, from the loaded tables (all in SQL)."""
    db.execute("BEGIN")
    # Distinct objects. A name in by-id is one per distinct logical id; in by-path one per line.
    # nlink -1 marks a conflict (reported below); -2 an object named by several logical ids, whose distinct
    # count is computed afterwards for those few objects only (count(DISTINCT) over every group costs
    # seconds per million lines). dir16() is a Python function: cheaper than any SQL expression on a BLOB.
    db.create_function("dir16", 1, _dir16, deterministic=True)
    db.execute(
        f"""INSERT INTO objects(inode, sha256, dir, bytes, nlink)
            SELECT {OBJ_BASE} + min(id), sha256, dir16(sha256), min(bytes),
                   CASE WHEN min(bytes) != max(bytes) OR min(content_type) != max(content_type) THEN -1
                        WHEN count(logical_id) > 1 THEN -2
                        ELSE 1 + count(logical_id) + count(source_path) END
            FROM entries GROUP BY sha256 ORDER BY min(id)"""
    )
    db.execute("""UPDATE objects SET nlink = 1 + fix.lids + fix.paths
                  FROM (SELECT sha256, count(DISTINCT logical_id) AS lids, count(source_path) AS paths
                        FROM entries WHERE sha256 IN (SELECT sha256 FROM objects WHERE nlink = -2)
                        GROUP BY sha256) AS fix
                  WHERE objects.sha256 = fix.sha256""")
    n_objects = db.execute("SELECT count(*) FROM objects").fetchone()[0]
    bad = db.execute("SELECT sha256 FROM objects WHERE nlink < 0 ORDER BY inode LIMIT 1").fetchone()
    if bad is not None:
        first, other = db.execute(
            "SELECT f.id, e.id FROM entries f JOIN entries e ON e.sha256 = f.sha256 WHERE f.sha256=? AND "
            "f.id = (SELECT min(id) FROM entries WHERE sha256=?) AND (e.bytes != f.bytes OR "
            "e.content_type != f.content_type) ORDER BY e.id LIMIT 1", (bad[0], bad[0])).fetchone()
        raise ManifestError(f"{name}:{_lineno(manifest_file, other)}: sha256 {bytes(bad[0]).hex()} has another "
                            f"size or content_type on line {_lineno(manifest_file, first)}")
    for statement in INDEXES:
        try:
            db.execute(statement)
        except sqlite3.IntegrityError:
            _explain_pnames_conflict(db, manifest_file, name)
            raise
    db.execute("INSERT INTO lids(id) SELECT min(id) FROM entries WHERE logical_id IS NOT NULL "
               "GROUP BY logical_id ORDER BY 1")
    n_lids = db.execute("SELECT count(*) FROM lids").fetchone()[0]
    db.execute("UPDATE pdirs SET nlink = 2 + sub.n FROM (SELECT parent_k, count(*) AS n FROM pdirs "
               "GROUP BY parent_k) AS sub WHERE pdirs.k = sub.parent_k")
    meta = {"entry_count": entry_count, "object_count": n_objects, "logical_id_count": n_lids,
            "pdir_count": pdir_count}
    db.executemany("INSERT INTO metadata VALUES (?,?)", [(k, str(v)) for k, v in meta.items()])
    db.execute("COMMIT")


def _explain_pnames_conflict(db: sqlite3.Connection, manifest_file: Path, name: str) -> None:
    """Raise ManifestError for the first by-path name given twice (a file twice, or a file and a directory)."""
    row = db.execute("SELECT parent_k, name FROM pnames GROUP BY parent_k, name HAVING count(*) > 1 "
                     "ORDER BY min(id) LIMIT 1").fetchone()
    if row is None:
        return
    rows = db.execute("SELECT entry, child_k FROM pnames WHERE parent_k=? AND name=? ORDER BY id", row).fetchall()
    files = [r[0] for r in rows if r[0] is not None]
    src = db.execute("SELECT source_path FROM entries WHERE id=?", (files[-1],)).fetchone()[0]
    line = _lineno(manifest_file, files[-1])
    if len(files) > 1:
        raise ManifestError(f"{name}:{line}: source_path: {src!r} is already named on line "
                            f"{_lineno(manifest_file, files[0])}")
    raise ManifestError(f"{name}:{line}: source_path: {src!r} is also a directory of another source_path")


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
        row = self._db().execute("SELECT min(dir) FROM objects WHERE dir >= ? AND dir < ?", (lo, hi)).fetchone()
        return None if row[0] is None else int(row[0])

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
            row = db.execute("SELECT o.inode, o.dir, e.content_type FROM objects o JOIN entries e "
                             f"ON e.id = o.inode - {OBJ_BASE} WHERE o.sha256=?", (parsed[0],)).fetchone()
            if row is None or row[1] != parent_inode - ABCD_BASE or extension_for(row[2]).encode() != parsed[1]:
                return None
            return int(row[0])
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
            for (ctype,) in db.execute("SELECT content_type FROM entries WHERE logical_id = "
                                       "(SELECT logical_id FROM entries WHERE id=?) AND sha256=?",
                                       (first, parsed[0])):
                if extension_for(ctype).encode() == parsed[1]:
                    row = db.execute("SELECT inode FROM objects WHERE sha256=?", (parsed[0],)).fetchone()
                    return int(row[0]) if row else None
            return None
        k = self._pdir_k(parent_inode)
        if k is not None:
            row = db.execute("SELECT p.child_k, o.inode FROM pnames p LEFT JOIN entries e ON e.id = p.entry "
                             "LEFT JOIN objects o ON o.sha256 = e.sha256 WHERE p.parent_k=? AND p.name=?",
                             (k, name)).fetchone()
            if row is None:
                return None
            return self.pdir_base + int(row[0]) if row[0] is not None else int(row[1])
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
        """Attributes of `inode`, or None when there is no such inode."""
        db = self._db()
        if self.is_object(inode):
            row = db.execute("SELECT bytes, nlink, sha256 FROM objects WHERE inode=?", (inode,)).fetchone()
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
            ab = inode - AB_BASE
            if self._abcd_exists(ab << 8, (ab + 1) << 8) is None:
                return None
            n = db.execute("SELECT count(DISTINCT dir) FROM objects WHERE dir >= ? AND dir < ?",
                           (ab << 8, (ab + 1) << 8)).fetchone()[0]
            return Attr(inode, True, 0, 2 + int(n))
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
            while True:
                rows = db.execute(f"SELECT o.inode, o.bytes, o.nlink, o.sha256, e.content_type FROM objects o "
                                  f"JOIN entries e ON e.id = o.inode - {OBJ_BASE} WHERE o.dir=? AND o.inode>? "
                                  "ORDER BY o.inode LIMIT ?", (inode - ABCD_BASE, after, _PAGE)).fetchall()
                for child, size, nlink, sha, ctype in rows:
                    hexsha = bytes(sha).hex()
                    yield f"{hexsha}.{extension_for(ctype)}".encode(), Attr(child, False, size, nlink, hexsha), child
                if len(rows) < _PAGE:
                    return
                after = rows[-1][0]
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
                "SELECT e.id, e.sha256, e.content_type, o.inode, o.bytes, o.nlink FROM entries e "
                "JOIN objects o ON o.sha256 = e.sha256 WHERE e.logical_id = "
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
            while True:
                rows = db.execute(
                    "SELECT p.id, p.name, p.child_k, o.inode, o.bytes, o.nlink, o.sha256, d.nlink FROM pnames p "
                    "LEFT JOIN entries e ON e.id = p.entry LEFT JOIN objects o ON o.sha256 = e.sha256 "
                    "LEFT JOIN pdirs d ON d.k = p.child_k WHERE p.parent_k=? AND p.id>? ORDER BY p.id LIMIT ?",
                    (k, after, _PAGE)).fetchall()
                for key, name, child_k, child, size, nlink, sha, dnlink in rows:
                    if child_k is not None:
                        attr = Attr(self.pdir_base + child_k, True, 0, dnlink)
                    else:
                        attr = Attr(child, False, size, nlink, bytes(sha).hex())
                    yield bytes(name), attr, key
                if len(rows) < _PAGE:
                    return
                after = rows[-1][0]

    # -- objects and entries -------------------------------------------------------------------
    def object_for_inode(self, inode: int) -> Entry:
        """The manifest entry (first line) of the object `inode`; NotFound if it is not an object."""
        row = None
        if self.is_object(inode):
            row = self._db().execute(f"SELECT {_ENTRY_COLUMNS} FROM entries WHERE id=? AND "
                                     "EXISTS (SELECT 1 FROM objects WHERE inode=?)",
                                     (inode - OBJ_BASE, inode)).fetchone()
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
        row = self._db().execute(f"SELECT {_ENTRY_COLUMNS} FROM entries WHERE id = "
                                 f"(SELECT inode - {OBJ_BASE} FROM objects WHERE sha256=?)", (raw,)).fetchone()
        return _entry(row) if row else None

    def by_logical_id(self, logical_id: str) -> Entry | None:
        """The first entry with this logical id."""
        row = self._db().execute(f"SELECT {_ENTRY_COLUMNS} FROM entries WHERE id = "
                                 "(SELECT min(id) FROM entries WHERE logical_id=?)", (logical_id,)).fetchone()
        return _entry(row) if row else None

    def inode_for_sha256(self, sha256: str) -> int | None:
        row = self._db().execute("SELECT inode FROM objects WHERE sha256=?", (bytes.fromhex(sha256),)).fetchone()
        return int(row[0]) if row else None

    def entry_count(self) -> int:
        return self._entries

    def object_count(self) -> int:
        return self._objects

    def logical_id_count(self) -> int:
        return self._lids

    def name_count(self) -> int:
        """Files in the tree: one per object under images/, per (logical id, object), per source_path."""
        row = self._db().execute("SELECT sum(nlink) FROM objects").fetchone()
        return int(row[0] or 0) + 1  # + manifest.jsonl

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

def _private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


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
    _private_dir(index_dir)
    dest = index_dir / f"{digest}.sqlite"
    with contextlib.suppress(ManifestError):
        return Index.open(dest, manifest_digest=digest)
    with _flock(index_dir / f"{digest}.lock"):
        try:
            return Index.open(dest, manifest_digest=digest)  # another process built it meanwhile
        except ManifestError:
            pass
        started = time.monotonic()
        build_index(manifest_file, dest, manifest_digest=digest, where=where, mtime_ns=mtime_ns)
        log.info("built the index of %s in %.1fs", where or manifest_file, time.monotonic() - started)
    return Index.open(dest, manifest_digest=digest)


def load_index(config: Config, store: S3Store) -> tuple[Index, Path]:
    """The index of the bucket's manifest and the path of its local copy.

    The manifest is HEAD-ed; a local copy with the same ETag is reused, otherwise it is downloaded
    (atomically) into `<cache_dir>/manifests/`. When S3 cannot be reached, the most recent local
    copy of this bucket's manifest is used, with a warning, so a mount serves cached data while S3
    is away. An invalid manifest raises ManifestError naming `s3://bucket/key:LINE`.
    """
    where = store.where(config.manifest_key)
    manifests = _private_dir(config.cache_dir / "manifests")
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
            got = store.download_file(relative, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        digest = _sha256_file(Path(tmp))
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
