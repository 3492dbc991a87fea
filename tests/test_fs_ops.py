"""fs.Operations driven directly (no mount), on a temp index and a fake reader (as s3ql's t3_fs_api)."""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pyfuse3
import pytest
import trio

from s3fsimg.counters import Counters
from s3fsimg.errors import BackendError, IntegrityError, NotFound, S3fsimgError
from s3fsimg.fs import STATS_XATTR, Operations, errno_for
from s3fsimg.index import BY_ID_INODE, IMAGES_INODE, MANIFEST_INODE, ROOT_INODE, Index
from s3fsimg.index_build import build_index
from s3fsimg.manifest import Entry, object_path
from s3fsimg.reader import COUNTER_NAMES
from tests.checklogs import expect_logs

CTX: Any = None  # the request context is not used by the Operations


def data_for(sha: str, size: int) -> bytes:
    return (sha.encode() * (size // 64 + 1))[:size]


class FakeReader:
    """The reader's interface (fs.Reader) over made-up object bytes, counting as the real one does."""

    def __init__(self) -> None:
        self.fail: dict[str, BaseException] = {}
        self.threads: set[int] = set()
        self.gate: threading.Event | None = None
        self.counters = Counters(COUNTER_NAMES)
        self.on_untrusted_pages: Callable[[str], None] | None = None

    def read(self, entry: Entry, offset: int, size: int, *, opened_at: int | None = None) -> bytes:
        self.threads.add(threading.get_ident())
        if self.gate is not None:
            self.gate.wait(10)
        if entry.sha256 in self.fail:
            self.counters.add("read_errors")
            raise self.fail[entry.sha256]
        data = data_for(entry.sha256, entry.bytes)[offset:offset + size]
        self.counters.add_many({"reads": 1, "bytes_read": len(data), "cache_hits": 1})
        return data

    def read_nowait(self, entry: Entry, offset: int, size: int, *, opened_at: int | None = None,
                    into: bytearray | None = None) -> bytes | None:
        return None  # always the worker-thread path, which the tests observe

    def may_keep_pages(self, entry: Entry, generation: int | None = None) -> bool:
        return True

    def failure_generation(self, entry: Entry) -> int:
        return 0


SHAS = [f"{i:02x}" * 32 for i in range(1, 4)]


@pytest.fixture
def reader() -> FakeReader:
    """The fake reader behind `ops` (typed as itself, so tests can reach its test-only attributes)."""
    return FakeReader()


@pytest.fixture
def ops(tmp_path: Path, reader: FakeReader) -> Iterator[Operations]:
    lines = [
        {"sha256": SHAS[0], "path": object_path(SHAS[0], "image/jpeg"), "bytes": 1000, "content_type": "image/jpeg",
         "width": 10, "height": 20, "logical_id": "ID1", "source_path": "a/one.jpg"},
        {"sha256": SHAS[1], "path": object_path(SHAS[1], "image/png"), "bytes": 70_000, "content_type": "image/png"},
        {"sha256": SHAS[0], "path": object_path(SHAS[0], "image/jpeg"), "bytes": 1000, "content_type": "image/jpeg",
         "source_path": "b/dup.jpg"},
        {"sha256": SHAS[2], "path": object_path(SHAS[2], "image/gif"), "bytes": 0, "content_type": "image/gif"},
    ]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(x) + "\n" for x in lines))
    build_index(manifest, tmp_path / "i.sqlite", manifest_digest="x", mtime_ns=1_700_000_000 * 10**9)
    index = Index.open(tmp_path / "i.sqlite")
    o = Operations(index, reader, manifest_path=manifest)
    yield o
    o.close()
    index.close()


def run(fn: Callable[[], Awaitable[Any]]) -> Any:
    return trio.run(fn)


async def resolve(ops: Operations, path: str) -> pyfuse3.EntryAttributes:
    inode = ROOT_INODE
    attr = await ops.getattr(inode, CTX)
    for part in path.split("/"):
        attr = await ops.lookup(inode, part.encode(), CTX)
        inode = attr.st_ino
    return attr


async def listdir(ops: Operations, inode: int) -> list[tuple[bytes, int]]:
    fh = await ops.opendir(inode, CTX)
    names: list[tuple[bytes, int]] = []
    # pyfuse3.readdir_reply needs a real token; call the index the way readdir does
    for name, attr, _key in ops.index.readdir_attrs(fh, 0):
        names.append((name, attr.inode))
    await ops.releasedir(fh)
    return names


