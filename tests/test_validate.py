"""`s3fsimg validate` reports every independent problem of a line, each once, with its line number and
field: the schema's errors and the rules a schema cannot state, on the fields that are valid (no
cascades), and the cross-line rules on the valid fields of an invalid line. The fast path stays free."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import s3fsimg.manifest as manifest_mod
from s3fsimg.errors import ManifestError
from s3fsimg.manifest import (
    FIELDS,
    Entry,
    EntryProblem,
    Problem,
    Validator,
    fast_fields,
    line_problems,
    object_path,
    parse_entry,
    parse_line,
    schema_validator,
)
from tests.test_manifest import SHA, SHA2, good, run_validate


def canonical(**fields: Any) -> bytes:
    """A line as the manifest writer writes it (the fast path's form)."""
    return (parse_entry(good(**fields)).to_json() + "\n").encode()


def check(*lines: dict[str, Any] | str | bytes) -> list[Problem]:
    """Every problem of these lines, through one Validator."""
    out: list[Problem] = []
    with Validator() as v:
        for lineno, line in enumerate(lines, 1):
            raw = line if isinstance(line, (str, bytes)) else json.dumps(line)
            out.extend(v.check_line(lineno, raw))
    return out


def fields_of(problems: list[Problem], lineno: int = 1) -> list[str | None]:
    return [p.field for p in problems if p.lineno == lineno]


# -- every independent problem of a line ----------------------------------------------------------------

def test_cli_reports_every_problem_of_a_line_with_line_and_field(tmp_path: Path) -> None:
    """The audit's case: a width of 0 and a .png path for image/jpeg are two problems, both reported."""
    bad = {**good(width=0, etag="abc"), "path": object_path(SHA, "image/png")}
    proc = run_validate(tmp_path, [json.dumps(good(sha256=SHA2)), json.dumps(bad)])
    assert proc.returncode == 1
    where = f"{tmp_path / 'm.jsonl'}:2: "
    errors = proc.stderr.splitlines()
    assert [e for e in errors if e.startswith(where)] == [
        f"{where}path: {object_path(SHA, 'image/png')!r} does not agree with sha256 and content_type "
        f"(expected {object_path(SHA, 'image/jpeg')!r})",
        f"{where}width: 0 is less than the minimum of 1",
        f"{where}etag: 'abc' does not match an ETag in double quotes (\"...\"), as S3 returns it",
    ]
    assert errors[-1].startswith("invalid: 3 error(s)")


@pytest.mark.parametrize("missing", ["sha256", "path", "content_type"])
def test_no_path_cascade_from_a_missing_field(missing: str) -> None:
    obj = {k: v for k, v in good(width=0).items() if k != missing}
    problems = check(obj)
    assert [(p.field, p.message) for p in problems] == [
        (None, f"{missing!r} is a required property"), ("width", "0 is less than the minimum of 1")]


@pytest.mark.parametrize(("field", "value"), [("sha256", "ABC"), ("sha256", SHA.upper()), ("sha256", SHA + "\n"),
                                              ("content_type", "text/plain"), ("content_type", "image/jpeg\n"),
                                              ("content_type", 3), ("path", "images/x.jpg")])
def test_no_path_cascade_from_a_malformed_field(field: str, value: Any) -> None:
    problems = check({**good(), field: value})  # the path is SHA's .jpg path
    assert fields_of(problems) == [field], problems


@pytest.mark.parametrize(("field", "value"), [("logical_id", ""), ("source_path", ""), ("bytes", -1.5),
                                              ("logical_id", "é" * 300), ("width", "0")])
def test_one_problem_per_field(field: str, value: Any) -> None:
    """A field the schema faults twice ('' is empty, and does not match the pattern) is one problem."""
    assert fields_of(check(good(**{field: value}))) == [field]


def test_the_first_schema_error_of_a_field_is_the_one_reported() -> None:
    assert len(list(schema_validator().iter_errors(good(logical_id="")))) == 2
    assert [p.message for p in check(good(logical_id=""))] == ["'' should be non-empty"]


def test_each_missing_field_is_its_own_problem() -> None:
    problems = check({"bytes": 1})
    required = ("sha256", "path", "content_type")
    assert [p.message for p in problems] == [f"{n!r} is a required property" for n in required]


def test_not_an_object_and_not_json_are_one_problem_each() -> None:
    problems = check("[1, 2]", "{nope", "")
    assert [(p.lineno, p.field) for p in problems] == [(1, None), (2, None)]
    assert problems[0].message == "[1, 2] is not of type 'object'"
    assert problems[1].message.startswith("not valid JSON (")


def test_rules_a_schema_cannot_state_are_checked_on_valid_fields() -> None:
    problems = check(good(logical_id="é" * 128, bytes=-1), good(logical_id="x\ud800", width=0))
    assert [(p.lineno, p.field) for p in problems] == [(1, "bytes"), (1, "logical_id"), (2, "width"), (2, "logical_id")]
    assert problems[1].message.endswith("is longer than 255 bytes")
    assert problems[3].message.endswith("is not valid UTF-8")


def test_messages_are_one_line_and_short() -> None:
    huge = "a/" * 5000 + "/"
    problems = check(good(source_path=huge, logical_id="é" * 4000, etag="x\ny" * 100, width=[1] * 1000))
    assert fields_of(problems) == ["width", "logical_id", "etag", "source_path"]
    for p in problems:
        text = p.format("m.jsonl")
        assert "\n" not in text and len(text) < 300, text


# -- the cross-line rules, also on the valid fields of an invalid line ----------------------------------

def test_cross_line_rules_run_on_the_valid_fields_of_an_invalid_line() -> None:
    problems = check(good(source_path="a/b.jpg"),
                     good(width=0, bytes=11, source_path="a/b.jpg"),  # 2: bad width, and two cross-line problems
                     good(sha256=SHA2, etag="e", source_path="a/b.jpg/c"),  # 3: under line 1's file
                     good(sha256=SHA2, bytes=4),  # 4: line 3 declared 10 bytes for SHA2, though line 3 is invalid
                     {**good(bytes=99, source_path="x"), "sha256": "nope"})  # 5: a bad sha256 is not compared
    assert [(p.lineno, p.field) for p in problems] == [
        (2, "width"), (2, "bytes"), (2, "source_path"), (3, "etag"), (3, "source_path"), (4, "bytes"), (5, "sha256")]
    assert problems[1].message == "11 differs from line 1, which gives 10 bytes for the same sha256"
    assert problems[2].message == "'a/b.jpg' is already named on line 1"
    assert problems[5].message == "4 differs from line 3, which gives 10 bytes for the same sha256"


def test_lines_of_one_object_agree_on_width_height_and_etag() -> None:
    """The mount shows each of these from the object's first line that has it: a later line must not differ."""
    problems = check(good(source_path="a"),  # 1: gives none of them
                     good(width=3, etag='"e1"'),  # 2: the first width and etag
                     good(width=3, height=4, etag='"e2"'),  # 3: another etag
                     good(width=5, height=4, etag="e1"),  # 4: another width; its etag is invalid, so not compared
                     good(sha256=SHA2, width=9, bytes=11),  # 5: another object
                     {**good(bytes=12, content_type="image/png", height=7), "path": object_path(SHA, "image/png")})
    assert [(p.lineno, p.field, p.message) for p in problems] == [
        (3, "etag", """'"e2"' differs from line 2, which gives '"e1"' for the same sha256 """
                    "(one object has one etag)"),
        (4, "etag", """'e1' does not match an ETag in double quotes ("..."), as S3 returns it"""),
        (4, "width", "5 differs from line 2, which gives 3 for the same sha256 (one object has one width)"),
        (6, "bytes", "12 differs from line 1, which gives 10 bytes for the same sha256"),
        (6, "content_type", "'image/png' differs from line 1, which gives 'image/jpeg' for the same sha256 "
                            "(one object has one type)"),
        (6, "height", "7 differs from line 3, which gives 4 for the same sha256 (one object has one height)"),
    ]


def _source_problems_reference(paths: list[str]) -> list[tuple[int, str]]:
    """The source_path rules, stated plainly over Python dicts."""
    files: dict[str, int] = {}
    dirs: dict[str, int] = {}
    out: list[tuple[int, str]] = []
    for lineno, src in enumerate(paths, 1):
        if src in files:
            out.append((lineno, f"{src!r} is already named on line {files[src]}"))
            continue
        if src in dirs:
            out.append((lineno, f"{src!r} is a directory of the source_path on line {dirs[src]}"))
            continue
        files[src] = lineno
        parts = src.split("/")
        for i in range(len(parts) - 1, 0, -1):  # nearest directory first
            head = "/".join(parts[:i])
            if head in files:
                out.append((lineno, f"{src!r} lies under {head!r}, which is a file on line {files[head]}"))
                break
            if head in dirs:
                break
            dirs[head] = lineno
    return out


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(st.sampled_from(["a", "b", "c.jpg"]), min_size=1, max_size=4).map("/".join),
                min_size=1, max_size=14))
