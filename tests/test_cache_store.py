"""DiskCache and its ledger on real files in tmp_path, without S3: modes, the reset of a broken ledger,
LRU order through the batched ledger, block maps, suspect markers, served-CRC records (two processes at
once), the stamp of complete objects. (The many-process tests through S3 are in test_cache.py.)"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import stat
import time
from pathlib import Path
from typing import Any

import pytest

from s3fsimg.cache import STAMP_NS, DiskCache
from s3fsimg.errors import CacheError
from tests.checklogs import expect_logs

pytestmark = pytest.mark.timeout(60)


def test_an_existing_cache_root_keeps_its_mode(tmp_path: Path) -> None:
    """`--cache-dir /tmp` (or a shared volume) must not be locked down to 0700: only what the cache
    creates is private."""
    root = tmp_path / "shared"
    root.mkdir()
    os.chmod(root, 0o1777)
    with DiskCache(root, 1 << 20):
        pass
    assert stat.S_IMODE(root.stat().st_mode) == 0o1777
    assert stat.S_IMODE((root / "v1").stat().st_mode) == 0o700
    fresh = tmp_path / "new" / "cache"
    with DiskCache(fresh, 1 << 20):
        pass
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o700
    assert stat.S_IMODE(fresh.parent.stat().st_mode) == 0o700


def test_an_unusable_ledger_starts_the_cache_again(tmp_path: Path) -> None:
    """A ledger that is not a database counts nothing: the cache starts again (its files dropped, so the
    bound holds) instead of every command, `cache clear` included, failing."""
    root = tmp_path / "cache"
    with DiskCache(root, 1 << 20) as cache:
        data = b"x" * 1000
        path = cache.put_object_bytes(data, hashlib.sha256(data).hexdigest(), "jpg")
        assert path is not None and path.exists()
    ledger = root / "v1" / "ledger.sqlite"
    for suffix in ("-wal", "-shm"):
        Path(f"{ledger}{suffix}").unlink(missing_ok=True)
    ledger.write_bytes(b"garbage, not SQLite " * 100)
    with expect_logs(r"ledger .* is unusable", count=1), DiskCache(root, 1 << 20) as cache:
        assert not path.exists()
        assert cache.stats()["files"] == 0
        assert cache.put_object_bytes(data, hashlib.sha256(data).hexdigest(), "jpg") == path
    with DiskCache(root, 1 << 20) as cache:  # and it stays usable
        assert cache.stats()["files"] == 1


@pytest.mark.timeout(60)
def test_an_unusable_ledger_is_not_reset_under_another_user(tmp_path: Path) -> None:
    """Another process still has the cache open (its ledger connection would keep counting into the old,
    unlinked file): the reset waits a few seconds for it, then fails with a clear message, and happens
    once the cache is no longer in use."""
    import fcntl

    root = tmp_path / "cache"
    data = b"y" * 1000
    sha = hashlib.sha256(data).hexdigest()
    with DiskCache(root, 1 << 20) as cache:
        assert cache.put_object_bytes(data, sha, "jpg") is not None
    ledger = root / "v1" / "ledger.sqlite"
    for suffix in ("-wal", "-shm"):
        Path(f"{ledger}{suffix}").unlink(missing_ok=True)
    ledger.write_bytes(b"garbage, not SQLite " * 100)
    user = os.open(root / "v1" / "locks" / "ledger", os.O_RDWR)  # what every open DiskCache holds
    try:
        fcntl.flock(user, fcntl.LOCK_SH)
        with pytest.raises(CacheError, match="other processes are using the cache"):
            DiskCache(root, 1 << 20)
        assert (root / "v1" / "objects" / sha[:2] / sha[2:4] / f"{sha}.jpg").exists()  # nothing dropped
    finally:
        os.close(user)
    with expect_logs(r"ledger .* is unusable", count=1), DiskCache(root, 1 << 20) as cache:
        assert cache.stats()["files"] == 0


def test_recently_used_files_are_evicted_last(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """LRU through the batched ledger: a use recorded in memory counts when this process evicts, and
    a use is in the ledger, for other processes, once the cache is closed."""
    import s3fsimg.ledger as ledger_mod

    monkeypatch.setattr(ledger_mod, "_TOUCH_INTERVAL", 0.0)
    root = tmp_path / "cache"
    blobs = {k: k.encode() * 400 for k in "abcd"}  # 400 bytes each
    shas = {k: hashlib.sha256(v).hexdigest() for k, v in blobs.items()}
    with DiskCache(root, 1000) as cache:
        for k in "ab":
            assert cache.put_object_bytes(blobs[k], shas[k], "jpg") is not None
            time.sleep(0.01)
        assert cache.object_path(shas["a"], "jpg") is not None  # "a" used after "b" (pending, not written)
        time.sleep(0.01)
        cache.put_object_bytes(blobs["c"], shas["c"], "jpg")  # 1200 > 1000: the least recent goes
        present = {k for k in "abc" if (root / "v1" / cache.object_name(shas[k], "jpg")).exists()}
        assert present == {"a", "c"}
        assert cache.object_path(shas["a"], "jpg") is not None  # pending at close
    with DiskCache(root, 1000) as other:  # another process now: "c" is the least recently used
        other.put_object_bytes(blobs["d"], shas["d"], "jpg")
        present = {k for k in "acd" if (root / "v1" / other.object_name(shas[k], "jpg")).exists()}
        assert present == {"a", "d"}


# ------------------------------------------------------------- block maps, integrity records, the stamp


def _obj(tag: bytes, n: int = 5000) -> tuple[bytes, str]:
    data = (tag * n)[:n]
    return data, hashlib.sha256(data).hexdigest()


def test_block_maps_are_kept_counted_and_checked(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    raw = b'{"format": "s3fsimg-blockmap-1", "whatever": 1}'
    _, sha = _obj(b"m")
    with DiskCache(root, 1 << 20) as cache:
        assert cache.get_blockmap(sha) is None
        assert cache.put_blockmap(sha, raw)
        assert cache.get_blockmap(sha) == raw
        stats = cache.stats()
        assert (stats["maps"], stats["objects"], stats["blocks"]) == (1, 0, 0)
        assert stats["map_bytes"] == stats["bytes"] == len(raw) + 8
        path = root / "v1" / "maps" / sha[:2] / sha
        assert path.is_file() and stat.S_IMODE(path.stat().st_mode) == 0o600
        data, _ = _obj(b"m")
        cache.put_object_bytes(data, sha, "png")
        cache.drop_object(sha, "png")  # maps are facts of the object: they stay
        assert cache.get_blockmap(sha) == raw
        # A map damaged on disk is not handed out: dropped (and counted out), fetched again by the reader.
        stored = bytearray(path.read_bytes())
        stored[-3] ^= 0x01
        path.write_bytes(bytes(stored))
        with expect_logs(r"block map maps/.* fails its checksum; dropping it", count=1):
            assert cache.get_blockmap(sha) is None
        assert not path.exists() and cache.stats()["files"] == 0
        assert cache.put_blockmap(sha, raw)
        cache.drop_blockmap(sha)
        assert cache.get_blockmap(sha) is None and cache.stats()["files"] == 0


def test_suspect_markers_are_shared_and_cleared(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    _, sha = _obj(b"s")
    with DiskCache(root, 1 << 20) as one, DiskCache(root, 1 << 20) as other:
        assert not one.is_suspect(sha)
        one.mark_suspect(sha)
        one.mark_suspect(sha)  # idempotent
        assert other.is_suspect(sha)
        assert stat.S_IMODE((root / "v1" / "suspect" / sha).stat().st_mode) == 0o600
        other.clear_suspect(sha)
        other.clear_suspect(sha)  # idempotent
        assert not one.is_suspect(sha)


def test_served_crcs_are_recorded_per_block_size_and_forgotten(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    _, sha = _obj(b"v")
    with DiskCache(root, 1 << 20) as cache:
        assert cache.served_crcs(sha, 4096) == {}
        assert cache.record_served(sha, 4096, 3, 0xDEADBEEF)
        assert cache.record_served(sha, 4096, 0, 0)  # a CRC of 0 is a CRC like any other
        assert cache.record_served(sha, 4096, 3, 0xDEADBEEF)  # the same bytes again: fine
        assert not cache.record_served(sha, 4096, 3, 0x12345678)  # other bytes for block 3
        assert cache.record_served(sha, 8192, 3, 0x12345678)  # another block size is another record
        assert cache.served_crcs(sha, 4096) == {0: 0, 3: 0xDEADBEEF}
        assert cache.served_crcs(sha, 8192) == {3: 0x12345678}
        record = root / "v1" / "served" / "4096" / sha
        assert record.read_bytes()[24:32] == b"SV\0\0\xde\xad\xbe\xef"
        assert stat.S_IMODE(record.stat().st_mode) == 0o600
        assert cache.stats()["files"] == 0  # not counted in the ledger
        cache.forget_served(sha)
        assert cache.served_crcs(sha, 4096) == {} and cache.served_crcs(sha, 8192) == {}
        assert cache.record_served(sha, 4096, 3, 0x12345678)  # a new record after forgetting


def _record_many(root: str, sha: str, crc: int, start: Any, out: Any) -> None:
    """Worker: after `start`, record `crc` for blocks 0..199; put the indexes refused on `out`."""
    with DiskCache(Path(root), 1 << 20) as cache:
        start.wait()
        out.put([i for i in range(200) if not cache.record_served(sha, 4096, i, crc)])


def test_two_processes_recording_other_bytes_for_a_block_one_of_them_is_refused(tmp_path: Path) -> None:
    """Two processes serve blocks 0..199 of one object with different bytes at the same moment: for every
    block exactly one of them is told the block was served with other bytes (never both accepted)."""
    root = tmp_path / "cache"
    _, sha = _obj(b"p")
    DiskCache(root, 1 << 20).close()
    ctx = multiprocessing.get_context("fork")
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_record_many, args=(str(root), sha, crc, start, out)) for crc in (1111, 2222)]
    for p in procs:
        p.start()
    start.set()
    refused = [out.get(timeout=30), out.get(timeout=30)]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert sorted(refused[0] + refused[1]) == list(range(200))
    with DiskCache(root, 1 << 20) as cache:
        crcs = cache.served_crcs(sha, 4096)
    assert set(crcs) == set(range(200)) and set(crcs.values()) <= {1111, 2222}


def test_clear_removes_maps_markers_and_records_too(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    data, sha = _obj(b"c")
    with DiskCache(root, 1 << 20) as cache:
        cache.put_object_bytes(data, sha, "jpg")
        cache.put_block(sha, 4096, 0, data[:4096])
        cache.put_blockmap(sha, b"{}")
        cache.mark_suspect(sha)
        cache.record_served(sha, 4096, 0, 7)
        assert cache.clear() == len(data) + (8 + 4096) + (8 + 2)  # the object, a block, a map
        assert cache.stats()["files"] == 0
        assert cache.get_blockmap(sha) is None and not cache.is_suspect(sha)
        assert cache.served_crcs(sha, 4096) == {} and cache.object_path(sha, "jpg") is None
        leftovers = [p for p in (root / "v1").rglob("*") if p.is_file() and p.parent.name not in ("locks", "v1")]
        assert leftovers == []


def test_complete_objects_carry_the_stamp_and_are_rehashed_when_written_to(tmp_path: Path) -> None:
    """A complete object written to after it was stored (its mtime is no longer the stamp) is re-hashed
    before it is served: still right -> stamped again and served; wrong -> dropped, a miss."""
    root = tmp_path / "cache"
    good, sha = _obj(b"g", 300_000)
    with DiskCache(root, 1 << 20) as cache:
        path = cache.put_object_bytes(good, sha, "jpg")
        assert path is not None and path.stat().st_mtime_ns == STAMP_NS
        assert cache.has_object(sha, "jpg")

        path.write_bytes(good)  # rewritten with the same bytes (e.g. copied back): served, re-stamped
        assert path.stat().st_mtime_ns != STAMP_NS
        fd = cache.open_object(sha, "jpg")
        assert fd is not None
        try:
            assert os.pread(fd, len(good) + 1, 0) == good
        finally:
            os.close(fd)
        assert path.stat().st_mtime_ns == STAMP_NS

        with open(path, "r+b") as f:  # one byte changed in place
            f.seek(123_456)
            f.write(b"X")
        with expect_logs(r"was modified on disk and no longer matches its hash; dropping it", count=1):
            assert cache.open_object(sha, "jpg") is None
        assert not path.exists() and cache.stats()["files"] == 0

        assert cache.put_object_bytes(good, sha, "jpg") == path
        with open(path, "ab") as f:  # appended to
            f.write(b"more")
        with expect_logs(r"no longer matches its hash", count=1):
            assert cache.object_path(sha, "jpg") is None
        assert not path.exists() and cache.stats()["files"] == 0

        # An intact object whose stamp is right is served without reading it: one changed byte that
        # keeps the stamp (only `cache verify` looks) is not noticed by open_object.
        assert cache.put_object_bytes(good, sha, "jpg") == path
        assert cache.object_path(sha, "jpg") == path


def test_a_stamped_temp_file_of_a_live_process_is_not_cleaned(tmp_path: Path) -> None:
    """Temp files carry the 2001 stamp before their rename: a cache opened meanwhile must not take them
    for day-old leftovers."""
    root = tmp_path / "cache"
    with DiskCache(root, 1 << 20) as cache:
        tmp = cache._tmp_name()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, b"x")
        os.utime(fd, ns=(STAMP_NS, STAMP_NS))
        os.close(fd)
        DiskCache(root, 1 << 20).close()
        assert tmp.exists()


def test_the_first_use_after_a_reboot_rehashes_recent_objects(tmp_path: Path) -> None:
    """Objects are renamed into place without fsync: after a reboot (another boot_id), the first process
    re-hashes the objects used last and drops those a crash left damaged; the rest stay."""
    root = tmp_path / "cache"
    (good, good_sha), (torn, torn_sha) = _obj(b"a", 9000), _obj(b"b", 9000)
    with DiskCache(root, 1 << 20) as cache:
        good_path = cache.put_object_bytes(good, good_sha, "jpg")
        torn_path = cache.put_object_bytes(torn, torn_sha, "jpg")
    assert good_path is not None and torn_path is not None
    torn_path.write_bytes(b"\0" * 9000)  # what a power loss can leave of unflushed data
    os.utime(torn_path, ns=(STAMP_NS, STAMP_NS))  # (its metadata did reach the disk)
    (root / "v1" / "boot_id").write_text("an earlier boot")
    with expect_logs(r"first use since a reboot: re-verified 2 recent objects, dropped 1", count=1), \
            DiskCache(root, 1 << 20) as cache:
        assert cache.object_path(good_sha, "jpg") == good_path
        assert cache.object_path(torn_sha, "jpg") is None and not torn_path.exists()
        assert cache.stats()["objects"] == 1
    assert (root / "v1" / "boot_id").read_text() == Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    with DiskCache(root, 1 << 20):  # the same boot: no second pass (a warning would fail the test)
        pass
