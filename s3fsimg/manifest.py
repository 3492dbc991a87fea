"""The manifest: one JSON object per line describing one name of one content-addressed image.

Owns the `Entry` record, the path/extension rules of the S3 layout, reading and writing JSONL,
and validation. Two checkers agree by construction and by test (tests/test_manifest.py):

- `parse_entry` is the fast, strict per-line parser used on every hot path (index build, mount,
  upload). It checks exactly what the JSON Schema says, plus the per-line rules a schema cannot
  state (path agrees with sha256 and content type; logical_id length in bytes).
- the JSON Schema `manifest.schema.json` (shipped in the package) is the public contract; `validate`
  runs it on every line that `parse_entry` rejects, so each error is reported schema-style with its
  field, and `parse_entry`'s own message covers the rules the schema cannot say.

Cross-line rules (same sha256 -> same bytes; no source_path twice; no source_path that is a
directory of another) are checked by `Validator` in bounded memory, through a temporary SQLite
file rather than Python sets, so a manifest of millions of lines validates in a few tens of MB.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import IO, Any

from s3fsimg.errors import ManifestError

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_CONTENT_TYPE_RE = re.compile(r"^image/[A-Za-z0-9][A-Za-z0-9.+-]*$")
_PATH_RE = re.compile(r"^images/([0-9a-f]{2})/([0-9a-f]{2})/([0-9a-f]{64})\.([a-z0-9]+)$")

#: content type -> extension of the S3 layout
EXTENSIONS = {
    "image/jpeg": "jpg",
    "image/png": "png",
    "image/webp": "webp",
    "image/gif": "gif",
    "image/tiff": "tif",
}
FIELDS = ("sha256", "path", "bytes", "content_type", "width", "height", "logical_id", "etag", "source_path")
_REQUIRED = ("sha256", "path", "bytes", "content_type")


def extension_for(content_type: str) -> str:
    """`image/jpeg` -> `jpg`; other image types use their subtype (`image/bmp` -> `bmp`)."""
    ext = EXTENSIONS.get(content_type)
    if ext is None:
        ext = re.sub(r"[^a-z0-9]", "", content_type.split("/", 1)[-1].lower()) or "bin"
    return ext


def object_path(sha256: str, content_type: str) -> str:
    """The content-addressed path of an object, relative to the dataset prefix."""
    return f"images/{sha256[0:2]}/{sha256[2:4]}/{sha256}.{extension_for(content_type)}"


def logical_id_problem(value: str) -> str | None:
    """Why `value` is not a safe logical id, or None."""
    if not value:
        return "is empty"
    if len(value.encode("utf-8", "surrogatepass")) > 255:
        return "is longer than 255 bytes"
    if "/" in value:
        return "contains '/'"
    if "\0" in value:
        return "contains NUL"
    if value in (".", ".."):
        return f"is {value!r}"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid UTF-8"
    return None


def source_path_problem(value: str) -> str | None:
    """Why `value` is not a safe relative POSIX path, or None."""
    if not value:
        return "is empty"
    if value.startswith("/"):
        return "is absolute"
    if "\0" in value:
        return "contains NUL"
    parts = value.split("/")
    if any(p == ".." for p in parts):
        return "contains '..'"
    if any(p in ("", ".") for p in parts):
        return "has an empty or '.' component"
    return None


@dataclass(frozen=True, slots=True)
class Entry:
    """One manifest line."""

    sha256: str
    path: str
    bytes: int
    content_type: str
    width: int | None = None
    height: int | None = None
    logical_id: str | None = None
    etag: str | None = None
    source_path: str | None = None

    @property
    def ext(self) -> str:
        return self.path.rsplit(".", 1)[1]

    def to_dict(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in FIELDS if getattr(self, f) is not None}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, separators=(",", ":"), sort_keys=False)


class EntryProblem(ValueError):
    """One problem in one line: `field` is the JSON field (or None for the line as a whole)."""

    def __init__(self, field: str | None, message: str) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field


def _is_int(v: Any) -> bool:
    """An integer as JSON Schema counts them: 3 and 3.0, never true/false."""
    if isinstance(v, bool):
        return False
    return isinstance(v, int) or (isinstance(v, float) and v.is_integer())


_MISSING = object()


def parse_entry(obj: Any) -> Entry:
    """Check one decoded line against the schema and the per-line rules; raise EntryProblem."""
    if not isinstance(obj, dict):
        raise EntryProblem(None, "is not a JSON object")
    for name in _REQUIRED:
        if name not in obj:
            raise EntryProblem(name, "is required")
    unknown = set(obj) - set(FIELDS)
    if unknown:
        raise EntryProblem(sorted(unknown)[0], "is not a manifest field")
    sha = obj["sha256"]
    if not isinstance(sha, str) or not SHA256_RE.match(sha):
        raise EntryProblem("sha256", f"{sha!r} is not 64 lowercase hex digits")
    size = obj["bytes"]
    if not _is_int(size) or size < 0:
        raise EntryProblem("bytes", f"{size!r} is not an integer >= 0")
    ctype = obj["content_type"]
    if not isinstance(ctype, str) or not _CONTENT_TYPE_RE.match(ctype):
        raise EntryProblem("content_type", f"{ctype!r} is not an image/... content type")
    path = obj["path"]
    if not isinstance(path, str) or not _PATH_RE.match(path):
        raise EntryProblem("path", f"{path!r} is not images/ab/cd/<sha256>.<ext>")
    expected = object_path(sha, ctype)
    if path != expected:
        raise EntryProblem("path", f"{path!r} does not agree with sha256 and content_type (expected {expected!r})")
    for name in ("width", "height"):
        v = obj.get(name, _MISSING)
        if v is not _MISSING and (not _is_int(v) or v < 1):
            raise EntryProblem(name, f"{v!r} is not an integer >= 1")
    lid = obj.get("logical_id", _MISSING)
    if lid is not _MISSING:
        if not isinstance(lid, str):
            raise EntryProblem("logical_id", f"{lid!r} is not a string")
        problem = logical_id_problem(lid)
        if problem:
            raise EntryProblem("logical_id", f"{lid!r} {problem}")
    etag = obj.get("etag", _MISSING)
    if etag is not _MISSING and (not isinstance(etag, str) or not etag):
        raise EntryProblem("etag", f"{etag!r} is not a non-empty string")
    src = obj.get("source_path", _MISSING)
    if src is not _MISSING:
        if not isinstance(src, str):
            raise EntryProblem("source_path", f"{src!r} is not a string")
        problem = source_path_problem(src)
        if problem:
            raise EntryProblem("source_path", f"{src!r} {problem}")
    width, height = obj.get("width"), obj.get("height")
    return Entry(sha256=sha, path=path, bytes=int(size), content_type=ctype,
                 width=None if width is None else int(width), height=None if height is None else int(height),
                 logical_id=obj.get("logical_id"), etag=obj.get("etag"), source_path=obj.get("source_path"))


def parse_line(line: str | bytes) -> Entry:
    try:
        obj = json.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        raise EntryProblem(None, f"not valid JSON ({exc.__class__.__name__}: {exc})") from None
    return parse_entry(obj)


#: A line exactly as `Entry.to_json` writes it (fields in FIELDS order, no spaces, strings without escapes
#: other than the \\" of an ETag). Only a fast path: anything it does not match goes to `parse_line`.
_S = rb'[^"\\\x00-\x1f]'  # a string character JSON takes as itself
_FAST_LINE = re.compile(
    rb'[ \t\r\n]*\{"sha256":"([0-9a-f]{64})","path":"images/(' + _S + rb'+)",'
    rb'"bytes":(0|[1-9][0-9]{0,17}),"content_type":"(image/[A-Za-z0-9][A-Za-z0-9.+\-]*)"'
    rb'(?:,"width":([1-9][0-9]{0,17}))?(?:,"height":([1-9][0-9]{0,17}))?'
    rb'(?:,"logical_id":"([^"\\/\x00-\x1f]{1,255})")?'
    rb'(?:,"etag":"(' + _S + rb'*(?:\\"' + _S + rb'*)*)")?'
    rb'(?:,"source_path":"(' + _S + rb'+)")?\}[ \t\r\n]*').fullmatch
_EXT_CACHE: dict[bytes, bytes] = {}

#: (sha256, bytes, content_type, width, height, logical_id, etag, source_path): an Entry without its path
Fields = tuple[str, int, str, int | None, int | None, str | None, str | None, str | None]


def fast_fields(raw: bytes) -> Fields | None:
    """The fields of a line in canonical form, or None when the line is not in that form.

    Agrees with `parse_line` (tests/test_manifest_fast.py): whenever it returns a tuple, `parse_line`
    accepts the line and gives an Entry with exactly these fields. It returns None for every line it
    does not vouch for (other field order, spaces, escapes, floats, any invalid line), which the
    caller then gives to `parse_line` for the answer or the error. About 3x faster than
    json.loads + parse_entry, because it builds neither a dict nor an Entry.
    """
    m = _FAST_LINE(raw)
    if m is None:
        return None
    sha, path, size, ctype, width, height, lid, etag, src = m.groups()
    ext = _EXT_CACHE.get(ctype)
    if ext is None:
        ext = extension_for(ctype.decode()).encode()
        if len(_EXT_CACHE) < 64:
            _EXT_CACHE[ctype] = ext
    if path != b"%s/%s/%s.%s" % (sha[0:2], sha[2:4], sha, ext):
        return None
    try:
        lid_s = None if lid is None else lid.decode()
        src_s = None if src is None else src.decode()
        etag_s = None if etag is None else etag.decode().replace('\\"', '"')
    except UnicodeDecodeError:
        return None
    if (lid_s is not None and (lid_s == "." or lid_s == "..")) or etag_s == "":
        return None
    if src is not None:  # source_path_problem, as substring tests ('/' and '.' never occur inside UTF-8 sequences)
        wrapped = b"/%s/" % src
        if b"//" in wrapped or b"/./" in wrapped or b"/../" in wrapped:  # "", absolute, "." and ".." components
            return None
    return (sha.decode(), int(size), ctype.decode(), None if width is None else int(width),
            None if height is None else int(height), lid_s, etag_s, src_s)


def parse_fields(raw: bytes) -> Fields:
    """`fast_fields`, falling back to `parse_line` (which raises EntryProblem for a bad line)."""
    fields = fast_fields(raw)
    if fields is None:
        e = parse_line(raw)
        fields = (e.sha256, e.bytes, e.content_type, e.width, e.height, e.logical_id, e.etag, e.source_path)
    return fields


def iter_entries(path: Path, *, where: str | None = None) -> Iterator[tuple[int, Entry]]:
    """(line number, entry) of every line of a local manifest; the first bad line raises ManifestError.
    Blank lines are ignored."""
    name = where or str(path)
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise ManifestError(f"{name}: cannot read the manifest: {exc.strerror}") from None
    with f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                yield lineno, parse_line(raw)
            except EntryProblem as exc:
                raise ManifestError(f"{name}:{lineno}: {exc}") from None


def write_manifest(entries: Iterable[Entry], out: IO[str]) -> int:
    n = 0
    for entry in entries:
        out.write(entry.to_json() + "\n")
        n += 1
    return n


def write_manifest_file(entries: Iterable[Entry], path: Path) -> int:
    """Write atomically: a temporary file in the same directory, fsync, rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as out:
            n = write_manifest(entries, out)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return n