def test_source_path_rules_match_a_reference_model(paths: list[str]) -> None:
    lines = [canonical(sha256=hashlib.sha256(str(i).encode()).hexdigest(), source_path=src)
             for i, src in enumerate(paths)]
    problems = check(*lines)
    assert all(p.field == "source_path" for p in problems)
    assert [(p.lineno, p.message) for p in problems] == _source_problems_reference(paths)


def test_new_object_is_the_first_line_without_any_problem() -> None:
    """validate --check-objects HEADs each object once: for its first line that has no problem."""
    lines: list[dict[str, Any]] = [
        good(width=0),  # 1: invalid
        good(source_path="a"),  # 2: the first clean line of SHA
        good(source_path="b"),  # 3: clean, but not the first
        good(sha256=SHA2, bytes=3, source_path="a"),  # 4: SHA2, a duplicate source_path
        good(sha256=SHA2, bytes=3),  # 5: the first clean line of SHA2
    ]
    seen = []
    with Validator() as v:
        for lineno, obj in enumerate(lines, 1):
            problems = list(v.check_line(lineno, json.dumps(obj)))
            seen.append((bool(problems), v.new_object, v.fields is not None))
        assert v.entries == 4
    assert seen == [(True, False, False), (False, True, True), (False, False, True), (True, False, True),
                    (False, True, True)]


