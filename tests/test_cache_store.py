"""DiskCache and its ledger on real files in tmp_path, without S3: modes, the reset of a broken ledger,
LRU order through the batched ledger. (The many-process tests through S3 are in test_cache.py.)"""

from __future__ import annotations

import hashlib
import os
import stat
import time
from pathlib import Path

import pytest

from s3fsimg.cache import DiskCache
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