@lru_cache(maxsize=1)
def schema() -> dict[str, Any]:
    text = resources.files("s3fsimg").joinpath("manifest.schema.json").read_text(encoding="utf-8")
    result: dict[str, Any] = json.loads(text)
    return result


@dataclass(frozen=True)
class Problem:
    lineno: int
    field: str | None
    message: str

    def format(self, where: str) -> str:
        return f"{where}:{self.lineno}: {self.field + ': ' if self.field else ''}{self.message}"


class Validator:
    """Validates a manifest line by line in bounded memory; `problems` streams every error found."""

    def __init__(self) -> None:
        from jsonschema import Draft202012Validator

        self._schema = Draft202012Validator(schema())
        self._tmpdir = tempfile.TemporaryDirectory(prefix="s3fsimg-validate-")
        self._db = sqlite3.connect(Path(self._tmpdir.name) / "seen.sqlite", isolation_level=None)
        self._db.executescript(
            """
            PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF; PRAGMA cache_size=-16000;
            -- sha256 -> size and the first line that named it
            CREATE TABLE objects(sha256 TEXT PRIMARY KEY, bytes INTEGER, content_type TEXT, lineno INTEGER)
                WITHOUT ROWID;
            -- every source_path and the line that named it
            CREATE TABLE files(path TEXT PRIMARY KEY, lineno INTEGER) WITHOUT ROWID;
            -- every directory implied by a source_path, and the first line that implied it
            CREATE TABLE dirs(path TEXT PRIMARY KEY, lineno INTEGER) WITHOUT ROWID;
            BEGIN;
            """
        )
        self.lines = 0
        self.entries = 0
        self.new_object = False  # whether the last line checked named a sha256 not seen before

    def close(self) -> None:
        self._db.close()
        self._tmpdir.cleanup()

    def __enter__(self) -> Validator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check_line(self, lineno: int, raw: bytes | str) -> Iterator[Problem]:
        self.lines += 1
        fields = fast_fields(raw) if isinstance(raw, bytes) else None
        if fields is not None:  # a canonical, valid line: only the cross-line rules are left to check
            self.entries += 1
            yield from self._cross(lineno, fields[0], fields[1], fields[2], fields[7])
            return
        if not raw.strip():
            return
        try:
            obj = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            yield Problem(lineno, None, f"not valid JSON ({exc})")
            return
        try:
            entry = parse_entry(obj)
        except EntryProblem as exc:
            schema_errors = list(self._schema.iter_errors(obj))
            for err in schema_errors:
                field = ".".join(str(p) for p in err.absolute_path) or None
                message = err.message
                if err.validator == "required" or err.validator == "additionalProperties":
                    field = None
                yield Problem(lineno, field, message)
            if not schema_errors:
                yield Problem(lineno, exc.field, str(exc).split(": ", 1)[-1] if exc.field else str(exc))
            return
        self.entries += 1
        yield from self._cross(lineno, entry.sha256, entry.bytes, entry.content_type, entry.source_path)

    def _cross(self, lineno: int, sha256: str, size: int, ctype: str, src: str | None) -> Iterator[Problem]:
        db = self._db
        row = db.execute("SELECT bytes, content_type, lineno FROM objects WHERE sha256=?", (sha256,)).fetchone()
        self.new_object = row is None
        if row is None:
            db.execute("INSERT INTO objects VALUES (?,?,?,?)", (sha256, size, ctype, lineno))
        elif row[0] != size:
            yield Problem(lineno, "bytes", f"{size} differs from line {row[2]}, which gives {row[0]} "
                                           "bytes for the same sha256")
        elif row[1] != ctype:
            yield Problem(lineno, "content_type", f"{ctype!r} differs from line {row[2]}, which gives {row[1]!r} "
                                                  "for the same sha256 (one object has one type)")
        if src is None:
            return
        row = db.execute("SELECT lineno FROM files WHERE path=?", (src,)).fetchone()
        if row is not None:
            yield Problem(lineno, "source_path", f"{src!r} is already named on line {row[0]}")
            return
        row = db.execute("SELECT lineno FROM dirs WHERE path=?", (src,)).fetchone()
        if row is not None:
            yield Problem(lineno, "source_path", f"{src!r} is a directory of the source_path on line {row[0]}")
            return
        db.execute("INSERT INTO files VALUES (?,?)", (src, lineno))
        for parent in PurePosixPath(src).parents:
            p = str(parent)
            if p == ".":
                break
            row = db.execute("SELECT lineno FROM files WHERE path=?", (p,)).fetchone()
            if row is not None:
                yield Problem(lineno, "source_path", f"{src!r} lies under {p!r}, which is a file on line {row[0]}")
            if db.execute("INSERT OR IGNORE INTO dirs VALUES (?,?)", (p, lineno)).rowcount == 0:
                break  # its ancestors are in already
