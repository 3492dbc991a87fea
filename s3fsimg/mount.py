"""Wiring of a mount: checks, daemonising, building the layers, running pyfuse3, unmounting.

`mount()` is the only place the read path is assembled: S3 store -> index -> reader -> `fs.Operations`
-> `pyfuse3.init` -> `trio.run(pyfuse3.main)`. Everything it builds is registered on one ExitStack and
closed on the way out, whatever the way out is.

Order of work, and why:
1. cheap checks in the calling process (mountpoint exists, is a directory, is not mounted; /dev/fuse
   can be opened), each failing with one clear line (`MountError`);
2. unless `foreground`, fork: the parent waits on a pipe until the child reports "ready" (exit 0) or
   an error (raised again in the parent, same class and message). The child forks once more and
   calls setsid, so it survives the shell. Forking happens BEFORE any boto3 client or thread exists;
3. in the serving process: the S3 store, the index (`index_load.load_index`: manifest problems are
   reported here), the counters (`Counters`, one slot per process), the reader, the Operations,
   `pyfuse3.init` (mount), then the trio loop;
4. SIGTERM/SIGINT -> `session.terminate()` -> the loop ends -> `pyfuse3.close(unmount=True)`; after
   an error, `close(unmount=False)`; an external `fusermount3 -u` also ends the loop.

With `workers` > 1 (the default on a machine with several cores), step 3 builds no reader in the
serving process (`_FirstReader` makes one only if a read comes before the workers exist); the process
answers INIT, forks the workers, which build their own index connection and reader and serve, and
supervises them (s3fsimg/workers.py: why and how). "ready" is reported once every worker has started;
the mount's exit status is 1 when a worker died (the connection was aborted).

Risk of `--allow-other`: every local user can then read the dataset with the mounting user's S3
credentials (the kernel still checks the 0444/0555 modes, which allow everyone to read). Use it only
when the dataset may be read by every account of the machine; it also needs `user_allow_other` in
/etc/fuse.conf for non-root users.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging
import os
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from s3fsimg import errors, session
from s3fsimg.config import Config, private_dirs
from s3fsimg.counters import Counters
from s3fsimg.errors import MountError, S3fsimgError
from s3fsimg.workers import (
    Turn,
    Workers,
    abort_connection,
    default_workers,
    hold_stop_signals,
    reap_all,
    serve_until_init,
    start_workers,
    stop_signals,
    supervise,
    wait_ready,
    worker_main,
)

log = logging.getLogger(__name__)

FSNAME = "s3fsimg"
#: Kernel readahead of the mount (the FUSE bdi's read_ahead_kb), set when we may (root): the default
#: 128 KiB makes the kernel read a file in 128 KiB requests, each a round trip through Python; at 1 MiB
#: sequential reads come in requests up to 1 MiB (libfuse's max_pages), far fewer round trips, while a
#: 64 KiB header read still asks for 256 KiB at most (one cache block). Larger windows make header
#: reads fetch more than one block (bench/mount.py measures the bytes fetched per byte asked).
READ_AHEAD_KB = 1024


def set_readahead(mountpoint: Path, kib: int = READ_AHEAD_KB) -> bool:
    """Set the mount's kernel readahead (sysfs, /sys/class/bdi/<dev>/read_ahead_kb); best effort: False
    when not permitted (not root, read-only /sys). Reads /proc/self/mountinfo only: it does not touch
    the mount, so it may run before the FUSE loop answers."""
    try:
        line = _mountinfo_line(mountpoint)
        if line is None:
            return False
        dev = line[0][2]  # major:minor, the bdi's name
        with open(f"/sys/class/bdi/{dev}/read_ahead_kb", "w") as f:
            f.write(str(kib))
    except OSError as exc:
        log.debug("cannot set the readahead of %s to %d KiB: %s", mountpoint, kib, exc.strerror)
        return False
    return True


#: How many background requests (read-ahead reads) the kernel keeps outstanding on the connection, and
#: when it starts throttling. The kernel's default (12, congestion at 9) throttles a few parallel
#: readers of large files: their read-ahead reads queue in the kernel while S3 could serve them all.
MAX_BACKGROUND = 64
CONGESTION_THRESHOLD = 48
_FUSECTL = Path("/sys/fs/fuse/connections")


def connection_dir(mountpoint: Path) -> Path:
    """The fusectl directory of the mount at `mountpoint` (stat it while the mount answers)."""
    return _FUSECTL / str(os.minor(os.stat(mountpoint).st_dev))


def set_background_limit(mountpoint: Path) -> bool:
    """Raise the connection's max_background through fusectl (root only; mounts fusectl when it is
    not, as systemd does at boot); best effort: False when not permitted."""
    try:
        conn = connection_dir(mountpoint)
        if not conn.is_dir() and os.geteuid() == 0 and not any(_FUSECTL.iterdir()):
            subprocess.run(["mount", "-t", "fusectl", "fusectl", str(_FUSECTL)], capture_output=True, timeout=10,
                           check=False)
        (conn / "max_background").write_text(str(MAX_BACKGROUND))
        (conn / "congestion_threshold").write_text(str(CONGESTION_THRESHOLD))
    except OSError as exc:
        log.debug("cannot raise max_background of %s: %s", mountpoint, exc)
        return False
    return True


def tune_after_init(mountpoint: Path) -> None:
    """The kernel-side settings of a mount, once its INIT is answered (INIT's reply caps the readahead
    at what the kernel offered in INIT, the default 128 KiB): readahead and background limit, each best
    effort. Blocks (sysfs writes, perhaps mounting fusectl): not from the trio loop."""
    set_readahead(mountpoint)
    set_background_limit(mountpoint)


def mount_options(*, allow_other: bool) -> set[str]:
    """The FUSE options of a mount."""
    options = {f"fsname={FSNAME}", f"subtype={FSNAME}", "ro", "default_permissions"}
    if allow_other:
        options.add("allow_other")
    return options


# -- checks ------------------------------------------------------------------------------------

def _unescape(field: str) -> str:
    """Undo the octal escapes of /proc/self/mountinfo (\\040 for space...)."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 4 <= len(field) and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def _mountinfo_line(mountpoint: Path) -> tuple[list[str], list[str]] | None:
    """The fields before and after " - " of the last /proc/self/mountinfo line mounted at `mountpoint`
    (the one on top); None when nothing is mounted there. OSError when mountinfo cannot be read."""
    target = os.path.abspath(mountpoint)
    found: tuple[list[str], list[str]] | None = None
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            if len(fields) >= 5 and _unescape(fields[4]) == target:
                found = (fields, right.split())
    return found


