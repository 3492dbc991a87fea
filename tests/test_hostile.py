"""Hostile input (issue 11).

* Arbitrary bytes and arbitrary JSON given to the manifest parser (`iter_entries`), to `s3fsimg validate`
  and to the index build: each answers with a clear error naming the manifest and the line (one short
  line of text), or accepts the manifest; never another exception, never a hang (pytest-timeout).
  The three agree: the index builds exactly when the parser accepts every line and validate finds
  nothing but its own extra cross-line rules.
* Logical ids and source paths with `..`, `/`, NUL, control characters, 300 bytes, odd Unicode, or a
  name that is also a directory never name anything outside the mount's tree: every name an index built
  from such a manifest lists under by-id/ and by-path/ is one safe component, and the listing is exactly
  the manifest's names; a real mount of such a tree is walked with os.walk and every file read.
* A logical map with bytes that are not UTF-8 on line 4 is refused naming line 4, exit 1, nothing uploaded.

Hypothesis runs a fixed, derandomized profile: CI tries the same examples every time.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from s3fsimg.config import Config
from s3fsimg.errors import ManifestError
from s3fsimg.index import BY_ID_INODE, BY_PATH_INODE, ROOT_INODE, Index
from s3fsimg.index_build import build_index
from s3fsimg.manifest import FIELDS, EntryProblem, iter_entries, object_path, parse_entry, parse_line
from s3fsimg.validate import validate
from tests.cacheworker import build_workset, upload_dir
from tests.mountutil import MountProcess, fuse_test

ROOT = Path(__file__).resolve().parents[1]
WHERE = "s3://lab/manifests/inventory-v1.jsonl"
MAX_MESSAGE = 400  # characters of one error message, beyond the manifest's name: "clear" means short


def profile(examples: int) -> settings:
    """The fixed profile: derandomized, so CI runs the same examples every time."""
    return settings(derandomize=True, max_examples=examples, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ------------------------------------------------------------------------------------- strategies

#: names an attacker (or an unlucky spreadsheet) might put in a manifest
ODD = [
    "..", ".", "/", "a/..", "../x", "a/../../etc/passwd", "/etc/passwd", "a//b", "a/./b", "a/", "\0", "a\0b",
    "\x01\x1f\x7f", "\n", "\r\n", "\t", " ", "-rf", "~", "$HOME", "..\\..\\x", "é", "e\u0301", "\u202eevil",
    "\ufeff", "\u200b", "／", "∕", "⁄", "．．", "\ud800", "\udfff", "🙂", "ǅ", "x" * 300, "é" * 150, "\uffff",
    "\U0010ffff", "images", "by-id", "manifest.jsonl", "...", "a" * 255,
]
_any_char = st.characters(exclude_categories=())  # every code point, lone surrogates included
hostile_text = st.one_of(
    st.sampled_from(ODD),
    st.lists(st.sampled_from([*ODD, "a", "b", "/", "."]), min_size=1, max_size=6).map("".join),
    st.text(_any_char, max_size=12),
)
_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(2**63 - 2, 2**70), st.floats(),
                     hostile_text)
json_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(hostile_text, inner, max_size=3), max_leaves=6)


def sha(i: int) -> str:
    return hashlib.sha256(f"hostile{i}".encode()).hexdigest()


def good(i: int = 0, content_type: str = "image/png", **fields: Any) -> dict[str, Any]:
    s = sha(i)
    obj: dict[str, Any] = {"sha256": s, "path": object_path(s, content_type), "bytes": 100 + i,
                           "content_type": content_type}
    obj.update(fields)
    return {k: v for k, v in obj.items() if v is not None}


@st.composite
def near_entries(draw: st.DrawFn) -> dict[str, Any]:
    """A valid entry with up to three fields removed or replaced by hostile text or arbitrary JSON."""
    obj = good(draw(st.integers(0, 4)), width=3, height=4, logical_id=f"L{draw(st.integers(0, 3))}",
               etag='"e"', source_path=draw(st.sampled_from(["a/b.png", "a/c.png", "d.png", "a"])))
    for name in draw(st.lists(st.sampled_from([*FIELDS, "extra", "logical-id"]), max_size=3)):
        how = draw(st.integers(0, 2))
        if how == 0:
            obj.pop(name, None)
        elif how == 1:
            obj[name] = draw(hostile_text)
        else:
            obj[name] = draw(json_values)
    return obj


def _encode(obj: Any, ascii_only: bool) -> bytes:
    # surrogatepass: a lone surrogate written raw is bytes that are not UTF-8, as a careless writer makes them
    return json.dumps(obj, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


@st.composite
def manifest_lines(draw: st.DrawFn) -> bytes:
    """One line (which may itself hold newlines: arbitrary bytes)."""
    kind = draw(st.integers(0, 5))
    if kind == 0:
        return draw(st.binary(max_size=60))
    if kind == 1:
        return _encode(draw(json_values), draw(st.booleans()))
    if kind in (2, 3):
        return _encode(draw(near_entries()), draw(st.booleans()))
    line = parse_entry(good(draw(st.integers(0, 4)))).to_json().encode()
    if kind == 4:
        return line
    at = draw(st.integers(0, len(line)))  # mangled: bytes inserted, the rest maybe cut
    return line[:at] + draw(st.binary(max_size=4)) + line[at:draw(st.integers(at, len(line)))]


manifests = st.lists(manifest_lines(), max_size=6).flatmap(
    lambda lines: st.sampled_from([b"\n", b"\r\n"]).map(lambda nl: nl.join(lines) + (nl if lines else b"")))


# ---------------------------------------------------------------------------------------- helpers


def first_bad_line(raw: bytes) -> int | None:
    """The reference: the first non-blank line `parse_line` rejects (lines are split at LF, as read)."""
    for lineno, line in enumerate(raw.split(b"\n"), 1):
        if line.strip():
            try:
                parse_line(line)
            except EntryProblem:
                return lineno
    return None


def assert_clear(message: str, where: str, lines: int) -> int:
    """`message` is one short line `WHERE:N: ...` with N a line of the manifest; returns N."""
    shown = message[:300]
    assert message.startswith(f"{where}:"), shown
    m = re.match(r":(\d+): \S", message[len(where):])
    assert m is not None, shown
    assert 1 <= int(m.group(1)) <= lines, shown
    assert "\n" not in message and "\r" not in message, shown
    assert len(message) - len(where) <= MAX_MESSAGE, shown
    return int(m.group(1))


def run_validate(path: Path) -> tuple[int, int, list[str]]:
    out: list[str] = []
    errors, entries = validate(Config.load(env={}), path, echo=out.append)
    return errors, entries, out


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hostile")


def _fresh(work: Path) -> Path:
    """A manifest path and an empty index directory beside it (hypothesis reuses the fixture's dir)."""
    for p in work.rglob("*"):
        if p.is_file():
            p.unlink()
    (work / "idx").mkdir(exist_ok=True)
    return work / "m.jsonl"


def build_or_error(m: Path, dest: Path, parts: int = 1) -> Index | str:
    """The index of `m`, or the ManifestError's message; nothing is left beside `dest` on an error."""
    try:
        build_index(m, dest, manifest_digest="d" * 64, where=WHERE, parts=parts)
    except ManifestError as exc:
        assert not dest.exists() and not [p for p in os.listdir(dest.parent) if p.startswith(dest.name)]
        return str(exc)
    return Index.open(dest, manifest_digest="d" * 64)


# ----------------------------------------------------------------- 1. arbitrary bytes and JSON


@profile(400)
@given(manifests)
@example(b"[" * 100_000 + b"\n")
@example(b'{"bytes": 1' + b"0" * 5000 + b"}\n")
@example(_encode(good(0, source_path="a\ud800b"), True) + b"\n")
@example(_encode(good(0, etag='"\ud800"'), True) + b"\n")
@example(_encode(good(0, logical_id="\udfff"), False) + b"\n")
@example(_encode({**good(0), "\n": 1}, True) + b"\n")
@example(_encode(good(0, sha256="f" * 1_000_000), True) + b"\n")
@example(b"\xef\xbb\xbf" + parse_entry(good(0)).to_json().encode() + b"\n")
def test_parser_validate_and_index_build_name_the_line_or_accept(work: Path, raw: bytes) -> None:
    m = _fresh(work)
    m.write_bytes(raw)
    lines = max(1, len(raw.split(b"\n")))
    bad = first_bad_line(raw)

    # the parser: the first bad line, by number
    try:
        n = sum(1 for _ in iter_entries(m, where=WHERE))
    except ManifestError as exc:
        assert assert_clear(str(exc), WHERE, lines) == bad
    else:
        assert bad is None
        assert n == sum(1 for line in raw.split(b"\n") if line.strip())

    # validate: every problem on a line of its own, naming it; the parser's first bad line among them
    errors, _entries, out = run_validate(m)
    assert errors == len(out)
    named = set()
    for message in out:
        if message != f"{m}: the manifest has no entries":
            named.add(assert_clear(message, str(m), lines))
    if bad is not None:
        assert bad in named, out

    # the index build: an error naming a line, or an index; validate's cross-line rules are a superset
    # of the build's, so it builds when validate finds nothing wrong
    built = build_or_error(m, work / "idx" / "i.sqlite")
    if isinstance(built, str):
        assert_clear(built, WHERE, lines)
        assert errors > 0
    else:
        built.close()
        assert bad is None
        # only validate's own cross-line rules (width/height/etag of one object agree), or no entries
        assert all(re.search(r": (width|height|etag): .* differs from line|has no entries", x) for x in out), out


@profile(25)
@given(st.lists(manifest_lines(), min_size=2, max_size=8))
def test_an_index_built_in_parts_names_the_line_of_the_whole_manifest(work: Path, lines: list[bytes]) -> None:
    """The build's helper processes (the later parts of a large manifest) number lines as the whole file."""
    m = _fresh(work)
    raw = b"\n".join(line.replace(b"\n", b" ") for line in lines) + b"\n"
    m.write_bytes(raw)
    one = build_or_error(m, work / "idx" / "one.sqlite")
    two = build_or_error(m, work / "idx" / "two.sqlite", parts=2)
    for built in (one, two):
        if isinstance(built, Index):
            built.close()
    if isinstance(one, str) or isinstance(two, str):
        assert isinstance(one, str) and isinstance(two, str), (one, two)
        assert assert_clear(two, WHERE, len(lines)) == assert_clear(one, WHERE, len(lines))


def test_cli_validate_of_hostile_bytes_is_one_line_per_problem(tmp_path: Path) -> None:
    m = tmp_path / "m.jsonl"
    m.write_bytes(b"\n".join([
        parse_entry(good(0)).to_json().encode(),
        b"\xff\xfe\x00garbage",
        _encode(good(1, source_path="a\ud800b"), False),
        b"[" * 200_000,
        _encode({**good(2), "\n\x1b[31mred": 1}, False),
        _encode(good(3, logical_id="x" * 300), True),
        b"",
    ]))
    r = subprocess.run([sys.executable, "-m", "s3fsimg", "validate", str(m)], capture_output=True, text=True,
                       cwd=tmp_path, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    problems = r.stderr.splitlines()
    assert problems[-1] == "invalid: 5 error(s) in 1 entries", r.stderr
    assert [assert_clear(p, str(m), 7) for p in problems[:-1]] == [2, 3, 4, 5, 6], r.stderr
    assert "\x1b" not in r.stderr


# ------------------------------------------------------------- 2. names never outside the tree


def listed(index: Index, inode: int, prefix: tuple[bytes, ...] = ()) -> Iterator[tuple[bytes, ...]]:
    """Every path under `inode` as the index lists it, each name checked to be one safe component."""
    for name, child, _key in index.readdir(inode):
        assert name and name not in (b".", b"..") and b"/" not in name and b"\0" not in name, (prefix, name)
        assert len(name) <= 1024, (prefix, name[:40])  # FUSE_NAME_MAX: the kernel refuses longer names
        assert index.lookup(inode, name) == child, (prefix, name)
        attr = index.getattr(child)
        assert attr is not None
        if attr.is_dir:
            assert index.parent(child) == inode
            for hostile in (b"", b"/", b"../" + name, b"a/b", b"\0"):
                assert index.lookup(child, hostile) is None, (prefix, name, hostile)
            yield from listed(index, child, (*prefix, name))
        else:
            yield (*prefix, name)


@st.composite
def hostile_entries(draw: st.DrawFn) -> list[dict[str, Any]]:
    """Entries whose logical ids and source paths are hostile; many lines still valid."""
    out = []
    for i in range(draw(st.integers(1, 8))):
        fields: dict[str, Any] = {}
        if draw(st.booleans()):
            fields["logical_id"] = draw(hostile_text)
        if draw(st.booleans()):
            fields["source_path"] = draw(st.one_of(hostile_text, st.lists(hostile_text, min_size=1, max_size=4)
                                                   .map("/".join)))
        out.append(good(draw(st.integers(0, 3)) if draw(st.booleans()) else i, **fields))
    return out


@profile(300)
@given(hostile_entries())
@example([good(0, source_path="a"), good(1, source_path="a/b")])  # a name that is also a directory
@example([good(0, source_path="a/b"), good(1, source_path="a")])
@example([good(0, logical_id="..", source_path="../../etc/passwd")])
@example([good(0, source_path="x" * 300 + "/" + "é" * 150, logical_id="a" * 255)])
@example([good(0, source_path="e\u0301"), good(1, source_path="\u00e9"), good(2, logical_id="\u202eevil")])
def test_every_name_an_index_lists_is_inside_the_tree(work: Path, entries: list[dict[str, Any]]) -> None:
    m = _fresh(work)
    m.write_bytes(b"".join(_encode(e, False) + b"\n" for e in entries))
    built = build_or_error(m, work / "idx" / "i.sqlite")
    if isinstance(built, str):
        assert_clear(built, WHERE, len(entries))
        return
    with built as index:
        parsed = [parse_entry(e) for e in entries]  # the index built: every line is valid
        by_id = set(listed(index, BY_ID_INODE))
        by_path = set(listed(index, BY_PATH_INODE))
        assert by_id == {(e.logical_id.encode(), e.path.rsplit("/", 1)[1].encode()) for e in parsed if e.logical_id}
        assert by_path == {tuple(p.encode() for p in e.source_path.split("/")) for e in parsed if e.source_path}
        assert {name for name, _child, _key in index.readdir(ROOT_INODE)} == {b"images", b"by-id", b"by-path",
                                                                             b"manifest.jsonl"}
        assert all(len(p) == 4 and p[0] == b"images" for p in listed(index, ROOT_INODE) if len(p) > 1
                   and p[0] not in (b"by-id", b"by-path"))


@pytest.mark.parametrize("entries", [
    [good(0, source_path="x" * 300 + "/" + "é" * 150, logical_id="a" * 255)],
    [good(0, source_path="e\u0301"), good(1, source_path="\u00e9"), good(2, logical_id="\u202eevil")],
], ids=["long-names", "lookalike-names"])
def test_odd_but_valid_names_build_and_list(work: Path, entries: list[dict[str, Any]]) -> None:
    """The property test above accepts a refusal with a clear message; these manifests must build."""
    m = _fresh(work)
    m.write_bytes(b"".join(_encode(e, False) + b"\n" for e in entries))
    built = build_or_error(m, work / "idx" / "i.sqlite")
    assert not isinstance(built, str), built
    with built as index:
        assert {name for name, _child, _key in index.readdir(ROOT_INODE)} >= {b"images", b"by-path"}


# ------------------------------------------------------------------------- 3. the logical map


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "s3fsimg", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env, "PYTHONPATH": str(ROOT)}, cwd=ROOT / "tests")


