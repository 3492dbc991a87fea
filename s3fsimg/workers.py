"""One FUSE session served by several processes: the INIT phase, the workers, the turn, the supervisor.

`mount.py` uses this when `--workers N` (N > 1). The parent mounts (`pyfuse3.init`) and serves alone
until the kernel's INIT has been answered (`serve_until_init`): libfuse keeps "init done" in each
process's memory, and a process forked before INIT answers every request with EIO. It then stops its
loop between two requests and forks N workers (`start_workers`); each builds its own index connection,
cache, S3 client and threads (SQLite connections, sockets and thread pools do not survive fork) and
runs `trio.run(worker_main)` (pyfuse3's loop behind the turn) on the inherited /dev/fuse descriptor.
The kernel hands each request to the one process that reads it.

The turn. pyfuse3 reads /dev/fuse holding the GIL, in blocking mode, after trio said the descriptor is
readable. With several processes polling one descriptor, every request wakes them all and all but one
then block in read() until the next request, holding the GIL: that process's threads stop and its trio
loop with them, so a read it was answering from a thread waits for some other request to arrive. With
one reader and nothing else going on, that is forever (measured: a 3-process toy hung on the first
cold `cat`). So only the holder of the *turn* (one byte in a pipe shared by the workers) waits for the
descriptor. It keeps the turn while it answers requests on its trio loop (lookups, attributes, opens,
page-cached reads: passing it on for each of those cost a cross-process wake-up per request and made
2 workers slower than 1). When a request is handed to a thread (`Operations.before_thread`: a read from
disk or S3) it passes the turn on, before the handler's first suspension, so that another worker reads
the next requests while this one's threads work, but only when that adds capacity (`Load`): this
process kept most of a core busy over the last tenth of a second and the machine has a core idle.
Otherwise each pass costs a cross-process wake-up and buys nothing: on 2 cores shared with 8 readers,
passing on every such request made 2 workers read the disk-cache pass at ~0.8x of one (measured on
312 small images; passing only with 2 or 4 threaded requests in flight, no better). A read of
/dev/fuse never blocks (except after a request vanished in between: the next request releases it).

Supervision (`supervise`, in the parent): SIGTERM/SIGINT/SIGHUP are forwarded to the workers, which
finish the requests they hold and stop; a worker that exits with 0 stopped because the mount went away
or it was told to. A worker that dies otherwise may have taken requests that nobody will ever answer:
the parent aborts the connection (`/sys/fs/fuse/connections/<minor>/abort`; without fusectl, closing
every descriptor does it), so every reader gets ENOTCONN at once, stops the other workers, and the
mount ends with a non-zero status after one log line naming the worker. Workers die with the parent
(PR_SET_PDEATHSIG): a SIGKILL of the parent leaves none behind, and the connection ends when the last
descriptor closes.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import select
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from s3fsimg import session
from s3fsimg.session import YIELD_EVERY, RequestWait, session_fd

log = logging.getLogger(__name__)

#: Upper bound of the default number of workers (`DATASET_MOUNT_WORKERS`).
MAX_DEFAULT_WORKERS = 8
_PR_SET_PDEATHSIG = 1
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
#: Stop signals that came while no trio loop was listening (see `hold_stop_signals`).
_pending_stop: list[int] = []


def hold_stop_signals() -> None:
    """From now on a stop signal that comes between two trio loops (the parent forking and starting its
    workers, a worker building its reader) is remembered and acted on by the next loop, instead of
    killing the process with the mount still attached."""
    del _pending_stop[:]
    for signum in _STOP_SIGNALS:
        signal.signal(signum, _remember_stop)


def _remember_stop(signum: int, frame: object) -> None:
    _pending_stop.append(signum)


async def stop_signals(on_signal: Callable[[int], None]) -> None:
    """Call `on_signal` for a remembered stop signal, then for each one that comes."""
    with trio.open_signal_receiver(*_STOP_SIGNALS) as signals:
        if _pending_stop:
            on_signal(_pending_stop[0])
        async for signum in signals:
            on_signal(signum)


def default_workers() -> int:
    """The number of cores, at most MAX_DEFAULT_WORKERS."""
    return max(1, min(os.cpu_count() or 1, MAX_DEFAULT_WORKERS))


# -- the parent's INIT phase ------------------------------------------------------------------

async def serve_until_init(mp: Path, after_init: Callable[[], None]) -> bool:
    """Serve requests alone until the kernel's INIT has been answered and `after_init` (in a thread)
    returned, then stop pyfuse3's loop between two requests. False when a stop signal came first."""
    fd = session_fd()
    stopped = False
    async with trio.open_nursery() as nursery:

        async def fuse() -> None:
            # One task: a request is answered before the next is read, so the loop can only end
            # between two requests (a request taken and left unanswered would hang its caller).
            await pyfuse3.main(min_tasks=1, max_tasks=1)
            nursery.cancel_scope.cancel()

        def on_signal(signum: int) -> None:
            nonlocal stopped
            if not stopped:
                log.info("signal %d before the workers started: unmounting", signum)
                stopped = True
                pyfuse3.terminate()

        nursery.start_soon(fuse)
        nursery.start_soon(stop_signals, on_signal)
        # A stat of the root returns once INIT is answered (the loop above serves both).
        with contextlib.suppress(OSError):
            await trio.to_thread.run_sync(os.stat, mp)
        await trio.to_thread.run_sync(after_init)
        # notify_closing wakes the task only while it waits for the descriptor, i.e. between requests;
        # if it is answering one, try again shortly.
        while True:
            trio.lowlevel.notify_closing(fd)
            await trio.sleep(0.005)
    return not stopped