def mount_info(mountpoint: Path) -> tuple[str, str] | None:
    """(filesystem type, source) of the mount at `mountpoint`, or None when nothing is mounted there."""
    try:
        line = _mountinfo_line(mountpoint)
    except OSError:
        return ("unknown", "") if os.path.ismount(mountpoint) else None
    if line is None:
        return None
    parts = line[1]
    return (parts[0], parts[1] if len(parts) > 1 else "")


def check_mountpoint(mountpoint: Path, *, allow_non_empty: bool = False) -> Path:
    """The absolute mountpoint, or MountError saying in one line why it cannot be mounted on. Like
    rclone mount and s3fs, a directory with files in it is refused unless `allow_non_empty` (the
    mount would hide them; this also refuses a mountpoint inside one of our own mounts)."""
    mp = Path(os.path.abspath(mountpoint))
    try:
        st = mp.stat()
    except FileNotFoundError:
        raise MountError(f"{mp}: the mountpoint does not exist (create it with mkdir)") from None
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            raise MountError(f"{mp}: a dead mount is still attached (run `fusermount3 -u -z {mp}`)") from None
        raise MountError(f"{mp}: cannot use the mountpoint: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise MountError(f"{mp}: the mountpoint is not a directory")
    info = mount_info(mp)
    if info is not None:
        raise MountError(f"{mp}: something is already mounted there ({info[0]}); unmount it first")
    if not allow_non_empty:
        try:
            with os.scandir(mp) as entries:
                occupied = next(entries, None) is not None
        except OSError as exc:
            raise MountError(f"{mp}: cannot use the mountpoint: {exc.strerror}") from None
        if occupied:
            raise MountError(f"{mp}: the mountpoint is not empty (the mount would hide what is there; "
                             "pass --allow-non-empty to mount over it)")
    return mp


def check_fuse() -> None:
    """MountError when /dev/fuse is absent or may not be opened by this user."""
    try:
        fd = os.open("/dev/fuse", os.O_RDWR)
    except FileNotFoundError:
        raise MountError("/dev/fuse does not exist: load the fuse kernel module (modprobe fuse), or in a "
                         "container pass --device /dev/fuse") from None
    except PermissionError:
        raise MountError("/dev/fuse: permission denied (add the user to the 'fuse' group, or in a container "
                         "pass --device /dev/fuse --cap-add SYS_ADMIN)") from None
    except OSError as exc:
        raise MountError(f"/dev/fuse cannot be opened: {exc.strerror}") from None
    os.close(fd)


# -- mount -------------------------------------------------------------------------------------

def mount(config: Config, mountpoint: Path, *, foreground: bool, allow_other: bool, log_file: Path | None,
          allow_non_empty: bool = False) -> int:
    """Mount the bucket's dataset read-only at `mountpoint` (see the module docstring).

    Returns 0 once the mount answers (daemonised), or the mount's exit status when it ends (`foreground`:
    0 when unmounted or signalled, 1 when a worker died). Raises MountError / ManifestError /
    ConfigError with one clear line when it cannot mount.
    """
    from s3fsimg.log import setup_logging

    config.require_bucket()
    mp = check_mountpoint(mountpoint, allow_non_empty=allow_non_empty)
    check_fuse()
    if foreground:
        setup_logging(config.log_level, log_file)
        return _serve(config, mp, allow_other=allow_other, ready=_Ready(None))
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid:  # the caller: wait for "ready" or an error from the daemon
        os.close(write_end)
        _wait_ready(read_end, pid, mp)
        return 0
    # First child: detach (new session), fork again so the daemon is not a session leader.
    code = 1
    try:
        os.close(read_end)
        os.setsid()
        if os.fork():
            code = 0
        else:
            code = _daemon(config, mp, allow_other=allow_other, log_file=log_file, ready=_Ready(write_end))
    finally:
        os._exit(code)


class _Ready:
    """The daemon's pipe to the waiting `s3fsimg mount`: one message ("ready", or an error's class and
    text), then closed; later messages go nowhere (the descriptor's number may be reused by then)."""

    def __init__(self, fd: int | None) -> None:
        self.fd = fd

    def report(self, message: str) -> None:
        fd, self.fd = self.fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            os.write(fd, message.encode())
        with contextlib.suppress(OSError):
            os.close(fd)


def _wait_ready(read_end: int, pid: int, mp: Path) -> None:
    chunks = []
    with os.fdopen(read_end, "rb") as r:
        while chunk := r.read(65536):
            chunks.append(chunk)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)  # the intermediate child exits at once
    message = b"".join(chunks).decode("utf-8", "replace")
    if message.startswith("ready"):
        return
    if not message:
        raise MountError(f"{mp}: the mount process exited before the mount was ready (see its log)")
    kind, _, text = message.partition("\n")
    cls = getattr(errors, kind, MountError)
    if not (isinstance(cls, type) and issubclass(cls, S3fsimgError)):
        cls = MountError
    raise cls(text)


