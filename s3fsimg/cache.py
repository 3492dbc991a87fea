"""The on-disk cache directory, shared by every process that uses it (mounts, `fetch`, DataLoader workers).

Owns the layout, atomic writes, the LRU ledger, eviction and the cross-process locks. It knows
nothing of S3: `reader.py` decides what to fetch and calls `put_block`/`put_object` here.

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
        ledger.sqlite                  the LRU ledger (WAL mode; schema in `_SCHEMA`)
        boot_id                        the boot in which the cache was last opened (see `_check_boot`)
      index/, manifests/               owned by index_load.py

Invariants (what makes it safe from many processes and after SIGKILL at any instant):
- A file under objects/ or blocks/ is complete: it is written under tmp/, then renamed. A block is
  checked against its CRC on every read; an object was verified before rename. Nothing is fsynced
  on the hot path; after a reboot the objects written last are re-verified once (`_check_boot`).
- The ledger row of a file is written *before* the rename, so a killed process can leave a row
  without a file (harmless: eviction skips it) but never a file the bound does not count. A row
  another process evicted before the rename is written again after it (`_commit`).
- A file's last use is recorded at most every few seconds, in batches (`touch`): the LRU order is
  precise to seconds while a process is busy; an idle process's last uses are written at its next
  use, eviction or close.
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
import fcntl
import hashlib
import logging
import os
import secrets
import shutil
import sqlite3
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from s3fsimg.config import private_dirs
from s3fsimg.errors import BackendError, CacheError

log = logging.getLogger(__name__)

LAYOUT = "v1"
_BLOCK_MAGIC = b"S3B1"
_HEADER = struct.Struct(">4sI")  # magic, crc32 of the data
_TOUCH_INTERVAL = 5.0  # seconds between ledger updates of one file's last use
_TOUCH_BATCH = 256  # pending uses that make touch() write them at once
_TOUCH_DELAY = 1.0  # seconds after which touch() writes the pending uses
_DIRTY_WINDOW = 300.0  # seconds of writes the kernel may not have flushed at a crash (with margin)


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None

_SCHEMA = """
PRAGMA journal_mode=WAL;
CREATE TABLE IF NOT EXISTS files(
    name  TEXT PRIMARY KEY,      -- path relative to v1/ (objects/... or blocks/...)
    bytes INTEGER NOT NULL,      -- size on disk
    atime REAL NOT NULL          -- last use, unix seconds (LRU order)
);
CREATE INDEX IF NOT EXISTS files_by_atime ON files(atime);
CREATE TABLE IF NOT EXISTS totals(
    id    INTEGER PRIMARY KEY CHECK (id = 0),
    bytes INTEGER NOT NULL,      -- sum(files.bytes), kept by the triggers below
    files INTEGER NOT NULL       -- count(files)
);
INSERT OR IGNORE INTO totals VALUES (0, 0, 0);
CREATE TRIGGER IF NOT EXISTS files_ins AFTER INSERT ON files BEGIN
    UPDATE totals SET bytes = bytes + NEW.bytes, files = files + 1;
END;
CREATE TRIGGER IF NOT EXISTS files_del AFTER DELETE ON files BEGIN
    UPDATE totals SET bytes = bytes - OLD.bytes, files = files - 1;
END;
CREATE TRIGGER IF NOT EXISTS files_upd AFTER UPDATE OF bytes ON files BEGIN
    UPDATE totals SET bytes = bytes - OLD.bytes + NEW.bytes;