def test_new_object_on_the_fast_path_too() -> None:
    with Validator() as v:
        assert list(v.check_line(1, canonical(source_path="a/b"))) == [] and v.new_object
        assert list(v.check_line(2, canonical(source_path="a/c"))) == [] and not v.new_object
        assert v.fields == (SHA, 10, "image/jpeg", None, None, None, None, "a/c")


# -- the ETag: the one S3 returned, quotes included -----------------------------------------------------

@pytest.mark.parametrize("etag", ["abc", '""', '"abc', 'abc"', '"a"b"', 'W/"abc"', '"abc"\n', "", 5])
def test_an_etag_without_its_quotes_is_an_error(etag: Any) -> None:
    assert fields_of(check(good(etag=etag))) == ["etag"]
    with pytest.raises(EntryProblem) as info:
        parse_entry(good(etag=etag))
    assert info.value.field == "etag"


@pytest.mark.parametrize("etag", ['"9a8b"', '"d41d8cd98f00b204e9800998ecf8427e-12"', '"a b\\\\c"'])
def test_a_quoted_etag_is_valid_on_both_paths(etag: str) -> None:
    assert check(good(etag=etag)) == []
    line = Entry(**good(etag=etag)).to_json().encode()
    assert parse_line(line).etag == etag
    if "\\" not in etag:  # the writer's form takes the fast path, with the quotes
        fields = fast_fields(line)
        assert fields is not None and fields[6] == etag


def test_the_writer_keeps_the_etag_as_given() -> None:
    """Entry.to_json writes the ETag as given: the uploader must hand it S3's quoted ETag (it does: boto3's
    ETag, from PUT, HEAD or LIST, keeps the quotes), and an unquoted one makes a manifest validate rejects."""
    line = Entry(**good(etag='"e"')).to_json()
    assert '"etag":"\\"e\\""' in line


# -- the schema says what parse_entry does, in Python's re and in ECMA-262 alike ----------------------

@pytest.mark.parametrize(("field", "value"), [
    ("content_type", "image/jpeg\n"),  # $ matches before a final newline in Python
    ("sha256", SHA + "\n"),
    ("source_path", "a\n/../b"),  # '.' does not match a newline: a '..' after one slipped through
    ("source_path", "a/"),
    ("source_path", "./a"),
    ("etag", '"a"\n'),
])
def test_schema_and_parse_entry_agree_on_newlines_and_trailing_slashes(field: str, value: str) -> None:
    obj = {**good(), field: value}
    if field == "content_type":
        obj["path"] = object_path(SHA, value)  # .jpeg: the path agrees, so only the type is wrong
    assert not schema_validator().is_valid(obj)
    with pytest.raises(EntryProblem):
        parse_entry(obj)
    assert fields_of(check(obj)) == [field]


@pytest.mark.parametrize(("field", "value"), [("source_path", ".\n"), ("source_path", "a\nb/c"), ("logical_id", "a\n"),
                                              ("source_path", "...")])
def test_newlines_inside_names_are_valid_for_both(field: str, value: str) -> None:
    obj = good(**{field: value})
    assert schema_validator().is_valid(obj)
    parse_entry(obj)


# -- properties -----------------------------------------------------------------------------------------