# -- the turn ---------------------------------------------------------------------------------

class Load:
    """Whether another worker would add capacity: this process used at least BUSY of a core and the
    machine left at least IDLE cores idle, over the last WINDOW seconds (sampled when asked, at most once
    a window: `time.process_time` and the idle time of /proc/stat)."""

    WINDOW = 0.1
    BUSY = 0.75
    IDLE = 1.0

    def __init__(self) -> None:
        self._tick = os.sysconf("SC_CLK_TCK")
        self._at = time.monotonic()
        self._cpu = time.process_time()
        self._idle = self._idle_seconds()
        self.share = False

    def _idle_seconds(self) -> float:
        """Idle and iowait seconds of the whole machine since boot (0 when /proc/stat cannot be read)."""
        try:
            with open("/proc/stat", "rb") as f:
                fields = f.readline().split()
            return (int(fields[4]) + int(fields[5])) / self._tick
        except (OSError, ValueError, IndexError):
            return 0.0

    def spare(self) -> bool:
        now = time.monotonic()
        if now - self._at >= self.WINDOW:
            cpu, idle = time.process_time(), self._idle_seconds()
            elapsed = now - self._at
            self.share = (cpu - self._cpu) / elapsed >= self.BUSY and (idle - self._idle) / elapsed >= self.IDLE
            self._at, self._cpu, self._idle = now, cpu, idle
        return self.share


