"""The index file format and its read API: names, inode numbers and attributes of the mount's tree.

Owns the format of an index (the schema, `SCHEMA` below, is its only definition; the inode numbering)
and `Index`, the read-only view that `fs.py` and `dataset.py` query. An index is built from a manifest
by `index_build.py` and found, built or reused for a bucket's manifest by `index_load.py`.

Nothing here holds a manifest in Python objects. Only what cannot be computed is stored. An object (a
distinct sha256) is not a table: it is the row of its first line, found through the hash index, which
also lists `images/ab/cd` in hash order (a name there is `<sha256>.<ext>`, so a lookup is one index
probe on the hash). The rare later lines of an object point at that first row (`obj`). `by-id/` is a
view of `entries` through its logical_id index; `by-path/` names are columns of `entries` (`parent_k`,
`name`) plus one `pdirs` row per directory, because a source tree is arbitrary. An index is opened
read-only (`mode=ro`) for serving; its `metadata` (format version, manifest digest) is checked on open.

Inode numbers: each a function of manifest order only, so stable across rebuilds and remounts of the
same manifest (E = number of entries)::

    1 root   2 images   3 by-id   4 by-path   5 manifest.jsonl
    AB_BASE + 0xab                     images/ab
    ABCD_BASE + 0xabcd                 images/ab/cd
    OBJ_BASE + i                       the object (sha256) whose first line is entry i; all its names share it
    OBJ_BASE + E + i                   by-id/<logical_id>, where entry i is the first line with that id
    OBJ_BASE + 2E + k                  the k-th by-path directory (k >= 1, order of first appearance)

Each kind of inode (the root, manifest.jsonl, images/, images/ab, images/ab/cd, the objects, by-id/,
by-id/<id>, by-path/ and its directories) is one small class below with its own getattr, lookup, readdir
and parent; `Index._kind_of` is the one place that tells, from the numbering above, which kind an inode
is.

Threads: each thread gets its own read-only connection (`threading.local`), opened with
`check_same_thread=False` only so that `close()` can close them all from one thread. Threads then never
queue on a Python lock, and SQLite serves read-only connections concurrently. Every query is a few
B-tree probes (microseconds with a warm page cache), cheap enough for the trio thread of the mount.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from s3fsimg.errors import ManifestError, NotFound, S3fsimgError
from s3fsimg.manifest import Entry, extension_for

#: Bump when the schema or the inode layout changes; an index of another version is rebuilt.
FORMAT_VERSION = 4

ROOT_INODE = 1
IMAGES_INODE = 2
BY_ID_INODE = 3
BY_PATH_INODE = 4
MANIFEST_INODE = 5
AB_BASE = 16  # images/ab -> AB_BASE + 0xab
ABCD_BASE = AB_BASE + 256  # images/ab/cd -> ABCD_BASE + 0xabcd
OBJ_BASE = 1 << 17  # first object inode; everything below is a fixed directory or file

#: The namespace of the objects' extended attributes (`Index.xattrs`)
XATTR_PREFIX = "user.s3fsimg."

#: Names of the root directory, in readdir order (readdir key = position + 1).
ROOT_NAMES = ((b"images", IMAGES_INODE), (b"by-id", BY_ID_INODE), (b"by-path", BY_PATH_INODE),
              (b"manifest.jsonl", MANIFEST_INODE))

_ROOT_LOOKUP = dict(ROOT_NAMES)

_PAGE = 512  # rows fetched per readdir query

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
-- distinct sha256) is the row of its first line: inode OBJ_BASE + id, attributes from that row (and
-- `objattrs` for the extended attributes its first line lacks).
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

-- For an object named on several lines whose first line lacks one of these fields: each from the
-- first of its lines that gives it (its extended attributes are per object; `Index.xattrs`).
CREATE TABLE objattrs(
    id         INTEGER PRIMARY KEY,  -- entries.id of the object's first line
    logical_id TEXT,
    width      INTEGER,
    height     INTEGER,
    etag       TEXT
);

-- One row per by-path directory (its files are the entries rows with parent_k = k).
CREATE TABLE pdirs(
    k        INTEGER PRIMARY KEY,  -- directory number (inode OBJ_BASE + 2E + k), order of first appearance
    parent_k INTEGER NOT NULL,     -- its parent's k; 0 is by-path itself
    name     TEXT NOT NULL,        -- its name in the parent
    nlink    INTEGER NOT NULL      -- st_nlink: 2 + subdirectories
);
"""

