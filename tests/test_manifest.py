"""The manifest: the fast parser agrees with the JSON Schema, and `validate` reports every error
with its line number and field (exit 1). Scanning for `manifest DIR`: MPO is image/jpeg, a hash cache
of an older version is not used, odd names and special files work or are skipped with a reason, and a
logical map that starts with a UTF-8 BOM loses no row."""

from __future__ import annotations

import codecs
import hashlib
import io
import json
import os
import re
import shutil
import socket
import sqlite3
import stat
import subprocess
import sys
import unicodedata
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from PIL import Image

from s3fsimg.manifest import Entry, EntryProblem, Validator, object_path, parse_entry, parse_line, schema
from s3fsimg.scan import HashCache, LogicalMap, NotRegularFile, _process, identify, read_regular, scan
from tests.checklogs import expect_logs

SHA = hashlib.sha256(b"x").hexdigest()
SHA2 = hashlib.sha256(b"y").hexdigest()


def good(**fields: Any) -> dict[str, Any]:
    sha = fields.pop("sha256", SHA)
    base = {"sha256": sha, "path": object_path(sha, "image/jpeg"), "bytes": 10, "content_type": "image/jpeg"}
    base.update(fields)
    return {k: v for k, v in base.items() if v is not None}


def run_validate(tmp_path: Path, lines: list[str]) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "m.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    return subprocess.run([sys.executable, "-m", "s3fsimg", "validate", str(path)], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)


def test_valid_manifest_exits_0(tmp_path: Path) -> None:
    lines = [json.dumps(good(logical_id="DAO-1", source_path="a/b.jpg", width=3, height=4, etag='"abc"')),
             json.dumps(good(source_path="a/c.jpg")),  # same object under another name
             json.dumps(good(sha256=SHA2, bytes=3))]
    proc = run_validate(tmp_path, lines)
    assert proc.returncode == 0, proc.stderr
    assert "valid: 3 entries" in proc.stdout


BAD_LINES = [
    ("{not json", None, "not valid JSON"),
    (json.dumps({k: v for k, v in good().items() if k != "bytes"}), None, "'bytes' is a required property"),
    (json.dumps(good(bytes="10")), "bytes", "is not of type 'integer'"),
    (json.dumps(good(bytes=-1)), "bytes", "less than the minimum"),
    (json.dumps(good(sha256="ABC")), "sha256", "does not match"),
    (json.dumps({**good(), "path": object_path(SHA2, "image/jpeg")}), "path", "does not agree with sha256"),
    (json.dumps({**good(), "path": object_path(SHA, "image/png")}), "path", "does not agree"),
    (json.dumps(good(logical_id="a/b")), "logical_id", "does not match"),
    (json.dumps(good(logical_id="..")), "logical_id", "should not be valid"),
    (json.dumps(good(logical_id="é" * 200)), "logical_id", "longer than 255 bytes"),
    (json.dumps(good(source_path="/etc/passwd")), "source_path", "does not match"),
    (json.dumps(good(source_path="a/../../b.jpg")), "source_path", "does not match"),
    (json.dumps(good(width=0)), "width", "less than the minimum"),
    (json.dumps(good(content_type="text/plain")), "content_type", "does not match"),
    (json.dumps({**good(), "colour": "red"}), None, "Additional properties are not allowed"),
]


@pytest.mark.parametrize(("line", "field", "message"), BAD_LINES)
def test_each_malformed_line_is_reported_with_its_line_number(
    tmp_path: Path, line: str, field: str | None, message: str
) -> None:
    ok = json.dumps(good(sha256=SHA2, bytes=3))
    proc = run_validate(tmp_path, [ok, ok, line])
    assert proc.returncode == 1
    where = f"{tmp_path / 'm.jsonl'}:3: "
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith(where)]
    assert errors, proc.stderr
    assert any(message in e and (field is None or e.startswith(where + field + ":")) for e in errors), errors
    assert "Traceback" not in proc.stderr


