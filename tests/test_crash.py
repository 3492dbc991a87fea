"""Crash and sharing (issue 11): after each of these, every read is correct (hash, and every partial read
against the source bytes).

* SIGKILL of the mount while readers (other processes, tests/mountreader.py) are in the middle of
  whole and partial reads; lazy unmount; a remount on the same cache reads everything right. (The kill
  of an idle mount, and that the remount reuses the cache: tests/test_mount.py.)
* SIGKILL of `s3fsimg fetch` processes while they fill the cache (bodies slowed by the proxy, so the
  kills land mid-transfer); then `fetch` processes at once return only verified files. (The kill of a
  `Dataset` reading by chunks: tests/test_cache.py.)
* A mount and a `Dataset` process whose shared cache is on a small tmpfs that fills. (The `Dataset`
  alone on a full tmpfs: tests/test_cache.py.)
* Two mounts and ten `Dataset` processes on one cache under eviction (a bound of a quarter of the data).
  Ten processes that `fetch` and then open each path under the same eviction, and one `fetch` of more
  objects than the bound, are expected failures for now (the path `fetch` returns is not protected from
  eviction: see each test).

The mount processes' own logs are not checked for warnings (a full disk warns, on purpose).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from s3fsimg.manifest import Entry
from tests.cacheworker import ROOT, build_workset, cache_usage, collect, start_worker, upload_dir, worker_env
from tests.mountutil import MountProcess, fuse_test, is_mounted, mounted_tmpfs

pytestmark = [fuse_test, pytest.mark.fuse]


@dataclass
class Workset:
    """The uploaded dataset: entries by sha256, and each object's source file."""

    entries: dict[str, Entry]
    sources: dict[str, Path]

    @property
    def total(self) -> int:
        return sum(e.bytes for e in self.entries.values())

    def targets(self, mountpoint: Path, out: Path) -> Path:
        """The targets file of tests/mountreader.py for this mount."""
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps([{"path": str(mountpoint / e.path), "source": str(self.sources[sha]),
                                    "sha256": sha} for sha, e in sorted(self.entries.items())]))
        return out


@pytest.fixture
def workset(s3_env: dict[str, str], sample_set: Any, large_set: Any, tmp_path: Path) -> Workset:
    """30 small images and the 4 large (1-3 MB, block-read) ones, uploaded."""
    root = build_workset(tmp_path / "ws", list(sample_set.distinct_images.values())[:30], large_set.large)
    entries = upload_dir(root, s3_env)
    sources = {hashlib.sha256(p.read_bytes()).hexdigest(): p for p in root.iterdir()}
    assert set(entries) <= set(sources) and len(entries) == 34
    return Workset(entries, sources)


def start_reader(env: dict[str, str], targets: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "tests.mountreader", "--targets", str(targets), *args],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def assert_correct(report: dict[str, Any], reads: int | None = None) -> None:
    detail: dict[str, Any] = {k: report[k] for k in ("bad", "short", "errors", "first_errors") if k in report}
    detail["stderr"] = report["stderr"][-2000:]
    assert report["returncode"] == 0 and not report["bad"] and not report.get("short"), detail
    assert not report["errors"], detail
    if reads is not None:
        assert report["ok"] == reads, detail