#: The indexes, by name (the builder creates each after the load, where its phase needs it).
INDEXES = {
    # objects: images/ lookup, readdir by hash; an object's later lines
    "entries_sha256": "CREATE INDEX entries_sha256 ON entries(sha256)",
    # by-id: lookup, the lines of one logical id
    "entries_logical_id": "CREATE INDEX entries_logical_id ON entries(logical_id) WHERE logical_id IS NOT NULL",
    # by-path files: lookup, readdir by name; unique: a source_path named twice fails the build
    "entries_name": "CREATE UNIQUE INDEX entries_name ON entries(parent_k, name) WHERE parent_k IS NOT NULL",
    # by-path directories: lookup, readdir by name
    "pdirs_name": "CREATE UNIQUE INDEX pdirs_name ON pdirs(parent_k, name)",
}


def _hash_bound(d: int) -> bytes:
    """The smallest blob >= every sha256 of the directories images/ab/cd with 0xabcd >= d (d <= 0x10000)."""
    return bytes((d >> 8, d & 0xFF)) if d < 0x10000 else b"\xff" * 33


def _first_abcd(db: sqlite3.Connection, lo: int, hi: int) -> int | None:
    """The first 0xabcd in [lo, hi) whose directory images/ab/cd holds an object, or None (one index probe)."""
    row = db.execute("SELECT sha256 FROM entries WHERE sha256 >= ? AND sha256 < ? ORDER BY sha256 LIMIT 1",
                     (_hash_bound(lo), _hash_bound(hi))).fetchone()
    return None if row is None else (row[0][0] << 8) | row[0][1]


_HEX_DIGITS = frozenset(b"0123456789abcdef")


def _hex_byte(name: bytes) -> int | None:
    """The value of a name under images/ or images/ab (two lowercase hex digits), or None."""
    if len(name) != 2 or not _HEX_DIGITS.issuperset(name):
        return None
    return int(name, 16)


@dataclass(frozen=True, slots=True)
class Attr:
    """What getattr needs to know about an inode."""

    inode: int
    is_dir: bool
    size: int
    nlink: int
    sha256: str | None = None  # objects only


_ENTRY_COLUMNS = "sha256, bytes, content_type, width, height, logical_id, etag, source_path"
#: One entry with its object's etag: the line's own, else its object's first line's, else a later line's
#: (`objattrs`), so the reader checks S3's responses against it whichever line named the object.
_ENTRY_SELECT = ("SELECT e.sha256, e.bytes, e.content_type, e.width, e.height, e.logical_id, "
                 "coalesce(e.etag, o.etag, a.etag), e.source_path FROM entries e "
                 "JOIN entries o ON o.id = coalesce(e.obj, e.id) LEFT JOIN objattrs a ON a.id = o.id")


def _entry(row: tuple[Any, ...] | sqlite3.Row) -> Entry:
    sha = bytes(row[0]).hex()
    ctype = row[2]
    return Entry(sha256=sha, path=f"images/{sha[0:2]}/{sha[2:4]}/{sha}.{extension_for(ctype)}", bytes=row[1],
                 content_type=ctype, width=row[3], height=row[4], logical_id=row[5], etag=row[6],
                 source_path=row[7])


def _sha_from_name(name: bytes) -> tuple[bytes, bytes] | None:
    """(raw sha256, ext) of a `<sha256>.<ext>` name (the hash in lowercase hex, as listed), or None."""
    if len(name) < 66 or name[64:65] != b"." or not _HEX_DIGITS.issuperset(name[:64]):
        return None
    return bytes.fromhex(name[:64].decode("ascii")), name[65:]


