"""The FUSE filesystem: only `Operations`, the `pyfuse3.Operations` subclass that answers the kernel.

It is given an open `Index` (names, inodes, sizes: every listing, lookup, stat and xattr is answered
from it, never from S3) and a reader (`ObjectReader`, see docs/architecture.md) through `__init__`;
`mount.py` builds both (and a worker of a multi-process mount swaps in its own with `after_fork`).
A file handle is the inode (and the object's failure generation in its high bits): nothing else is
kept per open, so any process serving the mount can answer any request. A read is
`reader.read_nowait(entry, ...)` on the trio loop when the bytes are page-cached, else
`reader.read(entry, ...)` in a worker thread (`trio.to_thread.run_sync`, bounded by a
CapacityLimiter), so a read waiting on S3 never blocks listings, stats or reads of cached data.

The filesystem is read-only: every write operation fails with EROFS, and `open` refuses write flags
with EROFS (the kernel itself already answers EROFS for a `ro` mount before asking us).

Errors: lower layers raise the project's exceptions (`s3fsimg.errors`); `errno_for` is the one place
they become an errno, at this boundary. Each EIO is logged once, with the key and the cause.

The counters (the reader's `Counters`, shared by every process of the mount) are exposed as the xattr
`user.s3fsimg.stats` (JSON) on the root directory; `listxattr` does not list it.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import pyfuse3
import trio

from s3fsimg.counters import Counters
from s3fsimg.errors import S3fsimgError
from s3fsimg.index import MANIFEST_INODE, ROOT_INODE, XATTR_PREFIX, Attr, Index
from s3fsimg.manifest import Entry

log = logging.getLogger(__name__)

STATS_XATTR = b"user.s3fsimg.stats"
_XATTR_PREFIX = XATTR_PREFIX.encode()
#: Content never changes for a given manifest: let the kernel keep names and attributes for a day.
CACHE_TIMEOUT = 24 * 3600.0
BLOCK_SIZE = 128 * 1024  # st_blksize: the unit `cp` and friends read in
#: Manifest entries of recently opened objects kept in memory: re-opening a file (an epoch of a data loader, a
#: page-cached re-read) makes no index query. ~0.5 KB each.
OPEN_ENTRY_CACHE = 8192
#: A file handle is the inode, with the object's failure generation at open above bit 48 (see `open`).
_HANDLE_SHIFT = 48
_INODE_MASK = (1 << _HANDLE_SHIFT) - 1
#: The reply buffer of reads answered on the trio thread (`read_nowait`): one, reused, since pyfuse3
#: sends the reply from it synchronously right after `read` returns, before any other task runs (its
#: fuse_read_async). Sized for the largest READ the kernel sends (1 MiB with libfuse's max_pages).
REPLY_BUFFER = 1 << 20
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT


class Reader(Protocol):
    """What fs.py needs of `s3fsimg.reader.ObjectReader` (tests give a fake)."""

    counters: Counters
    on_untrusted_pages: Callable[[str], None] | None

    def read(self, entry: Entry, offset: int, size: int, *, opened_at: int | None = None) -> bytes: ...

    def read_nowait(self, entry: Entry, offset: int, size: int, *, opened_at: int | None = None,
                    into: bytearray | None = None) -> bytes | bytearray | memoryview | None: ...

    def may_keep_pages(self, entry: Entry, generation: int | None = None) -> bool: ...

    def failure_generation(self, entry: Entry) -> int: ...


def _nothing() -> None:
    return None


def errno_for(exc: BaseException) -> int:
    """The errno the kernel gets for `exc`: the one mapping of the project's exceptions to errno.
    `S3fsimgError` subclasses carry theirs (NotFound -> ENOENT, ConfigError -> EINVAL, BackendError and
    IntegrityError -> EIO, ...); an OSError keeps its own; anything else is a bug, reported as EIO."""
    if isinstance(exc, pyfuse3.FUSEError):
        return int(exc.errno)
    if isinstance(exc, S3fsimgError):
        return int(exc.errno)
    if isinstance(exc, OSError) and exc.errno:
        return int(exc.errno)
    return errno.EIO


class Operations(pyfuse3.Operations):
    """Read-only filesystem over an index and a reader (see the module docstring)."""

    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, index: Index, reader: Reader, *, manifest_path: Path | None = None,
                 max_threads: int = 32, uid: int | None = None, gid: int | None = None) -> None:
        super().__init__()
        self.manifest_path = manifest_path
        self.limiter = trio.CapacityLimiter(max_threads)
        self.uid = os.getuid() if uid is None else uid
        self.gid = os.getgid() if gid is None else gid
        self.mtime_ns = index.mtime_ns
        self.started = time.time()
        self._logged: set[tuple[str, str]] = set()
        self._reply_buffer = bytearray(REPLY_BUFFER)
        #: Called right before a request is handed to a thread, before the handler first suspends: a
        #: worker of a multi-process mount passes its turn on there (see workers.py).
        self.before_thread: Callable[[], None] = _nothing
        self.after_fork(index, reader)

    def after_fork(self, index: Index, reader: Reader) -> None:
        """Serve from this process's own index connection and reader: what a mount's worker calls right after
        fork() (nothing of another process's SQLite connections, S3 client or threads is usable)."""
        self.index = index
        self.reader = reader
        reader.on_untrusted_pages = self._drop_pages
        self._manifest_fd: int | None = None
        # The manifest entry of an object inode, from an LRU of recently opened ones, else the index
        # (NotFound is raised, not cached).
        self._object_entry = functools.lru_cache(maxsize=OPEN_ENTRY_CACHE)(index.object_for_inode)

    # -- helpers -------------------------------------------------------------------------------
    def _attrs(self, a: Attr) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = a.inode
        e.generation = 0
        e.entry_timeout = CACHE_TIMEOUT
        e.attr_timeout = CACHE_TIMEOUT
        e.st_mode = (stat.S_IFDIR | 0o555) if a.is_dir else (stat.S_IFREG | 0o444)
        e.st_nlink = a.nlink
        e.st_uid = self.uid
        e.st_gid = self.gid
        e.st_rdev = 0
        e.st_size = a.size
        e.st_blksize = BLOCK_SIZE
        e.st_blocks = (a.size + 511) // 512
        e.st_atime_ns = e.st_mtime_ns = e.st_ctime_ns = self.mtime_ns
        return e

    def _attr(self, inode: int) -> Attr:
        a = self.index.getattr(inode)
        if a is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return a

    def _fail(self, exc: BaseException, key: str) -> pyfuse3.FUSEError:
        """The FUSEError for `exc`; an EIO is logged once per (key, cause) (the reader counts it)."""
        code = errno_for(exc)
        if code == errno.EIO:
            cause = str(exc) or exc.__class__.__name__
            if (key, cause) not in self._logged:
                if len(self._logged) > 10_000:
                    self._logged.clear()
                self._logged.add((key, cause))
                if isinstance(exc, S3fsimgError):
                    log.error("EIO reading %s: %s", key, cause)
                else:
                    log.error("EIO reading %s: unexpected %s", key, cause, exc_info=exc)
        return pyfuse3.FUSEError(code)

    def stats(self) -> dict[str, Any]:
        """Live counters of this mount (every process serving it: see `s3fsimg.counters`)."""
        out: dict[str, Any] = dict(self.reader.counters.snapshot())
        out["uptime_seconds"] = round(time.time() - self.started, 1)
        out["entries"] = self.index.entry_count()
        out["objects"] = self.index.object_count()
        return out

    def _drop_pages(self, sha256: str) -> None:
        """The kernel may hold pages of this object that must not be read back (it failed verification):
        drop them. From a thread of its own: the kernel waits for pages locked by reads in flight, and
        the read that found the failure holds some until its (error) reply has gone out."""
        inode = self.index.inode_for_sha256(sha256)
        if inode is None:
            return

        def invalidate() -> None:
            try:
                pyfuse3.invalidate_inode(inode, attr_only=False)
            except OSError as exc:  # not mounted (any more), or the kernel forgot the inode: nothing cached
                log.debug("invalidating inode %d: %s", inode, exc)

        threading.Thread(target=invalidate, name="s3fsimg-invalidate", daemon=True).start()

    # -- names and attributes ------------------------------------------------------------------
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        inode = self.index.lookup(parent_inode, name)
        if inode is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(self._attr(inode))

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        return self._attrs(self._attr(inode))

    async def forget(self, inode_list: Any) -> None:
        return None  # inodes are stable and cost nothing to keep

    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        self._attr(inode)
        if mode & os.W_OK:
            raise pyfuse3.FUSEError(errno.EROFS)
        return True

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = BLOCK_SIZE
        s.f_frsize = 512
        s.f_blocks = 0
        s.f_bfree = s.f_bavail = 0
        s.f_files = self.index.object_count() + 5
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s

    # -- directories ---------------------------------------------------------------------------
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        # No index query: the kernel only opens inodes it had from lookup/readdir, and every inode that
        # is neither an object nor the manifest is a directory.
        if self.index.is_object(inode) or inode == MANIFEST_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        for name, attr, key in self.index.readdir_attrs(fh, start_id):
            if not pyfuse3.readdir_reply(token, name, self._attrs(attr), key):
                break

    async def releasedir(self, fh: int) -> None:
        return None

    # -- extended attributes -------------------------------------------------------------------
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if inode == ROOT_INODE and name == STATS_XATTR:
            return json.dumps(self.stats(), sort_keys=True).encode()
        if not name.startswith(_XATTR_PREFIX):  # security.selinux, ACLs... (`ls -l` asks): no index query
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        self._attr(inode)
        value = self.index.xattrs(inode).get(name.decode("utf-8", "surrogateescape"))
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        self._attr(inode)
        return [k.encode() for k in self.index.xattrs(inode)]

    # -- files ---------------------------------------------------------------------------------
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        """The file handle is the inode, plus the object's failure generation at open in its high bits
        (`ObjectReader.failure_generation`: an open file whose object failed verification since fails its
        reads): no state is kept per open, so any process serving the mount answers any read. The kernel
        keeps an object's pages across opens (`keep_cache`) only when every byte served of it was
        verified (`ObjectReader.may_keep_pages`); otherwise an open drops them."""
        if flags & _WRITE_FLAGS:
            raise pyfuse3.FUSEError(errno.EISDIR if self._attr(inode).is_dir else errno.EROFS)
        if self.index.is_object(inode):
            # The hot path (every open of an image): one entry lookup, usually from memory.
            try:
                entry = self._object_entry(inode)
                generation = self.reader.failure_generation(entry)
                keep = self.reader.may_keep_pages(entry, generation)
                fh = inode | (generation << _HANDLE_SHIFT)
            except Exception as exc:
                raise self._fail(exc, f"inode {inode}") from None
        elif self._attr(inode).is_dir:
            raise pyfuse3.FUSEError(errno.EISDIR)
        elif inode == MANIFEST_INODE and self.manifest_path is not None:
            keep, fh = True, inode
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        self.reader.counters.add("opens")
        return pyfuse3.FileInfo(fh=fh, keep_cache=keep)

    # pyfuse3 replies from any buffer (PyObject_GetBuffer), so a bytearray filled by preadv goes out
    # without a copy into bytes; its stub says bytes.
    async def read(self, fh: int, off: int, size: int) -> bytes | bytearray | memoryview:  # type: ignore[override]
        """`fh` is the inode and a generation (see `open`). Exactly the bytes asked (up to the end of the
        file), or EIO."""
        inode, opened_at = fh & _INODE_MASK, fh >> _HANDLE_SHIFT
        if inode == MANIFEST_INODE:
            return await self._read_manifest(off, size)
        try:
            entry = self._object_entry(inode)
        except Exception as exc:  # the reader counts the failures of its reads; this one is ours
            self.reader.counters.add("read_errors")
            raise self._fail(exc, f"inode {inode}") from None
        try:
            # Page-cached: no thread, and no new buffer (see REPLY_BUFFER).
            data = self.reader.read_nowait(entry, off, size, opened_at=opened_at, into=self._reply_buffer)
            if data is None:
                self.before_thread()
                data = await trio.to_thread.run_sync(
                    functools.partial(self.reader.read, entry, off, size, opened_at=opened_at), limiter=self.limiter)
        except Exception as exc:
            if not isinstance(exc, S3fsimgError):  # the reader counts its own
                self.reader.counters.add("read_errors")
            raise self._fail(exc, entry.path) from None
        return data

    async def _read_manifest(self, off: int, size: int) -> bytes:
        try:
            if self._manifest_fd is None:
                assert self.manifest_path is not None
                self._manifest_fd = os.open(self.manifest_path, os.O_RDONLY | os.O_CLOEXEC)
            self.before_thread()
            data: bytes = await trio.to_thread.run_sync(os.pread, self._manifest_fd, size, off,
                                                        limiter=self.limiter)
        except Exception as exc:
            self.reader.counters.add("read_errors")
            raise self._fail(exc, str(self.manifest_path)) from None
        self.reader.counters.add_many({"reads": 1, "bytes_read": len(data)})
        return data

    async def release(self, fh: int) -> None:
        return None  # nothing is kept per open (see `open`)

    # `flush` is left to pyfuse3's default (ENOSYS): the kernel then stops sending FLUSH at all, one
    # round trip saved on every close(2) of a read-only file.

    # -- every write operation: EROFS ----------------------------------------------------------
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int, name_new: bytes,
                     flags: int, ctx: pyfuse3.RequestContext) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
                      fh: int | None, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def fsync(self, fh: int, datasync: bool) -> None:
        return None

    def close(self) -> None:
        """Close the manifest's descriptor (at unmount)."""
        if self._manifest_fd is not None:
            os.close(self._manifest_fd)
            self._manifest_fd = None