def wait_for(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


# ------------------------------------------------------------------------ SIGKILL of the mount


@pytest.mark.timeout(180)
def test_sigkill_of_the_mount_during_heavy_reads_then_remount_reads_everything_right(
        workset: Workset, s3_env: dict[str, str], proxy: Any, tmp_path: Path) -> None:
    env = worker_env(s3_env, DATASET_BLOCK_SIZE="64K", DATASET_LOG_LEVEL="info")
    mp = tmp_path / "mnt"
    targets = workset.targets(mp, tmp_path / "targets.json")
    m = MountProcess(mp, env=env)
    with proxy.fault("latency_ms", 20):  # S3 requests take a while: many are in flight at the kill
        m.start()
        try:
            proxy.reset()
            readers = [start_reader(env, targets, "--threads", "6", "--seconds", "8", "--seed", str(i),
                                    "--stop-after-errors", "100")
                       for i in range(2)]
            wait_for(lambda: proxy.get_count("GET", "images/") >= 20, 60, "reads through the mount")
            assert m.proc is not None
            m.proc.send_signal(signal.SIGKILL)
            m.proc.wait(10)
            gets_at_kill = proxy.get_count("GET", "images/")
            dying = [collect(r, 60) for r in readers]  # every reader ends: no read hangs on the dead mount
        finally:
            m.stop()
    assert not is_mounted(mp)
    for r in dying:  # reads failed (the mount is gone) but none returned wrong or short bytes
        assert not r["bad"] and not r["short"], r
    print(f"{gets_at_kill} image GETs before the kill; readers saw", [(r["ok"], r["errors"]) for r in dying])
    assert sum(sum(r["errors"].values()) for r in dying) > 0, "the kill did not interrupt any read"

    with MountProcess(mp, env=env):  # the same cache, after a kill at any instant
        report = collect(start_reader(env, targets, "--threads", "4", "--passes", "2"), 120)
    assert_correct(report, reads=2 * 2 * len(workset.entries))


# ---------------------------------------------------------------------- SIGKILL of fetch processes


def _fetch(env: dict[str, str], ids: list[str], cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "s3fsimg", "fetch", *ids], env=env, cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _shuffled(ids: list[str], seed: int) -> list[str]:
    order = list(ids)
    random.Random(seed).shuffle(order)
    return order


@pytest.mark.timeout(240)
def test_sigkill_of_fetch_processes_while_they_fill_the_cache_then_every_fetch_is_verified(
        workset: Workset, s3_env: dict[str, str], proxy: Any, tmp_path: Path) -> None:
    env = worker_env(s3_env)
    ids = sorted(workset.entries)
    with proxy.fault("bandwidth_bps", 1_000_000):  # bodies arrive slowly: the kills land mid-transfer
        proxy.reset()
        victims = [_fetch(env, _shuffled(ids, i), tmp_path) for i in range(4)]
        try:
            wait_for(lambda: proxy.get_count("GET", "images/") >= 4, 60, "the fetches to start")
            for v in victims:
                time.sleep(0.4)
                v.send_signal(signal.SIGKILL)
        finally:
            for v in victims:
                if v.poll() is None:
                    v.kill()
                v.communicate()
        gets = proxy.get_count("GET", "images/")
    assert [v.returncode for v in victims] == [-signal.SIGKILL] * 4, "a fetch finished before its kill"
    print(f"{gets} image GETs before the last kill")

    fetchers = [(order, _fetch(env, order, tmp_path)) for order in (_shuffled(ids, 10 + i) for i in range(3))]
    for order, p in fetchers:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err[-3000:]
        paths = out.splitlines()
        assert len(paths) == len(order), out
        for sha, path in zip(order, paths, strict=True):
            assert hashlib.sha256(Path(path).read_bytes()).hexdigest() == sha, (sha, path)
    proxy.reset()
    out, err = _fetch(env, ids, tmp_path).communicate(timeout=120)
    assert [hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in out.splitlines()] == ids, err
    assert proxy.get_count("GET", "images/") == 0  # all of it was cached, complete and verified


# ------------------------------------------------------------------------------ a full tmpfs


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    with mounted_tmpfs(tmp_path / "tmpfs", "6m") as mnt:
        yield mnt


@pytest.mark.timeout(240)
def test_a_mount_and_a_dataset_on_a_cache_on_a_full_tmpfs_read_right(
        workset: Workset, s3_env: dict[str, str], proxy: Any, tmp_path: Path, small_tmpfs: Path) -> None:
    assert workset.total > 6 << 20, workset.total  # the data does not fit
    env = worker_env(s3_env, DATASET_CACHE_DIR=str(small_tmpfs / "cache"), DATASET_CACHE_MAX_BYTES="1G",
                     DATASET_BLOCK_SIZE="64K", DATASET_LOG_LEVEL="warning")
    mp = tmp_path / "mnt"
    targets = workset.targets(mp, tmp_path / "targets.json")
    m = MountProcess(mp, env=env)
    with m:
        reader = start_reader(env, targets, "--threads", "4", "--passes", "2")
        api = start_worker(env, sorted(workset.entries), tmp_path / "api", "--mode", "read", "--passes", "2",
                           "--threads", "2")
        report, api_report = collect(reader, 180), collect(api, 180)
    assert_correct(report, reads=2 * 2 * len(workset.entries))
    assert api_report["returncode"] == 0 and not api_report["bad"] and not api_report["errors"], api_report
    said = m.log_file.read_text(errors="replace") + api_report["stderr"]
    assert re.search(r"disk full|No space left", said), "the tmpfs never filled: nothing was tested"


# ------------------------------------------------------------------ two mounts, ten fetchers


def _bound(workset: Workset) -> int:
    """A quarter of the data (at least 1.5x the largest object): eviction all the time."""
    return max(int(max(e.bytes for e in workset.entries.values()) * 1.5), workset.total // 4)


@pytest.mark.timeout(300)
def test_two_mounts_and_ten_processes_on_one_cache_under_eviction(workset: Workset, s3_env: dict[str, str],
                                                                 proxy: Any, tmp_path: Path) -> None:
    """Two mounts (three reader threads each) and ten `Dataset` processes (whole reads, and reads by
    chunks: the block path) on one cache bounded at a quarter of the data: every byte correct."""
    bound = _bound(workset)
    env = worker_env(s3_env, DATASET_CACHE_MAX_BYTES=str(bound), DATASET_BLOCK_SIZE="64K",
                     DATASET_LOG_LEVEL="warning")
    mps = [tmp_path / "mnt1", tmp_path / "mnt2"]
    mounts = [MountProcess(mp, env=env) for mp in mps]
    ids = sorted(workset.entries)
    try:
        for m in mounts:
            m.start()
        readers = [start_reader(env, workset.targets(mp, tmp_path / f"targets{i}.json"), "--threads", "3",
                                "--passes", "2", "--seed", str(i)) for i, mp in enumerate(mps)]
        workers = [start_worker(env, ids, tmp_path / "api", "--mode", ("read", "chunks")[i % 2], "--chunk", "70000",
                                "--passes", "2", "--shuffle", str(i), name=f"w{i}") for i in range(10)]
        reports = [collect(p, 240) for p in readers]
        worked = [collect(p, 240) for p in workers]
    finally:
        for m in mounts:
            m.stop()
    for r in reports:
        assert_correct(r, reads=2 * 2 * len(ids))
    for r in worked:
        assert r["returncode"] == 0 and not r["bad"] and not r["errors"] and r["ok"] == 2 * len(ids), \
            (r["bad"], r["errors"][:5], r["stderr"][-2000:])
    print(f"bound {bound}, data {workset.total}, cache usage after {cache_usage(Path(s3_env['DATASET_CACHE_DIR']))}")
    assert workset.total > bound  # eviction had to run


@pytest.mark.timeout(300)
def test_ten_fetching_processes_under_eviction_can_open_every_path_they_get(
        workset: Workset, s3_env: dict[str, str], proxy: Any, tmp_path: Path) -> None:
    """Ten processes `Dataset.fetch` then read each path at once, on one cache bounded at a quarter of the
    data. It failed (1 run in 2 on 2 cores) with `FileNotFoundError` on a path fetch had just returned,
    another process having evicted it in between; eviction now takes files used in the last
    `ledger.EVICT_GRACE` seconds only when nothing older is left. No wrong byte was ever read."""
    env = worker_env(s3_env, DATASET_CACHE_MAX_BYTES=str(_bound(workset)), DATASET_LOG_LEVEL="warning")
    ids = sorted(workset.entries)
    fetchers = [start_worker(env, ids, tmp_path / "fetch", "--mode", "fetch", "--passes", "3", "--shuffle", str(i),
                             name=f"f{i}") for i in range(10)]
    fetched = [collect(p, 240) for p in fetchers]
    assert [r["bad"] for r in fetched] == [[]] * 10  # never a wrong byte
    errors = [e for r in fetched for e in r["errors"]]
    if errors:  # the known limit; a wrong byte above is never excused
        pytest.xfail(f"{len(errors)} failed fetches, first: {errors[:3]}: a path fetch returns can be evicted by "
                     "another process before it is opened when every file in the cache was used in the last 10 s "
                     "(the bound is a quarter of what the processes use): 1 in 1,020 after the grace rule, 2-3 "
                     "before it; README 'What we chose'")


@pytest.mark.timeout(120)
def test_fetch_of_more_than_the_bound_prints_only_paths_that_exist(workset: Workset, s3_env: dict[str, str],
                                                                   proxy: Any, tmp_path: Path) -> None:
    """`s3fsimg fetch ID...` of 34 objects (10 MB) with a bound of a third of that printed 34 paths,
    16 of which no longer existed, and exited 0 (Dataset.fetch_many returns all paths at the end, each
    unpinned once fetched). Either every printed path exists, or the command fails saying why."""
    env = worker_env(s3_env, DATASET_CACHE_MAX_BYTES=str(workset.total // 3))
    ids = sorted(workset.entries)
    proc = _fetch(env, ids, tmp_path)
    out, err = proc.communicate(timeout=100)
    paths = out.splitlines()
    gone = [p for p in paths if not os.path.exists(p)]
    assert gone == [], f"{len(gone)} of {len(paths)} printed paths do not exist; stderr: {err[-500:]}"
    # Here they cannot all fit: the command says so in one line, before fetching anything.
    assert proc.returncode == 1 and paths == [], (proc.returncode, err)
    assert "do not fit in the cache bound" in err and err.count("\n") == 1, err
    assert proxy.get_count("GET", "images/") == 0
