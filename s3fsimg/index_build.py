"""Building an index (the format of `index.py`) from a manifest file, atomically.

The manifest is streamed once into `entries` (batched inserts, one transaction per batch); everything
else is derived from that table by SQL that runs in C. Lines go through `manifest.fast_fields` (a
tuple straight from a regex, no dict, no Entry; it agrees with `parse_line` by property test) and only
non-canonical or bad lines through `parse_line` (json.loads + `parse_entry`), both by `parse_fields`.

`index_load.ensure_index` runs the build in a child process (`python -m s3fsimg.index_build build`),
so a mount never holds the builder's memory. That process parses the first part of the manifest while
helper processes (`... part`) parse the later parts, split at line boundaries, each into its own
temporary database; it then appends each helper's rows with an id offset, renumbering its by-path
directories into the whole manifest's order of first appearance. Then, in SQL: the hash index, the
objects named on several lines and their link counts, the logical_id and by-path name indexes, `lids`
and directory link counts. `build_index` returns the time of each phase; docs/benchmarks.md gives the
build's time and memory at 1,000,000 entries. Errors name the manifest line: a helper's line numbers are
offset by the lines before its part.

An index is built into `<dest>.tmp-<pid>-<thread>` and renamed into place last (after fsync), so a
half-built index is never opened, and nothing is left at `dest` or beside it on any failure.

Rules the index adds to the manifest's: lines with the same sha256 must agree on size and content type
(one object has one name under images/); a source_path may be named once and may not also be a
directory of another source_path. A violation is a ManifestError naming the line.
"""

from __future__ import annotations

import json
import os
import resource
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from s3fsimg.config import private_dirs
from s3fsimg.errors import ManifestError
from s3fsimg.files import replace_file
from s3fsimg.index import FORMAT_VERSION, INDEXES, SCHEMA
from s3fsimg.manifest import EntryProblem, parse_fields

_BATCH = 20_000  # rows per insert transaction while streaming the manifest
_PART_BYTES = 64 << 20  # a manifest is parsed in parallel parts of at least this size (one per core, at most 4)
_BUILD_PRAGMAS = ("PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF; PRAGMA cache_size=-16000; "
                  "PRAGMA temp_store=FILE;")


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
    private_dirs(dest.parent)
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
        replace_file(tmp, dest, mode=0o600, fsync=True)
        times["fsync"] = time.perf_counter() - started
    except sqlite3.Error as exc:
        raise ManifestError(f"{name}: cannot build the index at {dest}: {exc}") from None
    finally:
        tmp.unlink(missing_ok=True)
        Path(f"{tmp}-journal").unlink(missing_ok=True)
    return times


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
        try:
            fields = parse_fields(raw)
        except EntryProblem as exc:
            if not raw.strip():
                continue
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
    a MB at a time."""
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
    return subprocess.Popen([sys.executable, "-m", "s3fsimg.index_build", "part", str(manifest_file), str(start),
                             str(end), str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env())


def child_env() -> dict[str, str]:
    """The environment of a helper process: this one's, with this package importable."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def _part_main(manifest_file: Path, start: int, end: int, out: Path) -> int:
    """`python -m s3fsimg.index_build part`: parse one part into a new database `out`; report on stdout."""
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
    db.execute(INDEXES["entries_sha256"])
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
    # Extended attributes are per object: what an object's first line lacks, from its first later line
    # that gives it (the hash index finds its lines in manifest order).
    first_given = ", ".join(f"(SELECT e.{c} FROM entries e WHERE e.sha256 = d.sha256 AND e.{c} IS NOT NULL "
                            f"ORDER BY e.id LIMIT 1)" for c in ("logical_id", "width", "height", "etag"))
    db.execute(f"INSERT INTO objattrs SELECT d.first, {first_given} FROM dups d CROSS JOIN entries f ON f.id = d.first "
               "WHERE f.logical_id IS NULL OR f.width IS NULL OR f.height IS NULL OR f.etag IS NULL")
    db.execute("DROP TABLE dups")
    lap("objects")
    db.execute(INDEXES["entries_logical_id"])
    lap("index logical_id")
    try:
        db.execute(INDEXES["entries_name"])
    except sqlite3.IntegrityError:
        _explain_name_conflict(db, manifest_file, name)
        raise
    db.execute(INDEXES["pdirs_name"])
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


def _main(argv: list[str]) -> int:
    """`python -m s3fsimg.index_build build MANIFEST DEST --digest SHA256 [--where W] [--mtime-ns N] [--parts N]`
    (what `ensure_index` runs), or `... part MANIFEST START END OUT` (a parsing helper of a build).
    The last line on stdout is a JSON report; exit 3 with {"error": ...} for a bad manifest."""
    if argv[:1] == ["part"] and len(argv) == 5:
        return _part_main(Path(argv[1]), int(argv[2]), int(argv[3]), Path(argv[4]))
    import argparse

    parser = argparse.ArgumentParser(prog="python -m s3fsimg.index_build build")
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
