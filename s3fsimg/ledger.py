"""The cache's LRU ledger: one SQLite file that counts every counted file of the cache directory.

Owns the accounting of `cache.py`'s file store: which files exist and how large they are (written
before a file is renamed into place), when each was last used (batched `touch`), eviction to keep
the total within `max_bytes`, the figures of `cache stats`, `clear`'s accounting, and starting the
ledger again when it is not a database. It knows file names only as paths relative to the
layout directory (`objects/...`, `blocks/...`, `maps/...`): the file store decides what they are.

On disk, in the layout directory (`CACHE_DIR/v1/`)::

    ledger.sqlite (+ -wal, -shm)   the ledger, WAL mode, 0600; schema in `_SCHEMA`
    locks/ledger                   every process using the cache holds an flock on it shared while
                                   open; a broken ledger is reset only under it exclusively

Invariants (with the file store's, in cache.py's docstring):
- Every change is one `BEGIN IMMEDIATE` transaction, so processes writing at once are serialised by
  SQLite's lock and the totals (kept by triggers) never double-count.
- A file's last use is recorded at most every `_TOUCH_INTERVAL` seconds per process, and written in
  batches (`touch`): the LRU order is precise to seconds while a process is busy; an idle process's
  last uses are written at its next use, eviction or close.
- Eviction (least recently used first, this process's pending uses counted first) unlinks files and
  deletes their rows in one transaction; a file this process has pinned (`pinned`: being written right
  now) is skipped. A reader that already has an evicted file open keeps reading it.
- A ledger that is not a database counts nothing, so the files it counted would be outside the
  bound: it is reset together with every counted file (`drop_all_files`), and only when no other
  process has the cache open (its connection would go on counting into the unlinked file).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from s3fsimg.errors import CacheError
from s3fsimg.files import flock, open_lock_file

log = logging.getLogger(__name__)

_TOUCH_INTERVAL = 5.0  # seconds between ledger updates of one file's last use
_TOUCH_BATCH = 256  # pending uses that make touch() write them at once
_TOUCH_DELAY = 1.0  # seconds after which touch() writes the pending uses
#: Files used this recently are evicted only when nothing older is left (a path just handed out by
#: `fetch` is usually opened at once). Above _TOUCH_INTERVAL + _TOUCH_DELAY, so a file in use stays in it.
EVICT_GRACE = 10.0
_OPEN_BUSY_TIMEOUT = 30.0  # seconds to retry opening the ledger while other processes open it too


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    """SQLITE_BUSY or SQLITE_LOCKED (Python 3.11 names the code; 3.10 only says it)."""
    code = getattr(exc, "sqlite_errorcode", None)
    return (code & 0xFF) in (5, 6) if isinstance(code, int) else "locked" in str(exc) or "busy" in str(exc)
_RESET_WAIT = 5.0  # seconds a reset waits for other processes that are opening the cache too

#: The ledger's tables, applied in one transaction on every open (all IF NOT EXISTS). The journal mode
#: is not part of it: it cannot change inside a transaction (see `_open`).
_SCHEMA = """
CREATE TABLE IF NOT EXISTS files(
    name  TEXT PRIMARY KEY,      -- path relative to v1/ (objects/..., blocks/... or maps/...)
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


def _under(prefix: str) -> tuple[str, str]:
    """The range of names starting with `prefix` (which ends in '/'), for a primary-key range scan."""
    return prefix, prefix[:-1] + chr(ord(prefix[-1]) + 1)


class Ledger:
    """The ledger of one cache directory in one process. Thread-safe; build a new one after fork().

    `base` is the layout directory (names are relative to it); `drop_all_files` empties every tree of
    counted files (called by a reset and by `clear`, with the ledger's write lock held by `clear`)."""

    def __init__(self, base: Path, max_bytes: int, *, drop_all_files: Callable[[], None]) -> None:
        self.base = Path(base)
        self.path = self.base / "ledger.sqlite"
        self.max_bytes = int(max_bytes)
        self.closed = False
        self._drop_all_files = drop_all_files
        self._lock = threading.RLock()
        self._pinned: dict[str, int] = {}
        self._touched: dict[str, float] = {}  # name -> last use this process recorded (see touch)
        self._pending_touches: dict[str, float] = {}  # uses not yet written to the ledger
        self._touches_flushed = time.time()
        # Every user of the cache holds this lock shared while it is open: a broken ledger is reset
        # (`_reset`) only by a process that can take it exclusively, i.e. by no other user.
        self._users_fd = open_lock_file(self.base / "locks" / "ledger")
        try:
            flock(self._users_fd, shared=True)
            try:
                self._open()
            except sqlite3.OperationalError:  # locked, read-only, I/O error: not a reason to drop anything
                raise
            except sqlite3.DatabaseError as exc:  # not a database, or corrupt: start the cache again
                self._reset(exc)
        except BaseException:
            os.close(self._users_fd)
            raise

    # -- opening, and the reset of a broken ledger ---------------------------------------------------
    def _open(self) -> None:
        """Open the ledger as `self._db`: WAL mode, the schema; closed again on any error."""
        # SQLite creates its files with the umask (0644) and gives -wal/-shm the mode of the database:
        # create the database file 0600 ourselves first.
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
        os.chmod(self.path, 0o600)
        # Processes opening a new ledger together (a mount's workers on a fresh cache) can be answered
        # "database is locked" at once, without the busy handler: by the switch to WAL mode, which needs
        # an exclusive lock, and by the reads around another's switch (a multi-worker mount failed to
        # start 1 run in 5 of the quick warm bench). The whole opening is retried while it is busy.
        deadline = time.monotonic() + _OPEN_BUSY_TIMEOUT
        while True:
            self._db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
            try:
                self._db.execute("PRAGMA busy_timeout=30000")
                self._db.execute("PRAGMA synchronous=NORMAL")
                if self._db.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                    self._db.execute("PRAGMA journal_mode=WAL")
                self._db.executescript(f"BEGIN IMMEDIATE;{_SCHEMA}COMMIT;")
                self._db.execute("SELECT bytes FROM totals").fetchone()
                return
            except sqlite3.OperationalError as exc:
                self._db.close()
                if not _is_busy(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
            except BaseException:
                self._db.close()
                raise

    def _usable(self) -> bool:
        """Open the ledger as `self._db` and keep it open; False (nothing open) when it is not a database."""
        try:
            self._open()
        except sqlite3.OperationalError:
            raise
        except sqlite3.DatabaseError:
            return False
        return True

    def _reset(self, why: Exception) -> None:
        """A ledger that is not a database (a torn copy, a stray file) counts nothing, so the files it
        counted would be outside the bound: they are dropped with it (it is a cache). Only when no other
        process uses the cache (the users' lock taken exclusively, waiting a few seconds for others
        that are opening it too); a process that finds it reset meanwhile (probed while it holds the
        lock shared, so nobody is resetting) just uses it. Returns with the ledger open as `self._db`
        and the lock held shared."""
        fd = self._users_fd
        flock(fd, unlock=True)
        deadline = time.monotonic() + _RESET_WAIT
        while True:
            if flock(fd, wait=False):
                break
            if flock(fd, shared=True, wait=False):  # else another process holds it exclusively: resetting
                if self._usable():
                    return
                flock(fd, unlock=True)
            if time.monotonic() > deadline:
                raise CacheError(f"{self.path}: the cache's ledger is unusable ({why}) and other processes "
                                 "are using the cache; stop them, then run s3fsimg cache clear") from None
            time.sleep(0.05)
        try:
            if self._usable():  # another process reset it while we waited
                return
            log.warning("cache: the ledger %s is unusable (%s); starting the cache again (its files are dropped)",
                        self.path, why)
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(f"{self.path}{suffix}")
            self._drop_all_files()
            self._open()
        finally:
            flock(fd, shared=True)

    def close(self) -> None:
        """Write the pending uses and close. Later calls do nothing; a late write raises sqlite3.Error."""
        if self.closed:
            return
        self.flush_touches()
        with self._lock:
            self.closed = True
            self._db.close()
            os.close(self._users_fd)  # the users' lock (see __init__)

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

    # -- pins: files this process is using right now are not evicted by it ----------------------------
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

    # -- rows ----------------------------------------------------------------------------------------
    def record(self, name: str, size: int) -> None:
        """Count a file (new, or its size changed) as used now, evicting others past the bound.
        Raises sqlite3.Error."""
        now = time.time()
        with self._write() as db:
            db.execute("INSERT INTO files(name, bytes, atime) VALUES (?,?,?) "
                       "ON CONFLICT(name) DO UPDATE SET bytes=excluded.bytes, atime=excluded.atime",
                       (name, size, now))
            total = db.execute("SELECT bytes FROM totals").fetchone()[0]
            if total > self.max_bytes:
                self._evict_locked(db, total - self.max_bytes)
        self._touched[name] = now

    def counts(self, name: str) -> bool:
        """Whether the ledger has a row for `name`. Raises sqlite3.Error."""
        with self._lock:
            return self._db.execute("SELECT 1 FROM files WHERE name=?", (name,)).fetchone() is not None

    def forget(self, name: str) -> None:
        """Delete the row of a file the caller has removed. Raises sqlite3.Error."""
        with self._write() as db:
            db.execute("DELETE FROM files WHERE name=?", (name,))

    def forget_under(self, prefix: str) -> None:
        """Delete the rows of every file under `prefix` (ending in '/'). Raises sqlite3.Error."""
        with self._write() as db:
            db.execute("DELETE FROM files WHERE name >= ? AND name < ?", _under(prefix))

    def recently_used(self, prefix: str, window: float) -> list[str]:
        """Names under `prefix` used within `window` seconds before the last use of any file."""
        with self._lock:
            last = self._db.execute("SELECT max(atime) FROM files").fetchone()[0]
            if last is None:
                return []
            rows = self._db.execute("SELECT name FROM files WHERE atime >= ? AND name >= ? AND name < ?",
                                    (last - window, *_under(prefix))).fetchall()
        return [name for (name,) in rows]

    # -- uses ----------------------------------------------------------------------------------------
    def touch(self, name: str) -> None:
        """Mark a file as used (LRU): at most once per file per `_TOUCH_INTERVAL`, and written to the
        ledger in batches (one transaction per use was a large part of a warm read of an image; see
        docs/misses.md): by the use that finds `_TOUCH_BATCH` uses pending or `_TOUCH_DELAY` passed since the
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
        """Write the pending uses to the ledger, in one transaction. Never raises sqlite3.Error."""
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

    # -- eviction ------------------------------------------------------------------------------------
    def evict(self, extra: int = 0, force_fraction: float = 0.0) -> int:
        """Evict until total + extra <= max_bytes (and at least force_fraction of the total). Returns
        bytes freed. Raises sqlite3.Error."""
        with self._write() as db:
            total = db.execute("SELECT bytes FROM totals").fetchone()[0]
            need = max(total + extra - self.max_bytes, int(total * force_fraction))
            return self._evict_locked(db, need) if need > 0 else 0

    def _evict_locked(self, db: sqlite3.Connection, need: int) -> int:
        if self._pending_touches:  # this process's recent uses count before anything is chosen
            self._flush_touches_locked(db)
        freed = 0
        skip: set[str] = set()
        # Files used in the last EVICT_GRACE seconds go last: a path `fetch` just handed out (in this or
        # another process) stays while anything older can go. When nothing older is left, they go too,
        # so the bound holds.
        for before in (time.time() - EVICT_GRACE, float("inf")):
            while freed < need:
                rows = db.execute("SELECT name, bytes FROM files WHERE atime < ? ORDER BY atime LIMIT ?",
                                  (before, 64 + len(skip))).fetchall()
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

    # -- commands ------------------------------------------------------------------------------------
    def totals(self) -> tuple[int, int]:
        """(bytes, files) of every counted file. Raises sqlite3.Error."""
        with self._lock:
            total, files = self._db.execute("SELECT bytes, files FROM totals").fetchone()
        return int(total), int(files)

    def totals_under(self, prefix: str) -> tuple[int, int]:
        """(bytes, files) of the counted files under `prefix` (ending in '/'). Raises sqlite3.Error."""
        with self._lock:
            files, total = self._db.execute("SELECT count(*), coalesce(sum(bytes), 0) FROM files "
                                            "WHERE name >= ? AND name < ?", _under(prefix)).fetchone()
        return int(total), int(files)

    def clear(self) -> int:
        """Drop every counted file (`drop_all_files`) and every row, under the write lock, so no other
        process records a file in between. Returns the bytes the ledger counted. Raises sqlite3.Error."""
        with self._write() as db:
            freed = db.execute("SELECT bytes FROM totals").fetchone()[0]
            self._drop_all_files()
            db.execute("DELETE FROM files")
        return int(freed)
