"""The manifest: the fast parser agrees with the JSON Schema, and `validate` reports every error
with its line number and field (exit 1)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from s3fsimg.manifest import EntryProblem, Validator, object_path, parse_entry, schema

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
