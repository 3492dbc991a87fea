"""The manifest: one JSON object per line describing one name of one content-addressed image.

Owns the `Entry` record, the path/extension rules of the S3 layout, reading and writing JSONL,
and validation. Two checkers agree by construction and by test (tests/test_manifest.py):

- `parse_entry` is the fast, strict per-line parser used on every hot path (index build, mount,
  upload). It checks exactly what the JSON Schema says, plus the per-line rules a schema cannot
  state (path agrees with sha256 and content type; logical_id length in bytes), and stops at the
  first problem.
- the JSON Schema `manifest.schema.json` (shipped in the package) is the public contract. Only for a
  line that `parse_entry` rejects, `line_problems` lists every independent problem of it: each schema
  error (one per field), then the rules a schema cannot state, on the fields the schema passed (so a
  missing or malformed sha256 never also yields a path that "does not agree" with it).

Cross-line rules (same sha256 -> same bytes; no source_path twice; no source_path that is a
directory of another) are checked by `Validator` in bounded memory, through a temporary SQLite
file rather than Python sets, so a manifest of millions of lines validates in a few tens of MB.
"""

from __future__ import annotations

import json
import re
import sqlite3
import tempfile
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import IO, Any

from s3fsimg.errors import ManifestError, quoted
from s3fsimg.files import atomic_write

# \Z, not $: $ also matches before a final newline, which would let "image/jpeg\n" through.
SHA256_RE = re.compile(r"^[0-9a-f]{64}\Z")
_CONTENT_TYPE_RE = re.compile(r"^image/[A-Za-z0-9][A-Za-z0-9.+-]*\Z")
_PATH_RE = re.compile(r"^images/([0-9a-f]{2})/([0-9a-f]{2})/([0-9a-f]{64})\.([a-z0-9]+)\Z")
#: An ETag as S3 returns it: in double quotes (HTTP's opaque-tag, never empty inside)
_ETAG_RE = re.compile(r'^"[^"]+"\Z')

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
    if not is_utf8(value):  # a lone surrogate from a JSON escape: no file has that name, SQLite cannot store it
        return "is not valid UTF-8"
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
        shown = field if field in FIELDS else quoted(field)  # a name the line made up: one short line, escaped
        super().__init__(f"{shown}: {message}" if field else message)
        self.field = field
        self.message = message


def _path_problem(path: str, sha256: str, content_type: str) -> EntryProblem | None:
    expected = object_path(sha256, content_type)
    if path == expected:
        return None
    return EntryProblem("path", f"{quoted(path)} does not agree with sha256 and content_type (expected {expected!r})")


#: The largest integer a manifest may hold (SQLite's, which the index and the validator use; S3's
#: largest object is far below it).
MAX_INT = 2**63 - 1