def _object_name(hexsha: str, content_type: str) -> bytes:
    """The name of an object in images/ab/cd and by-id/<id>: `<sha256>.<ext>`."""
    return f"{hexsha}.{extension_for(content_type)}".encode()


#: A directory listing: (name, attributes, key) per child, in key order; the key resumes after the child.
Listing = Iterator[tuple[bytes, Attr, int]]


class _Kind(ABC):
    """One kind of inode, with its attributes, names, listing and parent.

    `n` is an inode's number within its kind, from `Index._kind_of` (the ab of images/ab, the entry id of an
    object, the k of a by-path directory...). A kind whose inodes exist only where the manifest puts
    something (images/ab, images/ab/cd, by-id/<id>) checks that itself: getattr and parent give None,
    lookup None, readdir nothing. A file keeps the defaults: no names in it, no parent.
    """

    def __init__(self, index: Index) -> None:
        self.index = index

    def db(self) -> sqlite3.Connection:
        return self.index._db()

    @abstractmethod
    def getattr(self, n: int) -> Attr | None:
        """The attributes of inode n, or None when there is no such inode."""

    def lookup(self, n: int, name: bytes) -> int | None:
        """The inode of `name` (neither '.' nor '..') in directory n, or None."""
        return None

    def readdir(self, n: int, after: int) -> Listing:
        """The children of directory n whose key is greater than `after`."""
        return iter(())

    def parent(self, n: int) -> int | None:
        """The inode of '..' of directory n, or None."""
        return None


class _Root(_Kind):
    """The root: the fixed names of `ROOT_NAMES`; key = position + 1."""

    def getattr(self, n: int) -> Attr:
        return Attr(ROOT_INODE, True, 0, 2 + 3)  # images, by-id, by-path

    def lookup(self, n: int, name: bytes) -> int | None:
        return _ROOT_LOOKUP.get(name)

    def readdir(self, n: int, after: int) -> Listing:
        for i, (name, child) in enumerate(ROOT_NAMES):
            if i + 1 > after:
                attr = self.index.getattr(child)
                assert attr is not None
                yield name, attr, i + 1

    def parent(self, n: int) -> int:
        return ROOT_INODE


class _ManifestFile(_Kind):
    """manifest.jsonl, the manifest the index was built from (its size from the metadata)."""

    def getattr(self, n: int) -> Attr:
        return Attr(MANIFEST_INODE, False, self.index.manifest_bytes, 1)


class _Images(_Kind):
    """images/: a directory ab (inode AB_BASE + 0xab; key 0xab + 1) for each first byte of some object's
    hash, each found by one probe of the hash index."""

    def getattr(self, n: int) -> Attr:
        return Attr(IMAGES_INODE, True, 0, 2 + sum(1 for _ in self._abs(0)))

    def lookup(self, n: int, name: bytes) -> int | None:
        ab = _hex_byte(name)
        if ab is None or _first_abcd(self.db(), ab << 8, (ab + 1) << 8) is None:
            return None
        return AB_BASE + ab

    def readdir(self, n: int, after: int) -> Listing:
        for ab in self._abs(after):
            attr = self.index.getattr(AB_BASE + ab)
            if attr is not None:
                yield f"{ab:02x}".encode(), attr, ab + 1

    def parent(self, n: int) -> int:
        return ROOT_INODE

    def _abs(self, first: int) -> Iterator[int]:
        """The ab values (0..255, at least `first`) of the existing images/ab directories."""
        db = self.db()
        ab = first
        while ab < 256:
            d = _first_abcd(db, ab << 8, 1 << 16)
            if d is None:
                return
            ab = d >> 8
            yield ab
            ab += 1