def test_cross_line_rules(tmp_path: Path) -> None:
    lines = [
        json.dumps(good(source_path="a/b.jpg")),
        json.dumps(good(bytes=11, source_path="a/c.jpg")),  # 2: same sha, other size
        json.dumps(good(source_path="a/b.jpg")),  # 3: duplicate source_path
        json.dumps(good(source_path="a")),  # 4: a directory of line 1
        json.dumps(good(source_path="a/b.jpg/x.jpg")),  # 5: under a file
        json.dumps({**good(content_type="image/png", source_path="p.png"), "path": object_path(SHA, "image/png")}),
    ]
    proc = run_validate(tmp_path, lines)
    assert proc.returncode == 1
    text = proc.stderr
    where = str(tmp_path / "m.jsonl")
    assert f"{where}:2: bytes: 11 differs from line 1" in text
    assert f"{where}:3: source_path: 'a/b.jpg' is already named on line 1" in text
    assert f"{where}:4: source_path: 'a' is a directory of the source_path on line 1" in text
    assert f"{where}:5: source_path: 'a/b.jpg/x.jpg' lies under 'a/b.jpg'" in text
    assert f"{where}:6: content_type: 'image/png' differs from line 1" in text
    assert "invalid: 5 error(s)" in text


def test_missing_manifest_file_is_one_line(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "s3fsimg", "validate", str(tmp_path / "nope.jsonl")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip().endswith("cannot read: No such file or directory")
    assert len(proc.stderr.strip().splitlines()) == 1


# -- the fast parser and the schema agree --------------------------------------------------------------

_VALIDATOR = Draft202012Validator(schema())
_texts = st.one_of(st.text(max_size=8), st.sampled_from([".", "..", "a/b", "/abs", "a//b", "ok", "x\x00y",
                                                          "a/./b", "é" * 130, "d/e.jpg"]))
_values = st.one_of(st.none(), st.integers(-2, 20), st.booleans(), _texts, st.floats(allow_nan=False))


@st.composite
def near_valid(draw: st.DrawFn) -> dict[str, Any]:
    obj: dict[str, Any] = good(width=3, height=4, logical_id="L", etag='"e"', source_path="a/b.jpg")
    for name in draw(st.lists(st.sampled_from([*obj, "extra"]), max_size=3)):
        choice = draw(st.integers(0, 2))
        if choice == 0:
            obj.pop(name, None)
        else:
            obj[name] = draw(_values)
    return obj


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(near_valid())
def test_parse_entry_accepts_exactly_what_the_schema_accepts(obj: dict[str, Any]) -> None:
    try:
        parse_entry(obj)
        fast_ok = True
    except EntryProblem:
        fast_ok = False
    schema_ok = _VALIDATOR.is_valid(obj)
    if schema_ok and not fast_ok:
        # Only the rules a schema cannot state may reject a schema-valid line.
        with pytest.raises(EntryProblem) as info:
            parse_entry(obj)
        assert info.value.field in ("path", "logical_id"), info.value
    else:
        assert fast_ok == schema_ok, obj


def test_validator_memory_is_bounded_by_sqlite_not_python() -> None:
    with Validator() as v:
        for i in range(5000):
            sha = hashlib.sha256(str(i).encode()).hexdigest()
            line = json.dumps({"sha256": sha, "path": object_path(sha, "image/png"), "bytes": i,
                               "content_type": "image/png", "source_path": f"d{i % 50}/f{i}.png"})
            assert list(v.check_line(i + 1, line)) == []
        assert v.entries == 5000


# -- scanning: what `manifest DIR` names, and what it skips with a reason ------------------------------


def png_bytes(colour: str | tuple[int, int, int] = "red", size: tuple[int, int] = (12, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def write_mpo(path: Path, size: tuple[int, int] = (24, 16)) -> bytes:
    """A two-picture JPEG, as phones and cameras write; Pillow opens it as format MPO."""
    path.parent.mkdir(parents=True, exist_ok=True)
    first, second = Image.new("RGB", size, "orange"), Image.new("RGB", size, "navy")
    first.save(path, format="MPO", save_all=True, append_images=[second])
    with Image.open(path) as im:
        assert im.format == "MPO" and im.n_frames == 2  # really an MPO, not a plain JPEG
    return path.read_bytes()


def run_manifest(root: Path | str, out: Path, *prefix: str) -> subprocess.CompletedProcess[str]:
    """`s3fsimg manifest ROOT --out OUT`, run as `prefix...` when given (setpriv)."""
    return subprocess.run([*prefix, sys.executable, "-m", "s3fsimg", "manifest", os.fspath(root), "--out", str(out)],
                          capture_output=True, text=True, timeout=60, cwd=out.parent)


def manifest_entries(out: Path) -> list[Entry]:
    return [parse_line(line) for line in out.read_bytes().splitlines()]


def skip_lines(proc: subprocess.CompletedProcess[str]) -> set[str]:
    return {line for line in proc.stderr.splitlines() if line.startswith("skipped ")}


def test_mpo_is_recorded_as_jpeg(tmp_path: Path) -> None:
    data = write_mpo(tmp_path / "d" / "phone.jpg")
    sha = hashlib.sha256(data).hexdigest()
    assert identify(data) == ("image/jpeg", 24, 16)
    out = tmp_path / "m.jsonl"
    proc = run_manifest(tmp_path / "d", out)
    assert proc.returncode == 0, proc.stderr
    [entry] = manifest_entries(out)
    assert (entry.content_type, entry.path, entry.width, entry.height) == (
        "image/jpeg", f"images/{sha[:2]}/{sha[2:4]}/{sha}.jpg", 24, 16)
    assert run_validate(tmp_path, [out.read_text().rstrip("\n")]).returncode == 0


#: The hash cache file as s3fsimg wrote it before it had a version (user_version 0), when MPO was image/mpo.
_OLD_HASH_CACHE = """
CREATE TABLE files(rel TEXT PRIMARY KEY, stat TEXT NOT NULL, sha256 TEXT, content_type TEXT, width INTEGER,
                   height INTEGER) WITHOUT ROWID;
"""


def write_old_hash_cache(db_path: Path, root: Path, rel: str) -> None:
    """What a run before the MPO fix left in the hash cache for the MPO file at root/rel."""
    path = root / rel
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    db_path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(db_path)
    with db:
        db.executescript(_OLD_HASH_CACHE)
        db.execute("INSERT INTO files VALUES (?,?,?,?,?,?)",
                   (rel, HashCache.stamp(path.stat()), sha, "image/mpo", 24, 16))
    db.close()


def test_hash_cache_of_an_older_version_is_not_used(tmp_path: Path) -> None:
    root = tmp_path / "d"
    write_mpo(root / "phone.jpg")
    db_path = tmp_path / "hashes" / "x.sqlite"
    write_old_hash_cache(db_path, root, "phone.jpg")

    cache = HashCache(db_path)
    try:
        assert cache.get("phone.jpg", (root / "phone.jpg").stat()) is None
        [result] = scan(root, hash_cache=cache)
    finally:
        cache.close()
    assert result.entry is not None and result.entry.content_type == "image/jpeg"
    assert result.entry.path.endswith(".jpg")

    cache = HashCache(db_path)  # what this run learnt is kept, under the current version
    try:
        hit = cache.get("phone.jpg", (root / "phone.jpg").stat())
        assert hit is not None and hit[1] == "image/jpeg"
    finally:
        cache.close()
    db = sqlite3.connect(db_path)
    try:
        assert db.execute("PRAGMA user_version").fetchone()[0] == HashCache.VERSION
    finally:
        db.close()


def test_a_hash_cache_that_fails_later_is_turned_off_with_one_warning(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that fails mid-run (the 500-row flush inside `put`: disk full) or a read that fails: one
    WARNING, then the cache finds and keeps nothing; nothing raises, and what was committed stays."""
    root = tmp_path / "d"
    root.mkdir()
    (root / "a.png").write_bytes(png_bytes())
    st_a = (root / "a.png").stat()
    db_path = tmp_path / "hashes" / "x.sqlite"
    cache = HashCache(db_path)
    cache.put("a.png", st_a, None)
    cache.close()

    real_connect = sqlite3.connect

    def connect(database: Any, *args: Any, **kwargs: Any) -> sqlite3.Connection:
        conn = real_connect(database, *args, **kwargs)
        conn.execute(f"PRAGMA max_page_count={conn.execute('PRAGMA page_count').fetchone()[0]}")  # no room to grow
        return conn

    monkeypatch.setattr(sqlite3, "connect", connect)
    cache = HashCache(db_path)
    assert cache.get("a.png", st_a) == (None, None, None, None)
    with expect_logs(rf"^hash cache {re.escape(str(db_path))} unusable \(database or disk is full\); "
                     r"hashing every file$", count=1):
        for i in range(600):
            cache.put(f"f{i:04d}-{'x' * 60}.png", st_a, None)
        assert cache.get("a.png", st_a) is None  # off: every file is hashed
        cache.close()
    monkeypatch.undo()

    cache = HashCache(db_path)  # the file is intact: what the first run committed is there
    try:
        assert cache.get("a.png", st_a) == (None, None, None, None)
        with sqlite3.connect(db_path) as other:  # pulled from under it: reads now fail
            other.execute("DROP TABLE files")
        with expect_logs(r"unusable \(no such table: files\); hashing every file$", count=1):
            assert cache.get("a.png", st_a) is None
            assert cache.get("a.png", st_a) is None
    finally:
        cache.close()


def test_names_that_are_not_utf8_are_skipped_with_a_reason(tmp_path: Path) -> None:
    root = tmp_path / "d"
    root.mkdir()
    (root / "ok.png").write_bytes(png_bytes("red"))
    broot = os.fsencode(root)
    fd = os.open(broot + b"/caf\xe9.jpg", os.O_CREAT | os.O_WRONLY, 0o644)  # Latin-1 "café.jpg"
    os.write(fd, png_bytes("green"))
    os.close(fd)
    os.mkdir(broot + b"/dir\xff")
    fd = os.open(broot + b"/dir\xff/inside.png", os.O_CREAT | os.O_WRONLY, 0o644)
    os.write(fd, png_bytes("blue"))
    os.close(fd)

    out = tmp_path / "m.jsonl"
    proc = run_manifest(root, out)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert skip_lines(proc) == {
        "skipped caf\\xe9.jpg: name is not valid UTF-8",
        "skipped dir\\xff: directory name is not valid UTF-8 (nothing under it is scanned)",
    }
    assert [e.source_path for e in manifest_entries(out)] == ["ok.png"]
    assert "1 entries, 2 files skipped" in proc.stdout


ODD_NAMES = [
    "new\nline.png", "back\\slash.png", "-dash.png", "--help.png", " lead and trail .png", "tab\there.png",
    unicodedata.normalize("NFC", "é.png"), unicodedata.normalize("NFD", "é.png"), "日本 語.png", "'quote\".png",
    "-dir with space/x.png", "%s%n{}.png",
]


def test_odd_names_work(tmp_path: Path) -> None:
    root = tmp_path / "d"
    for i, name in enumerate(ODD_NAMES):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(png_bytes((i * 20, 0, 0), (i + 1, 3)))
    (root / "notes\n.txt").write_text("not an image")
    out = tmp_path / "m.jsonl"
    proc = run_manifest(root, out)
    assert proc.returncode == 0, proc.stderr
    entries = manifest_entries(out)
    assert sorted(e.source_path or "" for e in entries) == sorted(ODD_NAMES)
    assert {e.source_path: e.width for e in entries} == {name: i + 1 for i, name in enumerate(ODD_NAMES)}
    assert skip_lines(proc) == {"skipped notes\\n.txt: not an image"}  # one line, the newline escaped
    assert run_validate(tmp_path, out.read_text(encoding="utf-8").splitlines()).returncode == 0


@pytest.mark.timeout(60)
def test_fifos_sockets_devices_and_symlink_loops_are_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "d"
    (root / "sub").mkdir(parents=True)
    (root / "ok.png").write_bytes(png_bytes())
    os.mkfifo(root / "fifo")
    (root / "to-fifo").symlink_to("fifo")
    monkeypatch.chdir(root)  # a short relative name: AF_UNIX paths are limited to 108 bytes
    sock = socket.socket(socket.AF_UNIX)
    sock.bind("sock")
    sock.close()
    (root / "loop-a").symlink_to("loop-b")
    (root / "loop-b").symlink_to("loop-a")
    (root / "sub" / "self").symlink_to("self")
    (root / "gone").symlink_to("nowhere")
    (root / "sub" / "up").symlink_to("..")  # a directory loop back to DIR
    expected = {
        "skipped fifo: not a regular file (FIFO)",
        "skipped to-fifo: not a regular file (FIFO)",
        "skipped sock: not a regular file (socket)",
        "skipped loop-a: symlink loop",
        "skipped loop-b: symlink loop",
        "skipped sub/self: symlink loop",
        "skipped gone: broken symlink",
        "skipped sub/up: directory loop",
    }
    try:
        os.mknod(root / "null", stat.S_IFCHR | 0o600, os.makedev(1, 3))  # what /dev/null is
        expected.add("skipped null: not a regular file (character device)")
    except PermissionError:
        pass  # no CAP_MKNOD here: FIFOs and sockets still cover "never open what is not a file"
    out = tmp_path / "m.jsonl"
    proc = run_manifest(root, out)
    assert proc.returncode == 0, proc.stderr
    assert skip_lines(proc) == expected
    assert [e.source_path for e in manifest_entries(out)] == ["ok.png"]


def _without_dac() -> list[str]:
    """A command prefix under which file permissions apply (root reads anything: drop its DAC override)."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: permissions cannot be made to apply")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]


def test_unreadable_files_and_directories_are_skipped(tmp_path: Path) -> None:
    prefix = _without_dac()
    root = tmp_path / "d"
    (root / "locked").mkdir(parents=True)
    (root / "ok.png").write_bytes(png_bytes())
    (root / "secret.png").write_bytes(png_bytes("blue"))
    (root / "locked" / "x.png").write_bytes(png_bytes("green"))
    (root / "secret.png").chmod(0)
    (root / "locked").chmod(0)
    try:
        out = tmp_path / "m.jsonl"
        proc = run_manifest(root, out, *prefix)
    finally:
        (root / "locked").chmod(0o755)
    assert proc.returncode == 0, proc.stderr
    assert skip_lines(proc) == {"skipped secret.png: unreadable: Permission denied",
                                "skipped locked: unreadable directory: Permission denied"}
    assert [e.source_path for e in manifest_entries(out)] == ["ok.png"]


@pytest.mark.timeout(20)
def test_a_fifo_put_in_place_of_a_listed_file_is_never_opened_for_reading(tmp_path: Path) -> None:
    """The walk saw a regular file; by the time it is read, it is a FIFO no one writes to."""
    fifo = tmp_path / "was-a-file.png"
    os.mkfifo(fifo)
    result = _process("was-a-file.png", fifo, LogicalMap.empty(), None, None)
    assert (result.entry, result.skipped) == (None, "not a regular file (FIFO)")
    with pytest.raises(NotRegularFile):  # the last guard, after the stat: the descriptor read is refused
        read_regular(fifo)


@pytest.mark.parametrize("header", [False, True], ids=["no-header", "header"])
def test_a_logical_map_with_a_utf8_bom_loses_no_row(tmp_path: Path, header: bool) -> None:
    """Excel's "CSV UTF-8" and Notepad start the file with a BOM: it is not part of the first filename
    (without a header row, that row's id was lost; with one, the header was taken for a row)."""
    root = tmp_path / "d"
    root.mkdir()
    (root / "b.png").write_bytes(png_bytes("red"))
    (root / "c.png").write_bytes(png_bytes("blue"))
    map_path = tmp_path / "map.csv"
    rows = ("filename,logical_id\r\n" if header else "") + "b.png,ID-B\r\nc.png,ID-C\r\n"
    map_path.write_bytes(codecs.BOM_UTF8 + rows.encode("utf-8"))

    lmap = LogicalMap.load(map_path)
    assert (len(lmap), lmap.lookup("b.png"), lmap.lookup("c.png")) == (2, "ID-B", "ID-C")

    out = tmp_path / "m.jsonl"
    proc = subprocess.run([sys.executable, "-m", "s3fsimg", "manifest", str(root), "--out", str(out)],
                          env={**os.environ, "DATASET_LOGICAL_MAP": str(map_path)}, capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert {e.source_path: e.logical_id for e in manifest_entries(out)} == {"b.png": "ID-B", "c.png": "ID-C"}


def test_a_logical_map_matches_names_in_either_unicode_form_and_reports_rows_that_match_nothing(
        tmp_path: Path) -> None:
    """macOS writes decomposed (NFD) names, a CSV typed elsewhere is composed (NFC): "café.png" must
    match either way; a row that matches no file (a typo) is reported, not dropped silently."""
    import unicodedata

    root = tmp_path / "d"
    (root / "sub").mkdir(parents=True)
    nfd = unicodedata.normalize("NFD", "café.png")
    (root / nfd).write_bytes(png_bytes("red"))
    (root / "sub" / "b.png").write_bytes(png_bytes("blue"))
    map_path = tmp_path / "map.csv"
    map_path.write_text("filename,logical_id\ncafé.png,ID-CAFE\nsub/b.png,ID-B\nsub/typo.png,ID-X\nnothing.png,ID-Y\n",
                        encoding="utf-8")
    out = tmp_path / "m.jsonl"
    proc = subprocess.run([sys.executable, "-m", "s3fsimg", "manifest", str(root), "--out", str(out)],
                          env={**os.environ, "DATASET_LOGICAL_MAP": str(map_path)}, capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert {e.source_path: e.logical_id for e in manifest_entries(out)} == {nfd: "ID-CAFE", "sub/b.png": "ID-B"}
    notes = [line for line in proc.stderr.splitlines() if line.startswith("note:")]
    assert notes == [f"note: 2 row(s) of the logical map {map_path} match no file (first: 'sub/typo.png', line 4)"]