def is_utf8(text: str) -> bool:
    """Whether `text` is valid Unicode: a file name or command-line argument that was not UTF-8
    comes back from the OS holding lone surrogates, which a JSON manifest cannot hold."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


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
        raise EntryProblem("sha256", f"{quoted(sha)} is not 64 lowercase hex digits")
    size = obj["bytes"]
    if not _is_int(size) or not 0 <= size <= MAX_INT:
        raise EntryProblem("bytes", f"{quoted(size)} is not an integer from 0 to 2^63-1")
    ctype = obj["content_type"]
    if not isinstance(ctype, str) or not _CONTENT_TYPE_RE.match(ctype):
        raise EntryProblem("content_type", f"{quoted(ctype)} is not an image/... content type")
    path = obj["path"]
    if not isinstance(path, str) or not _PATH_RE.match(path):
        raise EntryProblem("path", f"{quoted(path)} is not images/ab/cd/<sha256>.<ext>")
    wrong_path = _path_problem(path, sha, ctype)
    if wrong_path:
        raise wrong_path
    for name in ("width", "height"):
        v = obj.get(name, _MISSING)
        if v is not _MISSING and (not _is_int(v) or not 1 <= v <= MAX_INT):
            raise EntryProblem(name, f"{quoted(v)} is not an integer from 1 to 2^63-1")
    lid = obj.get("logical_id", _MISSING)
    if lid is not _MISSING:
        if not isinstance(lid, str):
            raise EntryProblem("logical_id", f"{quoted(lid)} is not a string")
        problem = logical_id_problem(lid)
        if problem:
            raise EntryProblem("logical_id", f"{quoted(lid)} {problem}")
    etag = obj.get("etag", _MISSING)
    if etag is not _MISSING and (not isinstance(etag, str) or not _ETAG_RE.match(etag)):
        raise EntryProblem("etag", f"{quoted(etag)} is not an ETag in double quotes, as S3 returns it")
    if isinstance(etag, str) and not is_utf8(etag):
        raise EntryProblem("etag", f"{quoted(etag)} is not valid UTF-8")
    src = obj.get("source_path", _MISSING)
    if src is not _MISSING:
        if not isinstance(src, str):
            raise EntryProblem("source_path", f"{quoted(src)} is not a string")
        problem = source_path_problem(src)
        if problem:
            raise EntryProblem("source_path", f"{quoted(src)} {problem}")
    width, height = obj.get("width"), obj.get("height")
    return Entry(sha256=sha, path=path, bytes=int(size), content_type=ctype,
                 width=None if width is None else int(width), height=None if height is None else int(height),
                 logical_id=obj.get("logical_id"), etag=obj.get("etag"), source_path=obj.get("source_path"))


def parse_line(line: str | bytes) -> Entry:
    try:
        obj = json.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        raise EntryProblem(None, f"not valid JSON ({exc.__class__.__name__}: {exc})") from None
    except RecursionError:
        raise EntryProblem(None, "not valid JSON (nested too deeply)") from None
    return parse_entry(obj)


#: A line exactly as `Entry.to_json` writes it (fields in FIELDS order, no spaces, strings without escapes
#: other than the \\" around an ETag). Only a fast path: anything it does not match goes to `parse_line`.
_S = rb'[^"\\\x00-\x1f]'  # a string character JSON takes as itself
_FAST_LINE = re.compile(
    rb'[ \t\r\n]*\{"sha256":"([0-9a-f]{64})","path":"images/(' + _S + rb'+)",'
    rb'"bytes":(0|[1-9][0-9]{0,17}),"content_type":"(image/[A-Za-z0-9][A-Za-z0-9.+\-]*)"'
    rb'(?:,"width":([1-9][0-9]{0,17}))?(?:,"height":([1-9][0-9]{0,17}))?'
    rb'(?:,"logical_id":"([^"\\/\x00-\x1f]{1,255})")?'
    rb'(?:,"etag":"\\"(' + _S + rb'+)\\"")?'  # the ETag within its quotes: _ETAG_RE
    rb'(?:,"source_path":"(' + _S + rb'+)")?\}[ \t\r\n]*').fullmatch
_EXT_CACHE: dict[bytes, bytes] = {}

#: (sha256, bytes, content_type, width, height, logical_id, etag, source_path): an Entry without its path
Fields = tuple[str, int, str, int | None, int | None, str | None, str | None, str | None]


def fast_fields(raw: bytes) -> Fields | None:
    """The fields of a line in canonical form, or None when the line is not in that form.

    Agrees with `parse_line` (tests/test_manifest_fast.py): whenever it returns a tuple, `parse_line`
    accepts the line and gives an Entry with exactly these fields. It returns None for every line it
    does not vouch for (other field order, spaces, escapes, floats, any invalid line), which the
    caller then gives to `parse_line` for the answer or the error. Faster than json.loads +
    parse_entry, because it builds neither a dict nor an Entry (the scale figures are in docs/benchmarks.md).
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
        etag_s = None if etag is None else f'"{etag.decode()}"'
    except UnicodeDecodeError:
        return None
    if lid_s is not None and (lid_s == "." or lid_s == ".."):
        return None
    if src is not None:  # source_path_problem, as substring tests ('/' and '.' never occur inside UTF-8 sequences)
        wrapped = b"/%s/" % src
        if b"//" in wrapped or b"/./" in wrapped or b"/../" in wrapped:  # "", absolute, "." and ".." components
            return None
    return (sha.decode(), int(size), ctype.decode(), None if width is None else int(width),
            None if height is None else int(height), lid_s, etag_s, src_s)


def fields_of(e: Entry) -> Fields:
    """An Entry as `fast_fields` gives a line: its fields without the (derived) path."""
    return (e.sha256, e.bytes, e.content_type, e.width, e.height, e.logical_id, e.etag, e.source_path)