def test_attributes(ops: Operations) -> None:
    async def main() -> None:
        root = await ops.getattr(ROOT_INODE, CTX)
        assert stat.S_ISDIR(root.st_mode) and stat.S_IMODE(root.st_mode) == 0o555
        assert root.st_uid == os.getuid() and root.st_gid == os.getgid()
        f = await resolve(ops, "by-path/a/one.jpg")
        assert stat.S_ISREG(f.st_mode) and stat.S_IMODE(f.st_mode) == 0o444
        assert f.st_size == 1000 and f.st_blocks == 2 and f.st_nlink == 4  # images, by-id, 2 by-path
        assert f.st_mtime_ns == 1_700_000_000 * 10**9 == root.st_mtime_ns
        assert f.entry_timeout >= 3600 and f.attr_timeout >= 3600
        same = await resolve(ops, "by-path/b/dup.jpg")
        assert same.st_ino == f.st_ino
        big = await resolve(ops, object_path(SHAS[1], "image/png"))
        assert big.st_blocks == (70_000 + 511) // 512
        empty = await resolve(ops, object_path(SHAS[2], "image/gif"))
        assert empty.st_size == 0 and empty.st_blocks == 0
        m = await resolve(ops, "manifest.jsonl")
        assert ops.manifest_path is not None
        assert m.st_size == ops.manifest_path.stat().st_size
        with pytest.raises(pyfuse3.FUSEError) as info:
            await ops.lookup(ROOT_INODE, b"missing", CTX)
        assert info.value.errno == errno.ENOENT
        with pytest.raises(pyfuse3.FUSEError) as info:
            await ops.getattr(999_999_999, CTX)
        assert info.value.errno == errno.ENOENT
        s = await ops.statfs(CTX)
        assert s.f_namemax == 255

    run(main)


def test_listing(ops: Operations) -> None:
    async def main() -> None:
        assert [n for n, _ in await listdir(ops, ROOT_INODE)] == [b"images", b"by-id", b"by-path", b"manifest.jsonl"]
        assert [n for n, _ in await listdir(ops, BY_ID_INODE)] == [b"ID1"]
        assert sorted(n for n, _ in await listdir(ops, IMAGES_INODE)) == [b"01", b"02", b"03"]
        with pytest.raises(pyfuse3.FUSEError) as info:
            await ops.opendir(MANIFEST_INODE, CTX)
        assert info.value.errno == errno.ENOTDIR

    run(main)


def test_read_goes_through_a_worker_thread(ops: Operations, reader: FakeReader) -> None:
    async def main() -> None:
        attr = await resolve(ops, object_path(SHAS[1], "image/png"))
        fi = await ops.open(attr.st_ino, os.O_RDONLY, CTX)
        assert fi.keep_cache
        whole = data_for(SHAS[1], 70_000)
        assert await ops.read(fi.fh, 0, 4096) == whole[:4096]
        assert await ops.read(fi.fh, 69_000, 4096) == whole[69_000:]
        assert await ops.read(fi.fh, 80_000, 10) == b""
        await ops.release(fi.fh)
        assert fi.fh == attr.st_ino  # the handle is the inode: any process of the mount can serve it
        assert threading.get_ident() not in reader.threads  # never on the trio thread
        assert ops.manifest_path is not None
        m = await ops.open(MANIFEST_INODE, os.O_RDONLY, CTX)
        assert await ops.read(m.fh, 0, 1 << 20) == ops.manifest_path.read_bytes()
        await ops.release(m.fh)
        stats = json.loads(await ops.getxattr(ROOT_INODE, STATS_XATTR, CTX))
        assert stats["reads"] == 3 + 1 and stats["bytes_read"] == 4096 + 1000 + ops.manifest_path.stat().st_size
        assert stats["cache_hits"] == 3 and stats["opens"] == 2

    run(main)


@pytest.mark.parametrize("flags", [os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC, os.O_WRONLY | os.O_APPEND])
def test_open_refuses_write_flags(ops: Operations, flags: int) -> None:
    async def main() -> None:
        attr = await resolve(ops, "by-path/a/one.jpg")
        with pytest.raises(pyfuse3.FUSEError) as info:
            await ops.open(attr.st_ino, flags, CTX)
        assert info.value.errno == errno.EROFS

    run(main)


