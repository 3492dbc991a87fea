"""A mount served by several processes (`--workers N`, s3fsimg/workers.py; issue 13).

* 4 workers serve every file right, a single cold reader included (the case that hung before the turn),
  requests are answered by more than one of them, and the stats xattr sums every worker's counters.
* SIGKILL of one worker during heavy reads: no reader hangs (every read fails at once), the mount ends
  with status 1 and one log line naming the worker, it is unmounted, and a remount over the same cache
  reads everything right.
* No worker survives `s3fsimg umount`, SIGTERM, a SIGKILL of the parent, or a lazy unmount (once the
  last open file is closed).

The whole mount suite also runs with workers: `DATASET_MOUNT_WORKERS=4 pytest tests/test_mount.py
tests/test_fs_ops.py` (tests/mountutil.py passes the variable to every mount).
"""

from __future__ import annotations

import concurrent.futures
import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from s3fsimg.config import Config
from s3fsimg.errors import ConfigError
from s3fsimg.workers import MAX_DEFAULT_WORKERS, Load, default_workers
from s3fsimg_lab.proxy import LabProxy
from tests.cacheworker import ROOT, collect, worker_env
from tests.mountutil import MountProcess, fuse_test, is_mounted
from tests.test_crash import Workset, assert_correct, start_reader, workset  # noqa: F401
from tests.test_mount import Dataset, dataset  # noqa: F401

pytestmark = [fuse_test, pytest.mark.fuse]

STATS_XATTR = "user.s3fsimg.stats"


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return sorted(int(p) for p in f.read().split())
    except FileNotFoundError:
        return []


