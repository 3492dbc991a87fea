"""The fast line parser (`fast_fields`, used by the index build and `validate`) agrees with `parse_line`:
whenever it answers, `parse_line` accepts the line and gives exactly those fields; on canonical lines
(as `Entry.to_json` writes them) it always answers."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from s3fsimg.manifest import FIELDS, EntryProblem, fast_fields, fields_of, object_path, parse_fields, parse_line

_SHAS = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(3)]
_CTYPES = ["image/jpeg", "image/png", "image/tiff", "image/x-Portable+map.1", "image/", "text/plain", "image/jpeg\n"]
_texts = st.one_of(
    st.text(max_size=12),
    st.text(alphabet=st.characters(codec="utf-8"), min_size=250, max_size=260),
    st.sampled_from([".", "..", "a/b", "/abs", "a//b", "a/", "ok", "x\x00y", "a/./b", "a/../b", "é" * 127, "é" * 128,
                     "d/e.jpg", "./a", "../a", "a/..", "a/.", "...", "a/.b/..c", "é/./x",
                     '"q"', "\\", "\x1f", "\x7f", "\ud800", "tab\there", ""]),
)
_ints = st.one_of(st.integers(-3, 20), st.integers(10**17, 10**19), st.sampled_from([0, 1, 2**63]))
#: ETags: quoted ones (the only valid form), around any text (quotes, backslashes, control characters, nothing)
_etags = st.one_of(_texts, _texts.map(lambda t: f'"{t}"'),
                   st.sampled_from(['"9a8b"', '"9a8b-2"', '""', '"a"b"', '"abc', 'abc"', "W/\"a\"", '"a"\n']))
_values = st.one_of(st.none(), _ints, st.booleans(), _texts, st.floats(allow_nan=False, allow_infinity=False),
                    st.just([1]), st.just({"a": 1}))


@st.composite
def objects(draw: st.DrawFn) -> dict[str, Any]:
    sha = draw(st.sampled_from(_SHAS))
    ctype = draw(st.sampled_from(_CTYPES))
    obj: dict[str, Any] = {"sha256": sha, "path": object_path(sha, ctype), "bytes": draw(_ints),
                           "content_type": ctype}
    for name in ("width", "height"):
        if draw(st.booleans()):
            obj[name] = draw(_ints)
    for name in ("logical_id", "etag", "source_path"):
        if draw(st.booleans()):
            obj[name] = draw(_etags if name == "etag" else _texts)
    for name in draw(st.lists(st.sampled_from([*FIELDS, "extra"]), max_size=2)):
        if draw(st.booleans()):
            obj.pop(name, None)
        else:
            obj[name] = draw(_values)
    return obj


def _line(obj: dict[str, Any], style: int) -> bytes:
    if style == 0:  # canonical: fields in FIELDS order, compact, UTF-8
        ordered = {k: obj[k] for k in FIELDS if k in obj}
        ordered.update({k: v for k, v in obj.items() if k not in ordered})
        text = json.dumps(ordered, ensure_ascii=False, separators=(",", ":"))
    elif style == 1:
        text = json.dumps(obj, ensure_ascii=True, separators=(",", ":"))
    else:
        text = " " + json.dumps(obj) + " \r"
    return text.encode("utf-8", "surrogatepass") + b"\n"


def _parse(raw: bytes) -> tuple[Any, ...] | None:
    try:
        e = parse_line(raw)
    except EntryProblem:
        return None
    return fields_of(e)


def _agrees(raw: bytes) -> None:
    fast = fast_fields(raw)
    slow = _parse(raw)
    if fast is not None:
        assert slow == fast, raw
    try:
        assert parse_fields(raw) == slow
    except EntryProblem:
        assert slow is None


def _canonical(raw: bytes) -> bool:
    """Strict UTF-8, no escape but an ETag's \\", no floats, integers below 10**18 (what the fast path covers)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    obj = json.loads(text)
    def plain(k: str, v: str) -> bool:
        dumped = json.dumps(v, ensure_ascii=False)[1:-1]
        return dumped == v or (k == "etag" and "\\" not in v and dumped == v.replace('"', '\\"'))

    escaped = [v for k, v in obj.items() if isinstance(v, str) and not plain(k, v)]
    return not escaped and all(type(v) is not float and (type(v) is not int or v < 10**18) for v in obj.values())


@settings(max_examples=1500, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(objects(), st.integers(0, 2))
def test_fast_fields_agrees_with_parse_line(obj: dict[str, Any], style: int) -> None:
    raw = _line(obj, style)
    _agrees(raw)
    if style == 0 and _canonical(raw) and _parse(raw) is not None:
        assert fast_fields(raw) is not None, raw  # a canonical valid line takes the fast path


@settings(max_examples=1500, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(objects(), st.integers(0, 400), st.binary(min_size=0, max_size=3), st.integers(0, 3))
def test_fast_fields_agrees_on_mangled_bytes(obj: dict[str, Any], at: int, junk: bytes, cut: int) -> None:
    raw = _line(obj, 0)
    at %= len(raw) + 1
    _agrees(raw[:at] + junk + raw[at + cut:])


def test_fast_path_examples() -> None:
    sha = _SHAS[0]
    base = {"sha256": sha, "path": object_path(sha, "image/jpeg"), "bytes": 5, "content_type": "image/jpeg",
            "width": 1, "height": 2, "logical_id": "é" * 127, "etag": '"9a8b"', "source_path": "a b/c.jpg"}
    raw = _line(base, 0)
    assert fast_fields(raw) == (sha, 5, "image/jpeg", 1, 2, "é" * 127, '"9a8b"', "a b/c.jpg")
    for bad in ({"logical_id": "é" * 128}, {"etag": ""}, {"etag": "9a8b"}, {"etag": '""'}, {"etag": '"9a8b'},
                {"etag": '9a8b"'}, {"etag": '"9"a8b"'}, {"source_path": "a/../b"}, {"source_path": "a//b"},
                {"logical_id": ".."}, {"bytes": -1}, {"width": 0}, {"path": object_path(sha, "image/png")}):
        raw = _line({**base, **bad}, 0)
        assert fast_fields(raw) is None and _parse(raw) is None, bad
    assert fast_fields(b'{"sha256":"' + sha.encode() + b'"}\n') is None
