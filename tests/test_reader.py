"""ObjectReader: block arithmetic (Hypothesis, against a reference model), single-flight,
read-ahead, verification of large objects (a flipped byte), and S3 faults (503, truncated bodies,
hangs) handled within the read deadline. Unit tests use a fake in-memory store; the rest go through
the lab proxy in front of moto, and count requests there."""

from __future__ import annotations

import hashlib
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from s3fsimg.blockmap import BlockMap, blockmap_key
from s3fsimg.config import Config
from s3fsimg.dataset import Dataset
from s3fsimg.errors import BackendError, IntegrityError, NotFound
from s3fsimg.manifest import Entry
from s3fsimg.reader import BULK_READ, ObjectReader, block_span
from s3fsimg.s3 import GetResult
from tests.cacheworker import build_workset, cache_files, upload_dir
from tests.checklogs import expect_logs

pytestmark = pytest.mark.timeout(60)


# ----------------------------------------------------------------------------------------- fakes


class FakeStore:
    """The part of S3Store the reader uses: `get_range` over in-memory objects, counting calls."""

    def __init__(self, objects: dict[str, bytes], delay: float = 0.0) -> None:
        self.objects = objects
        self.delay = delay
        self.calls: list[tuple[str, int, int]] = []
        self.lock = threading.Lock()

    def get_range(self, relative: str, start: int, end: int, *, deadline: float) -> GetResult:
        data = self.objects.get(relative)
        if data is None:  # a block map these tests did not upload
            raise NotFound(f"{relative}: no such object")
        with self.lock:
            self.calls.append((relative, start, end))
        if self.delay:
            time.sleep(self.delay)
        assert 0 <= start < end, (start, end, len(data))
        return GetResult(data=data[start:end], etag=None, total_size=len(data))

    def where(self, relative: str) -> str:
        return f"s3://fake/{relative}"


def make_entry(data: bytes) -> Entry:
    sha = hashlib.sha256(data).hexdigest()
    return Entry(sha256=sha, path=f"images/{sha[:2]}/{sha[2:4]}/{sha}.png", bytes=len(data),
                 content_type="image/png")


def make_reader(cache_dir: Path, objects: dict[str, bytes], *, block_size: int = 4096, whole_object_max: int = 0,
                delay: float = 0.0, max_bytes: int = 1 << 30) -> tuple[ObjectReader, FakeStore]:
    config = Config(bucket="fake", cache_dir=cache_dir, cache_max_bytes=max_bytes, block_size=block_size,
                    whole_object_max=whole_object_max, read_deadline=10.0)
    store = FakeStore(objects, delay)
    return ObjectReader(config, store=store, threads=4), store  # type: ignore[arg-type]


# ------------------------------------------------------------------------------- block arithmetic


@given(offset=st.integers(0, 1 << 20), size=st.integers(1, 5000), bs_log=st.integers(0, 16))
def test_block_span_is_the_blocks_holding_the_range(offset: int, size: int, bs_log: int) -> None:
    """The reader's block arithmetic against a model: the blocks of every byte of the range."""
    block_size = 1 << bs_log
    first, last = block_span(offset, size, block_size)
    assert set(range(first, last + 1)) == {b // block_size for b in range(offset, offset + size)}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), obj_size=st.integers(0, 70_000), bs_log=st.integers(12, 14),
       whole_max=st.sampled_from([0, 5000, 1 << 20]))
def test_stream_read_matches_reference_model(data: Any, obj_size: int, bs_log: int, whole_max: int) -> None:
    """Random reads (some sequential, so read-ahead runs too) return exactly obj[offset:offset+size]."""
    payload = bytes((i * 131 + obj_size) % 251 for i in range(obj_size))
    entry = make_entry(payload)
    with tempfile.TemporaryDirectory() as tmp:
        reader, _store = make_reader(Path(tmp), {entry.path: payload}, block_size=1 << bs_log,
                                     whole_object_max=whole_max)
        try:
            offset = 0
            for _ in range(data.draw(st.integers(1, 12))):
                if data.draw(st.booleans()):  # sometimes continue sequentially
                    offset = data.draw(st.integers(0, obj_size + 5000))
                size = data.draw(st.integers(0, 40_000))
                got = reader.read(entry, offset, size)
                assert got == payload[offset:offset + size], (offset, size)
                offset += size
            # After reading everything, the object is complete and verified in the cache.
            assert reader.read(entry, 0, obj_size + 1) == payload
            time.sleep(0)  # let read-ahead settle
        finally:
            reader.close()


