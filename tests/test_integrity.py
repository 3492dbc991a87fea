"""A read returns the object's bytes, exactly as many as asked, or fails: never wrong or short bytes.

Reproductions of what the fault soak found (issue #11), each failing on the code before the fix:
- a block served with a flipped byte, dropped from the disk cache before its object was verified, left
  pages in the kernel that a later whole read returned (wrong from a block boundary on, no error);
- a ranged GET answered with fewer bytes than asked became a READ reply shorter than asked, which the
  kernel takes as the end of the file (fuse_short_read shrinks the inode).
And the block maps: with one, no byte of a block that does not match its hash is ever served.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from s3fsimg.blockmap import blockmap_key
from s3fsimg.config import Config
from s3fsimg.errors import BackendError
from s3fsimg.manifest import Entry
from s3fsimg.reader import ObjectReader
from s3fsimg.s3 import GetResult, S3Store
from tests.cacheworker import build_workset, upload_dir
from tests.mountutil import MountProcess, fuse_test

pytestmark = pytest.mark.timeout(120)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------------------ unit


class ShortStore:
    """Answers every range with one byte fewer than asked, with a consistent total size (a server or a
    proxy that cut a body and got away with it)."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def get_range(self, relative: str, start: int, end: int, *, deadline: float) -> GetResult:
        if relative.startswith("blocks/"):
            from s3fsimg.errors import NotFound

            raise NotFound(relative)
        return GetResult(data=self.data[start:end - 1], etag=None, total_size=len(self.data))

    def where(self, relative: str) -> str:
        return f"s3://fake/{relative}"


@pytest.mark.parametrize("whole_max", [0, 1 << 20])
def test_a_short_answer_from_s3_is_an_error_never_a_short_read(tmp_path: Path, whole_max: int) -> None:
    data = bytes(range(256)) * 300
    sha = _digest(data)
    entry = Entry(sha256=sha, path=f"images/{sha[:2]}/{sha[2:4]}/{sha}.png", bytes=len(data),
                  content_type="image/png")
    config = Config(bucket="fake", cache_dir=tmp_path / "c", block_size=4096, whole_object_max=whole_max,
                    read_deadline=2.0)
    with ObjectReader(config, store=ShortStore(data), threads=2) as reader:  # type: ignore[arg-type]
        for offset, size in ((0, 1000), (5000, 9000), (len(data) - 10, 4096)):
            with pytest.raises(BackendError):
                reader.read(entry, offset, size)


# ------------------------------------------------------------------------------------------ mount


@pytest.fixture
def big_set(s3_env: dict[str, str], large_set: Any, tmp_path: Path) -> dict[str, Entry]:
    """The large (1-3 MB) images uploaded with the product's uploader (so each has a block map), from
    tmp_path/ws."""
    return upload_dir(build_workset(tmp_path / "ws", [], large_set.large), s3_env)


def _stats(mp: Path) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "s3fsimg", "stats", str(mp), "--json"], capture_output=True,
                         text=True, check=True)
    stats: dict[str, Any] = json.loads(out.stdout)
    return stats


def _delete_blockmap(s3_env: dict[str, str], moto_client: Any, sha256: str) -> None:
    store = S3Store(Config.load(env=s3_env))
    moto_client.delete_object(Bucket=s3_env["S3_BUCKET"], Key=store.key(blockmap_key(sha256)))


@fuse_test
@pytest.mark.fuse
@pytest.mark.parametrize("with_map", [True, False], ids=["block-map", "no-map"])
def test_a_wrong_block_dropped_before_verification_never_makes_a_wrong_whole_read(
        big_set: dict[str, Entry], s3_env: dict[str, str], proxy: Any, moto_client: Any, mnt_dir: Path,
        tmp_path: Path, with_map: bool) -> None:
    big = max(big_set.values(), key=lambda e: e.bytes)
    if not with_map:
        _delete_blockmap(s3_env, moto_client, big.sha256)
    env = {**os.environ, "DATASET_READ_DEADLINE": "5s"}
    with MountProcess(mnt_dir, env=env):
        path = mnt_dir / big.path
        # 1. A partial read inside the object whose GET carries a flipped byte: with a block map it fails;
        #    without one it is served (unverified) and its pages stay in the kernel.
        source = (tmp_path / "ws" / str(big.source_path)).read_bytes()
        # The first GET is the range from block 1 (256 KiB blocks) on: its byte 40,000 is in this read.
        proxy.add_fault("flip_byte", 40_000, match=big.path, methods=["GET"], count=1)
        fd = os.open(path, os.O_RDONLY)
        try:
            part = os.pread(fd, 65536, 300_000)
            if with_map:  # the kernel re-sends a failed read-ahead as a page read, which then reads it whole
                assert part == source[300_000:365_536], "a block that does not match its block map was served"
            else:
                assert part != source[300_000:365_536]  # served unverified: the fault did land in this read
        except OSError as exc:
            assert with_map and exc.errno == errno.EIO, exc
        finally:
            os.close(fd)
        assert proxy.counts()["faults_applied"] == {"flip_byte": 1}
        proxy.clear_faults()
        # 2. Everything of it leaves the disk cache before the object was ever verified.
        subprocess.run([sys.executable, "-m", "s3fsimg", "cache", "clear"], env=env, check=True,
                       capture_output=True)
        # 3. A whole read: the object's bytes, or EIO; never other bytes without an error.
        try:
            whole = path.read_bytes()
            assert _digest(whole) == big.sha256, "a whole read returned wrong bytes without an error"
        except OSError as exc:
            assert exc.errno == errno.EIO
        assert _digest(path.read_bytes()) == big.sha256  # and then the object reads back right
        stats = _stats(mnt_dir)
        if with_map:
            assert stats["unverified_bytes"] == 0, stats
        else:
            assert stats["unverified_bytes"] > 0, stats