END;
"""


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
        self.max_bytes = int(max_bytes)
        self.base = self.root / LAYOUT
        self._base_str = str(self.base)
        self.pid = os.getpid()
        self._lock = threading.RLock()
        self._pinned: dict[str, int] = {}
        self._touched: dict[str, float] = {}  # name -> last use this process recorded (see touch)
        self._pending_touches: dict[str, float] = {}  # uses not yet written to the ledger
        self._touches_flushed = time.time()
        self.closed = False
        try:
            # Directories it creates are 0700; an existing cache root keeps its mode (it may be
            # /tmp or a shared volume): v1/ and the other top-level directories are private anyway.
            for sub in ("objects", "blocks", "tmp", "locks"):
                private_dirs(self.base / sub)
            ledger = self.base / "ledger.sqlite"
            # Every user of the cache holds this lock shared while it is open: a broken ledger is
            # reset (`_reset`) only by a process that can take it exclusively, i.e. by no other user.
            self._users_fd = os.open(self.base / "locks" / "ledger", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            fcntl.flock(self._users_fd, fcntl.LOCK_SH)
            try:
                self._open_ledger(ledger)
            except sqlite3.OperationalError:  # locked, read-only, I/O error: not a reason to drop anything
                raise
            except sqlite3.DatabaseError as exc:  # not a database, or corrupt: start the cache again
                self._reset(ledger, exc)
        except (OSError, sqlite3.Error, CacheError) as exc:
            if hasattr(self, "_users_fd"):
                os.close(self._users_fd)
            if isinstance(exc, CacheError):
                raise
            raise CacheError(f"{self.root}: cannot use the cache directory: {exc}") from None
        self._clean_tmp()
        self._check_boot()

    def _open_ledger(self, ledger: Path) -> None:
        # SQLite creates its files with the umask (0644) and gives -wal/-shm the mode of the database:
        # create the database file 0600 ourselves first.
        os.close(os.open(ledger, os.O_RDWR | os.O_CREAT, 0o600))
        os.chmod(ledger, 0o600)
        self._db = sqlite3.connect(ledger, timeout=30.0, isolation_level=None, check_same_thread=False)
        try:
            self._db.execute("PRAGMA busy_timeout=30000")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._init_ledger()
            self._db.execute("SELECT bytes FROM totals").fetchone()
        except BaseException:
            self._db.close()
            raise

    def _ledger_usable(self, ledger: Path) -> bool:
        """Open the ledger as `self._db` and keep it open; False (nothing open) when it is not a database."""
        try:
            self._open_ledger(ledger)
        except sqlite3.OperationalError:
            raise
        except sqlite3.DatabaseError:
            return False
        return True

    def _reset(self, ledger: Path, why: Exception) -> None:
        """A ledger that is not a database (a torn copy, a stray file) counts nothing, so the files it
        counted would be outside the bound: they are dropped with it (it is a cache). Only when no other
        process uses the cache (the users' lock taken exclusively, waiting a few seconds for others
        that are opening it too); a process that finds it reset meanwhile (probed while it holds the
        lock shared, so nobody is resetting) just uses it. Returns with the ledger open as `self._db`
        and the lock held shared."""
        fd = self._users_fd
        fcntl.flock(fd, fcntl.LOCK_UN)
        deadline = time.monotonic() + 5.0
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                pass
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:  # another process holds it exclusively: it is resetting
                pass
            else:
                if self._ledger_usable(ledger):
                    return
                fcntl.flock(fd, fcntl.LOCK_UN)
            if time.monotonic() > deadline:
                raise CacheError(f"{ledger}: the cache's ledger is unusable ({why}) and other processes "
                                 "are using the cache; stop them, then run s3fsimg cache clear") from None
            time.sleep(0.05)
        try:
            if self._ledger_usable(ledger):  # another process reset it while we waited
                return
            log.warning("cache: the ledger %s is unusable (%s); starting the cache again (its files are dropped)",
                        ledger, why)
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(f"{ledger}{suffix}")
            self._empty_trees()
            self._open_ledger(ledger)
        finally:
            fcntl.flock(fd, fcntl.LOCK_SH)

    def _empty_trees(self) -> None:
        """objects/ and blocks/ emptied: each renamed aside (one step, so no reader sees half of it),
        made again (0700), and the old one removed."""
        for sub in ("objects", "blocks"):
            doomed = self.base / "tmp" / f"{self.pid}-empty-{secrets.token_hex(4)}"
            with contextlib.suppress(FileNotFoundError):
                os.rename(self.base / sub, doomed)
            private_dirs(self.base / sub)
            shutil.rmtree(doomed, ignore_errors=True)

    def _init_ledger(self) -> None:
        """WAL mode and the schema. Switching to WAL needs an exclusive lock and may answer SQLITE_BUSY
        at once (without the busy handler) while another process opens the same ledger: so the
        mode is read first (no lock), and a busy switch is retried for a while."""
        deadline = time.monotonic() + 30.0
        while self._db.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
            try:
                self._db.execute("PRAGMA journal_mode=WAL")
            except sqlite3.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        self._db.executescript("BEGIN IMMEDIATE;" + _SCHEMA.replace("PRAGMA journal_mode=WAL;", "") + "COMMIT;")

    # -- lifecycle ---------------------------------------------------------------------------------
    def close(self) -> None:
        """Close the ledger. Writes still running in read-ahead threads then store nothing, quietly."""
        if self.closed:
            return
        self.flush_touches()
        with self._lock:
            self.closed = True
            self._db.close()
            os.close(self._users_fd)  # the users' lock (see __init__)

    def __enter__(self) -> DiskCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction; SQLite's lock serialises it with every other process."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _clean_tmp(self) -> None:
        now = time.time()
        for entry in os.scandir(self.base / "tmp"):
            pid_text = entry.name.split("-", 1)[0]
            try:
                stale = not _pid_alive(int(pid_text)) or now - entry.stat().st_mtime > 24 * 3600
            except (ValueError, OSError):
                stale = True
            if stale:
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)

    def _check_boot(self) -> None:
        """Complete objects are renamed into place without fsync (it cost a fifth of a cold fetch): a
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
        fd = os.open(self.base / "locks" / "boot", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if _read_text(marker) == current:
                return
            if marker.exists():
                self._verify_recent()
            tmp = self.base / "tmp" / f"{self.pid}-boot"
            out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # not the umask's 0644
            try:
                os.write(out, current.encode())
            finally:
                os.close(out)
            os.replace(tmp, marker)
        finally:
            os.close(fd)

    def _verify_recent(self) -> None:
        with self._lock:
            last = self._db.execute("SELECT max(atime) FROM files").fetchone()[0]
            if last is None:
                return
            rows = self._db.execute("SELECT name FROM files WHERE atime >= ? AND name >= 'objects/' AND "
                                    "name < 'objects0'", (last - _DIRTY_WINDOW,)).fetchall()
        dropped = 0
        for (name,) in rows:
            sha = name.rsplit("/", 1)[-1].split(".", 1)[0]
            try:
                hasher = hashlib.sha256()
                with open(self.base / name, "rb") as f:
                    while chunk := f.read(1 << 20):
                        hasher.update(chunk)
                ok = hasher.hexdigest() == sha
            except FileNotFoundError:
                continue
            except OSError:
                ok = False
            if not ok:
                self._drop(name)
                dropped += 1
        log.warning("cache: first use since a reboot: re-verified %d recent objects, dropped %d", len(rows), dropped)

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

    # -- pins: data this process is using right now is not evicted by it -----------------------------
    @contextlib.contextmanager
    def pinned(self, name: str) -> Iterator[None]:
        with self._lock:
            self._pinned[name] = self._pinned.get(name, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                if self._pinned[name] <= 1:
                    del self._pinned[name]
                else:
                    self._pinned[name] -= 1

    # -- complete objects --------------------------------------------------------------------------
    def object_path(self, sha256: str, ext: str) -> Path | None:
        """The path of a complete, verified object, or None. Marks it used."""
        name = self.object_name(sha256, ext)
        path = self.base / name
        if not path.is_file():
            return None
        self.touch(name)
        return path

    def open_object(self, sha256: str, ext: str) -> int | None:
        """A read-only descriptor of the complete object, or None. Marks it used. (The hot path of warm
        reads: one open(2), no stat, string paths.)"""
        name = f"objects/{sha256[0:2]}/{sha256[2:4]}/{sha256}.{ext}"
        try:
            fd = os.open(f"{self._base_str}/{name}", os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        self.touch(name)
        return fd

    def put_object_bytes(self, data: bytes, sha256: str, ext: str) -> Path | None:
        """Store verified bytes as the complete object (temp file, rename); None if the disk cannot take
        it. The object's blocks are dropped first, so the cache never holds an object twice (whole and
        in blocks) against its bound; a crash in between loses only cached data."""
        if self.closed:  # a read-ahead thread finishing after close(): store nothing, quietly
            return None
        name = self.object_name(sha256, ext)
        self.drop_blocks(sha256)
        if not self._write_file(name, data, fsync=False):
            return None
        return self.base / name

    def new_tmp(self) -> tuple[int, Path]:
        """An open, new temp file (0600) in tmp/: (fd, path)."""
        path = self.base / "tmp" / f"{self.pid}-{secrets.token_hex(8)}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        return fd, path

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
        self.touch(name)
        return data

    def has_block(self, sha256: str, block_size: int, index: int) -> bool:
        return (self.base / self.block_name(sha256, block_size, index)).is_file()

    def put_block(self, sha256: str, block_size: int, index: int, data: bytes) -> bool:
        """Store a block atomically; False if it could not be cached (disk full, I/O error)."""
        name = self.block_name(sha256, block_size, index)
        payload = _HEADER.pack(_BLOCK_MAGIC, zlib.crc32(data)) + data
        return self._write_file(name, payload, fsync=False)

    def drop_blocks(self, sha256: str) -> None:
        """Remove every block of an object (all block sizes), files and ledger rows."""
        for bs_dir in (self.base / "blocks").iterdir() if (self.base / "blocks").is_dir() else []:
            directory = bs_dir / sha256[0:2] / sha256
            if not directory.is_dir():
                continue
            prefix = f"blocks/{bs_dir.name}/{sha256[0:2]}/{sha256}/"
            with self._write() as db:
                db.execute("DELETE FROM files WHERE name >= ? AND name < ?", (prefix, prefix + "\xff"))
            shutil.rmtree(directory, ignore_errors=True)

    def drop_object(self, sha256: str, ext: str) -> None:
        self._drop(self.object_name(sha256, ext))
        self.drop_blocks(sha256)

    # -- writing, the ledger and eviction ----------------------------------------------------------
    def _write_file(self, name: str, payload: bytes, *, fsync: bool) -> bool:
        if self.closed:
            return False
        for attempt in (1, 2):
            tmp: Path | None = None
            try:
                fd, tmp = self.new_tmp()
                try:
                    view = memoryview(payload)
                    while view:
                        view = view[os.write(fd, view):]
                    if fsync:
                        os.fsync(fd)
                finally:
                    os.close(fd)
                with self.pinned(name):
                    self._commit(tmp, name, len(payload))
                return True
            except OSError as exc:
                if tmp is not None:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)
                if exc.errno == errno.ENOSPC and attempt == 1:
                    log.warning("cache: disk full in %s; evicting and retrying once", self.root)
                    with contextlib.suppress(sqlite3.Error):
                        self.evict(extra=max(len(payload) * 4, 8 << 20), force_fraction=0.1)
                    continue
                log.warning("cache: cannot store %s (%s); serving it without caching", name, exc.strerror)
                return False
            except sqlite3.Error as exc:  # the ledger's disk is full too: same policy as ENOSPC
                if tmp is not None:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)
                if self.closed:  # a read-ahead thread finishing after close(): nothing to report
                    return False
                log.warning("cache: cannot record %s in the ledger (%s); serving it without caching", name, exc)
                return False
        return False

    def _commit(self, tmp: Path, name: str, size: int) -> None:
        """Record a written temp file in the ledger (evicting to make room), then rename it into place.
        Another process may evict the new row between the two (its unlink then finds no file): the row
        is checked after the rename and written again if it is gone, so no file stays unaccounted for."""
        final = self.base / name
        self._record(name, size)
        private_dirs(final.parent)
        os.replace(tmp, final)
        with self._lock:
            present = self._db.execute("SELECT 1 FROM files WHERE name=?", (name,)).fetchone()
        if present is None:
            self._record(name, size)

    def _record(self, name: str, size: int) -> None:
        now = time.time()
        with self._write() as db:
            db.execute("INSERT INTO files(name, bytes, atime) VALUES (?,?,?) "
                       "ON CONFLICT(name) DO UPDATE SET bytes=excluded.bytes, atime=excluded.atime",
                       (name, size, now))
            total = db.execute("SELECT bytes FROM totals").fetchone()[0]
            if total > self.max_bytes:
                self._evict_locked(db, total - self.max_bytes)
        self._touched[name] = now

    def touch(self, name: str) -> None:
        """Mark a file as used (LRU): at most once per file per `_TOUCH_INTERVAL`, and written to the
        ledger in batches (a transaction each costs ~20 us, a third of a warm read of an image; batched,
        ~2 us): by the use that finds `_TOUCH_BATCH` uses pending or `_TOUCH_DELAY` passed since the
        last write, before this process evicts, and on close. There is no timer: an idle process's
        last uses wait for one of those (other processes meanwhile see its earlier use times)."""
        now = time.time()
        if now - self._touched.get(name, 0.0) < _TOUCH_INTERVAL:
            return
        self._touched[name] = now
        with self._lock:
            self._pending_touches[name] = now
            due = len(self._pending_touches) >= _TOUCH_BATCH or now - self._touches_flushed >= _TOUCH_DELAY
        if due:
            self.flush_touches()

    def flush_touches(self) -> None:
        """Write the pending uses to the ledger, in one transaction."""
        try:
            with self._lock:
                if self._pending_touches and not self.closed:
                    with self._write() as db:
                        self._flush_touches_locked(db)
                self._touches_flushed = time.time()
        except sqlite3.Error as exc:  # the LRU order is only a little less precise
            log.debug("cache: ledger touch failed: %s", exc)

    def _flush_touches_locked(self, db: sqlite3.Connection) -> None:
        pending, self._pending_touches = self._pending_touches, {}
        db.executemany("UPDATE files SET atime=max(atime, ?) WHERE name=?", [(t, n) for n, t in pending.items()])

    def evict(self, extra: int = 0, force_fraction: float = 0.0) -> int:
        """Evict until total + extra <= max_bytes (and at least force_fraction of the total). Returns bytes freed."""
        with self._write() as db:
            total = db.execute("SELECT bytes FROM totals").fetchone()[0]
            need = max(total + extra - self.max_bytes, int(total * force_fraction))
            return self._evict_locked(db, need) if need > 0 else 0

    def _evict_locked(self, db: sqlite3.Connection, need: int) -> int:
        if self._pending_touches:  # this process's recent uses count before anything is chosen
            self._flush_touches_locked(db)
        freed = 0
        skip: set[str] = set()
        while freed < need:
            rows = db.execute("SELECT name, bytes FROM files ORDER BY atime LIMIT ?", (64 + len(skip),)).fetchall()
            rows = [r for r in rows if r[0] not in skip]
            if not rows:
                break
            for name, size in rows:
                if name in self._pinned:
                    skip.add(name)
                    continue
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.base / name)
                db.execute("DELETE FROM files WHERE name=?", (name,))
                freed += size
                if freed >= need:
                    break
        if freed:
            log.debug("cache: evicted %d bytes", freed)
        return freed

    def _drop(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.base / name)
        try:
            with self._write() as db:
                db.execute("DELETE FROM files WHERE name=?", (name,))
        except sqlite3.Error as exc:
            if not self.closed:  # after close(), a late read-ahead thread's drop: nothing to report
                log.warning("cache: ledger update failed: %s", exc)

    # -- cross-process single flight -----------------------------------------------------------------
    @contextlib.contextmanager
    def object_lock(self, sha256: str, deadline: float) -> Iterator[None]:
        """An exclusive lock shared by every process on this cache for one object (striped by sha256)."""
        path = self.base / "locks" / sha256[0:4]
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            delay = 0.002
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise BackendError(f"timed out waiting for another process fetching {sha256}") from None
                    time.sleep(delay)
                    delay = min(delay * 2, 0.05)
            yield
        finally:
            os.close(fd)  # releases the lock

    # -- commands ----------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        with self._lock:
            total, files = self._db.execute("SELECT bytes, files FROM totals").fetchone()
            objects = self._db.execute(
                "SELECT count(*), coalesce(sum(bytes), 0) FROM files WHERE name >= 'objects/' AND name < 'objects0'"
            ).fetchone()
        return {
            "dir": str(self.root),
            "bytes": int(total),
            "max_bytes": self.max_bytes,
            "files": int(files),
            "objects": int(objects[0]),
            "object_bytes": int(objects[1]),
            "blocks": int(files) - int(objects[0]),
            "block_bytes": int(total) - int(objects[1]),
        }

    def clear(self) -> int:
        """Remove every cached object and block. Safe while others use the cache: each file is unlinked
        under the ledger lock (open readers keep their data), and later reads refetch."""
        freed = 0
        with self._write() as db:
            freed = db.execute("SELECT bytes FROM totals").fetchone()[0]
            self._empty_trees()
            db.execute("DELETE FROM files")
        return int(freed)