def test_read_past_end_and_negative_offset() -> None:
    payload = b"x" * 10_000
    entry = make_entry(payload)
    with tempfile.TemporaryDirectory() as tmp:
        reader, store = make_reader(Path(tmp), {entry.path: payload})
        with reader:
            assert reader.read(entry, 10_000, 10) == b""
            assert reader.read(entry, 20_000, 10) == b""
            assert reader.read(entry, -1, 10) == b""
            assert reader.read(entry, 9_995, 100) == payload[9_995:]
            assert store.calls  # the last read needed S3


# ---------------------------------------------------------------------------------- single flight


def test_single_flight_one_get_for_one_block(tmp_path: Path) -> None:
    payload = bytes(range(256)) * 400  # 100 KiB, 25 blocks of 4 KiB
    entry = make_entry(payload)
    reader, store = make_reader(tmp_path / "c", {entry.path: payload}, delay=0.3)
    with reader:
        barrier = threading.Barrier(12)
        results: list[bytes] = []
        errors: list[BaseException] = []

        def one() -> None:
            barrier.wait()
            try:
                results.append(reader.read(entry, 8192 + 100, 1000))
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=one) for _ in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not errors
        assert results == [payload[8292:9292]] * 12
        assert store.calls == [(entry.path, 8192, 12288)], store.calls


