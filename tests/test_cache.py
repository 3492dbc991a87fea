"""The shared cache directory under many processes (worker processes: tests/cacheworker.py), through the
lab proxy in front of moto, counting GETs at the proxy: single-flight across processes, the size bound
under concurrent filling, SIGKILL while filling, a full tmpfs, permissions, `s3fsimg cache` commands."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from s3fsimg.dataset import Dataset
from s3fsimg.errors import CacheError
from s3fsimg.manifest import Entry
from tests.asuser import probe_as_other_user
from tests.cacheworker import (
    ROOT,
    UsageSampler,
    build_workset,
    cache_usage,
    collect,
    run_workers,
    start_worker,
    upload_dir,
    worker_env,
)
from tests.checklogs import expect_logs
from tests.mountutil import mounted_tmpfs

pytestmark = pytest.mark.timeout(90)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def fifty(s3_env: dict[str, str], sample_set: Any, large_set: Any, tmp_path: Path) -> dict[str, Entry]:
    """50 distinct images: 46 small ones and the 4 large (1-3 MB) ones; {sha256: Entry}."""
    small = list(sample_set.distinct_images.values())[:46]
    entries = upload_dir(build_workset(tmp_path / "ws", small, large_set.large), s3_env)
    assert len(entries) == 50
    assert sum(e.bytes > 1_000_000 for e in entries.values()) == 4
    return entries


def _image_gets(proxy: Any) -> dict[str, int]:
    by_key: dict[str, int] = proxy.counts()["by_method_key"].get("GET", {})
    return {k: n for k, n in by_key.items() if "images/" in k}


def _assert_clean(reports: list[dict[str, Any]], n: int) -> None:
    for r in reports:
        detail = (r["bad"], r["errors"][:5], r["stderr"][-2000:])
        assert r["returncode"] == 0 and not r["bad"] and not r["errors"], detail
        assert r["ok"] == n, r


# ------------------------------------------------------------------------------------ 1. single flight


@pytest.mark.parametrize("mode", ["fetch", "read"])
def test_eight_processes_same_fifty_images(fifty: dict[str, Entry], s3_env: dict[str, str], proxy: Any,
                                           tmp_path: Path, mode: str) -> None:
    env = worker_env(s3_env)
    proxy.reset()
    reports = run_workers(env, sorted(fifty), tmp_path / "workers", 8, "--mode", mode, "--threads", "4")
    _assert_clean(reports, 50)
    gets = _image_gets(proxy)
    assert set(gets) == {e.path for e in fifty.values()}
    worst = max(gets.values())
    print(f"{mode}: {sum(gets.values())} image GETs for 50 objects, at most {worst} per object;",
          "seconds per worker:", [r["seconds"] for r in reports])
    if mode == "fetch":
        assert worst <= 2, {k: n for k, n in gets.items() if n > 2}
    else:
        # open().read() of a >1 MB object takes the block path, which is single-flight within a process
        # only (blocks are not locked across processes): at most one GET per process and object.
        assert worst <= 8
        assert max(n for k, n in gets.items() if fifty[k.rsplit("/", 1)[1].split(".")[0]].bytes < 1_000_000) <= 2


# ------------------------------------------------------------------------------------------- 3. bound


def _bound_and_slack(fifty: dict[str, Entry]) -> tuple[int, int, int]:
    """(working set, cache bound, stated slack) of the 4-process bound tests (64 KiB blocks). The slack
    is what processes have in flight (data being written lives in tmp/, so objects/ + blocks/ stay
    within the bound otherwise): a few blocks each, and an object being completed (two processes
    completing large objects at once hold both until the ledger, which counts both, evicts one: with a
    bound of 1.5x the largest object that happens); plus file-system rounding (4 KiB a file)."""
    total = sum(e.bytes for e in fifty.values())
    largest = max(e.bytes for e in fifty.values())
    return total, max(int(largest * 1.5), total // 3), 4 * 4 * (64 << 10) + largest + 4096 * len(fifty)


def test_bound_holds_with_four_processes(fifty: dict[str, Entry], s3_env: dict[str, str], proxy: Any,
                                         tmp_path: Path) -> None:
    total, bound, slack = _bound_and_slack(fifty)
    env = worker_env(s3_env, DATASET_CACHE_MAX_BYTES=str(bound), DATASET_BLOCK_SIZE="64K")
    cache = Path(s3_env["DATASET_CACHE_DIR"])
    with UsageSampler(cache) as sampler:
        reports = run_workers(env, sorted(fifty), tmp_path / "a", 4, "--mode", "chunks", "--chunk", "65536",
                              "--passes", "2", "--threads", "2", timeout=80)
    _assert_clean(reports, 100)
    print(f"bound {bound}, working set {total}, peak usage {sampler.peak} over {len(sampler.samples)} samples, "
          f"final {sampler.samples[-1]}, slack {slack}")
    assert sampler.peak <= bound + slack


def test_bound_holds_with_four_processes_mixed(fifty: dict[str, Entry], s3_env: dict[str, str], proxy: Any,
                                               tmp_path: Path) -> None:
    """Four processes at once, two reading by chunks (blocks), two by whole reads (objects)."""
    total, bound, slack = _bound_and_slack(fifty)
    env = worker_env(s3_env, DATASET_CACHE_MAX_BYTES=str(bound), DATASET_BLOCK_SIZE="64K")
    cache = Path(s3_env["DATASET_CACHE_DIR"])
    ids = sorted(fifty)
    with UsageSampler(cache) as sampler:
        procs = [start_worker(env, ids, tmp_path / "w", "--mode", mode, "--chunk", "65536", "--passes", "2",
                              "--shuffle", str(i), name=f"w{i}")
                 for i, mode in enumerate(["chunks", "read", "chunks", "read"])]
        reports = [collect(p, 80) for p in procs]
    _assert_clean(reports, 100)
    ledger = Dataset.from_env(cache_max_bytes=str(bound)).reader.cache.stats()
    print(f"bound {bound}, working set {total}, peak usage {sampler.peak} over {len(sampler.samples)} samples, "
          f"final {sampler.samples[-1]}, ledger {ledger['bytes']}, slack {slack}")
    assert sampler.peak <= bound + slack
    assert ledger["bytes"] <= bound
    assert abs(cache_usage(cache) - ledger["bytes"]) <= 4096 * (ledger["files"] + 1)  # the ledger is right


# ------------------------------------------------------------------------------------- 4. SIGKILL


@pytest.mark.parametrize("kill_after", [3, 20])
def test_sigkill_while_filling_then_fresh_process(fifty: dict[str, Entry], s3_env: dict[str, str], proxy: Any,
                                                  tmp_path: Path, kill_after: int) -> None:
    env = worker_env(s3_env, DATASET_BLOCK_SIZE="64K")
    ids = sorted(fifty, key=lambda s: -fifty[s].bytes)  # large ones first: blocks in flight when killed
    progress = tmp_path / "progress"
    victim = start_worker(env, ids, tmp_path / "victim", "--mode", "chunks", "--chunk", "50000", "--threads", "4",
                          "--progress", str(progress), name="victim")
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            done = len(progress.read_text().splitlines()) if progress.exists() else 0
            if done >= kill_after or victim.poll() is not None:
                break
            time.sleep(0.005)
        assert victim.poll() is None, "the worker finished before it could be killed"
        os.kill(victim.pid, signal.SIGKILL)
    finally:
        if victim.poll() is None:
            victim.kill()
        victim.wait()
    cache = Path(s3_env["DATASET_CACHE_DIR"])
    print("killed after", len(progress.read_text().splitlines()), "images; leftovers in tmp/:",
          len(os.listdir(cache / "v1" / "tmp")))
    # A fresh process reads everything correctly (by chunks and whole), then the set is cached.
    _assert_clean(run_workers(env, ids, tmp_path / "fresh", 1, "--mode", "chunks", "--chunk", "50000",
                              "--threads", "4"), 50)
    _assert_clean(run_workers(env, ids, tmp_path / "fetch", 1, "--mode", "fetch"), 50)
    assert os.listdir(cache / "v1" / "tmp") == []  # the dead process's temp files are gone
    proxy.reset()
    _assert_clean(run_workers(env, ids, tmp_path / "second", 2, "--mode", "read"), 50)
    _assert_clean(run_workers(env, ids, tmp_path / "third", 1, "--mode", "fetch"), 50)
    counts = proxy.counts()
    print("second pass:", counts["by_method"])
    assert _image_gets(proxy) == {}
    assert counts["by_method"].get("GET", 0) == 0


# ------------------------------------------------------------------------------------- 6. full disk


@pytest.fixture
def tmpfs(tmp_path: Path) -> Any:
    with mounted_tmpfs(tmp_path / "tmpfs", "8m") as mnt:
        yield mnt


def test_cache_on_a_full_tmpfs(fifty: dict[str, Entry], s3_env: dict[str, str], proxy: Any, tmpfs: Path,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    total = sum(e.bytes for e in fifty.values())
    assert total > 8 << 20, total  # the working set does not fit
    monkeypatch.setenv("DATASET_CACHE_DIR", str(tmpfs / "cache"))
    monkeypatch.setenv("DATASET_CACHE_MAX_BYTES", "1G")
    ids = sorted(fifty)
    cache_errors = 0
    # A full disk is reported (how often depends on eviction timing); reads still succeed.
    with (
        expect_logs(r"^cache: disk full in .*; evicting and retrying once$") as full,
        expect_logs(r"^cache: cannot store .* \(No space left on device\); serving it without caching$") as unstored,
        expect_logs(r"^cache: cannot record .* in the ledger .*; serving it without caching$") as unrecorded,
        Dataset.from_env(block_size="64K") as ds,
    ):
        for _ in range(2):
            for sha in ids:
                with ds.open(sha) as f:
                    assert _digest(f.read()) == sha
                with ds.open(sha) as f:
                    parts = []
                    while piece := f.read(70_000):
                        parts.append(piece)
                    assert _digest(b"".join(parts)) == sha
                try:
                    path = ds.fetch(sha)
                except CacheError as exc:
                    cache_errors += 1
                    assert str(exc)
                else:
                    assert _digest(path.read_bytes()) == sha
        usage = os.statvfs(tmpfs)
        print(f"tmpfs free {usage.f_bavail * usage.f_frsize}, fetch CacheErrors {cache_errors}, "
              f"reader stats {ds.reader.stats()}")
    assert full.seen + unstored.seen + unrecorded.seen + cache_errors > 0  # the disk did fill


# ---------------------------------------------------------------------- permissions and the commands


@pytest.mark.parametrize("existing_root", [False, True])
def test_cache_dir_is_private(fifty: dict[str, Entry], s3_env: dict[str, str], proxy: Any, existing_root: bool,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Every directory the cache creates is 0700 and every file 0600, in the whole cache directory (objects,
    blocks, ledger, locks, the manifest, its index; the uploader's hash cache), and another user can read
    none of them, even when the cache root is an existing directory others may enter."""
    cache = Path(s3_env["DATASET_CACHE_DIR"])
    if existing_root:  # outside tmp_path (0700), so that the other user reaches the root
        top = Path(tempfile.mkdtemp(prefix="s3fsimg-cache-"))
        os.chmod(top, 0o755)
        cache = top / "cache"
        cache.mkdir(mode=0o755)
        monkeypatch.setenv("DATASET_CACHE_DIR", str(cache))
    try:
        _fill_and_check_private(fifty, cache, existing_root)
    finally:
        if existing_root:
            shutil.rmtree(cache.parent)