def _daemon(config: Config, mp: Path, *, allow_other: bool, log_file: Path | None, ready: _Ready) -> int:
    from s3fsimg.log import setup_logging

    try:
        os.chdir("/")
        devnull = os.open(os.devnull, os.O_RDWR)
        if log_file is None:
            private_dirs(config.cache_dir)
            log_file = config.cache_dir / "mount.log"
        setup_logging(config.log_level, log_file)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.close(devnull)
        return _serve(config, mp, allow_other=allow_other, ready=ready)
    except S3fsimgError as exc:
        log.error("%s", exc)
        ready.report(f"{type(exc).__name__}\n{exc}")
        return 1
    except BaseException as exc:
        log.exception("mount failed")
        ready.report(f"MountError\n{mp}: the mount failed: {exc.__class__.__name__}: {exc}")
        return 1


def _serve(config: Config, mp: Path, *, allow_other: bool, ready: _Ready) -> int:
    """Build everything, mount, serve until unmounted or signalled, then close everything. Returns the
    exit status (1: a worker died and the mount was aborted)."""
    from s3fsimg.fs import Operations
    from s3fsimg.index_load import load_index
    from s3fsimg.reader import COUNTER_NAMES, ObjectReader
    from s3fsimg.s3 import S3Store

    n = config.workers or default_workers()
    with contextlib.ExitStack() as stack:
        store = S3Store(config, default_attempts=1)  # the manifest's store: see dataset._State.__init__
        index, manifest_path = load_index(config, store)
        stack.callback(index.close)
        counters = Counters(COUNTER_NAMES, slots=n)
        reader: Any = ObjectReader(config, counters=counters) if n == 1 else _FirstReader(config, counters)
        stack.callback(reader.close)
        ops = Operations(index, reader, manifest_path=manifest_path)
        stack.callback(ops.close)
        try:
            pyfuse3.init(ops, str(mp), mount_options(allow_other=allow_other))
        except RuntimeError as exc:
            raise MountError(f"{mp}: the kernel refused the mount ({exc}); see the log for libfuse's reason") \
                from None
        log.info("mounted %s at %s (%d entries, %d %s)", config.where(config.manifest_key), mp,
                 index.entry_count(), n, "process" if n == 1 else "worker processes")
        if n > 1:
            return _serve_with_workers(config, mp, ops, index.path, counters, n, ready)
        clean = False
        try:
            trio.run(_main, ready, mp)
            clean = True
        finally:
            pyfuse3.close(unmount=clean)
            log.info("unmounted %s", mp)
        return 0