#: Values that break exactly their own field, whatever the others are.
BREAK: dict[str, list[Any]] = {
    "sha256": ["ABC", 5, "g" * 64, SHA[:-1]],
    "path": ["x", 7, "images/00/00/short.jpg", object_path(SHA, "image/png") + "/"],
    "bytes": [-1, "10", 1.5, True, None],
    "content_type": ["text/plain", "image/", 3, "image/jpeg\n"],
    "width": [0, "3", -1, 2.5, False],
    "height": [0, [1]],
    "logical_id": ["", "a/b", "..", "é" * 128, 5, "x\ud800", "a\x00"],
    "etag": ["abc", '""', 5, '"a"b"'],
    "source_path": ["", "/a", "a/../b", "a/", "a\n/../b", 3, "a//b"],
}


#: Well-formed paths that disagree with sha256 and content_type: a problem only when both of those are valid.
DISAGREE = [object_path(SHA, "image/png"), object_path(SHA2, "image/jpeg")]


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.dictionaries(st.sampled_from(list(BREAK)), st.integers(0, 6), max_size=5),
       st.sets(st.sampled_from(["sha256", "path", "bytes", "content_type"]), max_size=2), st.booleans(),
       st.sampled_from([None, *DISAGREE]))
def test_every_broken_field_is_reported_once_and_nothing_else(
    broken: dict[str, int], missing: set[str], extra: bool, disagree: str | None
) -> None:
    obj: dict[str, Any] = good(width=3, height=4, logical_id="L", etag='"e"', source_path="a/b.jpg")
    if disagree is not None:
        obj["path"] = disagree
    for name, i in broken.items():
        obj[name] = BREAK[name][i % len(BREAK[name])]
    for name in missing:
        obj.pop(name)
    if extra:
        obj["colour"] = "red"
    expected = {n for n in broken if n not in missing}
    if disagree is not None and not ({"sha256", "content_type", "path"} & (expected | missing)):
        expected.add("path")
    problems = line_problems(obj)
    named = [p.field for p in problems if p.field is not None]
    assert sorted(named, key=FIELDS.index) == named  # in field order
    assert sorted(named) == sorted(expected), problems  # each broken field once; no cascade
    line_level = [p.message for p in problems if p.field is None]
    assert len(line_level) == len(missing) + extra, problems
    assert all(f"{n!r} is a required property" in line_level for n in missing)
    assert (not problems) == (not missing and not expected and not extra)
    try:
        parse_entry(obj)
        accepted = True
    except EntryProblem as exc:
        accepted = False
        assert exc.field in {*named, *missing, "colour"}, (exc, problems)
    assert accepted == (not problems)


def test_a_valid_line_never_pays_for_the_error_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Canonical lines take fast_fields, other valid lines json.loads + parse_entry; the schema is for bad lines."""
    def boom(obj: Any) -> list[EntryProblem]:
        raise AssertionError(f"line_problems called on {obj}")

    monkeypatch.setattr(manifest_mod, "line_problems", boom)
    with Validator() as v:
        assert list(v.check_line(1, canonical(width=3, etag='"e"', source_path="a/b"))) == []
        assert list(v.check_line(2, json.dumps(good(sha256=SHA2, bytes=3), sort_keys=True, indent=1)
                                 .replace("\n", "").encode())) == []
        assert list(v.check_line(3, b"  \n")) == []
        assert v.entries == 2


# -- values no database column holds, and JSON no parser recurses through ---------------------------------

@pytest.mark.parametrize(("field", "value"), [("bytes", 10**30), ("bytes", 2**63), ("width", 2**70)])
def test_integers_beyond_64_bits_are_a_problem_of_their_field(field: str, value: int, tmp_path: Path) -> None:
    """Not an OverflowError out of SQLite: the validator, the index build (mount, fetch) and parse_entry
    all say which field and line."""
    from s3fsimg.index_build import build_index

    assert fields_of(check(good(**{field: value}))) == [field]
    with pytest.raises(EntryProblem, match=f"^{field}: .* 2\\^63-1"):
        parse_entry(good(**{field: value}))
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps(good(sha256=hashlib.sha256(b"other").hexdigest())) + "\n"
                        + json.dumps(good(**{field: value})) + "\n")
    with pytest.raises(ManifestError, match=f"^s3://b/m:2: {field}: "):
        build_index(manifest, tmp_path / "index.sqlite", manifest_digest="0" * 64, where="s3://b/m")
    assert parse_entry(good(bytes=2**63 - 1)).bytes == 2**63 - 1


def test_json_nested_too_deeply_is_one_problem(tmp_path: Path) -> None:
    assert [p.message for p in check("[" * 100_000)] == ["not valid JSON (nested too deeply)"]
    proc = run_validate(tmp_path, ["[" * 100_000])
    assert proc.returncode == 1 and "m.jsonl:1: not valid JSON (nested too deeply)" in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