def _fill_and_check_private(fifty: dict[str, Entry], cache: Path, existing_root: bool) -> None:
    old = os.umask(0o022)
    try:
        with Dataset.from_env(block_size="64K") as ds:
            shas = sorted(fifty)
            for sha in shas[:10]:
                ds.fetch(sha)
            big = max(fifty.values(), key=lambda e: e.bytes)
            with ds.open(big.sha256) as f:
                f.read(100_000)  # leaves blocks
    finally:
        os.umask(old)
    assert stat.S_IMODE(cache.stat().st_mode) == (0o755 if existing_root else 0o700)
    exposed, paths = [], []
    for dirpath, dirs, files in os.walk(cache):
        for name in [*files, *dirs]:
            path = os.path.join(dirpath, name)
            paths.append(path)
            mode = stat.S_IMODE(os.lstat(path).st_mode)
            if mode & 0o077:
                exposed.append((path, oct(mode)))
    assert exposed == [], "\n".join(f"{p} {m}" for p, m in exposed)
    tops = {Path(p).relative_to(cache).parts[0] for p in paths}
    assert tops >= ({"v1", "index", "manifests"} if existing_root else {"v1", "index", "manifests", "hashes"}), tops
    if os.getuid() != 0:
        pytest.skip("the modes are right; trying them as another user needs root")
    tried = probe_as_other_user([cache, *paths])
    assert tried.pop(str(cache)) == ("ok" if existing_root else "EACCES")
    assert set(tried.values()) == {"EACCES"}, {p: r for p, r in tried.items() if r != "EACCES"}


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "s3fsimg", *args], env=worker_env(env), cwd=ROOT / "tests",
                          capture_output=True, text=True, timeout=60)