@fuse_test
@pytest.mark.fuse
def test_with_block_maps_partial_reads_are_verified_and_cheap(big_set: dict[str, Entry], proxy: Any,
                                                              mnt_dir: Path, tmp_path: Path) -> None:
    """64 KiB header reads of large images: served verified (no unverified byte), the block map fetched
    beside the first block, and at most 4x the bytes asked taken from S3 (the map included)."""
    env = {**os.environ}
    with MountProcess(mnt_dir, env=env):
        proxy.reset()
        errors: list[str] = []

        def header(e: Entry) -> None:
            with open(mnt_dir / e.path, "rb") as f:
                head = f.read(65536)
            if head != (tmp_path / "ws" / str(e.source_path)).read_bytes()[:65536]:
                errors.append(e.sha256)

        threads = [threading.Thread(target=header, args=(e,)) for e in big_set.values()]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        counts = proxy.counts()
        image_bytes = sum(proxy.get_bytes(e.path) for e in big_set.values())
        map_bytes = sum(proxy.get_bytes(blockmap_key(e.sha256)) for e in big_set.values())
        assert image_bytes <= 4 * 65536 * len(big_set), counts
        assert 0 < map_bytes <= image_bytes / 100, counts  # each map fetched once, beside the first block
        stats = _stats(mnt_dir)
        assert stats["unverified_bytes"] == 0 and stats["read_errors"] == 0, stats


@fuse_test
@pytest.mark.fuse
def test_pages_served_before_a_failure_found_by_another_process_are_never_read_back(
        big_set: dict[str, Entry], s3_env: dict[str, str], proxy: Any, moto_client: Any, mnt_dir: Path,
        tmp_path: Path) -> None:
    """An object without a block map: the mount serves a block with a flipped byte (unverified, so its
    pages stay in the kernel); another process (a Dataset on the same cache) completes the object, finds
    the block was served with other bytes, fails, and then verifies it whole. The mount's next open of
    the (now complete, verified) object must not keep those pages: the other process cannot drop them."""
    big = max(big_set.values(), key=lambda e: e.bytes)
    _delete_blockmap(s3_env, moto_client, big.sha256)
    source = (tmp_path / "ws" / str(big.source_path)).read_bytes()
    env = {**os.environ, "DATASET_READ_DEADLINE": "5s"}
    with MountProcess(mnt_dir, env=env):
        path = mnt_dir / big.path
        proxy.add_fault("flip_byte", 40_000, match=big.path, methods=["GET"], count=1)
        with open(path, "rb") as f:
            f.seek(300_000)
            assert f.read(65536) != source[300_000:365_536]  # served unverified, the fault in it
        proxy.clear_faults()
        from s3fsimg.dataset import Dataset
        from s3fsimg.errors import IntegrityError

        with Dataset.from_env() as ds:
            with pytest.raises(IntegrityError), ds.open(big.sha256) as f:
                f.read()  # completes it from fresh blocks: block 1 was served with other bytes
            assert _digest(ds.fetch(big.sha256).read_bytes()) == big.sha256  # whole, verified, complete
        assert path.read_bytes() == source


@fuse_test
@pytest.mark.fuse
def test_a_cached_object_corrupted_on_disk_is_fetched_again_through_the_mount(
        big_set: dict[str, Entry], s3_env: dict[str, str], proxy: Any, mnt_dir: Path, tmp_path: Path) -> None:
    """The mount keeps a descriptor of each complete object it reads; a write to the cached file (a
    flipped byte on disk) is noticed at the next read that reaches the mount, which fetches the object
    again instead of serving the damaged file."""
    e = min(big_set.values(), key=lambda x: x.bytes)
    source = (tmp_path / "ws" / str(e.source_path)).read_bytes()
    with MountProcess(mnt_dir, env={**os.environ, "DATASET_MOUNT_WORKERS": "1"}):  # one process: one descriptor
        path = mnt_dir / e.path
        assert path.read_bytes() == source  # now complete in the cache
        Path("/proc/sys/vm/drop_caches").write_text("3")
        assert path.read_bytes() == source  # read from the complete object: its descriptor is kept
        cached = Path(s3_env["DATASET_CACHE_DIR"]) / "v1" / "objects" / e.sha256[:2] / e.sha256[2:4] / \
            f"{e.sha256}.{e.path.rsplit('.', 1)[1]}"
        with open(cached, "r+b") as f:  # damage it in place, as bit rot or a stray write would
            f.seek(1000)
            byte = f.read(1)
            f.seek(1000)
            f.write(bytes([byte[0] ^ 0xFF]))
        Path("/proc/sys/vm/drop_caches").write_text("3")  # the kernel forgets the mount's pages too
        proxy.reset()
        assert path.read_bytes() == source
        assert proxy.get_count("GET", e.path) >= 1  # fetched again
