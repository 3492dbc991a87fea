"""Cache warm-up (issue 12): `s3fsimg warm --all` against the cold mount pass and `rclone copy` of the same
objects, at 25 ms first-byte latency per request, in one run, on the mount suite's data.

Workloads, each on a fresh cache or destination, each the best of `rounds` (1 with --quick, else 2):

* warm-up: `s3fsimg warm --all` (32 fetches in flight, its default) into a fresh cache: seconds, MB/s,
  GETs at the proxy;
* the first epoch after it: a mount of that cache read in full by 8 readers, hash-checked: GETs at the
  proxy (the claim is zero) and MB/s;
* the cold mount pass it replaces: a fresh mount on a fresh cache read in full by 8 readers (the mount
  suite's cold read), hash-checked;
* `rclone copy lab:BUCKET/images DIR` with `--transfers 32` (as many in flight as warm) and with its
  default (4), when rclone is installed: the usual way to pre-stage a dataset on local disk.

Ratios: the other side's time ÷ warm's time (higher: warm is faster), for the same bytes.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.common import Lab, Report, Section, run_timed, step, unmount_and_stop
from bench.mount import PASS_READERS, QUICK_SMALL, Mount, Obj, _prepare, _subset, read_all
from bench.write import rclone_env

LATENCY_MS = 25
WARM_THREADS = 32


def _warm(lab: Lab, bucket: str, cache: Path) -> tuple[float, int]:
    """`s3fsimg warm --all` into `cache`: (seconds, GETs of images)."""
    assert lab.proxy is not None
    env = lab.env(bucket, cache, DATASET_CACHE_MAX_BYTES="50G", DATASET_LOG_LEVEL="warning")
    lab.proxy.reset()
    seconds, proc = run_timed([sys.executable, "-m", "s3fsimg", "warm", "--all", "--threads", str(WARM_THREADS)],
                              env=env, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"s3fsimg warm failed: {proc.stderr.strip()[-500:]}")
    return seconds, lab.proxy.get_count("GET", "images/")


def _rclone_copy(lab: Lab, bucket: str, dest: Path, transfers: int, objs: list[Obj]) -> float:
    seconds, proc = run_timed(["rclone", "copy", f"lab:{bucket}/images", str(dest), "--transfers", str(transfers),
                               "--checkers", str(max(8, transfers))], env=rclone_env(lab), timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"rclone copy failed: {proc.stderr.strip()[-500:]}")
    copied = sum(1 for p in dest.rglob("*") if p.is_file())
    if copied != len(objs):
        raise RuntimeError(f"rclone copy made {copied} files, expected {len(objs)}")
    return seconds


def run(lab: Lab, report: Report, args: Any, data: Path) -> None:
    assert lab.proxy is not None
    quick = bool(args.quick)
    rounds = 1 if quick else 2
    sec = report.section("Cache warm-up: s3fsimg warm vs the cold mount pass and rclone copy")
    work = Path(tempfile.mkdtemp(prefix="bench-warm-", dir="/var/tmp" if Path("/var/tmp").is_dir() else None))
    try:
        with step("uploading the data"):
            bucket, objs, _local = _prepare(lab, _subset(data, work, QUICK_SMALL) if quick else data, work)
        total = sum(o.size for o in objs)
        lab.latency(LATENCY_MS)
        warm_s, cold_s, after_s = [], [], []
        warm_gets, after_gets = 0, 0
        rclone: dict[int, list[float]] = {}
        for r in range(rounds):
            with step(f"round {r + 1}: warm --all, then a mount of the warmed cache"):
                m = Mount("s3fsimg", lab, bucket, work, f"warmed-{r}")
                try:
                    seconds, warm_gets = _warm(lab, bucket, m.cache)
                    warm_s.append(seconds)
                    m.start()
                    lab.proxy.reset()
                    t, n, bad = read_all(m.mp, objs, PASS_READERS)
                    after_gets = max(after_gets, lab.proxy.get_count("GET"))
                    if bad or n != total:
                        raise RuntimeError(f"the read after warm-up got wrong bytes: {bad[:1]} ({n} of {total})")
                    after_s.append(t)
                finally:
                    m.stop()
            with step(f"round {r + 1}: cold mount pass"), Mount("s3fsimg", lab, bucket, work, f"cold-{r}") as m:
                t, n, bad = read_all(m.mp, objs, PASS_READERS)
                if bad or n != total:
                    raise RuntimeError(f"the cold read got wrong bytes: {bad[:1]} ({n} of {total})")
                cold_s.append(t)
            if shutil.which("rclone"):
                for transfers in (WARM_THREADS, 4):
                    dest = work / f"rclone-{transfers}-{r}"
                    with step(f"round {r + 1}: rclone copy, {transfers} transfers"):
                        try:
                            rclone.setdefault(transfers, []).append(_rclone_copy(lab, bucket, dest, transfers, objs))
                        except (RuntimeError, subprocess.TimeoutExpired) as exc:
                            print(f"  !! {exc}", flush=True)
                            sec.notes.append(f"rclone copy ({transfers} transfers) failed: {str(exc)[:300]}")
                        finally:
                            shutil.rmtree(dest, ignore_errors=True)
        _report(sec, objs, total, min(warm_s), warm_gets, min(after_s), after_gets, min(cold_s),
                {k: min(v) for k, v in rclone.items() if v}, quick)
    finally:
        lab.latency(0)
        for mp in work.glob("mnt-*"):
            unmount_and_stop(mp, None)
        shutil.rmtree(work, ignore_errors=True)


def _report(sec: Section, objs: list[Obj], total: int, warm: float, warm_gets: int, after: float, after_gets: int,
            cold: float, rclone: dict[int, float], quick: bool) -> None:
    mb = total / 1e6
    sec.intro = (f"{len(objs)} distinct images, {mb:.0f} MB, at {LATENCY_MS} ms first-byte latency per request "
                 f"(lab proxy). `s3fsimg warm --all` ({WARM_THREADS} fetches in flight) fills a fresh cache; the "
                 f"cold mount pass is a fresh mount on a fresh cache read by {PASS_READERS} readers; `rclone copy` "
                 "copies the same objects to a local directory. Best of "
                 f"{'one round' if quick else 'two rounds'}."
                 + (" **Quick mode** (CI): a subset; the ratios are indicative only." if quick else ""))
    sec.add(f"warm-up, {LATENCY_MS} ms", mb / warm, "MB/s", baseline=f"cold mount pass, {PASS_READERS} readers",
            ratio=cold / warm, goal=1.0)
    for transfers, seconds in sorted(rclone.items(), reverse=True):
        sec.add(f"warm-up, {LATENCY_MS} ms (vs rclone copy)", mb / warm, "MB/s",
                baseline=f"rclone copy, --transfers {transfers}", ratio=seconds / warm,
                goal=1.0 if transfers == WARM_THREADS else None)
    sec.add("warm-up GETs", float(warm_gets), "requests", note=f"{len(objs)} objects")
    sec.add(f"first full read of a mount after warm-up, {PASS_READERS} readers: GETs", float(after_gets),
            "requests", goal=0, lower_is_better=True)
    sec.add(f"first full read of a mount after warm-up, {PASS_READERS} readers", mb / after, "MB/s",
            baseline="cold mount pass", ratio=cold / after)
    rows = [["s3fsimg warm --all", f"{warm:.2f}", f"{mb / warm:.1f}"],
            [f"cold mount pass ({PASS_READERS} readers)", f"{cold:.2f}", f"{mb / cold:.1f}"],
            [f"mount read after warm-up ({PASS_READERS} readers)", f"{after:.2f}", f"{mb / after:.1f}"]]
    rows += [[f"rclone copy --transfers {t}", f"{s:.2f}", f"{mb / s:.1f}"] for t, s in sorted(rclone.items())]
    sec.tables.append((["workload", "seconds", "MB/s"], rows))
    if not rclone:
        sec.notes.append("rclone is not installed on this machine: no rclone copy figure (apt-get install rclone).")
    sec.notes.append(
        "Commands: `python -m s3fsimg warm --all --threads 32` (S3_ENDPOINT_URL=proxy, S3_ADDRESSING_STYLE=path, "
        "DATASET_CACHE_DIR=fresh dir, DATASET_CACHE_MAX_BYTES=50G); the mounts as in the mount suite; "
        "`rclone copy lab:BUCKET/images DIR --transfers N --checkers max(8, N)` with the remote configured as in "
        "the mount suite. Every file read through a mount is hashed and checked against the manifest; rclone "
        "checks sizes and MD5 ETags itself.")