def test_cache_stats_and_clear_commands(fifty: dict[str, Entry], s3_env: dict[str, str], proxy: Any) -> None:
    shas = sorted(fifty)
    with Dataset.from_env(block_size="64K") as ds:
        for sha in shas[:5]:
            ds.fetch(sha)
        big = max(fifty.values(), key=lambda e: e.bytes)
        with ds.open(big.sha256) as f:
            f.read(100_000)
    r = _cli(s3_env, "cache", "stats", "--json")
    assert r.returncode == 0, r.stderr
    stats = json.loads(r.stdout)
    expected_objects = sum(1 for s in shas[:5] if fifty[s].sha256 != big.sha256)
    assert stats["objects"] == expected_objects
    assert stats["object_bytes"] == sum(fifty[s].bytes for s in shas[:5] if s != big.sha256)
    assert stats["blocks"] >= 1 and stats["block_bytes"] >= 100_000
    assert stats["maps"] == 1  # the large object's block map (uploaded with it), fetched with its first block
    assert stats["bytes"] == stats["object_bytes"] + stats["block_bytes"] + stats["map_bytes"]
    r = _cli(s3_env, "cache", "stats")
    assert r.returncode == 0 and "complete objects" in r.stdout, r
    assert "testing-secret" not in r.stdout + r.stderr

    r = _cli(s3_env, "cache", "clear")
    assert r.returncode == 0 and "cleared" in r.stdout, r
    stats = json.loads(_cli(s3_env, "cache", "stats", "--json").stdout)
    assert stats["bytes"] == 0 and stats["files"] == 0
    assert cache_usage(Path(s3_env["DATASET_CACHE_DIR"])) == 0
    # After a clear, reads refetch and are right.
    proxy.reset()
    with Dataset.from_env() as ds:
        for sha in shas[:5]:
            assert _digest(ds.fetch(sha).read_bytes()) == sha
    assert len(_image_gets(proxy)) == 5