@pytest.mark.parametrize("bom", [False, True])
def test_a_logical_map_not_utf8_on_line_4_is_refused_naming_line_4_and_nothing_is_uploaded(
        sample_dir: Any, s3_env: dict[str, str], proxy: Any, tmp_path: Path, bom: bool) -> None:
    names = [img.rel for img in sample_dir.images if re.fullmatch(r"[\w./-]+", img.rel)][:3]
    bad = tmp_path / "map.csv"
    bad.write_bytes((b"\xef\xbb\xbf" if bom else b"") + b"filename,logical_id\r\n"
                    + f"{names[0]},A-1\r\n{names[1]},A-2\r\n".encode()
                    + names[2].encode() + b",A-\xe9t\xe9\r\n")  # Latin-1 'été', as a spreadsheet might save it
    proxy.reset()
    r = _cli({**s3_env, "DATASET_LOGICAL_MAP": str(bad)}, "upload", str(sample_dir.root))
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().splitlines() == [f"s3fsimg: error: {bad}:4: not UTF-8 (byte b'\\xe9' at column "
                                             f"{len(names[2]) + 4})"], r.stderr
    counts = proxy.counts()
    assert counts["by_method"].get("PUT", 0) == 0 and counts["requests"] == 0, counts
    r = _cli({"DATASET_LOGICAL_MAP": str(bad)}, "manifest", str(sample_dir.root), "--out", str(tmp_path / "o.jsonl"))
    assert r.returncode == 1 and f"{bad}:4: not UTF-8" in r.stderr, r.stderr
    assert not (tmp_path / "o.jsonl").exists()