def alive(pid: int) -> bool:
    """Running (a zombie not yet reaped counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.02)


def worker_pids(m: MountProcess, n: int) -> list[int]:
    assert m.proc is not None
    parent = m.proc.pid
    wait_until(lambda: len(children(parent)) == n, 30, f"{n} workers")
    return children(parent)


def io_chars(pid: int) -> int:
    """Bytes this process has read with read(2) and friends: /dev/fuse requests, cache files, sockets."""
    with open(f"/proc/{pid}/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


def sha_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------ configuration


def test_workers_setting() -> None:
    assert default_workers() == max(1, min(os.cpu_count() or 1, MAX_DEFAULT_WORKERS))
    assert Config.load(env={}).workers is None
    assert Config.load(env={"DATASET_MOUNT_WORKERS": "4"}).workers == 4
    assert Config.load({"workers": 2}, env={"DATASET_MOUNT_WORKERS": "4"}).workers == 2
    for bad in ("0", "-1", "two", "1.5"):
        with pytest.raises(ConfigError, match="DATASET_MOUNT_WORKERS"):
            Config.load(env={"DATASET_MOUNT_WORKERS": bad})


def test_bad_workers_flag_exits_2(tmp_path: Path) -> None:
    env = {**os.environ, "S3_BUCKET": "b", "DATASET_MOUNT_WORKERS": "x"}
    out = subprocess.run([sys.executable, "-m", "s3fsimg", "mount", str(tmp_path), "--foreground"], env=env,
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 2 and "DATASET_MOUNT_WORKERS: 'x' is not a number of processes" in out.stderr
    out = subprocess.run([sys.executable, "-m", "s3fsimg", "mount", str(tmp_path), "--workers", "0"],
                         env={**env, "DATASET_MOUNT_WORKERS": "2"}, capture_output=True, text=True, cwd=ROOT,
                         timeout=60)
    assert out.returncode == 2 and "--workers" in out.stderr


# ------------------------------------------------------------------------------------ serving


def test_load_shares_the_turn_only_when_this_process_is_busy_and_a_core_is_idle(
        monkeypatch: pytest.MonkeyPatch) -> None:
    clock = {"now": 100.0, "cpu": 10.0, "idle": 1000.0}
    monkeypatch.setattr(time, "monotonic", lambda: clock["now"])
    monkeypatch.setattr(time, "process_time", lambda: clock["cpu"])
    monkeypatch.setattr(Load, "_idle_seconds", lambda self: clock["idle"])
    load = Load()

    def window(cpu: float, idle: float, seconds: float = 0.2) -> bool:
        clock["now"] += seconds
        clock["cpu"] += cpu * seconds
        clock["idle"] += idle * seconds
        return load.spare()

    assert window(cpu=0.9, idle=1.5)  # busy, and a core idle: another worker adds capacity
    assert not window(cpu=0.9, idle=0.3)  # busy, but the machine is full: a pass would cost, not add
    assert not window(cpu=0.3, idle=1.5)  # this process keeps up alone
    assert not window(cpu=0.9, idle=1.5, seconds=0.01)  # within the window: the last decision holds
    assert window(cpu=0.9, idle=1.5)


@pytest.mark.timeout(120)
def test_four_workers_serve_every_file_and_the_stats_sum_them(dataset: Dataset, mnt_dir: Path,  # noqa: F811
                                                              proxy: LabProxy) -> None:
    objects = list({e.sha256: e for e in dataset.entries}.values())
    # S3FSIMG_TURN=always: the turn goes on with every read handed to a thread, so that the workers all
    # serve (by default it stays with one worker unless another adds capacity: test_load_shares_...).
    with MountProcess(mnt_dir, env={**dataset.env, "S3FSIMG_TURN": "always"}, workers=4) as m:
        pids = worker_pids(m, 4)
        before = {pid: io_chars(pid) for pid in pids}
        # One reader alone, cold: each read waits for S3 in a thread of whichever worker took it (with
        # every worker polling /dev/fuse, the others blocked in read() holding their GIL: this hung).
        for e in objects[:10]:
            assert sha_of(mnt_dir / e.path) == e.sha256, e.path
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            digests = list(pool.map(lambda e: sha_of(mnt_dir / e.path), objects[10:]))
        assert digests == [e.sha256 for e in objects[10:]]
        answered = [pid for pid in pids if io_chars(pid) > before[pid]]
        assert len(answered) >= 2, f"only {answered} of {pids} answered requests"
        stats = json.loads(os.getxattr(mnt_dir, STATS_XATTR))
        cli = subprocess.run([sys.executable, "-m", "s3fsimg", "stats", str(mnt_dir), "--json"], cwd=ROOT,
                             capture_output=True, text=True, timeout=60, check=True)
        assert all(alive(p) for p in pids)
    # Each object was read once on a fresh mount: every byte the kernel asked for was counted once,
    # whichever worker answered.
    assert stats["bytes_read"] == sum(e.bytes for e in objects)
    assert stats["opens"] == len(objects)
    assert stats["reads"] >= len(objects)
    assert json.loads(cli.stdout)["bytes_read"] == stats["bytes_read"]
    assert m.proc is not None and m.proc.returncode == 0
    assert not any(alive(p) for p in pids)


@pytest.mark.timeout(180)
def test_sigkill_of_one_worker_during_heavy_reads_hangs_no_reader_and_a_remount_reads_right(
        workset: Workset, s3_env: dict[str, str], proxy: LabProxy, tmp_path: Path) -> None:  # noqa: F811
    env = worker_env(s3_env, DATASET_BLOCK_SIZE="64K", DATASET_LOG_LEVEL="info", S3FSIMG_TURN="always")
    mp = tmp_path / "mnt"
    targets = workset.targets(mp, tmp_path / "targets.json")
    m = MountProcess(mp, env=env, workers=4)
    with proxy.fault("latency_ms", 20):  # S3 requests take a while: many are in flight at the kill
        m.start()
        try:
            pids = worker_pids(m, 4)
            proxy.reset()
            readers = [start_reader(env, targets, "--threads", "6", "--seconds", "60", "--seed", str(i),
                                    "--stop-after-errors", "50")
                       for i in range(2)]
            wait_until(lambda: proxy.get_count("GET", "images/") >= 20, 60, "reads through the mount")
            os.kill(pids[1], signal.SIGKILL)
            killed = time.monotonic()
            assert m.proc is not None
            status = m.proc.wait(30)
            dying = [collect(r, 30) for r in readers]  # every reader ends (they would read for 60 s)
            ended = time.monotonic() - killed
        finally:
            m.stop()
    log = m.log_file.read_text()
    assert status == 1, m.output()
    assert f"worker 1 (pid {pids[1]}) was killed by SIGKILL: the mount was aborted" in log
    assert not is_mounted(mp)
    assert not any(alive(p) for p in pids)
    assert ended < 20, f"the readers took {ended:.1f}s to see the dead mount"
    for r in dying:  # reads failed (the mount is gone) but none returned wrong or short bytes
        assert not r["bad"] and not r["short"], r
        assert set(r["errors"]) <= {"ENOTCONN", "ECONNABORTED", "ENOENT"}, r
    assert sum(sum(r["errors"].values()) for r in dying) > 0, "the kill did not interrupt any read"
    print("readers saw", [(r["ok"], r["errors"]) for r in dying], f"and ended {ended:.1f}s after the kill")

    with MountProcess(mp, env=env, workers=4):  # the same cache, warm, after the abort
        report = collect(start_reader(env, targets, "--threads", "4", "--passes", "2"), 120)
    assert_correct(report, reads=2 * 2 * len(workset.entries))


# ------------------------------------------------------------------------------------ no worker left


def _umount(m: MountProcess, pids: list[int], target: Path) -> None:
    subprocess.run([sys.executable, "-m", "s3fsimg", "umount", str(m.mountpoint)], cwd=ROOT, check=True,
                   capture_output=True, timeout=60)
    assert m.proc is not None and m.proc.wait(30) == 0, m.output()


def _sigterm(m: MountProcess, pids: list[int], target: Path) -> None:
    assert m.proc is not None
    m.proc.send_signal(signal.SIGTERM)
    assert m.proc.wait(30) == 0, m.output()
    assert not is_mounted(m.mountpoint)


def _sigkill_parent(m: MountProcess, pids: list[int], target: Path) -> None:
    assert m.proc is not None
    m.proc.kill()
    m.proc.wait(10)
    wait_until(lambda: not any(alive(p) for p in pids), 10, "the workers to die with the parent")
    with pytest.raises(OSError) as info, open(target, "rb") as f:  # a dead mount, as with one process
        f.read(1)
    assert info.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)


def _lazy_unmount(m: MountProcess, pids: list[int], target: Path) -> None:
    with open(target, "rb") as f:
        subprocess.run(["fusermount3", "-u", "-z", str(m.mountpoint)], check=True, capture_output=True)
        assert not is_mounted(m.mountpoint)
        time.sleep(0.5)
        assert all(alive(p) for p in pids), "the workers left while a file was still open"
        assert hashlib.sha256(f.read()).hexdigest() == target.name.split(".")[0]  # still served
    assert m.proc is not None and m.proc.wait(30) == 0, m.output()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("end", [_umount, _sigterm, _sigkill_parent, _lazy_unmount],
                         ids=["umount", "sigterm", "sigkill-parent", "lazy-unmount"])
def test_no_worker_survives(end: Callable[[MountProcess, list[int], Path], None], dataset: Dataset,  # noqa: F811
                            mnt_dir: Path) -> None:
    target = mnt_dir / dataset.entries[0].path
    m = MountProcess(mnt_dir, env=dataset.env, workers=4).start()
    try:
        pids = worker_pids(m, 4)
        end(m, pids, target)
        wait_until(lambda: not any(alive(p) for p in pids), 10, "every worker to exit")
    finally:
        m.stop()
    assert not is_mounted(mnt_dir)
