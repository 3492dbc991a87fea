"""The on-disk SQLite index of one manifest: names, inode numbers and attributes of the mount's tree.

Owns the index file format (the schema, in `SCHEMA` below, is its only definition), how an index is
built from a manifest (`build_index`), how it is found or built for a bucket's manifest and reused
(`load_index`), and the read API that `fs.py` and `dataset.py` query (`Index`). Nothing here loads a
whole manifest into Python objects: a manifest of millions of lines is streamed once into the
`entries` table, and everything else (objects, directories, names, link counts) is derived from it
by SQL statements that run in C.

On-disk layout, under the cache directory::

    <cache_dir>/manifests/<key>.jsonl      local copy of a bucket's manifest; <key> hashes the endpoint,
    <cache_dir>/manifests/<key>.json       bucket, manifest key and ETag; the .json records ETag,
                                           Last-Modified, sha256 and size of that copy
    <cache_dir>/index/<sha256>.sqlite      the index of the manifest whose bytes hash to <sha256>
    <cache_dir>/index/<sha256>.lock        flock held while building, so two processes never both build

An index is built into `<dest>.tmp-<pid>` (and a staging database beside it, deleted afterwards) and
renamed into place last, so a half-built index is never opened. It is opened read-only (`mode=ro`)
for serving, and its `metadata` table (format version, manifest digest) is checked on open.

Inode numbers (stable for a given manifest: every number is a function of manifest order)::

    1 root   2 images   3 by-id   4 by-path   5 manifest.jsonl
    16 + 0xab                      images/ab
    272 + 0xabcd                   images/ab/cd
    OBJ_BASE + n                   the n-th distinct object (sha256) in order of first appearance;
                                   every name of that object (images/, by-id/, by-path/) is this inode
    obj_base + objects + n         the n-th by-id/<logical_id> directory, in order of first appearance
    ... + logical ids + n          the n-th by-path directory, in order of first appearance

Threads: each thread gets its own read-only connection (`threading.local`), made with
`check_same_thread=False` only so that `close()` can close them all from one thread. Readers in
different threads then never wait on a Python lock, and SQLite lets read-only connections read
concurrently; every query is a few indexed B-tree lookups, cheap enough to run on the trio thread.
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
from s3fsimg.manifest import Entry, iter_entries

if TYPE_CHECKING:
    from s3fsimg.config import Config
    from s3fsimg.s3 import S3Store

log = logging.getLogger(__name__)

#: Bump when the schema or the inode layout changes; an index of another version is rebuilt.
FORMAT_VERSION = 1

ROOT_INODE = 1
IMAGES_INODE = 2
BY_ID_INODE = 3
BY_PATH_INODE = 4
MANIFEST_INODE = 5
AB_BASE = 16  # images/ab -> AB_BASE + 0xab
ABCD_BASE = AB_BASE + 256  # images/ab/cd -> ABCD_BASE + 0xabcd
OBJ_BASE = 1 << 17  # first object inode; everything below is a fixed directory or file

#: Names of the root directory, in readdir order.
ROOT_NAMES = ((b"images", IMAGES_INODE), (b"by-id", BY_ID_INODE), (b"by-path", BY_PATH_INODE),
              (b"manifest.jsonl", MANIFEST_INODE))

_BATCH = 20_000  # rows per insert transaction while streaming the manifest
_READDIR_PAGE = 512  # rows fetched per readdir query
_PATH_PREFIX_LEN = len("images/ab/cd/")  # basename of a manifest path = substr(path, 14)

# The whole schema, in one place. Tables are created empty before the load; indexes after it.
SCHEMA = """
-- Facts about this index, checked on open. Keys: format_version, manifest_sha256, manifest_bytes,
-- mtime_ns, entry_count, object_count, obj_base, iddir_base, pdir_base, built_at.
CREATE TABLE metadata(
    key   TEXT PRIMARY KEY,   -- name of the fact
    value TEXT NOT NULL       -- its value, as text
) WITHOUT ROWID;

-- One row per manifest line (blank lines skipped), in manifest order.
CREATE TABLE entries(
    id           INTEGER PRIMARY KEY,  -- 0-based position among the entries: nth_entry(id)
    lineno       INTEGER NOT NULL,     -- 1-based line number in the manifest, for messages
    sha256       TEXT NOT NULL,        -- object hash (64 lowercase hex digits)
    path         TEXT NOT NULL,        -- images/ab/cd/<sha256>.<ext>
    bytes        INTEGER NOT NULL,     -- object size
    content_type TEXT NOT NULL,        -- image/...
    width        INTEGER,              -- pixels, or NULL
    height       INTEGER,              -- pixels, or NULL
    logical_id   TEXT,                 -- by-id/<logical_id>, or NULL
    etag         TEXT,                 -- S3 ETag with its quotes, or NULL
    source_path  TEXT                  -- by-path/<source_path>, or NULL
);