class _ImagesAb(_Kind):
    """images/ab (n = 0xab): a directory cd (inode ABCD_BASE + 0xabcd; key 0xcd + 1) for each pair of first
    bytes of some object's hash."""

    def getattr(self, n: int) -> Attr | None:
        children = sum(1 for _ in self.readdir(n, 0))  # at most 256 index probes (`Index.getattr` keeps it)
        return Attr(AB_BASE + n, True, 0, 2 + children) if children else None

    def lookup(self, n: int, name: bytes) -> int | None:
        cd = _hex_byte(name)
        if cd is None:
            return None
        d = (n << 8) | cd
        return ABCD_BASE + d if _first_abcd(self.db(), d, d + 1) is not None else None

    def readdir(self, n: int, after: int) -> Listing:
        db = self.db()
        cd = after
        while cd < 256:
            d = _first_abcd(db, (n << 8) + cd, (n + 1) << 8)
            if d is None:
                return
            cd = d & 0xFF
            yield f"{cd:02x}".encode(), Attr(ABCD_BASE + d, True, 0, 2), cd + 1
            cd += 1

    def parent(self, n: int) -> int | None:
        return IMAGES_INODE if self.index.getattr(AB_BASE + n) is not None else None


class _ImagesAbcd(_Kind):
    """images/ab/cd (n = 0xabcd): the objects whose hash starts with abcd, named `<sha256>.<ext>`, in hash
    order; key = the object's inode (a listing resumes after that object's hash)."""

    def getattr(self, n: int) -> Attr | None:
        return Attr(ABCD_BASE + n, True, 0, 2) if _first_abcd(self.db(), n, n + 1) is not None else None

    def lookup(self, n: int, name: bytes) -> int | None:
        parsed = _sha_from_name(name)
        if parsed is None:
            return None
        sha, ext = parsed
        if (sha[0] << 8) | sha[1] != n:
            return None
        row = self.db().execute("SELECT id, content_type FROM entries WHERE sha256=? AND nlink IS NOT NULL",
                                (sha,)).fetchone()
        if row is None or extension_for(row[1]).encode() != ext:
            return None
        return OBJ_BASE + int(row[0])

    def readdir(self, n: int, after: int) -> Listing:
        db = self.db()
        hi = _hash_bound(n + 1)
        if after:
            row = db.execute("SELECT sha256 FROM entries WHERE id=?", (after - OBJ_BASE,)).fetchone()
            if row is None:
                return
            lo, op = row[0], ">"
        else:
            lo, op = _hash_bound(n), ">="
        while True:
            rows = db.execute(f"SELECT id, bytes, nlink, sha256, content_type FROM entries WHERE sha256 {op} ? "
                              "AND sha256 < ? AND nlink IS NOT NULL ORDER BY sha256 LIMIT ?",
                              (lo, hi, _PAGE)).fetchall()
            for i, size, nlink, sha, ctype in rows:
                child = OBJ_BASE + i
                hexsha = bytes(sha).hex()
                yield _object_name(hexsha, ctype), Attr(child, False, size, nlink, hexsha), child
            if len(rows) < _PAGE:
                return
            lo, op = rows[-1][3], ">"

    def parent(self, n: int) -> int | None:
        return AB_BASE + (n >> 8) if self.getattr(n) is not None else None


class _Objects(_Kind):
    """The objects, files (n = the entry id of the object's first line; inode OBJ_BASE + n): attributes,
    manifest entry and extended attributes, each from the first line's row (and `objattrs`)."""

    def getattr(self, n: int) -> Attr | None:
        row = self.db().execute("SELECT bytes, nlink, sha256 FROM entries WHERE id=? AND nlink IS NOT NULL",
                                (n,)).fetchone()
        return Attr(OBJ_BASE + n, False, row[0], row[1], bytes(row[2]).hex()) if row else None

    def entry(self, n: int) -> Entry | None:
        row = self.db().execute(f"{_ENTRY_SELECT} WHERE e.id=? AND e.nlink IS NOT NULL", (n,)).fetchone()
        return None if row is None else _entry(row)

    def xattrs(self, n: int) -> dict[str, bytes]:
        row = self.db().execute(
            "SELECT e.sha256, e.content_type, coalesce(e.logical_id, a.logical_id), coalesce(e.width, a.width), "
            "coalesce(e.height, a.height), coalesce(e.etag, a.etag) FROM entries e "
            "LEFT JOIN objattrs a ON a.id = e.id WHERE e.id=? AND e.nlink IS NOT NULL", (n,)).fetchone()
        if row is None:
            return {}
        values = {"sha256": bytes(row[0]).hex(), "logical_id": row[2], "width": row[3], "height": row[4],
                  "content_type": row[1], "etag": row[5]}
        return {f"{XATTR_PREFIX}{k}": str(v).encode() for k, v in values.items() if v is not None}