def test_every_write_operation_is_erofs(ops: Operations) -> None:
    async def main() -> None:
        f = (await resolve(ops, "by-path/a/one.jpg")).st_ino
        calls: list[Callable[[], Awaitable[Any]]] = [
            lambda: ops.write(1, 0, b"x"),
            lambda: ops.create(ROOT_INODE, b"new", 0o644, os.O_WRONLY, CTX),
            lambda: ops.mkdir(ROOT_INODE, b"d", 0o755, CTX),
            lambda: ops.mknod(ROOT_INODE, b"n", stat.S_IFREG | 0o644, 0, CTX),
            lambda: ops.rmdir(ROOT_INODE, b"images", CTX),
            lambda: ops.unlink(ROOT_INODE, b"manifest.jsonl", CTX),
            lambda: ops.rename(ROOT_INODE, b"images", ROOT_INODE, b"x", 0, CTX),
            lambda: ops.symlink(ROOT_INODE, b"s", b"t", CTX),
            lambda: ops.link(f, ROOT_INODE, b"l", CTX),
            lambda: ops.setattr(f, pyfuse3.EntryAttributes(), pyfuse3.SetattrFields(), None, CTX),
            lambda: ops.setxattr(f, b"user.x", b"1", CTX),
            lambda: ops.removexattr(f, b"user.s3fsimg.sha256", CTX),
            lambda: ops.access(f, os.W_OK, CTX),
        ]
        for call in calls:
            with pytest.raises(pyfuse3.FUSEError) as info:
                await call()
            assert info.value.errno == errno.EROFS
        assert await ops.access(f, os.R_OK, CTX)

    run(main)


def test_xattrs(ops: Operations) -> None:
    async def main() -> None:
        f = (await resolve(ops, "by-id/ID1/" + SHAS[0] + ".jpg")).st_ino
        names = await ops.listxattr(f, CTX)
        assert set(names) == {b"user.s3fsimg.sha256", b"user.s3fsimg.logical_id", b"user.s3fsimg.width",
                              b"user.s3fsimg.height", b"user.s3fsimg.content_type"}
        assert await ops.getxattr(f, b"user.s3fsimg.width", CTX) == b"10"
        with pytest.raises(pyfuse3.FUSEError) as info:
            await ops.getxattr(f, b"user.s3fsimg.etag", CTX)
        assert info.value.errno == pyfuse3.ENOATTR
        assert await ops.listxattr(ROOT_INODE, CTX) == []  # the stats xattr is not listed

    run(main)


def test_errors_map_to_errno_and_eio_is_logged_once(ops: Operations, reader: FakeReader,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    assert errno_for(NotFound("x")) == errno.ENOENT
    assert errno_for(BackendError("x")) == errno.EIO
    assert errno_for(IntegrityError("x")) == errno.EIO
    assert errno_for(S3fsimgError("x")) == errno.EIO
    assert errno_for(ValueError("bug")) == errno.EIO
    assert errno_for(OSError(errno.ENOSPC, "full")) == errno.ENOSPC

    async def main() -> None:
        reader.fail[SHAS[1]] = IntegrityError("s3://b/images/x: sha256 mismatch")
        attr = await resolve(ops, object_path(SHAS[1], "image/png"))
        fi = await ops.open(attr.st_ino, os.O_RDONLY, CTX)
        for _ in range(3):
            with pytest.raises(pyfuse3.FUSEError) as info:
                await ops.read(fi.fh, 0, 10)
            assert info.value.errno == errno.EIO
        reader.fail[SHAS[1]] = BackendError("s3://b/images/x: cannot connect")
        with pytest.raises(pyfuse3.FUSEError):
            await ops.read(fi.fh, 0, 10)
        del reader.fail[SHAS[1]]
        assert len(await ops.read(fi.fh, 0, 10)) == 10  # works again once the fault is gone
        stats = json.loads(await ops.getxattr(ROOT_INODE, STATS_XATTR, CTX))
        assert stats["read_errors"] == 4

    with expect_logs(r"^EIO reading ", level=logging.ERROR, count=2):
        run(main)
    eio = [r for r in caplog.records if "EIO" in r.getMessage()]  # two (count=2): one per distinct cause
    assert "sha256 mismatch" in eio[0].getMessage() and object_path(SHAS[1], "image/png") in eio[0].getMessage()


def test_slow_read_does_not_block_lookups(ops: Operations, reader: FakeReader) -> None:
    gate = threading.Event()

    reader.gate = gate

    async def main() -> None:
        attr = await resolve(ops, "by-path/a/one.jpg")
        fi = await ops.open(attr.st_ino, os.O_RDONLY, CTX)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ops.read, fi.fh, 0, 1)
            with trio.fail_after(1):
                for _ in range(100):
                    await resolve(ops, "by-path/b/dup.jpg")
                    await listdir(ops, ROOT_INODE)
            gate.set()

    run(main)