-- One row per distinct object (sha256): the inode all of its names share.
CREATE TABLE objects(
    inode  INTEGER PRIMARY KEY,  -- OBJ_BASE + rank of the object's first appearance in the manifest
    sha256 TEXT NOT NULL,        -- the object's hash (unique index objects_sha256)
    entry  INTEGER NOT NULL,     -- entries.id of its first line: attributes, xattrs, object_for_inode
    bytes  INTEGER NOT NULL,     -- st_size
    nlink  INTEGER NOT NULL      -- st_nlink: how many names it has in the tree
);

-- One row per directory.
CREATE TABLE dirs(
    inode  INTEGER PRIMARY KEY,  -- the directory's inode
    parent INTEGER NOT NULL,     -- inode of '..' (the root is its own parent)
    nlink  INTEGER NOT NULL,     -- st_nlink: 2 + number of subdirectories
    entry  INTEGER               -- by-id/<logical_id> dirs: entries.id of the first line with that id
);

-- One row per name (directory entry).
CREATE TABLE dentries(
    id     INTEGER PRIMARY KEY,  -- readdir key: stable, increasing within a directory (insertion order)
    parent INTEGER NOT NULL,     -- inode of the directory holding the name
    name   BLOB NOT NULL,        -- the name's bytes (UTF-8)
    inode  INTEGER NOT NULL      -- objects.inode, dirs.inode or MANIFEST_INODE
);
"""

INDEXES = """
CREATE UNIQUE INDEX dentries_name ON dentries(parent, name);   -- lookup
CREATE INDEX dentries_parent ON dentries(parent);              -- readdir: (parent, rowid) keyset order
"""

_HEX = "'0123456789abcdef'"


def _hexdigit(expr: str, pos: int) -> str:
    return f"(instr({_HEX}, substr({expr}, {pos}, 1)) - 1)"


def _hex2(expr: str) -> str:
    """SQL for int(expr[0:2], 16)."""
    return f"({_hexdigit(expr, 1)} * 16 + {_hexdigit(expr, 2)})"


def _hex4(expr: str) -> str:
    """SQL for int(expr[0:4], 16)."""
    return f"({_hex2(expr)} * 256 + {_hexdigit(expr, 3)} * 16 + {_hexdigit(expr, 4)})"


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

    `manifest_digest` is the sha256 of the manifest's bytes, recorded in the metadata. `where`
    names the manifest in error messages (`s3://bucket/key`); `mtime_ns` is the mtime every file and
    directory of the mount shows (default: the manifest file's own mtime). A bad line raises
    ManifestError naming `where:LINE`; nothing is left at `dest` on any failure.
    """
    name = where or str(manifest_file)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{dest.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    stage = tmp.with_name(tmp.name + ".stage")
    for p in (tmp, stage):
        p.unlink(missing_ok=True)
    if mtime_ns is None:
        try:
            mtime_ns = manifest_file.stat().st_mtime_ns
        except OSError as exc:
            raise ManifestError(f"{name}: cannot read the manifest: {exc.strerror}") from None
    try:
        db = sqlite3.connect(tmp, isolation_level=None)
        try:
            _build(db, manifest_file, stage, name=name, digest=manifest_digest, mtime_ns=mtime_ns)
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
        stage.unlink(missing_ok=True)
        for suffix in ("-journal", "-wal", "-shm"):
            Path(str(tmp) + suffix).unlink(missing_ok=True)
            Path(str(stage) + suffix).unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _build(db: sqlite3.Connection, manifest_file: Path, stage: Path, *, name: str, digest: str,
           mtime_ns: int) -> None:
    db.executescript("PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF; PRAGMA cache_size=-32000;"
                     "PRAGMA temp_store=FILE; PRAGMA page_size=4096;")
    db.executescript(SCHEMA)
    db.execute("ATTACH DATABASE ? AS stage", (str(stage),))
    db.executescript(
        """
        PRAGMA stage.journal_mode=OFF; PRAGMA stage.synchronous=OFF;
        -- by-path directories: k is 1-based creation order, parent_k 0 means by-path itself
        CREATE TABLE stage.pdirs(k INTEGER PRIMARY KEY, parent_k INTEGER NOT NULL, name BLOB NOT NULL);
        -- by-path files: the entry, its directory k, its base name
        CREATE TABLE stage.pfiles(entry INTEGER NOT NULL, parent_k INTEGER NOT NULL, name BLOB NOT NULL);
        """
    )
    entries_sql = "INSERT INTO entries VALUES (?,?,?,?,?,?,?,?,?,?,?)"
    pdirs: dict[str, int] = {}  # by-path directory path -> k: directories only, never files
    rows: list[tuple[Any, ...]] = []
    prows: list[tuple[int, int, bytes]] = []
    drows: list[tuple[int, int, bytes]] = []

    def flush() -> None:
        db.execute("BEGIN")
        db.executemany(entries_sql, rows)
        if prows:
            db.executemany("INSERT INTO stage.pfiles VALUES (?,?,?)", prows)
        if drows:
            db.executemany("INSERT INTO stage.pdirs VALUES (?,?,?)", drows)
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
            drows.append((k, parent_k, base.encode()))
        return k

    n = 0
    for lineno, e in iter_entries(manifest_file, where=name):
        rows.append((n, lineno, e.sha256, e.path, e.bytes, e.content_type, e.width, e.height,
                     e.logical_id, e.etag, e.source_path))
        src = e.source_path
        if src is not None:
            head, _, base = src.rpartition("/")
            prows.append((n, pdir(head) if head else 0, base.encode()))
        n += 1
        if len(rows) >= _BATCH:
            flush()
    flush()
    _derive(db, name=name, pdir_count=len(pdirs))
    meta = {
        "format_version": FORMAT_VERSION,
        "manifest_sha256": digest,
        "manifest_bytes": manifest_file.stat().st_size,
        "mtime_ns": mtime_ns,
        "entry_count": n,
        "built_at": time.time_ns(),
    }
    db.executemany("INSERT OR REPLACE INTO metadata VALUES (?,?)", [(k, str(v)) for k, v in meta.items()])
    db.execute("DETACH DATABASE stage")
    db.execute("PRAGMA optimize")


def _first_line(db: sqlite3.Connection, entry: int) -> int:
    row = db.execute("SELECT lineno FROM entries WHERE id=?", (entry,)).fetchone()
    return int(row[0]) if row else 0


def _derive(db: sqlite3.Connection, *, name: str, pdir_count: int) -> None:
    """Objects, directories, names and link counts, from the loaded `entries` (all in SQL)."""
    db.execute("BEGIN")
    # Distinct objects with their first line and how many names each has. A name in by-id is one per
    # distinct (logical_id, path); in images one per distinct path; in by-path one per line.
    db.execute(
        """CREATE TABLE stage.objs AS
           SELECT sha256, min(id) AS first, min(bytes) AS lo, max(bytes) AS hi, count(DISTINCT path) AS npaths,
                  count(DISTINCT path) + count(DISTINCT logical_id || '/' || path) + count(source_path) AS nlink
           FROM entries GROUP BY sha256"""
    )
    bad = db.execute("SELECT sha256, first, lo, hi FROM stage.objs WHERE lo != hi LIMIT 1").fetchone()
    if bad:
        other = db.execute("SELECT lineno, bytes FROM entries WHERE sha256=? AND bytes!=? ORDER BY id LIMIT 1",
                           (bad[0], db.execute("SELECT bytes FROM entries WHERE id=?", (bad[1],)).fetchone()[0])
                           ).fetchone()
        raise ManifestError(f"{name}:{other[0]}: bytes: {other[1]} differs from line {_first_line(db, bad[1])}, "
                            "which gives another size for the same sha256")
    db.execute(
        f"""INSERT INTO objects(inode, sha256, entry, bytes, nlink)
            SELECT {OBJ_BASE} - 1 + row_number() OVER (ORDER BY first), sha256, first, lo, nlink
            FROM stage.objs ORDER BY first"""
    )
    db.execute("CREATE UNIQUE INDEX objects_sha256 ON objects(sha256)")
    n_objects = db.execute("SELECT count(*) FROM objects").fetchone()[0]
    iddir_base = OBJ_BASE + n_objects

    db.execute(
        f"""CREATE TABLE stage.lids AS
            SELECT CAST(logical_id AS BLOB) AS name,
                   {iddir_base} - 1 + row_number() OVER (ORDER BY min(id)) AS inode, min(id) AS first
            FROM entries WHERE logical_id IS NOT NULL GROUP BY logical_id"""
    )
    db.execute("CREATE UNIQUE INDEX stage.lids_name ON lids(name)")
    n_lids = db.execute("SELECT count(*) FROM stage.lids").fetchone()[0]
    pdir_base = iddir_base + n_lids

    # by-path conflicts: a source_path named twice, or one that is also a directory of another.
    dup = db.execute("SELECT min(entry), max(entry) FROM stage.pfiles GROUP BY parent_k, name "
                     "HAVING count(*) > 1 LIMIT 1").fetchone()
    if dup:
        src = db.execute("SELECT source_path FROM entries WHERE id=?", (dup[1],)).fetchone()[0]
        raise ManifestError(f"{name}:{_first_line(db, dup[1])}: source_path: {src!r} is already named on line "
                            f"{_first_line(db, dup[0])}")
    db.execute("CREATE INDEX stage.pdirs_name ON pdirs(parent_k, name)")
    clash = db.execute("SELECT f.entry FROM stage.pfiles f JOIN stage.pdirs d "
                       "ON d.parent_k = f.parent_k AND d.name = f.name LIMIT 1").fetchone()
    if clash:
        src = db.execute("SELECT source_path FROM entries WHERE id=?", (clash[0],)).fetchone()[0]
        raise ManifestError(f"{name}:{_first_line(db, clash[0])}: source_path: {src!r} is also a directory "
                            "of another source_path")

    ins = "INSERT INTO dentries(parent, name, inode) "
    db.executemany("INSERT INTO dentries(parent, name, inode) VALUES (?,?,?)",
                   [(ROOT_INODE, n, i) for n, i in ROOT_NAMES])
    # images/ab and images/ab/cd
    db.execute(ins + f"SELECT {IMAGES_INODE}, CAST(p AS BLOB), {AB_BASE} + {_hex2('p')} FROM "
               "(SELECT DISTINCT substr(sha256, 1, 2) AS p FROM objects ORDER BY 1)")
    db.execute(ins + f"SELECT {AB_BASE} + {_hex2('p')}, CAST(substr(p, 3, 2) AS BLOB), {ABCD_BASE} + {_hex4('p')} "
               "FROM (SELECT DISTINCT substr(sha256, 1, 4) AS p FROM objects ORDER BY 1)")
    # images/ab/cd/<sha>.<ext>: the path of each object's first line ...
    db.execute(ins + f"SELECT {ABCD_BASE} + {_hex4('o.sha256')}, CAST(substr(e.path, {_PATH_PREFIX_LEN + 1}) "
               "AS BLOB), o.inode FROM objects o JOIN entries e ON e.id = o.entry ORDER BY o.inode")
    # ... and any other path of the same sha256 (another content type: rare)
    db.execute(ins + f"SELECT {ABCD_BASE} + {_hex4('e.sha256')}, CAST(substr(e.path, {_PATH_PREFIX_LEN + 1}) "
               "AS BLOB), o.inode FROM stage.objs s JOIN entries e ON e.sha256 = s.sha256 "
               "JOIN objects o ON o.sha256 = s.sha256 JOIN entries f ON f.id = o.entry "
               "WHERE s.npaths > 1 AND e.path != f.path GROUP BY e.path ORDER BY min(e.id)")
    # by-id/<logical_id> and by-id/<logical_id>/<sha>.<ext>
    db.execute(ins + f"SELECT {BY_ID_INODE}, name, inode FROM stage.lids ORDER BY inode")
    db.execute(ins + f"SELECT l.inode, CAST(substr(e.path, {_PATH_PREFIX_LEN + 1}) AS BLOB), o.inode "
               "FROM entries e JOIN stage.lids l ON l.name = CAST(e.logical_id AS BLOB) "
               "JOIN objects o ON o.sha256 = e.sha256 WHERE e.logical_id IS NOT NULL "
               "GROUP BY l.inode, e.path ORDER BY min(e.id)")
    # by-path directories and files
    db.execute(ins + f"SELECT CASE parent_k WHEN 0 THEN {BY_PATH_INODE} ELSE {pdir_base} - 1 + parent_k END, "
               f"name, {pdir_base} - 1 + k FROM stage.pdirs ORDER BY k")
    db.execute(ins + f"SELECT CASE f.parent_k WHEN 0 THEN {BY_PATH_INODE} ELSE {pdir_base} - 1 + f.parent_k END, "
               "f.name, o.inode FROM stage.pfiles f JOIN entries e ON e.id = f.entry "
               "JOIN objects o ON o.sha256 = e.sha256 ORDER BY f.entry")
    for statement in INDEXES.split(";"):
        if statement.strip():
            db.execute(statement)

    # Directories: every dentry whose inode is not an object or the manifest, plus the root.
    obj_end = OBJ_BASE + n_objects
    db.execute(f"INSERT INTO dirs(inode, parent, nlink) VALUES ({ROOT_INODE}, {ROOT_INODE}, 2)")
    db.execute(f"INSERT INTO dirs(inode, parent, nlink) SELECT inode, parent, 2 FROM dentries "
               f"WHERE inode != {MANIFEST_INODE} AND (inode < {OBJ_BASE} OR inode >= {obj_end}) ORDER BY inode")
    db.execute("CREATE TABLE stage.sub AS SELECT parent, count(*) AS n FROM dirs WHERE inode != parent "
               "GROUP BY parent")
    db.execute("UPDATE dirs SET nlink = 2 + sub.n FROM stage.sub AS sub WHERE dirs.inode = sub.parent")
    db.execute("UPDATE dirs SET entry = lids.first FROM stage.lids AS lids WHERE dirs.inode = lids.inode")
    meta = {"object_count": n_objects, "obj_base": OBJ_BASE, "iddir_base": iddir_base, "pdir_base": pdir_base,
            "pdir_count": pdir_count}
    db.executemany("INSERT INTO metadata VALUES (?,?)", [(k, str(v)) for k, v in meta.items()])
    db.execute("COMMIT")


# ----------------------------------------------------------------------------------------------
# Serving
# ----------------------------------------------------------------------------------------------

_ENTRY_COLUMNS = "sha256, path, bytes, content_type, width, height, logical_id, etag, source_path"


def _entry(row: tuple[Any, ...]) -> Entry:
    return Entry(sha256=row[0], path=row[1], bytes=row[2], content_type=row[3], width=row[4], height=row[5],
                 logical_id=row[6], etag=row[7], source_path=row[8])


class Index:
    """A read-only view of a built index. Thread-safe: one SQLite connection per thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._uri = f"file:{path}?mode=ro"
        self._local = threading.local()
        self._lock = threading.Lock()
        self._conns: list[sqlite3.Connection] = []
        self._closed = False
        self.metadata = {k: v for k, v in self._db().execute("SELECT key, value FROM metadata")}
        self.manifest_sha256 = self.metadata.get("manifest_sha256", "")
        self.mtime_ns = int(self.metadata.get("mtime_ns", "0"))
        self.manifest_bytes = int(self.metadata.get("manifest_bytes", "0"))
        self._entry_count = int(self.metadata.get("entry_count", "0"))
        self._object_count = int(self.metadata.get("object_count", "0"))
        self._obj_end = OBJ_BASE + self._object_count

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
            conn.execute("PRAGMA cache_size=-8000")  # 8 MB of page cache per thread
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

    # -- tree ----------------------------------------------------------------------------------
    def is_object(self, inode: int) -> bool:
        return OBJ_BASE <= inode < self._obj_end

    def lookup(self, parent_inode: int, name: bytes) -> int | None:
        """The inode of `name` in directory `parent_inode`, or None."""
        if name == b".":
            return parent_inode if self.getattr(parent_inode) is not None else None
        if name == b"..":
            row = self._db().execute("SELECT parent FROM dirs WHERE inode=?", (parent_inode,)).fetchone()
            return int(row[0]) if row else None
        row = self._db().execute("SELECT inode FROM dentries WHERE parent=? AND name=?",
                                 (parent_inode, name)).fetchone()
        return int(row[0]) if row else None

    def getattr(self, inode: int) -> Attr | None:
        """Attributes of `inode`, or None when there is no such inode."""
        db = self._db()
        if self.is_object(inode):
            row = db.execute("SELECT bytes, nlink, sha256 FROM objects WHERE inode=?", (inode,)).fetchone()
            return Attr(inode, False, row[0], row[1], row[2]) if row else None
        if inode == MANIFEST_INODE:
            return Attr(inode, False, self.manifest_bytes, 1)
        row = db.execute("SELECT nlink FROM dirs WHERE inode=?", (inode,)).fetchone()
        return Attr(inode, True, 0, row[0]) if row else None

    def readdir(self, inode: int, after: int = 0) -> Iterator[tuple[bytes, int, int]]:
        """(name, inode, next_key) of directory `inode` whose key is greater than `after`, in key order.
        Pass the last next_key back as `after` to continue. Fetches a page at a time."""
        for name, attr, key in self.readdir_attrs(inode, after):
            yield name, attr.inode, key

    def readdir_attrs(self, inode: int, after: int = 0) -> Iterator[tuple[bytes, Attr, int]]:
        """Like readdir, with each child's attributes (one query per page, for readdirplus)."""
        db = self._db()
        while True:
            rows = db.execute(
                "SELECT d.id, d.name, d.inode, o.bytes, o.nlink, o.sha256, r.nlink FROM dentries d "
                "LEFT JOIN objects o ON o.inode = d.inode LEFT JOIN dirs r ON r.inode = d.inode "
                "WHERE d.parent=? AND d.id>? ORDER BY d.id LIMIT ?", (inode, after, _READDIR_PAGE)).fetchall()
            for key, name, child, size, nlink, sha, dnlink in rows:
                if size is not None:
                    attr = Attr(child, False, size, nlink, sha)
                elif child == MANIFEST_INODE:
                    attr = Attr(child, False, self.manifest_bytes, 1)
                else:
                    attr = Attr(child, True, 0, dnlink or 2)
                yield bytes(name), attr, key
            if len(rows) < _READDIR_PAGE:
                return
            after = rows[-1][0]

    def child_count(self, inode: int) -> int:
        row = self._db().execute("SELECT count(*) FROM dentries WHERE parent=?", (inode,)).fetchone()
        return int(row[0])

    # -- objects and entries -------------------------------------------------------------------
    def object_for_inode(self, inode: int) -> Entry:
        """The manifest entry (first line) of the object `inode`; NotFound if it is not an object."""
        row = None
        if self.is_object(inode):
            row = self._db().execute(f"SELECT {_ENTRY_COLUMNS} FROM entries WHERE id = "
                                     "(SELECT entry FROM objects WHERE inode=?)", (inode,)).fetchone()
        if row is None:
            raise NotFound(f"inode {inode}: not an object of this manifest")
        return _entry(row)

    def xattrs(self, inode: int) -> dict[str, bytes]:
        """The contract's `user.s3fsimg.*` attributes of an object (those it has); {} for others."""
        if not self.is_object(inode):
            return {}
        try:
            e = self.object_for_inode(inode)
        except NotFound:
            return {}
        values = {"sha256": e.sha256, "logical_id": e.logical_id, "width": e.width, "height": e.height,
                  "content_type": e.content_type, "etag": e.etag}
        return {f"user.s3fsimg.{k}": str(v).encode() for k, v in values.items() if v is not None}

    def by_sha256(self, sha256: str) -> Entry | None:
        row = self._db().execute(f"SELECT {_ENTRY_COLUMNS} FROM entries WHERE id = "
                                 "(SELECT entry FROM objects WHERE sha256=?)", (sha256,)).fetchone()
        return _entry(row) if row else None

    def by_logical_id(self, logical_id: str) -> Entry | None:
        """The first entry with this logical id."""
        row = self._db().execute(
            f"SELECT {_ENTRY_COLUMNS} FROM entries WHERE id = (SELECT r.entry FROM dentries d "
            "JOIN dirs r ON r.inode = d.inode WHERE d.parent=? AND d.name=?)",
            (BY_ID_INODE, logical_id.encode("utf-8", "surrogatepass"))).fetchone()
        return _entry(row) if row else None

    def inode_for_sha256(self, sha256: str) -> int | None:
        row = self._db().execute("SELECT inode FROM objects WHERE sha256=?", (sha256,)).fetchone()
        return int(row[0]) if row else None

    def entry_count(self) -> int:
        return self._entry_count

    def object_count(self) -> int:
        return self._object_count

    def dir_count(self) -> int:
        return int(self._db().execute("SELECT count(*) FROM dirs").fetchone()[0])

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
    from s3fsimg.s3 import translate

    try:
        resp = store.client.head_object(Bucket=store.bucket, Key=store.key(relative))
    except Exception as exc:
        err = translate(exc, where)
        if isinstance(err, NotFound):
            raise ManifestError(f"{where}: no manifest in the bucket (upload a dataset first)") from None
        if isinstance(err, BackendError):
            raise err from None
        raise ManifestError(f"{where}: cannot read the manifest: {err}") from None
    modified = resp.get("LastModified")
    mtime_ns = int(modified.timestamp() * 1e9) if modified is not None else 0
    return {"etag": str(resp.get("ETag", "")), "size": int(resp["ContentLength"]), "mtime_ns": mtime_ns}


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