def parse_fields(raw: bytes) -> Fields:
    """`fast_fields`, falling back to `parse_line` (which raises EntryProblem for a bad line)."""
    fields = fast_fields(raw)
    return fields if fields is not None else fields_of(parse_line(raw))


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


def write_manifest_file(entries: Iterable[Entry], path: Path, *, write_empty: bool = True) -> int:
    """Write atomically: a temporary file in the same directory, fsync, rename. With `write_empty`
    False, a manifest of no entries (invalid) is not written, and a file already at `path` stays."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, mode=0o644, fsync=True) as pending:
        with pending.open("w", encoding="utf-8", newline="\n") as out:
            n = write_manifest(entries, out)
        if not (n or write_empty):
            pending.discard()
    return n


@lru_cache(maxsize=1)
def schema() -> dict[str, Any]:
    text = resources.files("s3fsimg").joinpath("manifest.schema.json").read_text(encoding="utf-8")
    result: dict[str, Any] = json.loads(text)
    return result


@lru_cache(maxsize=1)
def schema_validator() -> Any:
    """A jsonschema validator of the manifest schema (imported only when a line needs explaining)."""
    from jsonschema import Draft202012Validator

    return Draft202012Validator(schema())


#: What each field's schema pattern means, for messages (the regex itself says little to a reader).
_PATTERN_MEANING = {
    "sha256": "64 lowercase hex digits",
    "path": "images/ab/cd/<sha256>.<ext>",
    "content_type": "image/<subtype>",
    "logical_id": "a name without '/' or NUL",
    "etag": 'an ETag in double quotes ("..."), as S3 returns it',
    "source_path": "a relative POSIX path without an empty, '.' or '..' component",
}
_FIELD_RANK = {name: i for i, name in enumerate(FIELDS)}


def line_problems(obj: Any) -> list[EntryProblem]:
    """Every independent problem of one decoded line, in field order: the schema's errors (the first of
    each field: a logical_id '' "should be non-empty", and is not also said not to match the pattern),
    then the rules a schema cannot state, checked only on fields the schema passed. Empty when
    `parse_entry` accepts `obj`. For the error path only: far slower than `parse_entry`."""
    found: dict[Any, EntryProblem] = {}  # one per field (or per missing field, for the line as a whole)
    for err in schema_validator().iter_errors(obj):
        field = str(err.absolute_path[0]) if err.absolute_path else None
        key: Any = field
        message = err.message
        if err.validator == "pattern" and field in _PATTERN_MEANING:
            message = f"{quoted(err.instance)} does not match {_PATTERN_MEANING[field]}"
        elif err.validator == "additionalProperties" and field is None and isinstance(obj, dict):
            unknown = sorted(k for k in obj if k not in FIELDS)  # (jsonschema's message holds each name whole)
            more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
            verb = "was" if len(unknown) == 1 else "were"
            names = ", ".join(quoted(k) for k in unknown[:3])
            message = f"Additional properties are not allowed ({names}{more} {verb} unexpected)"
            key = (err.validator, message)
        else:
            full = repr(err.instance)
            if len(full) > 100:
                message = message.replace(full, quoted(err.instance))
            if len(message) > 300:  # a long value quoted inside jsonschema's words: a message stays short
                message = message[:280] + "..."
            if field is None:  # the line as a whole: "'bytes' is a required property", additional properties
                key = (err.validator, message)
        found.setdefault(key, EntryProblem(field, message))
    if isinstance(obj, dict):
        def ok(name: str) -> bool:
            return name in obj and name not in found

        extra: list[EntryProblem | None] = []
        if ok("sha256") and ok("path") and ok("content_type"):
            extra.append(_path_problem(obj["path"], obj["sha256"], obj["content_type"]))
        if ok("logical_id"):
            problem = logical_id_problem(obj["logical_id"])
            extra.append(EntryProblem("logical_id", f"{quoted(obj['logical_id'])} {problem}") if problem else None)
        if ok("etag") and not is_utf8(obj["etag"]):
            extra.append(EntryProblem("etag", f"{quoted(obj['etag'])} is not valid UTF-8"))
        if ok("source_path"):
            problem = source_path_problem(obj["source_path"])
            extra.append(EntryProblem("source_path", f"{quoted(obj['source_path'])} {problem}") if problem else None)
        for p in extra:
            if p is not None:
                found[p.field] = p
    problems = sorted(found.values(), key=lambda p: _FIELD_RANK.get(p.field, -1) if p.field else -2)
    if not problems:  # never expected (tests/test_validate.py): parse_entry's own word, so a bad line is never passed
        try:
            parse_entry(obj)
        except EntryProblem as exc:
            problems.append(exc)
    return problems


@dataclass(frozen=True)
class Problem:
    lineno: int
    field: str | None
    message: str

    def format(self, where: str) -> str:
        return f"{where}:{self.lineno}: {self.field + ': ' if self.field else ''}{self.message}"


class Validator:
    """Validates a manifest line by line in bounded memory; `check_line` streams every problem of a line.

    A canonical valid line costs `fast_fields` and the cross-line checks; any other line is parsed
    with json.loads + `parse_entry`, and only a line these reject pays for `line_problems`. The
    cross-line rules also run on the valid fields of an invalid line (a duplicate source_path is its
    own problem, whatever else is wrong), and what a line declares is remembered whether or not the
    line is valid, so later lines are checked against it.

    Cross-line rules: the lines of one sha256 name one object, so they agree on bytes and content_type,
    and on width, height and etag where they give them (the mount shows each from the object's first
    line that has it); no source_path twice; none that is a directory of another or lies under one.
    """

    def __init__(self) -> None:
        self._tmpdir = tempfile.TemporaryDirectory(prefix="s3fsimg-validate-")
        self._db = sqlite3.connect(Path(self._tmpdir.name) / "seen.sqlite", isolation_level=None)
        self._db.executescript(
            """
            PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF; PRAGMA cache_size=-16000;
            -- one row per sha256: what its lines say about the object, and where it was first said
            CREATE TABLE objects(
                sha256       TEXT PRIMARY KEY,
                bytes        INTEGER,  -- size and type, from the first line naming the sha256 (lineno)
                content_type TEXT,
                lineno       INTEGER,
                clean        INTEGER,  -- 1 once a line without any problem named it (the one that
                                       -- validate --check-objects HEADs the object for), else NULL
                width        INTEGER,  -- from the first line that gives a width (width_line), or NULL
                width_line   INTEGER,
                height       INTEGER,  -- likewise
                height_line  INTEGER,
                etag         TEXT,     -- likewise
                etag_line    INTEGER
            ) WITHOUT ROWID;
            -- every source_path (is_dir 0) and every directory one implies (is_dir 1): the line that
            -- named it, or that first implied it
            CREATE TABLE names(path TEXT PRIMARY KEY, lineno INTEGER, is_dir INTEGER) WITHOUT ROWID;
            BEGIN;
            """
        )
        self.lines = 0
        self.entries = 0  # lines that pass every per-line rule
        #: after check_line: the line's fields when it passes every per-line rule, else None
        self.fields: Fields | None = None
        #: after check_line: True when the line has no problem at all and is the first such line naming its sha256
        self.new_object = False

    def close(self) -> None:
        self._db.close()
        self._tmpdir.cleanup()

    def __enter__(self) -> Validator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check_line(self, lineno: int, raw: bytes | str) -> Iterator[Problem]:
        """Every problem of one line (none for a blank one). `fields` and `new_object` describe the line
        once the iterator is exhausted."""
        self.lines += 1
        self.fields = None
        self.new_object = False
        fields = fast_fields(raw) if isinstance(raw, bytes) else None
        if fields is None:
            if not raw.strip():
                return
            fields = yield from self._slow(lineno, raw)
            if fields is None:
                return
        self.entries += 1
        self.fields = fields
        yield from self._cross_object(lineno, fields[0], fields[1], fields[2], fields[3], fields[4], fields[6],
                                      clean=True)
        if fields[7] is not None:
            problems = list(self._cross_source(lineno, fields[7]))
            if problems and self.new_object:  # not clean after all: a later clean line is the one to HEAD
                self._db.execute("UPDATE objects SET clean=NULL WHERE sha256=?", (fields[0],))
                self.new_object = False
            yield from problems

    def _slow(self, lineno: int, raw: bytes | str) -> Generator[Problem, None, Fields | None]:
        """A line off the fast path: its fields when valid; else yields its problems and returns None."""
        try:
            obj = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            yield Problem(lineno, None, f"not valid JSON ({exc})")
            return None
        except RecursionError:
            yield Problem(lineno, None, "not valid JSON (nested too deeply)")
            return None
        try:
            e = parse_entry(obj)
        except EntryProblem:
            pass
        else:
            return fields_of(e)
        problems = line_problems(obj)
        for p in problems:
            yield Problem(lineno, p.field, p.message)
        if isinstance(obj, dict):  # the cross-line rules, on the fields that are valid
            bad = {p.field for p in problems}

            def valid(name: str) -> Any:
                return obj[name] if name in obj and name not in bad else None

            sha256, size, ctype = valid("sha256"), valid("bytes"), valid("content_type")
            if sha256 is not None and size is not None and ctype is not None:
                width, height = valid("width"), valid("height")
                yield from self._cross_object(lineno, sha256, int(size), ctype,
                                              None if width is None else int(width),
                                              None if height is None else int(height), valid("etag"), clean=False)
            if valid("source_path") is not None:
                yield from self._cross_source(lineno, obj["source_path"])
        return None

    def _cross_object(self, lineno: int, sha256: str, size: int, ctype: str, width: int | None, height: int | None,
                      etag: str | None, *, clean: bool) -> Iterator[Problem]:
        """The lines of one sha256 agree on what they say about its object. Sets new_object when this
        (clean so far) line is the first clean one of the object."""
        db = self._db
        row = db.execute("SELECT bytes, content_type, lineno, clean, width, width_line, height, height_line, etag, "
                         "etag_line FROM objects WHERE sha256=?", (sha256,)).fetchone()
        if row is None:
            db.execute("INSERT INTO objects VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                       (sha256, size, ctype, lineno, 1 if clean else None, width, None if width is None else lineno,
                        height, None if height is None else lineno, etag, None if etag is None else lineno))
            self.new_object = clean
            return
        agrees = True
        if row[0] != size:
            agrees = False
            yield Problem(lineno, "bytes", f"{size} differs from line {row[2]}, which gives {row[0]} "
                                           "bytes for the same sha256")
        if row[1] != ctype:
            agrees = False
            yield Problem(lineno, "content_type", f"{quoted(ctype)} differs from line {row[2]}, which gives "
                                                  f"{quoted(row[1])} for the same sha256 (one object has one type)")
        fill: list[str] = []
        for name, value, (known, known_line) in (("width", width, row[4:6]), ("height", height, row[6:8]),
                                                 ("etag", etag, row[8:10])):
            if value is None:
                continue
            if known is None:
                fill.append(name)
            elif value != known:
                agrees = False
                yield Problem(lineno, name, f"{quoted(value)} differs from line {known_line}, which gives "
                                            f"{quoted(known)} for the same sha256 (one object has one {name})")
        if fill:  # the first line of the object that gives these
            values = {"width": width, "height": height, "etag": etag}
            db.execute(f"UPDATE objects SET {', '.join(f'{n}=?, {n}_line=?' for n in fill)} WHERE sha256=?",
                       (*(v for n in fill for v in (values[n], lineno)), sha256))
        if agrees and clean and row[3] is None:
            db.execute("UPDATE objects SET clean=1 WHERE sha256=?", (sha256,))
            self.new_object = True

    def _cross_source(self, lineno: int, src: str) -> Iterator[Problem]:
        """No source_path twice; none that is a directory of another, or lies under another. Usually two
        statements: the insert of the file, and the probe that finds its directory already there."""
        db = self._db
        if db.execute("INSERT OR IGNORE INTO names VALUES (?,?,0)", (src, lineno)).rowcount == 0:
            is_dir, first = db.execute("SELECT is_dir, lineno FROM names WHERE path=?", (src,)).fetchone()
            what = "is a directory of the source_path on" if is_dir else "is already named on"
            yield Problem(lineno, "source_path", f"{quoted(src)} {what} line {first}")
            return
        head = src
        while True:
            head = head.rpartition("/")[0]
            if not head:
                return
            row = db.execute("SELECT is_dir, lineno FROM names WHERE path=?", (head,)).fetchone()
            if row is None:
                db.execute("INSERT INTO names VALUES (?,?,1)", (head, lineno))
                continue
            if not row[0]:  # a file; its own directories are in already
                yield Problem(lineno, "source_path",
                              f"{quoted(src)} lies under {quoted(head)}, which is a file on line {row[1]}")
            return  # a directory: its ancestors are in already