class Turn:
    """The right to read the next request from /dev/fuse (see the module docstring): one byte in a pipe
    made before fork, taken by one task of one worker at a time. Use `install` in a worker. `share`:
    when to pass the turn on with a request handed to a thread (`Load.spare` unless the environment's
    S3FSIMG_TURN is `always`, which the tests use to make every worker serve)."""

    def __init__(self) -> None:
        self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        os.write(self._w, b"t")
        self._owned = False  # this process took the byte
        self._granted = False  # ... and pyfuse3 is reading (or has read) a request with it
        self._exiting = False
        self._lock = trio.Lock()  # one task of this process waits for the turn at a time
        self._calls = 0
        self._share: Callable[[], bool] = lambda: True  # set per worker by `install`

    def pass_on(self) -> None:
        """Give the turn to the next reader if this process read the request being handled with it and
        another worker adds capacity (called before the handler first suspends, so no other task of this
        process is waiting with it)."""
        if self._granted and self._share():
            self._granted = False
            self._give()

    def _give(self) -> None:
        if self._owned:
            self._owned = False
            os.write(self._w, b"t")

    def leave(self) -> None:
        """This process serves no more: give the turn back if it has it (the task whose read ended the
        session leaves its grant behind; the other workers need the turn to see the end too)."""
        self._exiting = True
        self._granted = False
        self._give()

    def stop(self) -> None:
        """Stop waiting for the turn (the worker was told to stop); call from the trio thread."""
        self._exiting = True
        trio.lowlevel.notify_closing(self._r)

    async def _take(self) -> None:
        if self._granted:  # the last request was answered without a thread: keep the turn
            self._granted = False
            return
        while True:
            try:
                os.read(self._r, 1)
            except BlockingIOError:  # another worker has it
                await trio.lowlevel.wait_readable(self._r)
                continue
            self._owned = True
            return

    async def wait_fuse_readable(self, requests: RequestWait) -> bool:
        """pyfuse3's `_wait_fuse_readable` behind the turn (`requests.wait` once this process has it)."""
        self._calls += 1
        if self._calls % YIELD_EVERY == 0:
            await trio.lowlevel.checkpoint()
        if self._exiting:
            return False
        if self._granted and requests.queued():
            # This process kept the turn (the last request was answered on the loop), no other task of
            # it waits with the turn, and a request is queued: read it now, as `RequestWait.wait` does.
            return True
        # One task of this process waits for the turn (trio allows one waiter per descriptor); the others
        # queue on the lock. pyfuse3 counts idle tasks only inside its own `_wait_fuse_readable`, which
        # this replaces: it sees none, starts a task after each read until max_tasks (99), and never ends
        # one. They wait here, a few KB each; no task is started or ended per request (ending one whenever
        # another waited made pyfuse3 start one for nearly every request: 2 workers ÷ 1 on 312 small
        # images went from ~0.7x to ~0.87x on the page-cache pass when that stopped).
        await self._lock.acquire()
        try:
            if self._exiting:
                return False
            try:
                await self._take()
            except trio.ClosedResourceError:
                self._exiting = True
                return False
            try:
                ready = await requests.wait_polled()
            except BaseException:
                self._give()
                raise
            if not ready:  # the session ended (unmounted, or stopped)
                self._exiting = True
                self._give()
                return False
            self._granted = True
            return True
        finally:
            self._lock.release()

    def install(self, ops: Any) -> None:
        """Route pyfuse3's waits in this process through the turn (and a new `session.RequestWait`), and
        pass the turn on when `ops` hands a request to a thread."""
        requests = session.install(hook=False)
        # Made here, after fork: `Load` samples this process's own CPU time.
        self._share = (lambda: True) if os.environ.get("S3FSIMG_TURN") == "always" else Load().spare

        async def wait_fuse_readable() -> bool:
            return await self.wait_fuse_readable(requests)

        pyfuse3._wait_fuse_readable = wait_fuse_readable  # type: ignore[attr-defined]
        ops.before_thread = self.pass_on


# -- workers ----------------------------------------------------------------------------------

@dataclass
class Worker:
    slot: int
    pid: int
    pidfd: int
    status: int | None = None  # exit code (negative: killed by that signal) once reaped


@dataclass
class Workers:
    """The parent's view of its workers."""

    items: list[Worker] = field(default_factory=list)

    def live(self) -> list[Worker]:
        return [w for w in self.items if w.status is None]

    def signal(self, signum: int) -> None:
        for w in self.live():
            with contextlib.suppress(ProcessLookupError):
                os.kill(w.pid, signum)


def _die_with_parent(parent: int) -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl
        os._exit(1)


def start_workers(n: int, run_worker: Callable[[int], int], close_fds: tuple[int, ...] = ()) -> Workers:
    """Fork `n` workers; worker `slot` runs `run_worker(slot)` and exits with its result (never returns
    into the caller's stack). Each closes `close_fds` first (e.g. the daemon's ready pipe)."""
    parent = os.getpid()
    workers = Workers()
    for slot in range(n):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                _die_with_parent(parent)
                for fd in close_fds:
                    with contextlib.suppress(OSError):
                        os.close(fd)
                hold_stop_signals()
                code = run_worker(slot)
            except BaseException:
                log.exception("worker %d failed", slot)
            finally:
                with contextlib.suppress(Exception):
                    logging.shutdown()
                    sys.stdout.flush()
                    sys.stderr.flush()
                os._exit(code)
        workers.items.append(Worker(slot, pid, os.pidfd_open(pid)))
    return workers