async def _main(ready: _Ready, mp: Path) -> None:
    async with trio.open_nursery() as nursery:
        stopping = False

        def on_signal(signum: int) -> None:
            # Once: later signals are absorbed while the loop finishes (reads in threads may take up to
            # the read deadline); they no longer kill the process before it unmounts.
            nonlocal stopping
            if not stopping:
                stopping = True
                log.info("signal %d: unmounting", signum)
                session.terminate()

        nursery.start_soon(stop_signals, on_signal)

        async def fuse() -> None:
            await pyfuse3.main()
            nursery.cancel_scope.cancel()

        session.install()
        nursery.start_soon(fuse)
        # A stat of the root from a thread returns once the kernel's INIT is answered (the loop above
        # serves both); only then may the mount be tuned.
        with contextlib.suppress(OSError):
            await trio.to_thread.run_sync(os.stat, mp)
        await trio.to_thread.run_sync(tune_after_init, mp)
        ready.report("ready")


# -- several processes (see s3fsimg/workers.py) -------------------------------------------------

class _FirstReader:
    """The reader of a multi-process mount's parent, which answers the requests that come before the
    workers exist (INIT, the first stat, rarely more): an `ObjectReader` made on first use, so that
    usually no S3 client, cache connection or thread exists in the parent when it forks."""

    def __init__(self, config: Config, counters: Counters) -> None:
        self.counters = counters
        self.on_untrusted_pages: Callable[[str], None] | None = None
        self._config = config
        self._reader: Any = None

    def __getattr__(self, name: str) -> Any:  # read, read_nowait, may_keep_pages...
        if name.startswith("_"):
            raise AttributeError(name)
        if self._reader is None:
            from s3fsimg.reader import ObjectReader

            self._reader = ObjectReader(self._config, counters=self.counters)
            self._reader.on_untrusted_pages = self.on_untrusted_pages
        return getattr(self._reader, name)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()