def test_single_flight_whole_object_threads(tmp_path: Path) -> None:
    payload = b"small object " * 100
    entry = make_entry(payload)
    reader, store = make_reader(tmp_path / "c", {entry.path: payload}, whole_object_max=1 << 20, delay=0.3)
    with reader:
        barrier = threading.Barrier(8)
        paths: list[Path] = []

        def one() -> None:
            barrier.wait()
            paths.append(reader.fetch_path(entry))

        threads = [threading.Thread(target=one) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert len(paths) == 8 and len(set(paths)) == 1
        assert paths[0].read_bytes() == payload
        assert len(store.calls) == 1


# ------------------------------------------------------------------------------------- read-ahead


def test_sequential_reads_trigger_readahead(tmp_path: Path) -> None:
    payload = hashlib.sha256(b"seed").digest() * (4096 * 4)  # 512 KiB, 128 blocks of 4 KiB
    entry = make_entry(payload)
    reader, store = make_reader(tmp_path / "c", {entry.path: payload})
    with reader:
        assert reader.read(entry, 0, 4096) == payload[:4096]
        assert reader.read(entry, 4096, 4096) == payload[4096:8192]  # sequential: read-ahead starts
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not reader.cache.has_block(entry.sha256, 4096, 5):
            time.sleep(0.01)
        assert reader.stats()["readahead_requests"] >= 1
        fetched_ends = max(end for _, _, end in store.calls)
        assert fetched_ends > 8192, store.calls  # blocks beyond what was asked were fetched
        calls_before = len(store.calls)
        assert reader.read(entry, 8192, 4096) == payload[8192:12288]  # served from read-ahead, no new GET for it
        assert all(not (s <= 8192 < e) for _, s, e in store.calls[calls_before:])
        # Reading on to the end: far fewer GETs than blocks, and the object ends complete.
        off = 12288
        while off < len(payload):
            assert reader.read(entry, off, 4096) == payload[off:off + 4096]
            off += 4096
        assert len(store.calls) < 128 // 4, len(store.calls)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and reader.cache.object_path(entry.sha256, entry.ext) is None:
            time.sleep(0.01)
        path = reader.cache.object_path(entry.sha256, entry.ext)
        assert path is not None and path.read_bytes() == payload


def test_a_bulk_first_read_gets_the_whole_object_once_verified_without_a_block_map(tmp_path: Path) -> None:
    payload = hashlib.sha256(b"bulk").digest() * (1 << 15)  # 1 MiB, 256 blocks of 4 KiB
    entry = make_entry(payload)
    blockmap = BlockMap.of_bytes(payload, block_size=4096)
    objects = {entry.path: payload, blockmap_key(entry.sha256): blockmap.to_bytes()}
    reader, store = make_reader(tmp_path / "c", objects)
    with reader:
        assert reader.read(entry, 0, BULK_READ) == payload[:BULK_READ]
        assert reader.read(entry, BULK_READ, len(payload)) == payload[BULK_READ:]
        # One GET, the whole object; its map is not asked for (the sha256 checks every byte instead).
        assert store.calls == [(entry.path, 0, len(payload))]
        stats = reader.stats()
        assert stats["unverified_bytes"] == 0 and stats["integrity_errors"] == 0
        path = reader.cache.object_path(entry.sha256, entry.ext)
        assert path is not None and path.read_bytes() == payload
        assert not reader.cache.served_crcs(entry.sha256, 4096)


def test_a_bulk_first_read_of_wrong_bytes_serves_none_of_them(tmp_path: Path) -> None:
    payload = hashlib.sha256(b"bulk").digest() * (1 << 15)
    entry = make_entry(payload)
    wrong = bytearray(payload)
    wrong[700_000] ^= 0x01  # in a block the read does not ask for
    reader, _ = make_reader(tmp_path / "c", {entry.path: bytes(wrong)})
    with reader:
        with pytest.raises(IntegrityError):
            reader.read(entry, 0, BULK_READ)
        assert reader.cache.is_suspect(entry.sha256)
        assert reader.cache.object_path(entry.sha256, entry.ext) is None
        assert reader.stats()["integrity_errors"] == 1


def test_an_object_read_to_its_end_by_blocks_always_completes(tmp_path: Path) -> None:
    """Runs of one object ending together each looked for the other's blocks before they were stored, so
    none completed it and no later read did either (1 run in 4 at 128 MiB): the object stayed in blocks
    without its whole-object check. The run that stores last now completes it."""
    payload = hashlib.sha256(b"runs").digest() * (1 << 20)  # 32 MiB, 512 blocks of 64 KiB, no block map
    entry = make_entry(payload)
    for attempt in range(3):
        reader, _ = make_reader(tmp_path / f"c{attempt}", {entry.path: payload}, block_size=1 << 16)
        with reader:
            for off in range(0, len(payload), 128 << 10):
                assert reader.read(entry, off, 128 << 10) == payload[off:off + (128 << 10)]
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and reader.cache.object_path(entry.sha256, entry.ext) is None:
                time.sleep(0.02)
            path = reader.cache.object_path(entry.sha256, entry.ext)
            assert path is not None, f"attempt {attempt}: every block read, the object never completed"
            assert path.read_bytes() == payload


def test_a_sequential_read_looks_for_each_block_ahead_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Read-ahead looked again for every block of its window that was no longer in flight on each read (a
    stat each); blocks it asked for already are not looked at again. The bytes and GETs do not change."""
    payload = hashlib.sha256(b"ahead").digest() * (1 << 19)  # 16 MiB, 256 blocks of 64 KiB
    entry = make_entry(payload)
    reader, store = make_reader(tmp_path / "c", {entry.path: payload}, block_size=1 << 16)
    looked = 0
    has_block = type(reader.cache).has_block

    def counting(self: Any, *args: Any) -> bool:
        nonlocal looked
        looked += 1
        return has_block(self, *args)

    monkeypatch.setattr(type(reader.cache), "has_block", counting)
    with reader:
        for off in range(0, len(payload), 1 << 20):
            assert reader.read(entry, off, 1 << 20) == payload[off:off + (1 << 20)]
            deadline = time.monotonic() + 10  # the read-ahead stored before the next read, as over a network
            while reader._inflight and time.monotonic() < deadline:
                time.sleep(0.005)
    blocks = len(payload) >> 16
    # Each block once by read-ahead, plus the completion check's (`_complete`): 494 here; 746 before.
    assert looked < 2.5 * blocks, f"{looked} block lookups for {blocks} blocks"
    assert sum(e - s for _, s, e in store.calls if _ == entry.path) == len(payload)  # each byte fetched once


def test_a_sequential_read_behind_an_earlier_one_still_reads_ahead(tmp_path: Path) -> None:
    """The read-ahead mark belongs to the stream that set it: reading 16-20 MiB and then 0-12 MiB of an
    object (a seek back) reads ahead in the second pass too (found in review: it made no read-ahead)."""
    payload = hashlib.sha256(b"back").digest() * (1 << 20)  # 32 MiB, 512 blocks of 64 KiB
    entry = make_entry(payload)
    reader, _ = make_reader(tmp_path / "c", {entry.path: payload}, block_size=1 << 16)
    with reader:
        for off in range(16 << 20, 20 << 20, 1 << 20):
            assert reader.read(entry, off, 1 << 20) == payload[off:off + (1 << 20)]
        before = reader.stats()["readahead_requests"]
        for off in range(0, 12 << 20, 1 << 20):
            assert reader.read(entry, off, 1 << 20) == payload[off:off + (1 << 20)]
        assert reader.stats()["readahead_requests"] > before


def test_random_reads_do_not_read_ahead(tmp_path: Path) -> None:
    payload = bytes(range(256)) * 1024  # 256 KiB
    entry = make_entry(payload)
    reader, store = make_reader(tmp_path / "c", {entry.path: payload})
    with reader:
        for off in (100_000, 8_000, 200_000, 50_000):
            assert reader.read(entry, off, 100) == payload[off:off + 100]
        assert reader.stats()["readahead_requests"] == 0
        assert sum(e - s for _, s, e in store.calls) <= 4 * 2 * 4096


def test_corrupt_block_file_is_refetched_not_served(tmp_path: Path) -> None:
    payload = bytes(range(256)) * 64  # 16 KiB
    entry = make_entry(payload)
    reader, store = make_reader(tmp_path / "c", {entry.path: payload})
    with reader:
        assert reader.read(entry, 0, 100) == payload[:100]
        block = reader.cache.path(reader.cache.block_name(entry.sha256, 4096, 0))
        raw = bytearray(block.read_bytes())
        raw[20] ^= 0xFF
        block.write_bytes(bytes(raw))
        n = len(store.calls)
        with expect_logs(r"^cache: block .* fails its checksum; dropping it$", count=1):
            assert reader.read(entry, 0, 100) == payload[:100]
            assert len(store.calls) == n + 1


# ------------------------------------------------------------------------------ through the lab proxy


@pytest.fixture
def lab_set(s3_env: dict[str, str], sample_set: Any, large_set: Any, tmp_path: Path) -> dict[str, Entry]:
    """4 small images and the 4 large ones uploaded; {sha256: Entry}."""
    return upload_dir(build_workset(tmp_path / "ws", sample_set.images[:4], large_set.large), s3_env)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_flipped_byte_in_large_object_fails_the_completing_read(lab_set: dict[str, Entry], proxy: Any,
                                                                 s3_env: dict[str, str]) -> None:
    big = max(lab_set.values(), key=lambda e: e.bytes)
    ds = Dataset.from_env(block_size="64K")
    try:
        proxy.add_fault("flip_byte", match=big.sha256, methods=["GET"], count=1)
        with ds.open(big.sha256) as f, pytest.raises(IntegrityError):
            f.read()
        assert proxy.counts()["faults_applied"], "the fault was not applied"
        time.sleep(0.3)
        assert cache_files(Path(s3_env["DATASET_CACHE_DIR"]), big.sha256) == []
        # Chunked (sequential, read-ahead) reading fails too and leaves nothing.
        proxy.clear_faults()
        proxy.add_fault("flip_byte", match=big.sha256, methods=["GET"], count=1)
        ds2 = Dataset.from_env(block_size="64K")
        with ds2.open(big.sha256) as f, pytest.raises(IntegrityError):
            while f.read(100_000):
                pass
        ds2.close()
        time.sleep(0.5)
        assert cache_files(Path(s3_env["DATASET_CACHE_DIR"]), big.sha256) == []
        # Once the fault is gone the object reads back right.
        proxy.clear_faults()
        with ds.open(big.sha256) as f:
            assert _digest(f.read()) == big.sha256
        assert _digest(ds.fetch(big.sha256).read_bytes()) == big.sha256
    finally:
        ds.close()


def test_object_failed_in_another_process_fails_open_files_and_is_read_whole(lab_set: dict[str, Entry],
                                                                              proxy: Any) -> None:
    """Integrity state is per object and shared through the cache: an object that failed verification in
    one process (here a second reader on the same cache directory, as a mount worker or a DataLoader
    worker is; a read-ahead thread records it the same way) makes every file opened on it before fail its
    next read, rather than read on to the end as if whole; a new open reads it whole and verified."""
    big = max(lab_set.values(), key=lambda e: e.bytes)
    ds = Dataset.from_env(block_size="64K")
    other = Dataset.from_env(block_size="64K")
    try:
        with ds.open(big.sha256) as f:
            assert f.read(70_000)
            with pytest.raises(IntegrityError):  # it raises in the thread that records it
                other.reader._integrity_failure(big, "its bytes hash to something else (simulated)")
            assert other.reader.cache.is_suspect(big.sha256)
            with pytest.raises(IntegrityError, match="failed verification while being read"):
                f.read()
        proxy.reset()
        with ds.open(big.sha256) as f:  # a new open reads it whole and verified
            assert _digest(f.read()) == big.sha256
        assert proxy.get_bytes(big.path) >= big.bytes  # the whole object
        assert not ds.reader.cache.is_suspect(big.sha256)  # verified whole: no longer suspect
    finally:
        other.close()
        ds.close()


@pytest.mark.parametrize("kind,value", [("error_status", 503), ("error_status", 500), ("truncate", 1000),
                                        ("refuse", None)])
def test_transient_faults_are_retried(lab_set: dict[str, Entry], proxy: Any, kind: str, value: Any) -> None:
    """A fault limited to the first 2 requests of each object is invisible to readers."""
    ds = Dataset.from_env(read_deadline="20s")
    try:
        for e in lab_set.values():
            proxy.add_fault(kind, value, match=e.sha256, methods=["GET"], count=2)
        for e in lab_set.values():
            with ds.open(e.sha256) as f:
                assert _digest(f.read()) == e.sha256
        applied = sum(f["applied"] for f in proxy.faults())
        assert applied == 2 * len(lab_set), proxy.faults()
    finally:
        ds.close()


def test_hung_request_fails_within_the_deadline(lab_set: dict[str, Entry], proxy: Any) -> None:
    small = min(lab_set.values(), key=lambda e: e.bytes)
    big = max(lab_set.values(), key=lambda e: e.bytes)
    ds = Dataset.from_env(read_deadline="3s")
    try:
        len(ds)  # index loaded before the fault
        proxy.add_fault("hang", match="images/", methods=["GET"])
        for e, call in ((small, lambda e: ds.fetch(e.sha256)), (big, lambda e: ds.open(e.sha256).read())):
            t0 = time.monotonic()
            with pytest.raises(BackendError) as info:
                call(e)
            elapsed = time.monotonic() - t0
            assert elapsed < 3 + 2.0, elapsed
            assert e.sha256 in str(info.value)
        proxy.clear_faults()
        assert _digest(ds.fetch(small.sha256).read_bytes()) == small.sha256
        with ds.open(big.sha256) as f:
            assert _digest(f.read()) == big.sha256
    finally:
        proxy.clear_faults()
        ds.close()


def test_read_nowait_serves_only_an_open_complete_object(tmp_path: Path) -> None:
    """The filesystem's event-loop fast path: bytes only from an already-open, complete, page-cached
    object; None (use a worker thread) otherwise."""
    import hashlib as _h

    from s3fsimg.config import Config as _Config
    from s3fsimg.manifest import Entry as _Entry
    from s3fsimg.manifest import object_path as _object_path
    from s3fsimg.reader import ObjectReader as _Reader
    from s3fsimg.s3 import GetResult as _GetResult

    data = bytes(range(256)) * 4000
    sha = _h.sha256(data).hexdigest()
    entry = _Entry(sha, _object_path(sha, "image/png"), len(data), "image/png")

    class Store:
        def get_range(self, relative: str, start: int, end: int, *, deadline: float) -> _GetResult:
            return _GetResult(data[start:end], None, len(data))

        def where(self, relative: str) -> str:
            return relative

    reader = _Reader(_Config(bucket="b", cache_dir=tmp_path / "c", whole_object_max=2 << 20), store=Store())  # type: ignore[arg-type]
    assert reader.read_nowait(entry, 0, 10) is None  # nothing open yet
    assert reader.read(entry, 0, 10) == data[:10]  # fetches whole (under the threshold), opens the object
    assert reader.read_nowait(entry, 1000, 5000) == data[1000:6000]
    assert reader.read_nowait(entry, len(data) - 3, 100) == data[-3:]
    reader.close()
