"""The on-disk cache directory, shared by every process that uses it (mounts, `fetch`, DataLoader workers).

`DiskCache` is the file store: names, get/put, temp files, locks, the boot check. Its accounting
(the LRU ledger: sizes, uses, eviction, stats, clear) is `ledger.py`'s `Ledger`, which it holds. It
knows nothing of S3: `reader.py` decides what to fetch and calls `put_block`/`put_object_bytes` here.

On-disk layout (every directory it creates 0700, every file 0600, so other users cannot read it)::

    CACHE_DIR/
      v1/
        objects/ab/cd/<sha256>.<ext>   complete objects, verified against their sha256 before they
                                       were renamed into place; what `fetch` hands out as paths
        blocks/<bs>/ab/<sha256>/<n>    block n (bytes [n*bs, (n+1)*bs)) of a partial object, bs = block
                                       size in bytes; file = 8-byte header (b"S3B1" + CRC-32 of the data)
                                       + data, so a torn or zeroed block is never served
        tmp/<pid>-<random>             files being written; renamed into place when complete; those of
                                       dead processes are removed when a cache is opened
        locks/<xxxx>                   up to 65536 lock files (the first four hex digits of a sha256);
                                       an exclusive flock on one makes a whole-object fetch
                                       single-flight across processes (and threads)
        maps/ab/<sha256>               block maps, counted in the ledger: file = 8-byte header (b"S3M1" +
                                       CRC-32 of the map) + the map's bytes as fetched from S3 (see
                                       blockmap.py), so a map damaged on disk is fetched again, not used
        suspect/<sha256>               empty marker: the object failed verification in some process; every
                                       process then serves it only after a whole-object verification
        failures/<sha256>              one byte per failed verification of the object, ever (its size is
                                       the count: `failure_count`); not removed when it is verified again
        gaveup/<sha256>                empty marker: S3 failed a read of the object (after its retries) at
                                       the file's mtime; removed by the next read that succeeds
        served/<bs>/<sha256>           for objects without a block map: 8 bytes per block index (b"SV\0\0" +
                                       big-endian CRC-32) of the bytes served before verification, so
                                       the read that completes the object can tell whether the kernel
                                       may hold other bytes (see reader.py); flock'd while written.
                                       Not counted in the ledger (a few bytes per object); removed when
                                       the object is complete or dropped, and by `clear`
        locks/ledger                   held shared by every process using the cache (see ledger.py)
        ledger.sqlite                  the LRU ledger (WAL mode; owned by ledger.py)
        boot_id                        the boot in which the cache was last opened (see `_check_boot`)
      index/, manifests/               owned by index_load.py

Invariants (what makes it safe from many processes and after SIGKILL at any instant):
- A file under objects/, blocks/ or maps/ is complete: it is written under tmp/, then renamed. A block
  or a map is checked against its CRC on every read; an object was verified before rename, and carries
  a fixed mtime (`STAMP_NS`): a complete object whose mtime differs was written to since, and is
  re-hashed before it is served (dropped when it no longer matches its name). `verify` (the command
  `s3fsimg cache verify`) re-hashes everything. Nothing is fsynced on the hot path; after a reboot
  the objects written last are re-verified once (`_check_boot`).
- The ledger row of a file is written *before* the rename, so a killed process can leave a row
  without a file (harmless: eviction skips it) but never a file the bound does not count. A row
  another process evicted before the rename is written again after it (`_write_file`).
- A file's last use is recorded at most every few seconds, in batches (`Ledger.touch`): the LRU
  order is precise to seconds while a process is busy; an idle process's last uses are written at
  its next use, eviction or close.
- Eviction (least recently used first) runs under SQLite's write lock (`BEGIN IMMEDIATE`), so
  processes evicting at once never double-count; it unlinks files, and a reader that already has a
  file open keeps reading it (Linux keeps unlinked open files), so data in use is never pulled
  from under a reader. Files this process is writing or reading right now are pinned in memory.
- Total size stays within `max_bytes` plus what is in flight: at most a few blocks per thread, and
  an object being completed per process (its row may evict another process's newest, still being
  renamed, which then records it again: both stay until the next eviction).
- A full disk (ENOSPC) evicts and retries once, then gives up caching that data (the reader
  serves it from memory): never wrong bytes, never a crash.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import secrets
import shutil
import sqlite3
import struct
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from s3fsimg.blockmap import BlockMap
from s3fsimg.config import private_dirs
from s3fsimg.errors import BackendError, CacheError, IntegrityError
from s3fsimg.files import atomic_write, flock, locked, open_lock_file
from s3fsimg.ledger import Ledger

log = logging.getLogger(__name__)

LAYOUT = "v1"
_BLOCK_MAGIC = b"S3B1"
_HEADER = struct.Struct(">4sI")  # magic, crc32 of the data
_DIRTY_WINDOW = 300.0  # seconds of writes the kernel may not have flushed at a crash (with margin)
_COUNTED_TREES = ("objects", "blocks", "maps")  # the trees of files the ledger counts
#: Small per-object records, not counted, emptied with the rest
_MARKER_TREES = ("suspect", "served", "failures", "gaveup")
#: The mtime of every complete object (2001-09-09T01:46:40Z): any write changes it. Whole (even)
#: seconds, so file systems with coarse timestamps (1 s on ext4 with small inodes, 2 s on FAT) keep
#: it exactly; with nanoseconds they would round it and every open would re-hash the object.
STAMP_NS = 1_000_000_000 * 1_000_000_000
_MAP_MAGIC = b"S3M1"  # maps/ files: this + CRC-32 of the map (`_HEADER`), then the map
_SERVED = struct.Struct(">2s2xI")  # b"SV", pad, crc32 of the bytes served


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _sha256_of(fd: int) -> str:
    """The sha256 (hex) of an open file, read from its current offset to its end."""
    hasher = hashlib.sha256()
    while chunk := os.read(fd, 1 << 20):
        hasher.update(chunk)
    return hasher.hexdigest()


_HEX64 = frozenset("0123456789abcdef")


def stamp_verified(fd: int) -> None:
    """Mark an open complete object as verified: its mtime becomes STAMP_NS (see
    `unchanged_since_verified`)."""
    os.utime(fd, ns=(time.time_ns(), STAMP_NS))


def unchanged_since_verified(fd: int) -> bool:
    """Whether an open complete object still has the mtime it was stamped with when it was verified (one
    fstat): any write to it since (damage on disk, a stray editor) changes it. False when it cannot tell."""
    try:
        return os.fstat(fd).st_mtime_ns == STAMP_NS
    except OSError:
        return False


def _is_sha256(name: str) -> bool:
    return len(name) == 64 and set(name) <= _HEX64


@dataclass
class VerifyReport:
    """What `DiskCache.verify` checked (files it could read) and removed (files that failed)."""

    objects: int = 0
    blocks: int = 0
    maps: int = 0
    bad_objects: int = 0
    bad_blocks: int = 0
    bad_maps: int = 0

    @property
    def removed(self) -> int:
        return self.bad_objects + self.bad_blocks + self.bad_maps

    def summary(self, where: str) -> str:
        """One line for `s3fsimg cache verify`."""
        checked = f"checked {self.objects} complete objects, {self.blocks} blocks, {self.maps} block maps"
        if not self.removed:
            return f"cache {where}: {checked}; all intact"
        return (f"cache {where}: {checked}; removed {self.removed} damaged: {self.bad_objects} objects, "
                f"{self.bad_blocks} blocks, {self.bad_maps} block maps")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class DiskCache:
    """The cache directory of one process. Thread-safe; build a new one after fork()."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = Path(root)
        self.base = self.root / LAYOUT
        self._base_str = str(self.base)
        self.pid = os.getpid()
        try:
            # Directories it creates are 0700; an existing cache root keeps its mode (it may be
            # /tmp or a shared volume): v1/ and the other top-level directories are private anyway.
            for sub in (*_COUNTED_TREES, *_MARKER_TREES, "tmp", "locks"):
                private_dirs(self.base / sub)
            self.ledger = Ledger(self.base, max_bytes, drop_all_files=self._empty_trees)
        except (OSError, sqlite3.Error) as exc:
            raise CacheError(f"{self.root}: cannot use the cache directory: {exc}") from None
        self._clean_tmp()
        self._check_boot()

    @property
    def max_bytes(self) -> int:
        return self.ledger.max_bytes

    @property
    def closed(self) -> bool:
        return self.ledger.closed

    def _empty_trees(self) -> None:
        """The counted trees and the integrity markers (suspect, served, failures, gave-up) emptied: each
        renamed aside (one step, so no reader sees half of it), made again (0700), and the old one removed.
        With failures/ gone every object's failure generation is 0 again, so a file opened before with
        another generation fails its next reads (as after a failure: a new open reads on)."""
        for sub in (*_COUNTED_TREES, *_MARKER_TREES):
            doomed = self.base / "tmp" / f"{self.pid}-empty-{secrets.token_hex(4)}"
            with contextlib.suppress(FileNotFoundError):
                os.rename(self.base / sub, doomed)
            private_dirs(self.base / sub)
            shutil.rmtree(doomed, ignore_errors=True)

    # -- lifecycle ---------------------------------------------------------------------------------
    def close(self) -> None:
        """Close the ledger. Writes still running in read-ahead threads then store nothing, quietly."""
        self.ledger.close()

    def __enter__(self) -> DiskCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _clean_tmp(self) -> None:
        now = time.time()
        for entry in os.scandir(self.base / "tmp"):
            pid_text = entry.name.split("-", 1)[0]
            try:
                # ctime, not mtime: a complete object's temp file has its mtime set to 2001 (STAMP_NS)
                stale = not _pid_alive(int(pid_text)) or now - entry.stat().st_ctime > 24 * 3600
            except (ValueError, OSError):
                stale = True
            if stale:
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)

    def _check_boot(self) -> None:
        """Complete objects are renamed into place without fsync (it slowed every cold fetch markedly): a
        process kill cannot tear them, but a power loss or kernel crash can leave the last seconds'
        writes empty or partial. So the first process to use the cache after a reboot re-hashes every
        object the ledger shows used in the last `_DIRTY_WINDOW` seconds before it was last used, and
        drops those that do not match their name. Blocks carry their own CRC and need no such pass."""
        try:
            current = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        except OSError:
            return
        marker = self.base / "boot_id"
        if _read_text(marker) == current:
            return
        with locked(self.base / "locks" / "boot"):
            if _read_text(marker) == current:
                return
            if marker.exists():
                self._verify_recent()
            with atomic_write(marker, tmp=self._tmp_name()) as pending:
                pending.write(current.encode())

    def _verify_recent(self) -> None:
        names = self.ledger.recently_used("objects/", _DIRTY_WINDOW)
        dropped = 0
        for name in names:
            sha = name.rsplit("/", 1)[-1].split(".", 1)[0]
            if self._verify_object(name, sha, lambda n: None) is False:
                self._drop(name)
                dropped += 1
        log.warning("cache: first use since a reboot: re-verified %d recent objects, dropped %d", len(names), dropped)

    # -- names -------------------------------------------------------------------------------------
    @staticmethod
    def object_name(sha256: str, ext: str) -> str:
        return f"objects/{sha256[0:2]}/{sha256[2:4]}/{sha256}.{ext}"

    @staticmethod
    def block_dir_name(sha256: str, block_size: int) -> str:
        return f"blocks/{block_size}/{sha256[0:2]}/{sha256}"

    def block_name(self, sha256: str, block_size: int, index: int) -> str:
        return f"{self.block_dir_name(sha256, block_size)}/{index}"

    def path(self, name: str) -> Path:
        return self.base / name

    # -- complete objects --------------------------------------------------------------------------
    def object_path(self, sha256: str, ext: str) -> Path | None:
        """The path of a complete, verified object, or None. Marks it used."""
        name = self.object_name(sha256, ext)
        path = self.base / name
        fd = self._open_checked(name, sha256)
        if fd is None:
            return None
        os.close(fd)
        self.ledger.touch(name)
        return path

    def open_object(self, sha256: str, ext: str) -> int | None:
        """A read-only descriptor of the complete object, or None. Marks it used. (The hot path of warm
        reads: one open(2) and one fstat(2) for the stamp, string paths.)"""
        name = f"objects/{sha256[0:2]}/{sha256[2:4]}/{sha256}.{ext}"
        fd = self._open_checked(name, sha256)
        if fd is not None:
            self.ledger.touch(name)
        return fd

    def has_object(self, sha256: str, ext: str) -> bool:
        """Whether the complete object is in the cache (one stat; not marked used)."""
        return os.path.isfile(f"{self._base_str}/{self.object_name(sha256, ext)}")

    def _open_checked(self, name: str, sha256: str) -> int | None:
        """A descriptor of the complete object `name`, or None when absent. When its mtime is not the
        stamp it was written with, it was written to since: re-hashed, dropped when it no longer
        matches (then None: a miss), else stamped again."""
        try:
            fd = os.open(f"{self._base_str}/{name}", os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        if unchanged_since_verified(fd):
            return fd
        try:
            intact = _sha256_of(fd) == sha256
            if intact:
                os.lseek(fd, 0, os.SEEK_SET)
                with contextlib.suppress(OSError):
                    stamp_verified(fd)
                return fd
        except OSError:  # unreadable: a miss
            intact = True  # (nothing known against it: left in place)
        os.close(fd)
        if not intact:
            log.warning("cache: %s was modified on disk and no longer matches its hash; dropping it", name)
            self._drop(name)
        return None

    def put_object_bytes(self, data: bytes, sha256: str, ext: str) -> Path | None:
        """Store verified bytes as the complete object (temp file, rename); None if the disk cannot take
        it. The object's blocks are dropped first, so the cache never holds an object twice (whole and
        in blocks) against its bound; a crash in between loses only cached data."""
        if self.closed:  # a read-ahead thread finishing after close(): store nothing, quietly
            return None
        name = self.object_name(sha256, ext)
        self.drop_blocks(sha256)
        if not self._write_file(name, data, fsync=False, stamp=True):
            return None
        return self.base / name

    def _tmp_name(self) -> Path:
        """A new name in tmp/, starting with this process's pid (see `_clean_tmp`)."""
        return self.base / "tmp" / f"{self.pid}-{secrets.token_hex(8)}"

    # -- blocks ------------------------------------------------------------------------------------
    def get_block(self, sha256: str, block_size: int, index: int, length: int) -> bytes | None:
        """Block `index` if cached and intact (CRC and length), else None. Read errors are misses."""
        name = self.block_name(sha256, block_size, index)
        try:
            with open(self.base / name, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("cache: cannot read %s (%s); reading from S3", name, exc.strerror)
            return None
        if len(raw) != _HEADER.size + length:
            log.warning("cache: block %s has the wrong length; dropping it", name)
            self._drop(name)
            return None
        magic, crc = _HEADER.unpack_from(raw)
        data = raw[_HEADER.size:]
        if magic != _BLOCK_MAGIC or zlib.crc32(data) != crc:
            log.warning("cache: block %s fails its checksum; dropping it", name)
            self._drop(name)
            return None
        self.ledger.touch(name)
        return data

    def has_block(self, sha256: str, block_size: int, index: int) -> bool:
        return (self.base / self.block_name(sha256, block_size, index)).is_file()

    def put_block(self, sha256: str, block_size: int, index: int, data: bytes) -> bool:
        """Store a block atomically; False if it could not be cached (disk full, I/O error)."""
        name = self.block_name(sha256, block_size, index)
        payload = _HEADER.pack(_BLOCK_MAGIC, zlib.crc32(data)) + data
        return self._write_file(name, payload, fsync=False)

    def drop_blocks(self, sha256: str) -> None:
        """Remove every block of an object (all block sizes), files and ledger rows. A ledger that cannot be
        written (its disk is full) keeps the rows: a row without a file is harmless (eviction skips it)."""
        for bs_dir in (self.base / "blocks").iterdir() if (self.base / "blocks").is_dir() else []:
            directory = bs_dir / sha256[0:2] / sha256
            if not directory.is_dir():
                continue
            try:
                self.ledger.forget_under(f"blocks/{bs_dir.name}/{sha256[0:2]}/{sha256}/")
            except sqlite3.Error as exc:
                if not self.closed:
                    log.warning("cache: ledger update failed: %s", exc)
            shutil.rmtree(directory, ignore_errors=True)

    def drop_object(self, sha256: str, ext: str) -> None:
        self._drop(self.object_name(sha256, ext))
        self.drop_blocks(sha256)

    # -- writing -----------------------------------------------------------------------------------
    def _write_file(self, name: str, payload: bytes, *, fsync: bool, stamp: bool = False) -> bool:
        """Write `payload` as the file `name`: a temp file in tmp/, recorded in the ledger (evicting to
        make room), then renamed into place. Another process may evict the new row between the record
        and the rename (its unlink then finds no file): the row is checked after the rename and written
        again if it is gone, so no file stays unaccounted for. False (logged) when it cannot be stored."""
        if self.closed:
            return False
        final = self.base / name
        for attempt in (1, 2):
            try:
                with self.ledger.pinned(name):
                    with atomic_write(final, tmp=self._tmp_name(), fsync=fsync) as pending:
                        pending.write(payload)
                        if stamp:
                            stamp_verified(pending.fd)
                        self.ledger.record(name, len(payload))
                        private_dirs(final.parent)
                    if not self.ledger.counts(name):
                        self.ledger.record(name, len(payload))
                return True
            except OSError as exc:
                if exc.errno == errno.ENOSPC and attempt == 1:
                    log.warning("cache: disk full in %s; evicting and retrying once", self.root)
                    with contextlib.suppress(sqlite3.Error):
                        self.ledger.evict(extra=max(len(payload) * 4, 8 << 20), force_fraction=0.1)
                    continue
                log.warning("cache: cannot store %s (%s); serving it without caching", name, exc.strerror)
                return False
            except sqlite3.Error as exc:  # the ledger's disk is full too: same policy as ENOSPC
                if self.closed:  # a read-ahead thread finishing after close(): nothing to report
                    return False
                log.warning("cache: cannot record %s in the ledger (%s); serving it without caching", name, exc)
                return False
        return False

    def _drop(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.base / name)
        try:
            self.ledger.forget(name)
        except sqlite3.Error as exc:
            if not self.closed:  # after close(), a late read-ahead thread's drop: nothing to report
                log.warning("cache: ledger update failed: %s", exc)

    # -- block maps ----------------------------------------------------------------------------------
    @staticmethod
    def blockmap_name(sha256: str) -> str:
        return f"maps/{sha256[0:2]}/{sha256}"

    def get_blockmap(self, sha256: str) -> bytes | None:
        """The object's block map as fetched from S3 (raw bytes), or None (also when its file fails its
        CRC: then it is dropped). Marks it used."""
        name = self.blockmap_name(sha256)
        try:
            with open(self.base / name, "rb") as f:
                stored = f.read()
        except OSError:
            return None
        raw = self._unwrap_map(stored)
        if raw is None:
            log.warning("cache: block map %s fails its checksum; dropping it", name)
            self._drop(name)
            return None
        self.ledger.touch(name)
        return raw

    @staticmethod
    def _unwrap_map(stored: bytes) -> bytes | None:
        """The map bytes of a maps/ file, or None when its header or CRC is wrong."""
        if len(stored) < _HEADER.size:
            return None
        magic, crc = _HEADER.unpack_from(stored)
        raw = stored[_HEADER.size:]
        return raw if magic == _MAP_MAGIC and zlib.crc32(raw) == crc else None

    def put_blockmap(self, sha256: str, raw: bytes) -> bool:
        """Keep the object's block map (atomic, counted in the ledger); False if it could not be stored."""
        payload = _HEADER.pack(_MAP_MAGIC, zlib.crc32(raw)) + raw
        return self._write_file(self.blockmap_name(sha256), payload, fsync=False)

    def drop_blockmap(self, sha256: str) -> None:
        self._drop(self.blockmap_name(sha256))

    # -- integrity records shared by every process (see the layout) -----------------------------------
    def mark_suspect(self, sha256: str) -> None:
        """The object failed verification: mark it suspect and count the failure (`failure_count`)."""
        with contextlib.suppress(OSError):
            os.close(os.open(f"{self._base_str}/suspect/{sha256}", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
        with contextlib.suppress(OSError):
            fd = os.open(f"{self._base_str}/failures/{sha256}", os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
                         0o600)
            try:
                os.write(fd, b"x")
            finally:
                os.close(fd)

    def mark_gave_up(self, sha256: str) -> None:
        """S3 failed a read of the object just now (see reader.py `_get`): every process sees when."""
        path = f"{self._base_str}/gaveup/{sha256}"
        with contextlib.suppress(OSError):
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
            os.utime(path)

    def gave_up_at(self, sha256: str) -> float | None:
        """When S3 last failed a read of the object (unix time), or None. One stat."""
        try:
            return os.stat(f"{self._base_str}/gaveup/{sha256}").st_mtime
        except OSError:
            return None

    def clear_gave_up(self, sha256: str) -> None:
        with contextlib.suppress(OSError):
            os.unlink(f"{self._base_str}/gaveup/{sha256}")

    def failure_count(self, sha256: str) -> int:
        """How many times the object failed verification in any process (kept when it is no longer
        suspect): a reader that opened it before the last failure may have been served bytes that
        failed (see reader.py). One stat."""
        try:
            return os.stat(f"{self._base_str}/failures/{sha256}").st_size
        except OSError:
            return 0

    def is_suspect(self, sha256: str) -> bool:
        return os.path.exists(f"{self._base_str}/suspect/{sha256}")

    def clear_suspect(self, sha256: str) -> None:
        with contextlib.suppress(OSError):
            os.unlink(f"{self._base_str}/suspect/{sha256}")

    def _served_path(self, sha256: str, block_size: int) -> str:
        return f"{self._base_str}/served/{block_size}/{sha256}"

    def record_served(self, sha256: str, block_size: int, index: int, crc32: int) -> bool:
        """Record that block `index` was served with bytes of CRC `crc32`. False when other bytes were
        recorded for it before (the kernel may hold pages of both). An unusable record is not a reason
        to fail a read: it then records nothing and answers True."""
        path = self._served_path(sha256, block_size)
        try:
            try:
                fd = open_lock_file(path)
            except FileNotFoundError:
                private_dirs(Path(path).parent)
                fd = open_lock_file(path)
            try:
                flock(fd)
                old = os.pread(fd, _SERVED.size, index * _SERVED.size)
                if len(old) == _SERVED.size:
                    magic, crc = _SERVED.unpack(old)
                    if magic == b"SV":
                        return bool(crc == crc32)
                os.pwrite(fd, _SERVED.pack(b"SV", crc32), index * _SERVED.size)
                return True
            finally:
                os.close(fd)  # releases the lock
        except OSError as exc:
            log.debug("cache: cannot record a served block of %s: %s", sha256, exc)
            return True

    def served_crcs(self, sha256: str, block_size: int) -> dict[int, int]:
        """{block index: CRC} of the blocks recorded as served (see `record_served`)."""
        try:
            with open(self._served_path(sha256, block_size), "rb") as f:
                raw = f.read()
        except OSError:
            return {}
        out: dict[int, int] = {}
        for i in range(len(raw) // _SERVED.size):
            magic, crc = _SERVED.unpack_from(raw, i * _SERVED.size)
            if magic == b"SV":
                out[i] = crc
        return out

    def forget_served(self, sha256: str) -> None:
        """Drop the records of served blocks of an object (every block size)."""
        served = self.base / "served"
        with contextlib.suppress(OSError):
            for bs_dir in os.scandir(served):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(f"{bs_dir.path}/{sha256}")

    # -- cross-process single flight -----------------------------------------------------------------
    @contextlib.contextmanager
    def object_lock(self, sha256: str, deadline: float) -> Iterator[None]:
        """An exclusive lock shared by every process on this cache for one object (striped by sha256)."""
        try:
            with locked(self.base / "locks" / sha256[0:4], deadline=deadline):
                yield
        except TimeoutError:
            raise BackendError(f"timed out waiting for another process fetching {sha256}") from None

    # -- verification of everything (`s3fsimg cache verify`) ------------------------------------------
    def verify(self, on_bytes: Callable[[int], object] | None = None) -> VerifyReport:
        """Re-hash every complete object against its name, check every block against its CRC (and,
        when its object's block map is cached with the same block size, against the map's SHA-256 and
        the block's length) and every block map against its CRC and format; remove (files and ledger
        rows) what fails. Safe while others use the cache: a file evicted meanwhile is skipped. Files
        whose names are not of the layout are left alone. `on_bytes(n)` is told of each file read."""
        report = VerifyReport()
        tell = on_bytes or (lambda n: None)
        for name in self._files_under("maps", depth=2):
            sha = name.rsplit("/", 1)[1]
            if not _is_sha256(sha):
                continue
            stored = self._read_for_verify(name)
            if stored is None:
                continue
            tell(len(stored))
            report.maps += 1
            if self._parse_map(sha, stored) is None:
                log.info("cache verify: %s is not a valid block map; removing it", name)
                self._drop(name)
                report.bad_maps += 1
        for name in self._files_under("objects", depth=3):
            sha, _, ext = name.rsplit("/", 1)[1].partition(".")
            if not (_is_sha256(sha) and ext):
                continue
            intact = self._verify_object(name, sha, tell)
            if intact is None:
                continue
            report.objects += 1
            if not intact:
                log.info("cache verify: %s does not hash to its name; removing it", name)
                self._drop(name)
                report.bad_objects += 1
        blockmap: BlockMap | None = None
        for name in self._files_under("blocks", depth=4):
            _, bs_text, _, sha, index_text = name.split("/")
            if not (bs_text.isdigit() and index_text.isdigit() and _is_sha256(sha)):
                continue
            raw = self._read_for_verify(name)
            if raw is None:
                continue
            tell(len(raw))
            report.blocks += 1
            if blockmap is None or blockmap.sha256 != sha:
                blockmap = self._cached_map(sha)
            if not self._block_intact(raw, int(bs_text), int(index_text), blockmap):
                log.info("cache verify: block %s is damaged; removing it", name)
                self._drop(name)
                report.bad_blocks += 1
        return report

    def _files_under(self, tree: str, depth: int) -> Iterator[str]:
        """Names (relative to v1/) of the files `depth` levels below `tree`, in sorted order."""
        def walk(rel: str, level: int) -> Iterator[str]:
            try:
                entries = sorted(os.scandir(f"{self._base_str}/{rel}"), key=lambda e: e.name)
            except OSError:  # gone meanwhile (an object's blocks dropped), or not a directory
                return
            for entry in entries:
                if level == depth:
                    if entry.is_file(follow_symlinks=False):
                        yield f"{rel}/{entry.name}"
                elif entry.is_dir(follow_symlinks=False):
                    yield from walk(f"{rel}/{entry.name}", level + 1)

        yield from walk(tree, 1)

    def _read_for_verify(self, name: str) -> bytes | None:
        """A file's bytes for `verify`: None when it is gone (evicted meanwhile), b"" when it cannot be
        read (so it fails its check and is removed)."""
        try:
            return (self.base / name).read_bytes()
        except FileNotFoundError:
            return None
        except OSError:
            return b""

    def _verify_object(self, name: str, sha256: str, tell: Callable[[int], object]) -> bool | None:
        """Whether a complete object hashes to its name (re-stamped when it does and its stamp was
        lost); None when it is gone."""
        try:
            fd = os.open(f"{self._base_str}/{name}", os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError:
            return False
        try:
            st = os.fstat(fd)
            tell(st.st_size)
            intact = _sha256_of(fd) == sha256
            if intact and st.st_mtime_ns != STAMP_NS:
                with contextlib.suppress(OSError):
                    stamp_verified(fd)
            return intact
        except OSError:  # an I/O error reading it: not servable
            return False
        finally:
            os.close(fd)

    def _parse_map(self, sha256: str, stored: bytes) -> BlockMap | None:
        """The block map of a maps/ file, or None when its CRC, format or object do not hold."""
        raw = self._unwrap_map(stored)
        if raw is None:
            return None
        try:
            size = json.loads(raw).get("bytes")
            if type(size) is not int:
                return None
            return BlockMap.from_bytes(raw, sha256=sha256, size=size)
        except (ValueError, AttributeError, RecursionError, IntegrityError):
            return None

    def _cached_map(self, sha256: str) -> BlockMap | None:
        try:
            stored = (self.base / self.blockmap_name(sha256)).read_bytes()
        except OSError:
            return None
        return self._parse_map(sha256, stored)

    @staticmethod
    def _block_intact(raw: bytes, block_size: int, index: int, blockmap: BlockMap | None) -> bool:
        """A block file's header and CRC hold, its length fits the block size, and, with a map of this
        block size, it is exactly block `index` of the map."""
        if len(raw) < _HEADER.size:
            return False
        magic, crc = _HEADER.unpack_from(raw)
        data = memoryview(raw)[_HEADER.size:]
        if magic != _BLOCK_MAGIC or zlib.crc32(data) != crc or not 0 < len(data) <= block_size:
            return False
        if blockmap is not None and blockmap.block_size == block_size:
            return blockmap.check_block(index, data)
        return True

    # -- commands ----------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Sizes and counts from the ledger: everything, complete objects, blocks, block maps."""
        total, files = self.ledger.totals()
        object_bytes, objects = self.ledger.totals_under("objects/")
        map_bytes, maps = self.ledger.totals_under("maps/")
        return {
            "dir": str(self.root),
            "bytes": total,
            "max_bytes": self.max_bytes,
            "files": files,
            "objects": objects,
            "object_bytes": object_bytes,
            "blocks": files - objects - maps,
            "block_bytes": total - object_bytes - map_bytes,
            "maps": maps,
            "map_bytes": map_bytes,
        }

    def clear(self) -> int:
        """Remove every cached object, block and block map, and every suspect marker and served record.
        Safe while others use the cache: it happens under the ledger's write lock (open readers keep
        their data), and later reads refetch. Returns the bytes the ledger counted."""
        return self.ledger.clear()