#: names that are valid, and odd: each must appear in the mount as itself, inside its directory
ODD_IDS = ["...", " ", "-rf", "\u202eevil", "e\u0301", "\u00e9", "a" * 255, "\n", "\t\x01\x7f", "🙂", "．．",
           "／etc", "..\\..\\x", "images", "manifest.jsonl", "\ufeff", "$HOME", "*", "..a"]
ODD_PATHS = ["...", " /x.png", "-rf/\n.png", "e\u0301/x", "\u00e9/x", "x" * 300 + "/y.png", "..\\..\\evil.png",
             "a/\x7f", "..a/b..", ".hidden/x", "by-id/x.png", "/".join(["deep"] * 30) + "/f.png", "\u202e/gnp.exe",
             "ǅ/🙂/．．/／"]


@fuse_test
@pytest.mark.fuse
@pytest.mark.timeout(120)
def test_a_mount_of_odd_names_shows_each_inside_its_tree(s3_env: dict[str, str], sample_set: Any, moto_client: Any,
                                                       tmp_path: Path) -> None:
    """os.walk of a real mount whose manifest names objects by odd (valid) ids and paths: every name is
    itself, inside the mount, and reads back the object's bytes."""
    objects = list(upload_dir(build_workset(tmp_path / "ws", list(sample_set.distinct_images.values())[:4]),
                              s3_env).values())
    lines: list[str] = []
    want: dict[tuple[str, ...], str] = {}
    for i, name in enumerate([*ODD_IDS, *ODD_PATHS]):
        e = objects[i % len(objects)]
        if i < len(ODD_IDS):
            line = {**e.to_dict(), "logical_id": name}
            line.pop("source_path", None)
            want[("by-id", name, e.path.rsplit("/", 1)[1])] = e.sha256
        else:
            line = {**e.to_dict(), "source_path": name}
            line.pop("logical_id", None)
            key = ("by-path", *name.split("/"))
            want[key] = e.sha256
        lines.append(json.dumps(line, ensure_ascii=False))
    for e in objects:
        want[tuple(e.path.split("/"))] = e.sha256
    moto_client.put_object(Bucket=s3_env["S3_BUCKET"], Key="manifests/inventory-v1.jsonl",
                           Body="\n".join(lines).encode() + b"\n")
    mp = tmp_path / "mnt"
    with MountProcess(mp):
        top = os.path.realpath(mp)
        seen: dict[tuple[str, ...], str] = {}
        for dirpath, dirs, files in os.walk(mp):
            rel = Path(dirpath).relative_to(mp).parts
            for name in [*dirs, *files]:
                full = os.path.join(dirpath, name)
                assert os.path.realpath(full).startswith(top + os.sep), full
                assert os.path.dirname(os.path.abspath(full)) == os.path.abspath(dirpath)
            for name in files:
                if rel or name != "manifest.jsonl":
                    with open(os.path.join(dirpath, name), "rb") as f:
                        key = (*rel, name)
                        seen[key] = hashlib.sha256(f.read()).hexdigest()
        assert seen == want
        assert sorted(os.listdir(mp)) == ["by-id", "by-path", "images", "manifest.jsonl"]