async def worker_main(turn: Turn, ready: Callable[[], None]) -> None:
    """A worker's trio main: pyfuse3's loop behind the turn until the session ends or a stop signal."""
    async with trio.open_nursery() as nursery:

        stopping = False

        def on_signal(signum: int) -> None:
            nonlocal stopping
            if not stopping:
                log.debug("worker %d: signal %d: stopping", os.getpid(), signum)
                stopping = True
                turn.stop()
                session.terminate()

        nursery.start_soon(stop_signals, on_signal)
        ready()
        try:
            await pyfuse3.main()
        finally:
            turn.leave()
        nursery.cancel_scope.cancel()


def abort_connection(conn: Path | None) -> bool:
    """Abort the FUSE connection: every request waiting, and every later one, fails at once (ENOTCONN).
    False when fusectl is not there (closing every descriptor then ends the connection)."""
    if conn is None:
        return False
    try:
        (conn / "abort").write_text("1")
    except OSError as exc:
        log.debug("cannot abort %s: %s", conn, exc)
        return False
    return True


def _describe(w: Worker) -> str:
    assert w.status is not None
    if w.status < 0:
        try:
            name = signal.Signals(-w.status).name
        except ValueError:
            name = f"signal {-w.status}"
        return f"worker {w.slot} (pid {w.pid}) was killed by {name}"
    return f"worker {w.slot} (pid {w.pid}) exited with status {w.status}"


async def supervise(workers: Workers, conn: Path | None, *, stop_timeout: float) -> str | None:
    """Wait for every worker. None when they all stopped cleanly; else why the mount was aborted."""
    failure: str | None = None
    stopping = False

    async with trio.open_nursery() as nursery:

        def stop_all(reason: str) -> None:
            nonlocal stopping
            if stopping:
                return
            stopping = True
            workers.signal(signal.SIGTERM)

            async def kill_stragglers() -> None:
                await trio.sleep(stop_timeout)
                if workers.live():
                    log.warning("workers still running %.0fs after %s: killing them", stop_timeout, reason)
                    workers.signal(signal.SIGKILL)

            nursery.start_soon(kill_stragglers)

        async def watch(w: Worker) -> None:
            nonlocal failure
            await trio.lowlevel.wait_readable(w.pidfd)
            _, status = os.waitpid(w.pid, 0)
            os.close(w.pidfd)
            w.status = os.waitstatus_to_exitcode(status)
            if w.status != 0 and failure is None and not stopping:
                failure = _describe(w)
                aborted = abort_connection(conn)
                log.error("%s: %s", failure, "the mount was aborted" if aborted else "ending the mount")
                stop_all("a worker died")
            elif w.status != 0:
                log.debug("%s", _describe(w))
            if not workers.live():
                nursery.cancel_scope.cancel()

        def on_signal(signum: int) -> None:
            if not stopping:
                log.info("signal %d: stopping the workers and unmounting", signum)
            stop_all(f"signal {signum}")

        for w in workers.items:
            nursery.start_soon(watch, w)
        nursery.start_soon(stop_signals, on_signal)
    return failure


def reap_all(workers: Workers) -> None:
    """Kill and reap whatever workers remain (the parent's way out after an error of its own)."""
    workers.signal(signal.SIGKILL)
    for w in workers.live():
        with contextlib.suppress(ChildProcessError):
            _, status = os.waitpid(w.pid, 0)
            w.status = os.waitstatus_to_exitcode(status)
        with contextlib.suppress(OSError):
            os.close(w.pidfd)


def wait_ready(read_fd: int, workers: Workers, timeout: float) -> str | None:
    """Wait until every worker wrote its ready byte to `read_fd`; None, or why not."""
    deadline = time.monotonic() + timeout
    got = 0
    while got < len(workers.items):
        left = deadline - time.monotonic()
        if left <= 0:
            return f"the workers did not start within {timeout:.0f}s"
        readable, _, _ = select.select([read_fd] + [w.pidfd for w in workers.items], [], [], left)
        if read_fd in readable:
            got += len(os.read(read_fd, 64))
            continue
        for w in workers.items:
            if w.pidfd in readable:
                return f"worker {w.slot} (pid {w.pid}) exited while starting (see the log)"
    return None
