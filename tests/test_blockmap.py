"""Block maps (s3fsimg/blockmap.py): the format, block bounds against a reference model, and that
`from_bytes` answers any input bytes with a map or an IntegrityError, nothing else."""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from s3fsimg.blockmap import FORMAT, BlockMap, blockmap_key, encoded_size
from s3fsimg.errors import IntegrityError

SHA = "ab" * 32


def profile(examples: int) -> settings:
    """The fixed profile: derandomized, so CI runs the same examples every time."""
    return settings(
        derandomize=True, max_examples=examples, deadline=None, suppress_health_check=[HealthCheck.too_slow]
    )


def document(**changes: object) -> bytes:
    base: dict[str, object] = {
        "format": FORMAT,
        "sha256": SHA,
        "bytes": 10,
        "block_size": 4,
        "blocks": [hashlib.sha256(b"x").hexdigest()] * 3,
    }
    base.update(changes)
    return json.dumps(base).encode()


def test_key_is_under_blocks_by_the_first_two_bytes() -> None:
    assert blockmap_key(SHA) == f"blocks/ab/ab/{SHA}"
    other = "0123" + "f" * 60
    assert blockmap_key(other) == f"blocks/01/23/{other}"


def test_the_format_is_the_agreed_json() -> None:
    data = bytes(range(256)) * 4 + b"tail"
    made = BlockMap.of_bytes(data, block_size=256)
    parsed = json.loads(made.to_bytes())
    assert parsed == {
        "format": "s3fsimg-blockmap-1",
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
        "block_size": 256,
        "blocks": [hashlib.sha256(data[i : i + 256]).hexdigest() for i in range(0, len(data), 256)],
    }
    assert made.block_count() == 5
    assert made.block_bounds(4) == (1024, 1028)
    assert encoded_size(made.sha256, len(data), 256) == len(made.to_bytes())


def test_of_file_is_of_bytes(tmp_path: Path) -> None:
    data = hashlib.sha256(b"seed").digest() * 40_000  # 1.28 MB: several 256 KiB blocks and a short last one
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    assert BlockMap.of_file(path, block_size=256 << 10) == BlockMap.of_bytes(data, block_size=256 << 10)
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert BlockMap.of_file(empty, block_size=4096) == BlockMap(hashlib.sha256(b"").hexdigest(), 0, 4096, ())


def test_check_block_wants_the_exact_bytes() -> None:
    data = b"0123456789"
    made = BlockMap.of_bytes(data, block_size=4)
    assert made.check_block(0, b"0123") and made.check_block(2, memoryview(b"89"))
    assert not made.check_block(0, b"0124")
    assert not made.check_block(2, b"89\0\0")  # padded: wrong length
    assert not made.check_block(1, b"456")  # short
    assert not made.check_block(3, b"")  # no such block
    assert not made.check_block(-1, b"89")
    with pytest.raises(IndexError):
        made.block_bounds(3)


@pytest.mark.parametrize(
    ("raw", "what"),
    [
        (b"\xff\xfe", "not a JSON document"),
        (b"[1, 2]", "not a JSON object"),
        (b"[" * 100_000, "not a JSON document"),
        (document(format="s3fsimg-blockmap-2"), "format"),
        (document(sha256="cd" * 32), "sha256 differs"),
        (document(bytes=11), "bytes differs"),
        (document(bytes=10.0), "bytes differs"),
        (document(bytes=True), "bytes differs"),
        (document(block_size=0), "block_size"),
        (document(block_size="4"), "block_size"),
        (document(blocks={"0": "x"}), "blocks is not a list"),
        (document(blocks=[hashlib.sha256(b"x").hexdigest()] * 2), "2 blocks where 3"),
        (document(blocks=["AB" * 32] * 3), "64 lowercase hex"),
        (document(blocks=[None] * 3), "64 lowercase hex"),
        (b'{"bytes": 1' + b"0" * 5000 + b"}", "not a JSON document"),  # past int_max_str_digits
    ],
)
def test_a_bad_map_is_an_integrity_error_naming_the_object(raw: bytes, what: str) -> None:
    with pytest.raises(IntegrityError) as error:
        BlockMap.from_bytes(raw, sha256=SHA, size=10)
    assert str(error.value).startswith(f"block map of {SHA}: ")
    assert what in str(error.value)


@profile(300)
@given(data=st.binary(max_size=5000), block_size=st.integers(1, 700))
def test_round_trip_and_bounds_match_a_reference_model(data: bytes, block_size: int) -> None:
    made = BlockMap.of_bytes(data, block_size=block_size)
    assert encoded_size(made.sha256, len(data), block_size) == len(made.to_bytes())
    assert BlockMap.from_bytes(made.to_bytes(), sha256=made.sha256, size=len(data)) == made
    # Reference model: the blocks tile [0, size) in order, each block_size long but the last.
    bounds = [made.block_bounds(i) for i in range(made.block_count())]
    assert [data[s:e] for s, e in bounds] == [data[i : i + block_size] for i in range(0, len(data), block_size)]
    assert all(made.check_block(i, data[s:e]) for i, (s, e) in enumerate(bounds))


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=70),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=20,
)


@profile(1000)
@given(raw=st.binary(max_size=400))
def test_arbitrary_bytes_give_a_map_or_an_integrity_error(raw: bytes) -> None:
    with contextlib.suppress(IntegrityError):
        BlockMap.from_bytes(raw, sha256=SHA, size=10)


@profile(1000)
@given(at=st.integers(0, 10**6), cut=st.integers(0, 8), insert=st.binary(max_size=8))
def test_a_damaged_valid_map_gives_a_map_or_an_integrity_error(at: int, cut: int, insert: bytes) -> None:
    valid = BlockMap.of_bytes(b"0123456789", block_size=4)
    raw = valid.to_bytes()
    position = at % (len(raw) + 1)
    damaged = raw[:position] + insert + raw[position + cut :]
    try:
        made = BlockMap.from_bytes(damaged, sha256=valid.sha256, size=10)
    except IntegrityError:
        return
    assert made.sha256 == valid.sha256 and made.size == 10 and made.block_count() == -(-10 // made.block_size)


@profile(600)
@given(
    fields=st.dictionaries(
        st.sampled_from(["format", "sha256", "bytes", "block_size", "blocks", "other"]), JSON_VALUES, max_size=6
    ),
    keep=st.sets(st.sampled_from(["format", "sha256", "bytes", "block_size", "blocks"])),
)
def test_arbitrary_json_gives_a_map_or_an_integrity_error(fields: dict[str, object], keep: set[str]) -> None:
    # Start from a valid map and replace some fields by arbitrary JSON, so most checks are reached.
    valid = json.loads(BlockMap.of_bytes(b"0123456789", block_size=4).to_bytes())
    mixed = {**{k: v for k, v in valid.items() if k in keep}, **{k: v for k, v in fields.items() if k not in keep}}
    raw = json.dumps(mixed).encode()
    try:
        made = BlockMap.from_bytes(raw, sha256=valid["sha256"], size=10)
    except IntegrityError:
        return
    assert made.size == 10 and made.block_count() == -(-10 // made.block_size)


@profile(300)
@given(data=st.binary(min_size=1, max_size=2000), flip=st.integers(0, 10**6))
def test_a_map_tells_a_changed_byte_in_its_block(data: bytes, flip: int) -> None:
    made = BlockMap.of_bytes(data, block_size=128)
    position = flip % len(data)
    damaged = bytearray(data)
    damaged[position] ^= 0x01
    index = position // 128
    start, end = made.block_bounds(index)
    assert not made.check_block(index, bytes(damaged[start:end]))