class _ById(_Kind):
    """by-id/: a directory per distinct logical id (inode `iddir_base` + the entry id of its first line,
    the `lids` row; key that id + 1), in manifest order."""

    def getattr(self, n: int) -> Attr:
        return Attr(BY_ID_INODE, True, 0, 2 + self.index.logical_id_count())

    def lookup(self, n: int, name: bytes) -> int | None:
        try:
            lid = name.decode("utf-8")
        except UnicodeDecodeError:
            return None
        row = self.db().execute("SELECT min(id) FROM entries WHERE logical_id=?", (lid,)).fetchone()
        return None if row[0] is None else self.index.iddir_base + int(row[0])

    def readdir(self, n: int, after: int) -> Listing:
        db = self.db()
        while True:
            rows = db.execute("SELECT l.id, e.logical_id FROM lids l JOIN entries e ON e.id = l.id "
                              "WHERE l.id >= ? ORDER BY l.id LIMIT ?", (after, _PAGE)).fetchall()
            for i, lid in rows:
                yield lid.encode("utf-8"), Attr(self.index.iddir_base + i, True, 0, 2), i + 1
            if len(rows) < _PAGE:
                return
            after = rows[-1][0] + 1

    def parent(self, n: int) -> int:
        return ROOT_INODE


class _IdDir(_Kind):
    """by-id/<logical_id> (n = the entry id of the first line with that id, when `lids` has it): a file
    `<sha256>.<ext>` per distinct object among the lines with that id; key = the entry id of the first
    such line + 1."""

    def _exists(self, n: int) -> bool:
        return self.db().execute("SELECT 1 FROM lids WHERE id=?", (n,)).fetchone() is not None

    def getattr(self, n: int) -> Attr | None:
        return Attr(self.index.iddir_base + n, True, 0, 2) if self._exists(n) else None

    def lookup(self, n: int, name: bytes) -> int | None:
        parsed = _sha_from_name(name)
        if parsed is None or not self._exists(n):
            return None
        for ctype, obj in self.db().execute("SELECT content_type, coalesce(obj, id) FROM entries WHERE logical_id = "
                                            "(SELECT logical_id FROM entries WHERE id=?) AND sha256=?",
                                            (n, parsed[0])):
            if extension_for(ctype).encode() == parsed[1]:
                return OBJ_BASE + int(obj)
        return None

    def readdir(self, n: int, after: int) -> Listing:
        if not self._exists(n):
            return
        db = self.db()
        rows = db.execute(
            f"SELECT e.id, e.sha256, e.content_type, {OBJ_BASE} + o.id, o.bytes, o.nlink FROM entries e "
            "JOIN entries o ON o.id = coalesce(e.obj, e.id) WHERE e.logical_id = "
            "(SELECT logical_id FROM entries WHERE id=?) AND e.id >= ? ORDER BY e.id",
            (n, after)).fetchall()
        seen: set[bytes] = set()
        for i, sha, ctype, child, size, nlink in rows:
            hexsha = bytes(sha).hex()
            name = _object_name(hexsha, ctype)
            if name in seen or db.execute("SELECT 1 FROM entries WHERE logical_id = (SELECT logical_id FROM "
                                          "entries WHERE id=?) AND sha256=? AND id<? LIMIT 1",
                                          (n, sha, i)).fetchone():
                continue
            seen.add(name)
            yield name, Attr(child, False, size, nlink, hexsha), i + 1

    def parent(self, n: int) -> int | None:
        return BY_ID_INODE if self._exists(n) else None