def _serve_with_workers(config: Config, mp: Path, ops: Any, index_path: Path, counters: Counters, n: int,
                        ready: _Ready) -> int:
    """Serve until INIT is answered, fork `n` workers, supervise them, unmount once (workers.py)."""
    from s3fsimg.index import Index
    from s3fsimg.reader import ObjectReader

    conn: Path | None = None

    def after_init() -> None:
        nonlocal conn
        tune_after_init(mp)  # mounts fusectl when it may: the abort of a dead worker needs it
        with contextlib.suppress(OSError):
            conn = connection_dir(mp)

    started_r, started_w = os.pipe2(os.O_CLOEXEC)
    turn = Turn()

    def run_worker(slot: int) -> int:
        os.close(started_r)
        counters.use_slot(slot)
        with contextlib.ExitStack() as own:
            index = Index.open(index_path)
            own.callback(index.close)
            reader = ObjectReader(config, counters=counters)
            own.callback(reader.close)
            ops.after_fork(index, reader)
            turn.install(ops)

            def started() -> None:
                os.write(started_w, b"r")
                os.close(started_w)

            trio.run(worker_main, turn, started)
        return 0

    clean = False
    workers: Workers | None = None
    hold_stop_signals()
    try:
        if not trio.run(serve_until_init, mp, after_init):
            clean = True  # signalled before the workers existed
            return 0
        workers = start_workers(n, run_worker, close_fds=(ready.fd,) if ready.fd is not None else ())
        os.close(started_w)
        why = wait_ready(started_r, workers, timeout=60.0)
        if why is not None:
            abort_connection(conn)
            raise MountError(f"{mp}: {why}")
        log.info("serving with %d workers (pids %s)", n, " ".join(str(w.pid) for w in workers.items))
        ready.report("ready")
        failure = trio.run(functools.partial(supervise, workers, conn, stop_timeout=config.read_deadline + 5))
        clean = True
        return 0 if failure is None else 1
    finally:
        with contextlib.suppress(OSError):
            os.close(started_r)
        with contextlib.suppress(OSError):
            os.close(started_w)
        if workers is not None:
            reap_all(workers)
        pyfuse3.close(unmount=clean)
        if clean and mount_info(mp) is not None:  # libfuse does not unmount an aborted connection
            subprocess.run(["fusermount3", "-u", "-z", str(mp)], capture_output=True, check=False)
        log.info("unmounted %s", mp)


# -- other commands ----------------------------------------------------------------------------

def umount(mountpoint: Path) -> None:
    """Unmount a mount of this program (`fusermount3 -u`); MountError when it is not one, or is busy."""
    mp = Path(os.path.abspath(mountpoint))
    info = mount_info(mp)
    if info is None:
        raise MountError(f"{mp}: not mounted")
    if info[0] != f"fuse.{FSNAME}" and info[1] != FSNAME:
        raise MountError(f"{mp}: not a mount of {FSNAME} (it is {info[0]})")
    result = subprocess.run(["fusermount3", "-u", str(mp)], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        reason = (result.stderr or result.stdout).strip().splitlines()
        raise MountError(f"{mp}: cannot unmount: {reason[-1] if reason else 'fusermount3 failed'}")


def read_stats(mountpoint: Path) -> dict[str, Any]:
    """The live counters of the mount at `mountpoint` (the root's `user.s3fsimg.stats` xattr)."""
    from s3fsimg.fs import STATS_XATTR

    mp = os.path.abspath(mountpoint)
    try:
        raw = os.getxattr(mp, STATS_XATTR)
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise MountError(f"{mp}: not an {FSNAME} mount") from None
        raise MountError(f"{mp}: cannot read the mount's stats: {exc.strerror}") from None
    data: dict[str, Any] = json.loads(raw)
    return data
