"""Scale (issue 4 "Done when" 7, issue 5 scale part): a generated manifest of N entries (1,000,000 by
default, `--entries`; 30,000 with `--quick`) whose objects do not exist, measured as a user meets it,
with the real CLI in subprocesses against the lab's S3 server (through the counting proxy):

- first mount (cold cache dir: the manifest is downloaded, hashed and compiled into the index) and a
  mount with the index cached: from starting `s3fsimg mount --foreground` to the mount answering;
- the mount process's peak RSS (VmHWM of the serving process, read before unmounting);
- random `os.stat` per second of names from the manifest (on a fresh mount: the kernel has cached none);
- `find MOUNT/images -type f | wc -l` and `find MOUNT -type f | wc -l`: time and the exact count;
- S3 requests made during stat + find (counted at the proxy: must be 0);
- `s3fsimg validate FILE`: time and peak RSS (the child's VmHWM, polled).

The manifest generator is deterministic (entry i is object i, or a repeat of object i-1 every
DUP_EVERY lines; every entry has a logical id, an ETag and a source path in one of DIRS folders), so
names can be computed for any i without reading the file back.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import ROOT, Lab, Report, is_mounted, step, unmount_and_stop, vm_hwm_mb
from s3fsimg_lab.moto import s3_client

DUP_EVERY = 20  # every 20th line names the previous line's object again (another id, another source path)
DIRS = 1000  # source folders of the by-path tree
MANIFEST_KEY = "manifests/inventory-v1.jsonl"


def _seed(i: int) -> int:
    return i - 1 if i % DUP_EVERY == 0 and i else i


def _sha(seed: int) -> str:
    return hashlib.sha256(str(seed).encode()).hexdigest()


def generate(path: Path, n: int) -> tuple[int, int]:
    """Write the manifest of `n` entries; returns (distinct objects, names in the whole tree)."""
    objects = 0
    with open(path, "w", encoding="utf-8", buffering=1 << 20) as out:
        lines = []
        for i in range(n):
            seed = _seed(i)
            objects += seed == i
            sha = _sha(seed)
            lines.append(f'{{"sha256":"{sha}","path":"images/{sha[:2]}/{sha[2:4]}/{sha}.jpg",'
                         f'"bytes":{1000 + seed % 5000},'
                         f'"content_type":"image/jpeg","width":64,"height":48,"logical_id":"ID-{i:08d}",'
                         f'"etag":"\\"{sha[:32]}\\"","source_path":"class{i % DIRS:04d}/img{i:08d}.jpg"}}\n')
            if len(lines) >= 10_000:
                out.write("".join(lines))
                lines.clear()
        out.write("".join(lines))
    # images/ (one per object) + by-id (one per entry: ids are unique) + by-path (one per entry) + manifest.jsonl
    return objects, objects + 2 * n + 1


def names_of(i: int) -> list[str]:
    sha = _sha(_seed(i))
    base = f"{sha}.jpg"
    return [f"images/{sha[:2]}/{sha[2:4]}/{base}", f"by-id/ID-{i:08d}/{base}",
            f"by-path/class{i % DIRS:04d}/img{i:08d}.jpg"]


class Mount:
    """`s3fsimg mount MP --foreground` in a subprocess; always unmounted and stopped by `stop()`."""

    def __init__(self, mp: Path, env: dict[str, str], log: Path) -> None:
        self.mp, self.env, self.log = mp, env, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 600) -> float:
        started = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, "-m", "s3fsimg", "mount", str(self.mp), "--foreground",
                                      "--log-file", str(self.log)], env=self.env, cwd=ROOT,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        while time.perf_counter() - started < timeout:
            if is_mounted(self.mp):
                with contextlib.suppress(OSError):
                    if os.stat(self.mp).st_ino == 1:
                        return time.perf_counter() - started
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise SystemExit(f"mount failed: {err}\n{self.log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.005)
        raise SystemExit(f"mount did not answer within {timeout}s")

    def peak_rss_mb(self) -> float:
        assert self.proc is not None
        return vm_hwm_mb(self.proc.pid)

    def stop(self) -> None:
        unmount_and_stop(self.mp, self.proc, timeout=30)
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()


def count_files(root: Path) -> tuple[float, int]:
    """`find ROOT -type f | wc -l`, as a shell runs it: (seconds, count)."""
    started = time.perf_counter()
    out = subprocess.run(f"find {root} -type f | wc -l", shell=True, capture_output=True, text=True, check=True)
    return time.perf_counter() - started, int(out.stdout.strip())


def run_child(cmd: list[str], env: dict[str, str]) -> tuple[float, float, int, str]:
    """(seconds, peak RSS MB, exit code, stderr) of one child process. The peak is the child's VmHWM,
    polled until it exits: wait4's ru_maxrss would count the bench's own memory, which the child
    holds between fork and exec."""
    started = time.perf_counter()
    peak = 0.0
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
        while proc.poll() is None:
            peak = max(peak, vm_hwm_mb(proc.pid))
            time.sleep(0.02)
        elapsed = time.perf_counter() - started
        err.seek(0)
        return elapsed, peak, int(proc.returncode), err.read().decode(errors="replace")


def run(lab: Lab, report: Report, args: Any, data_dir: Path) -> None:
    n = args.entries or (30_000 if args.quick else 1_000_000)
    sec = report.section(f"Scale: a {n:,}-entry manifest",
                         "A generated manifest whose objects do not exist (every line with a logical id, an ETag and "
                         f"a source path in {DIRS} folders; every {DUP_EVERY}th line a second name of the previous "
                         "object), served by the real CLI against the lab S3 server through the counting proxy. "
                         "Mount times run from starting `s3fsimg mount --foreground` to the mount answering.")
    work = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    mounts: list[Mount] = []
    try:
        manifest = work / "manifest.jsonl"
        with step(f"generating a {n:,}-entry manifest"):
            objects, names = generate(manifest, n)
        size_mb = manifest.stat().st_size / 1e6
        bucket = lab.new_bucket("scale")
        with step(f"uploading it ({size_mb:.0f} MB)"):
            s3_client(lab.moto.url).upload_file(str(manifest), bucket, MANIFEST_KEY)
        cache = work / "cache"
        mp = work / "mnt"
        mp.mkdir()
        env = lab.env(bucket, cache, DATASET_LOG_LEVEL="info")
        at_goal_size = n == 1_000_000  # the time goals are for 1,000,000 entries; other sizes report figures only

        with step("first mount (cold cache)"):
            m = Mount(mp, env, work / "mount1.log")
            mounts.append(m)
            t_first = m.start()
            rss_first = m.peak_rss_mb()
            m.stop()
        sec.add("first mount (download, hash, build the index)", t_first, "s", goal=10 if at_goal_size else None,
                lower_is_better=True, note=f"manifest {size_mb:.0f} MB")
        with step("mount with the index cached"):
            m = Mount(mp, env, work / "mount2.log")
            mounts.append(m)
            t_cached = m.start()
            assert lab.proxy is not None
            lab.proxy.reset()
            rng = random.Random(7)
            paths = [mp / name for i in rng.sample(range(n), min(n, 20_000)) for name in names_of(i)]
            rng.shuffle(paths)
            started = time.perf_counter()
            for p in paths:
                os.stat(p)
            t_stats = time.perf_counter() - started
            t_find_images, found_images = count_files(mp / "images")
            full = n <= 200_000  # the whole tree has a directory per logical id: minutes at 1M
            t_find_all, found_all = count_files(mp) if full else (0.0, names)
            requests = lab.proxy.counts()["requests"]
            rss = max(rss_first, m.peak_rss_mb())
            m.stop()
        assert found_images == objects, (found_images, objects)
        assert found_all == names, (found_all, names)
        sec.add("mount with the index cached", t_cached, "s", goal=1, lower_is_better=True)
        sec.add("mount process peak RSS", rss, "MB", goal=150, lower_is_better=True,
                note="VmHWM, max of both mounts")
        sec.add("random stats (fresh mount, kernel caches cold)", len(paths) / t_stats, "stats/s")
        sec.add(f"find MOUNT/images -type f | wc -l ({found_images:,} files, count correct)", t_find_images, "s")
        if full:
            sec.add(f"find MOUNT -type f | wc -l ({found_all:,} files, count correct)", t_find_all, "s")
        else:
            sec.notes.append(f"`find MOUNT -type f` (all {names:,} names, one by-id directory per entry) runs "
                             "with up to 200,000 entries only.")
        sec.add("S3 requests during stats + find", requests, "requests", goal=0, lower_is_better=True)

        with step("validate"):
            t_val, rss_val, code, err = run_child([sys.executable, "-m", "s3fsimg", "validate", str(manifest)], env)
        if code != 0:
            raise SystemExit(f"validate failed ({code}): {err[-2000:]}")
        sec.add("s3fsimg validate FILE", t_val, "s", goal=60 if at_goal_size else None,
                lower_is_better=True)
        sec.add("s3fsimg validate peak RSS", rss_val, "MB", goal=200, lower_is_better=True)
        for log in sorted(work.glob("mount*.log")):
            for line in log.read_text(errors="replace").splitlines():
                if "built the index" in line or "downloaded" in line:
                    sec.notes.append(f"{log.name}: `{line.split(' ', 3)[-1]}`")
        if not at_goal_size:
            sec.notes.append(f"The time goals are for 1,000,000 entries: at {n:,} the times are reported without one.")
    finally:
        for m in mounts:
            m.stop()
        shutil.rmtree(work, ignore_errors=True)