class _ByPath(_Kind):
    """by-path/ (n = 0) and its directories (n = their `pdirs.k`, 1..P; inode `pdir_base` + k): the
    subdirectories (key: their k), then the files (key: P + 1 + entry id), each in name order; a listing
    resumes after the name of the key's directory or file."""

    def inode(self, k: int) -> int:
        return BY_PATH_INODE if k == 0 else self.index.pdir_base + k

    def getattr(self, n: int) -> Attr | None:
        db = self.db()
        if n == 0:
            subdirs = int(db.execute("SELECT count(*) FROM pdirs WHERE parent_k=0").fetchone()[0])
            return Attr(BY_PATH_INODE, True, 0, 2 + subdirs)
        row = db.execute("SELECT nlink FROM pdirs WHERE k=?", (n,)).fetchone()
        return Attr(self.inode(n), True, 0, int(row[0])) if row else None

    def lookup(self, n: int, name: bytes) -> int | None:
        try:
            text = name.decode("utf-8")
        except UnicodeDecodeError:
            return None
        db = self.db()
        row = db.execute("SELECT k FROM pdirs WHERE parent_k=? AND name=?", (n, text)).fetchone()
        if row is not None:
            return self.inode(int(row[0]))
        row = db.execute("SELECT coalesce(obj, id) FROM entries WHERE parent_k=? AND name=?", (n, text)).fetchone()
        return None if row is None else OBJ_BASE + int(row[0])

    def parent(self, n: int) -> int | None:
        if n == 0:
            return ROOT_INODE
        row = self.db().execute("SELECT parent_k FROM pdirs WHERE k=?", (n,)).fetchone()
        return None if row is None else self.inode(int(row[0]))

    def readdir(self, n: int, after: int) -> Listing:
        db = self.db()
        files_from = self.index._pdirs + 1
        last: str | None = None
        if after < files_from:
            if after:
                row = db.execute("SELECT name FROM pdirs WHERE k=?", (after,)).fetchone()
                if row is None:
                    return
                last = row[0]
            while True:
                rows = db.execute("SELECT k, name, nlink FROM pdirs WHERE parent_k=? AND name > ? ORDER BY name "
                                  "LIMIT ?", (n, "" if last is None else last, _PAGE)).fetchall()
                for child_k, name, nlink in rows:
                    yield name.encode(), Attr(self.inode(child_k), True, 0, nlink), child_k
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
                (n, "" if last is None else last, _PAGE)).fetchall()
            for i, name, child, size, nlink, sha in rows:
                yield name.encode(), Attr(child, False, size, nlink, bytes(sha).hex()), files_from + i
            if len(rows) < _PAGE:
                return
            last = rows[-1][1]


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
        self._object_kind = _Objects(self)
        self._iddir_kind = _IdDir(self)
        self._by_path_kind = _ByPath(self)
        self._ab_kind = _ImagesAb(self)
        self._abcd_kind = _ImagesAbcd(self)
        self._fixed_kinds: dict[int, tuple[_Kind, int]] = {
            ROOT_INODE: (_Root(self), 0), IMAGES_INODE: (_Images(self), 0), BY_ID_INODE: (_ById(self), 0),
            BY_PATH_INODE: (self._by_path_kind, 0), MANIFEST_INODE: (_ManifestFile(self), 0)}

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

    # -- what an inode is ----------------------------------------------------------------------
    def _kind_of(self, inode: int) -> tuple[_Kind, int] | None:
        """The kind of `inode` and its number within that kind, or None when no inode has that number.
        The one place that decides it, from the inode numbering alone (no query): whether the inode
        exists is then its kind's answer."""
        if inode >= OBJ_BASE:
            if inode < self.iddir_base:
                return self._object_kind, inode - OBJ_BASE
            if inode < self.pdir_base:
                return self._iddir_kind, inode - self.iddir_base
            k = inode - self.pdir_base
            return (self._by_path_kind, k) if 1 <= k <= self._pdirs else None
        if ABCD_BASE <= inode < ABCD_BASE + 0x10000:
            return self._abcd_kind, inode - ABCD_BASE
        if AB_BASE <= inode < ABCD_BASE:
            return self._ab_kind, inode - AB_BASE
        return self._fixed_kinds.get(inode)

    def is_object(self, inode: int) -> bool:
        """Whether `inode` is in the objects' range (no query: `fs.py` asks on every open)."""
        return OBJ_BASE <= inode < self.iddir_base

    # -- tree ----------------------------------------------------------------------------------
    def lookup(self, parent_inode: int, name: bytes) -> int | None:
        """The inode of `name` in directory `parent_inode`, or None."""
        found = self._kind_of(parent_inode)
        if found is None:
            return None
        kind, n = found
        if name == b".":
            attr = self.getattr(parent_inode)
            return parent_inode if attr is not None and attr.is_dir else None
        if name == b"..":
            return kind.parent(n)
        return kind.lookup(n, name)

    def parent(self, inode: int) -> int | None:
        """The inode of '..' of directory `inode` (the root is its own parent), or None."""
        found = self._kind_of(inode)
        return None if found is None else found[0].parent(found[1])

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
        found = self._kind_of(inode)
        return None if found is None else found[0].getattr(found[1])

    def readdir(self, inode: int, after: int = 0) -> Iterator[tuple[bytes, int, int]]:
        """(name, inode, next_key) of directory `inode` whose key is greater than `after`, in key order.
        Pass the last next_key back as `after` to continue. Queries a page at a time."""
        for name, attr, key in self.readdir_attrs(inode, after):
            yield name, attr.inode, key

    def readdir_attrs(self, inode: int, after: int = 0) -> Listing:
        """Like readdir, with each child's attributes (for readdirplus: no lookup per name)."""
        found = self._kind_of(inode)
        return iter(()) if found is None else found[0].readdir(found[1], after)

    # -- objects and entries -------------------------------------------------------------------
    def object_for_inode(self, inode: int) -> Entry:
        """The manifest entry (first line) of the object `inode`; NotFound if it is not an object."""
        entry = self._object_kind.entry(inode - OBJ_BASE) if self.is_object(inode) else None
        if entry is None:
            raise NotFound(f"inode {inode}: not an object of this manifest")
        return entry

    def xattrs(self, inode: int) -> dict[str, bytes]:
        """The contract's `user.s3fsimg.*` attributes of an object (those it has); {} for others.

        Per object, not per line, as the object is one inode under all its names: logical_id, width,
        height and etag each come from the object's first line that has the field (its lines share its
        bytes, so width, height and etag agree): its first row, else `objattrs` (built with the index).
        One query of two primary-key probes, however many lines name the object."""
        return self._object_kind.xattrs(inode - OBJ_BASE) if self.is_object(inode) else {}

    def by_sha256(self, sha256: str) -> Entry | None:
        """The first entry of the object with this hash (with the object's etag)."""
        try:
            raw = bytes.fromhex(sha256)
        except ValueError:
            return None
        row = self._db().execute(f"{_ENTRY_SELECT} WHERE e.sha256=? AND e.nlink IS NOT NULL", (raw,)).fetchone()
        return _entry(row) if row else None

    def by_logical_id(self, logical_id: str) -> Entry | None:
        """The first entry with this logical id (with its object's etag)."""
        row = self._db().execute(f"{_ENTRY_SELECT} WHERE e.id = (SELECT min(id) FROM entries WHERE logical_id=?)",
                                 (logical_id,)).fetchone()
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
        """Every entry in manifest order, each line as the manifest gives it, a page at a time."""
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
        row = self._db().execute(f"{_ENTRY_SELECT} WHERE e.id=?", (i,)).fetchone()
        if row is None:
            raise IndexError(i)
        return _entry(row)


__all__ = ["BY_ID_INODE", "BY_PATH_INODE", "FORMAT_VERSION", "IMAGES_INODE", "INDEXES", "MANIFEST_INODE",
           "OBJ_BASE", "ROOT_INODE", "SCHEMA", "XATTR_PREFIX", "Attr", "Index"]
