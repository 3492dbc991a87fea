"""The mount (issues 4 and 5): s3fsimg, `rclone mount` and s3fs-fuse side by side, on the same objects,
the same local S3 server (moto behind the lab proxy) and the same machine, in one run.

Workloads, for each system and each proxy first-byte latency (0 and 25 ms; `--quick`: 25 ms only):

* mount time (until the root lists) and the mount process's peak RSS (VmHWM, the highest of its mounts);
* `find` + `stat` of every name under images/ on a fresh mount (seconds, S3 requests at the proxy);
* header reads: the first 64 KiB of every image over 1 MB, one after another, on a fresh cache
  (seconds; bytes sent by S3 ÷ bytes asked, counted at the proxy);
* cold full read of every image with 1, 4, 8 and 16 parallel readers (`--quick`: 8), each on a new
  mount with a new cache, every file hashed and checked against the manifest's sha256;
* on the 8-reader mount: the second pass (page cache dropped: the disk cache) and the third pass (the
  kernel page cache), 8 readers, hash-checked; then an ImageFolder-style loop: 4 worker processes open
  and decode every image with Pillow (`convert("RGB")`), right after pass 3 (the local copy's loop
  likewise right after its pass 3: both sides cached).

Baselines measured in the same run: boto3 GETs of the same keys with the same thread counts (one
client per thread, hash-checked the same way), and a local copy of the same files in the same
layout, read the same way (cold: page cache dropped; warm: page-cached).

Everything reads MOUNT/images/ab/cd/<sha256>.<ext>, the layout all three systems show. Each mount is
always unmounted (`fusermount3 -u -z`) and its process stopped, whatever happens.
"""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import (
    ROOT,
    Lab,
    Report,
    Section,
    drop_page_cache,
    fmt,
    is_mounted,
    process_tree_cpu,
    process_tree_hwm_mb,
    step,
    unmount_and_stop,
)
from bench.write import rclone_env

SYSTEMS = ("s3fsimg", "rclone", "s3fs")
# Systems whose cold read is also measured after a `find` (s3fs's find alone takes ~100 s at 25 ms).
FIND_FIRST = ("s3fsimg", "rclone")
WORKER_COUNTS = [1, 2, 4]
WORKERS_LATENCY = 25
PASS_READERS = 8
PASS_REPEATS = 3  # passes 2 and 3 on each `--workers N` mount (the best counts)
IMAGEFOLDER_WORKERS = 4
HEADER_BYTES = 64 << 10
HEADER_MIN = 1_000_000
MOUNT_TIMEOUT = 60.0


@dataclass(frozen=True)
class Obj:
    rel: str  # images/ab/cd/<sha256>.<ext>
    sha256: str
    size: int


# -- workloads (each on a directory: a mount or the local copy) -----------------------------------

def _hash_file(path: str) -> tuple[str, int]:
    """sha256 and length of a file, read in 256 KiB chunks (what hashlib.file_digest does, on 3.10 too)."""
    h = hashlib.sha256()
    buf = bytearray(1 << 18)
    view = memoryview(buf)
    n = 0
    with open(path, "rb", buffering=0) as f:
        while size := f.readinto(buf):
            h.update(view[:size])
            n += size
    return h.hexdigest(), n


def read_all(root: Path, objs: list[Obj], threads: int) -> tuple[float, int, list[str]]:
    """Read and hash every object under root with `threads` readers: (seconds, bytes, mismatches)."""
    base = str(root)

    def one(o: Obj) -> tuple[Obj, str, int]:
        try:
            digest, n = _hash_file(f"{base}/{o.rel}")
        except OSError as exc:
            return o, f"error {exc.errno}", 0
        return o, digest, n

    t = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(one, objs))
    elapsed = time.perf_counter() - t
    bad = [o.rel for o, digest, _ in results if digest != o.sha256]
    return elapsed, sum(n for _, _, n in results), bad


def header_reads(root: Path, objs: list[Obj]) -> float:
    """Open each object, read its first 64 KiB, close it; one after another."""
    t = time.perf_counter()
    for o in objs:
        with open(root / o.rel, "rb") as f:
            f.read(HEADER_BYTES)
    return time.perf_counter() - t


def find_stat(root: Path) -> tuple[float, int]:
    """`find DIR -printf '%y %s'`: lstat of every name. (seconds, number of regular files)."""
    t = time.perf_counter()
    proc = subprocess.run(["find", str(root / "images"), "-printf", "%y %s\n"], capture_output=True, text=True,
                          check=True, timeout=600)
    elapsed = time.perf_counter() - t
    return elapsed, sum(1 for line in proc.stdout.splitlines() if line.startswith("f "))


def _decode(path: str) -> int:
    from PIL import Image

    with Image.open(path) as im:
        return len(im.convert("RGB").tobytes()) and 1


def _warm(_: int) -> int:
    import PIL.Image  # noqa: F401 - import before timing

    return 0


class ImageFolderLoop:
    """A pool of worker processes (spawned and warmed up before timing), like DataLoader workers."""

    def __init__(self, workers: int = IMAGEFOLDER_WORKERS) -> None:
        self.pool = multiprocessing.get_context("spawn").Pool(workers)
        self.pool.map(_warm, range(workers * 4))

    def run(self, root: Path, objs: list[Obj]) -> float:
        paths = [str(root / o.rel) for o in objs]
        t = time.perf_counter()
        decoded = sum(self.pool.map(_decode, paths, chunksize=2))
        elapsed = time.perf_counter() - t
        if decoded != len(paths):
            raise RuntimeError(f"decoded {decoded} of {len(paths)} images under {root}")
        return elapsed

    def close(self) -> None:
        self.pool.terminate()
        self.pool.join()


# -- the three mounts ----------------------------------------------------------------------------

class Mount:
    """One mount of one system on a fresh cache directory, in the foreground (so its pid is ours)."""

    def __init__(self, system: str, lab: Lab, bucket: str, work: Path, tag: str, workers: int | None = None) -> None:
        self.system, self.lab, self.bucket, self.workers = system, lab, bucket, workers
        self.mp = work / f"mnt-{tag}"
        self.cache = work / f"cache-{tag}"
        self.log = work / f"{tag}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.mount_seconds = 0.0
        self.cmd, self.env = self._command(work)

    def _command(self, work: Path) -> tuple[list[str], dict[str, str]]:
        mp, cache = str(self.mp), str(self.cache)
        if self.system == "s3fsimg":
            env = self.lab.env(self.bucket, self.cache, DATASET_CACHE_MAX_BYTES="50G", DATASET_LOG_LEVEL="warning")
            workers = ["--workers", str(self.workers)] if self.workers else []
            return [sys.executable, "-m", "s3fsimg", "mount", mp, "--foreground", *workers, "--log-file",
                    str(self.log)], env
        if self.system == "rclone":
            return ["rclone", "mount", f"lab:{self.bucket}", mp, *RCLONE_FLAGS, "--cache-dir", cache], \
                rclone_env(self.lab)
        if self.system == "s3fs":
            passwd = work / "s3fs-passwd"
            if not passwd.exists():
                passwd.write_text(f"{os.environ['AWS_ACCESS_KEY_ID']}:{os.environ['AWS_SECRET_ACCESS_KEY']}\n")
                passwd.chmod(0o600)
            return ["s3fs", self.bucket, mp, "-f", "-o", f"use_cache={cache}", "-o", "ro", "-o", f"url={self.lab.url}",
                    "-o", "use_path_request_style", "-o", f"passwd_file={passwd}"], dict(os.environ)
        raise ValueError(self.system)

    def start(self) -> Mount:
        self.mp.mkdir(parents=True, exist_ok=True)
        self.cache.mkdir(parents=True, exist_ok=True)
        logf = open(self.log, "ab")  # noqa: SIM115 - the child keeps it
        t = time.perf_counter()
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=logf, stderr=subprocess.STDOUT, cwd=str(ROOT))
        logf.close()
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while True:
            if is_mounted(self.mp):
                with contextlib.suppress(OSError):
                    os.listdir(self.mp)
                    break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                text = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
                self.stop()
                raise RuntimeError(f"{self.system} did not mount: {text}")
            time.sleep(0.005)
        self.mount_seconds = time.perf_counter() - t
        return self

    def cpu_seconds(self) -> float:
        """CPU seconds the mount process and its workers have used so far."""
        assert self.proc is not None
        return process_tree_cpu(self.proc.pid)

    def peak_rss_mb(self) -> float:
        """VmHWM of the mount process, summed with its workers' (MB)."""
        assert self.proc is not None
        return process_tree_hwm_mb(self.proc.pid)

    def stop(self) -> None:
        unmount_and_stop(self.mp, self.proc)
        shutil.rmtree(self.cache, ignore_errors=True)

    def __enter__(self) -> Mount:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


RCLONE_FLAGS = ["--read-only", "--vfs-cache-mode", "full"]


# -- baselines -----------------------------------------------------------------------------------

class Boto3Reader:
    """GETs of whole objects with N threads, one client per thread (built before timing), hash-checked."""

    def __init__(self, lab: Lab, bucket: str, threads: int) -> None:
        self.bucket = bucket
        self._clients = [lab.client(response_checksum_validation="when_required") for _ in range(threads)]
        self._local = threading.local()
        self._next = 0
        self._lock = threading.Lock()
        self.pool = ThreadPoolExecutor(threads, initializer=self._init)
        list(self.pool.map(lambda _: None, range(threads * 2)))

    def _init(self) -> None:
        with self._lock:
            self._local.c = self._clients[self._next]
            self._next += 1

    def read_all(self, objs: list[Obj]) -> tuple[float, int, list[str]]:
        def one(o: Obj) -> tuple[Obj, str, int]:
            body = self._local.c.get_object(Bucket=self.bucket, Key=o.rel)["Body"]
            h = hashlib.sha256()
            n = 0
            while chunk := body.read(1 << 18):
                h.update(chunk)
                n += len(chunk)
            return o, h.hexdigest(), n

        t = time.perf_counter()
        results = list(self.pool.map(one, objs))
        elapsed = time.perf_counter() - t
        return elapsed, sum(n for *_, n in results), [o.rel for o, d, _ in results if d != o.sha256]

    def close(self) -> None:
        self.pool.shutdown()


# -- results -------------------------------------------------------------------------------------

@dataclass
class Result:
    """Figures of one system (or baseline) at one latency."""

    cold: dict[int, float] = field(default_factory=dict)  # readers -> seconds
    pass2: float | None = None
    pass3: float | None = None
    header_s: float | None = None
    header_ratio: float | None = None
    imagefolder: float | None = None
    find_s: float | None = None
    find_requests: int | None = None
    local: Result | None = None  # the local copy, measured right next to this system's passes
    mount_s: list[float] = field(default_factory=list)
    cpu: dict[str, list[float]] = field(default_factory=dict)  # workload -> [CPU seconds, bytes], all rounds
    cold_after_find: float | None = None  # PASS_READERS readers on a fresh mount after a `find` (data only)
    find_first_s: float | None = None  # that `find`
    rss_mb: float = 0.0
    bad: list[str] = field(default_factory=list)
    error: str | None = None


def _check(res: Result, what: str, bad: list[str]) -> None:
    if bad:
        res.bad.append(f"{what}: {len(bad)} files with wrong bytes, e.g. {bad[0]}")


def read_counted(m: Mount, res: Result, what: str, objs: list[Obj], threads: int) -> tuple[float, int]:
    """`read_all` on a mount, hash-checked, adding the mount's CPU seconds and the bytes to res.cpu[what]."""
    before = m.cpu_seconds()
    t, n, bad = read_all(m.mp, objs, threads)
    used = m.cpu_seconds() - before
    _check(res, what, bad)
    acc = res.cpu.setdefault(what, [0.0, 0.0])
    acc[0] += used
    acc[1] += n
    return t, n


def cpu_per_gb(res: Result | None, what: str) -> float | None:
    """CPU seconds of the mount (and its workers) per GB it served in `what`, over every round."""
    if res is None or what not in res.cpu or not res.cpu[what][1]:
        return None
    seconds, nbytes = res.cpu[what]
    return seconds / (nbytes / 1e9)


def measure_system(system: str, lab: Lab, bucket: str, work: Path, objs: list[Obj], large: list[Obj],
                   readers: list[int], loop: ImageFolderLoop, latency: int, local: Path, rounds: int) -> Result:
    assert lab.proxy is not None
    res = Result()
    tag = f"{system}-{latency}"
    total = sum(o.size for o in objs)
    with step(f"{system} at {latency} ms: find, header reads"), Mount(system, lab, bucket, work, f"{tag}-meta") as m:
        res.mount_s.append(m.mount_seconds)
        lab.proxy.reset()
        res.find_s, nfiles = find_stat(m.mp)
        res.find_requests = int(lab.proxy.counts()["requests"])
        if nfiles != len(objs):
            res.bad.append(f"find saw {nfiles} files under images/, expected {len(objs)}")
        if large:
            lab.proxy.reset()
            res.header_s = header_reads(m.mp, large)
            res.header_ratio = lab.proxy.get_bytes("images/") / (len(large) * HEADER_BYTES)
        res.rss_mb = max(res.rss_mb, m.peak_rss_mb())
    for r in readers:
        with step(f"{system} at {latency} ms: cold read, {r} readers"), \
                Mount(system, lab, bucket, work, f"{tag}-r{r}") as m:
            res.mount_s.append(m.mount_seconds)
            t, n = read_counted(m, res, f"cold {r}r", objs, r)
            if n != total:
                res.bad.append(f"cold read with {r} readers: {n} bytes, expected {total}")
            res.cold[r] = t
            print(f"     {total / 1e6 / t:.1f} MB/s", flush=True)
            if r == PASS_READERS:
                # Each figure is the best of `rounds`, alternating with the same on the local copy, so
                # that load from elsewhere on the machine falls on both sides of the ratio.
                res.local = Result()
                p2, p3, lp2, lp3, folder, lfolder = [], [], [], [], [], []
                for _ in range(rounds):
                    drop_page_cache()
                    p2.append(read_counted(m, res, "pass 2", objs, PASS_READERS)[0])
                    p3.append(read_counted(m, res, "pass 3", objs, PASS_READERS)[0])
                    # The loop right after pass 3 on each side: both trees are cached (the mount's
                    # files in its disk cache and the kernel's page cache, the local ones in the page cache).
                    folder.append(loop.run(m.mp, objs))
                    drop_page_cache()
                    lp2.append(read_all(local, objs, PASS_READERS)[0])
                    lp3.append(read_all(local, objs, PASS_READERS)[0])
                    lfolder.append(loop.run(local, objs))
                res.pass2, res.pass3, res.imagefolder = min(p2), min(p3), min(folder)
                res.local.pass2, res.local.pass3, res.local.imagefolder = min(lp2), min(lp3), min(lfolder)
                print(f"     pass 2 {total / 1e6 / res.pass2:.0f} MB/s, pass 3 {total / 1e6 / res.pass3:.0f} MB/s, "
                      f"ImageFolder {len(objs) / res.imagefolder:.0f} img/s", flush=True)
            res.rss_mb = max(res.rss_mb, m.peak_rss_mb())
    if system in FIND_FIRST:
        # The data-only cold read: a `find` first, so the mount knows every directory (rclone LISTs them,
        # s3fsimg has them in its index), then the same read as the cold one above.
        with step(f"{system} at {latency} ms: find, then cold read, {PASS_READERS} readers"), \
                Mount(system, lab, bucket, work, f"{tag}-find") as m:
            res.find_first_s, _ = find_stat(m.mp)
            t, n = read_counted(m, res, "cold after find", objs, PASS_READERS)
            if n != total:
                res.bad.append(f"cold read after find: {n} bytes, expected {total}")
            res.cold_after_find = t
            print(f"     find {res.find_first_s:.2f} s, then {total / 1e6 / t:.1f} MB/s", flush=True)
            res.rss_mb = max(res.rss_mb, m.peak_rss_mb())
    return res


@dataclass
class MapCompare:
    """The same workloads on the same objects with block maps (verified) and without (served unverified)."""

    header_s: dict[bool, float] = field(default_factory=dict)  # with maps? -> best seconds
    header_fetched: dict[bool, int] = field(default_factory=dict)  # bytes S3 sent (images/ + blocks/), one run
    map_gets: dict[bool, str] = field(default_factory=dict)  # GETs of blocks/ keys and their statuses, one run
    cold: dict[bool, float] = field(default_factory=dict)  # with maps? -> best seconds, PASS_READERS readers
    bad: list[str] = field(default_factory=list)


def compare_blockmaps(lab: Lab, buckets: dict[bool, str], work: Path, objs: list[Obj], large: list[Obj],
                      latency: int, rounds: int) -> MapCompare:
    """Header reads of the large images, then a cold read of every image, each on a fresh mount, with and
    without block maps in A-B-B-A order (so a drift in load falls on both sides)."""
    assert lab.proxy is not None
    out = MapCompare()
    total = sum(o.size for o in objs)
    order = ([True, False, False, True] * rounds)[: 2 * rounds]
    for i, maps in enumerate(order):
        side = "with maps" if maps else "without maps"
        bucket = buckets[maps]
        with step(f"s3fsimg at {latency} ms, {side}: header reads"), \
                Mount("s3fsimg", lab, bucket, work, f"map{int(maps)}-{latency}-{i}-h") as m:
            lab.proxy.reset()
            t = header_reads(m.mp, large)
            counts = lab.proxy.counts()
            out.header_s[maps] = min(t, out.header_s.get(maps, t))
            out.header_fetched[maps] = sum(n for k, n in counts["response_bytes_by_key"].items()
                                           if k.startswith(("images/", "blocks/")))
            gets = counts["by_method_key"].get("GET", {})
            statuses = ", ".join(f"{k}: {v}" for k, v in sorted(counts["status"].items()))
            out.map_gets[maps] = (f"{sum(n for k, n in gets.items() if k.startswith('images/'))} image GETs, "
                                  f"{sum(n for k, n in gets.items() if k.startswith('blocks/'))} map GETs "
                                  f"(statuses {statuses})")
        with step(f"s3fsimg at {latency} ms, {side}: cold read, {PASS_READERS} readers"), \
                Mount("s3fsimg", lab, bucket, work, f"map{int(maps)}-{latency}-{i}-c") as m:
            t, n, bad = read_all(m.mp, objs, PASS_READERS)
            if bad or n != total:
                out.bad.append(f"cold read {side}: {len(bad)} wrong files, {n} of {total} bytes")
            out.cold[maps] = min(t, out.cold.get(maps, t))
            print(f"     {total / 1e6 / t:.1f} MB/s", flush=True)
    return out


def measure_workers(lab: Lab, bucket: str, work: Path, objs: list[Obj], latency: int, counts: list[int],
                    rounds: int) -> dict[int, Result]:
    """Cold read, pass 2 and pass 3 (PASS_READERS readers) on a fresh mount with `--workers N`, for each N;
    rounds alternate the order of N; passes 2 and 3 are the best of PASS_REPEATS on each mount."""
    out = {w: Result() for w in counts}
    total = sum(o.size for o in objs)
    for rnd in range(rounds):
        for w in counts if rnd % 2 == 0 else counts[::-1]:
            res = out[w]
            with step(f"s3fsimg --workers {w} at {latency} ms: cold, pass 2, pass 3"), \
                    Mount("s3fsimg", lab, bucket, work, f"w{w}-{latency}-{rnd}", workers=w) as m:
                t, n = read_counted(m, res, f"cold {PASS_READERS}r", objs, PASS_READERS)
                if n != total:
                    res.bad.append(f"cold read with {w} workers: {n} bytes, expected {total}")
                res.cold[PASS_READERS] = min(t, res.cold.get(PASS_READERS, t))
                # Passes 2 and 3 take well under a second each: the best of PASS_REPEATS per mount.
                t2s, t3s = [], []
                for _ in range(PASS_REPEATS):
                    drop_page_cache()
                    t2s.append(read_counted(m, res, "pass 2", objs, PASS_READERS)[0])
                    t3s.append(read_counted(m, res, "pass 3", objs, PASS_READERS)[0])
                t2, t3 = min(t2s), min(t3s)
                res.pass2 = min(t2, res.pass2 or t2)
                res.pass3 = min(t3, res.pass3 or t3)
                res.rss_mb = max(res.rss_mb, m.peak_rss_mb())
                print(f"     cold {total / 1e6 / t:.0f} MB/s, pass 2 {total / 1e6 / t2:.0f} MB/s, "
                      f"pass 3 {total / 1e6 / t3:.0f} MB/s", flush=True)
    return out


def measure_local(local: Path, objs: list[Obj], loop: ImageFolderLoop, rounds: int) -> Result:
    res = Result()
    pass2, pass3, folder, finds = [], [], [], []
    for _ in range(rounds):
        drop_page_cache()
        t, _, bad = read_all(local, objs, PASS_READERS)
        _check(res, "local cold", bad)
        pass2.append(t)
        pass3.append(read_all(local, objs, PASS_READERS)[0])
        folder.append(loop.run(local, objs))
        finds.append(find_stat(local)[0])
    res.pass2, res.pass3, res.imagefolder, res.find_s = min(pass2), min(pass3), min(folder), min(finds)
    res.find_requests = 0
    return res


# -- the suite -----------------------------------------------------------------------------------

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif")
QUICK_SMALL = 40  # small images kept in --quick (with every large one): s3fs alone needs ~0.3 s per name at 25 ms


def _subset(data: Path, work: Path, small: int) -> Path:
    """A directory of hard links to every image under large/ and the first `small` other images."""
    out = work / "data-subset"
    kept = 0
    for p in sorted(data.rglob("*")):
        if not p.is_file() or p.suffix.lower() not in IMAGE_SUFFIXES or not p.stat().st_size:
            continue
        rel = p.relative_to(data)
        if rel.parts[0] != "large":
            if kept >= small:
                continue
            kept += 1
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        os.link(p, out / rel)
    return out


def _without_maps(lab: Lab, data: Path, work: Path) -> str:
    """A second bucket with the same upload, then every block map deleted: the same objects as an upload
    by another tool would leave them (served unverified, block by block)."""
    from s3fsimg.config import Config
    from s3fsimg.uploader import upload
    from s3fsimg_lab.moto import s3_client

    bucket = lab.new_bucket("nomap")
    upload(Config(bucket=bucket, endpoint_url=lab.url, addressing_style="path", cache_dir=work / "upload-cache"),
           data, show_progress=False)
    client = s3_client(lab.moto.url)
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="blocks/")
            for o in page.get("Contents", [])]
    for i in range(0, len(keys), 1000):
        client.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys[i:i + 1000]]})
    if not keys or client.list_objects_v2(Bucket=bucket, Prefix="blocks/").get("KeyCount"):
        raise RuntimeError(f"bucket {bucket}: expected block maps to delete ({len(keys)} found), or some are left")
    return bucket


def _prepare(lab: Lab, data: Path, work: Path) -> tuple[str, list[Obj], Path]:
    """Upload the data with s3fsimg; the distinct objects; a local copy in the same layout."""
    from s3fsimg.config import Config
    from s3fsimg.manifest import iter_entries
    from s3fsimg.s3 import S3Store
    from s3fsimg.uploader import upload

    bucket = lab.new_bucket("mount")
    config = Config(bucket=bucket, endpoint_url=lab.url, addressing_style="path", cache_dir=work / "upload-cache")
    upload(config, data, show_progress=False)
    manifest = work / "manifest.jsonl"
    manifest.write_bytes(S3Store(config).get_bytes(config.manifest_key))
    objs = sorted({e.sha256: Obj(e.path, e.sha256, e.bytes) for _, e in iter_entries(manifest)}.values(),
                  key=lambda o: o.rel)
    by_sha: dict[str, Path] = {}
    for p in data.rglob("*"):
        if p.is_file():
            by_sha.setdefault(hashlib.sha256(p.read_bytes()).hexdigest(), p)
    local = work / "local"
    for o in objs:
        dest = local / o.rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(by_sha[o.sha256], dest)
    return bucket, objs, local


def run(lab: Lab, report: Report, args: Any, data: Path) -> None:
    from bench import plots

    quick = bool(args.quick)
    latencies = [25] if quick else [0, 25]
    readers = [8] if quick else [1, 4, 8, 16]
    available = [s for s in SYSTEMS if s == "s3fsimg" or shutil.which(s)]
    sec = report.section("Mount: s3fsimg vs rclone mount vs s3fs-fuse")
    work = Path(tempfile.mkdtemp(prefix="bench-mount-", dir="/var/tmp" if os.path.isdir("/var/tmp") else None))
    loop: ImageFolderLoop | None = None
    try:
        with step("uploading and copying the data"):
            source = _subset(data, work, QUICK_SMALL) if quick else data
            bucket, objs, local = _prepare(lab, source, work)
            nomap_bucket = _without_maps(lab, source, work)
        total = sum(o.size for o in objs)
        large = [o for o in objs if o.size > HEADER_MIN]
        sec.intro = (
            f"{len(objs)} distinct images, {total / 1e6:.0f} MB ({len(large)} over 1 MB, up to "
            f"{max(o.size for o in objs) / 1e6:.1f} MB), uploaded once; every system reads the same objects "
            f"under MOUNT/images/ab/cd/<sha256>.<ext>. Latencies: {', '.join(f'{x} ms' for x in latencies)} "
            f"first-byte latency per request at the lab proxy. Cold reads use {', '.join(map(str, readers))} "
            f"parallel readers, each on a new mount with a new cache; passes 2 and 3 and the ImageFolder loop "
            f"run on the {PASS_READERS}-reader mount. Every file read is hashed and checked against the manifest."
            + (f" **Quick mode** (CI): every large image and {QUICK_SMALL} small ones, 25 ms only, 8 readers only, "
               "one round of each workload; a smoke test of the whole suite, its ratios are indicative only."
               if quick else ""))
        loop = ImageFolderLoop()
        rounds = 1 if quick else 2
        with step("local copy"):
            local_res = measure_local(local, objs, loop, rounds)
        results: dict[int, dict[str, Result]] = {}
        maps: dict[int, MapCompare] = {}
        workers: dict[int, Result] = {}
        for latency in latencies:
            lab.latency(latency)
            per: dict[str, Result] = {}
            with step(f"boto3 at {latency} ms"):
                b = Result()
                for r in readers:
                    reader = Boto3Reader(lab, bucket, r)
                    try:
                        times = []
                        for _ in range(rounds):
                            t, _, bad = reader.read_all(objs)
                            _check(b, f"boto3 {r} threads", bad)
                            times.append(t)
                        b.cold[r] = min(times)
                    finally:
                        reader.close()
                per["boto3"] = b
            for system in available:
                try:
                    per[system] = measure_system(system, lab, bucket, work, objs, large, readers, loop, latency,
                                                 local, rounds)
                except Exception as exc:  # a peer that fails is reported, not fatal
                    print(f"  !! {system} at {latency} ms failed: {exc}", flush=True)
                    per[system] = Result(error=str(exc)[:300])
            results[latency] = per
            if large:
                maps[latency] = compare_blockmaps(lab, {True: bucket, False: nomap_bucket}, work, objs, large,
                                                  latency, rounds)
            if latency == WORKERS_LATENCY:
                workers = measure_workers(lab, bucket, work, objs, latency, WORKER_COUNTS, rounds)
        lab.latency(0)
        local_res2 = measure_local(local, objs, loop, 1)  # again at the end: the best of both
        for attr in ("pass2", "pass3", "imagefolder", "find_s"):
            setattr(local_res, attr, min(getattr(local_res, attr), getattr(local_res2, attr)))
        _report(sec, results, local_res, objs, large, readers, quick, maps, workers)
        plots.mount_plots(sec, args, results, local_res, total, len(objs), readers)
        if workers:
            plots.workers_plot(sec, args, results[WORKERS_LATENCY], workers, total, WORKERS_LATENCY)
    finally:
        if loop is not None:
            loop.close()
        for mp in work.glob("mnt-*"):
            unmount_and_stop(mp, None)
        lab.latency(0)
        shutil.rmtree(work, ignore_errors=True)


def _mbps(total: int, seconds: float | None) -> float:
    return total / 1e6 / seconds if seconds else 0.0


def _cpu_table(latency: int, per: dict[str, Result], local: Result, workers: dict[int, Result],
               total: int) -> tuple[list[str], list[list[str]]]:
    """Throughput beside the mount process's CPU seconds per GB served (its workers included)."""
    r = PASS_READERS
    header = [f"{latency} ms: system", f"cold {r}r MB/s", "CPU s/GB", "pass 2 MB/s", "CPU s/GB", "pass 3 MB/s",
              "CPU s/GB", f"cold {r}r after find MB/s", "CPU s/GB", "find before it s"]

    def cpu(res: Result, what: str) -> str:
        value = cpu_per_gb(res, what)
        return fmt(value) if value is not None else ""

    def row(name: str, res: Result) -> list[str]:
        return [name, fmt(_mbps(total, res.cold[r])) if r in res.cold else "", cpu(res, f"cold {r}r"),
                fmt(_mbps(total, res.pass2)) if res.pass2 else "", cpu(res, "pass 2"),
                fmt(_mbps(total, res.pass3)) if res.pass3 else "", cpu(res, "pass 3"),
                fmt(_mbps(total, res.cold_after_find)) if res.cold_after_find else "", cpu(res, "cold after find"),
                fmt(res.find_first_s) if res.find_first_s is not None else ""]

    rows = []
    for name in ("s3fsimg", "rclone", "s3fs"):
        res = per.get(name)
        if res is not None and not res.error:
            rows.append(row(f"{name} (default settings)" if name == "s3fsimg" else name, res))
    rows += [row(f"s3fsimg --workers {w}", res) for w, res in sorted(workers.items())]
    if "boto3" in per:
        rows.append(row(f"boto3 GET, {r} threads", per["boto3"]))
    rows.append(row("local copy", local))
    return header, rows


def _report(sec: Section, results: dict[int, dict[str, Result]], local: Result, objs: list[Obj], large: list[Obj],
            readers: list[int], quick: bool, maps: dict[int, MapCompare], workers: dict[int, Result]) -> None:
    total, n = sum(o.size for o in objs), len(objs)
    goal_r = PASS_READERS if PASS_READERS in readers else readers[-1]
    for latency, per in results.items():
        ours, boto = per.get("s3fsimg"), per["boto3"]
        peers = {k: v for k, v in per.items() if k in ("rclone", "s3fs") and v.error is None}
        if ours is None or ours.error:
            sec.notes.append(f"s3fsimg failed at {latency} ms: {ours.error if ours else 'not run'}")
            continue
        # cold reads
        for r in readers:
            mb = _mbps(total, ours.cold.get(r))
            goal = 1.0 if (latency == 25 and r == goal_r) else None
            sec.add(f"cold read, {r} readers, {latency} ms", mb, "MB/s", baseline=f"boto3 GET, {r} threads",
                    ratio=boto.cold[r] / ours.cold[r], goal=goal)
            peer_best = max((_mbps(total, p.cold.get(r)) for p in peers.values()), default=0.0)
            if peer_best:
                sec.add(f"cold read, {r} readers, {latency} ms (vs peers)", mb, "MB/s",
                        baseline="better of rclone, s3fs", ratio=mb / peer_best,
                        goal=1.5 if (latency == 25 and r == goal_r) else None)
        rclone = peers.get("rclone")
        if rclone is not None and goal_r in rclone.cold and goal_r in ours.cold:
            sec.add(f"cold read, {goal_r} readers, {latency} ms, fresh mount (vs rclone)",
                    _mbps(total, ours.cold[goal_r]), "MB/s", baseline="rclone mount, fresh mount",
                    ratio=rclone.cold[goal_r] / ours.cold[goal_r])
        if rclone is not None and rclone.cold_after_find and ours.cold_after_find:
            sec.add(f"cold read after find (data only), {goal_r} readers, {latency} ms",
                    _mbps(total, ours.cold_after_find), "MB/s", baseline="rclone mount, after find",
                    ratio=rclone.cold_after_find / ours.cold_after_find, goal=1.2 if latency == 25 else None)
        near = ours.local or local
        if ours.pass2 and near.pass2:
            sec.add(f"second pass (disk cache), {latency} ms", _mbps(total, ours.pass2), "MB/s",
                    baseline="local copy, page cache dropped", ratio=near.pass2 / ours.pass2, goal=0.8)
        if ours.pass3 and near.pass3:
            sec.add(f"third pass (page cache), {latency} ms", _mbps(total, ours.pass3), "MB/s",
                    baseline="local copy, page-cached", ratio=near.pass3 / ours.pass3, goal=0.97)
        if ours.header_ratio is not None and ours.header_s:
            sec.add(f"64 KiB header reads, {len(large)} images > 1 MB, {latency} ms (image bytes only)",
                    ours.header_ratio, "fetched ÷ asked", goal=4.0, lower_is_better=True)
            peer_hdr = [p.header_s for p in peers.values() if p.header_s]
            if peer_hdr:
                sec.add(f"64 KiB header reads, time, {latency} ms", ours.header_s, "s",
                        baseline="faster of rclone, s3fs", ratio=min(peer_hdr) / ours.header_s, goal=1.0)
        if ours.imagefolder and near.imagefolder:
            sec.add(f"ImageFolder loop ({IMAGEFOLDER_WORKERS} workers, cached), {latency} ms", n / ours.imagefolder,
                    "images/s", baseline="same loop on the local copy", ratio=near.imagefolder / ours.imagefolder,
                    goal=0.95)
        if ours.find_s is not None and local.find_s:
            sec.add(f"find + stat, S3 requests, {latency} ms", float(ours.find_requests or 0), "requests", goal=0,
                    lower_is_better=True)
            sec.add(f"find + stat, time, {latency} ms", ours.find_s, "s", baseline="local tree (ours ÷ local)",
                    ratio=ours.find_s / local.find_s, goal=3.0, lower_is_better=True)
        cmp = maps.get(latency)
        if cmp is not None and len(cmp.header_s) == 2 and len(cmp.cold) == 2:
            asked = len(large) * HEADER_BYTES
            sec.add(f"64 KiB header reads with block maps, {latency} ms: images + maps fetched ÷ asked",
                    cmp.header_fetched[True] / asked, "fetched ÷ asked", goal=4.0, lower_is_better=True)
            sec.add(f"64 KiB header reads with block maps, time, {latency} ms", cmp.header_s[True], "s",
                    baseline="same objects without maps (ours with ÷ without)",
                    ratio=cmp.header_s[True] / cmp.header_s[False], goal=1.2, lower_is_better=True)
            sec.add(f"cold read with block maps, {PASS_READERS} readers, {latency} ms", _mbps(total, cmp.cold[True]),
                    "MB/s", baseline="same objects without maps", ratio=cmp.cold[False] / cmp.cold[True], goal=0.95)
            sec.tables.append(([f"{latency} ms: block maps", "header reads s", "header: fetched ÷ asked",
                                "S3 requests of header reads",
                                f"cold read, {PASS_READERS} readers, MB/s"],
                               [[side, fmt(cmp.header_s[m]), f"{cmp.header_fetched[m] / asked:.3f}", cmp.map_gets[m],
                                 fmt(_mbps(total, cmp.cold[m]))]
                                for side, m in (("with maps (verified)", True), ("without maps (unverified)", False))]))
            for problem in cmp.bad:
                sec.notes.append(f"**s3fsimg at {latency} ms, block-map comparison: {problem}**")
        if latency == WORKERS_LATENCY and 1 in workers and 2 in workers:
            one, two = workers[1], workers[2]
            for what, t1, t2 in ((f"cold read, {PASS_READERS} readers", one.cold.get(PASS_READERS),
                                  two.cold.get(PASS_READERS)),
                                 ("second pass (disk cache)", one.pass2, two.pass2),
                                 ("third pass (page cache)", one.pass3, two.pass3)):
                if t1 and t2:
                    sec.add(f"{what}, 2 workers, {latency} ms", _mbps(total, t2), "MB/s",
                            baseline="the same with --workers 1", ratio=t1 / t2, goal=1.0)
        sec.add(f"mount time (fresh cache), {latency} ms", min(ours.mount_s), "s")
        sec.add(f"mount peak RSS (parent + workers), {latency} ms", ours.rss_mb, "MB")

        header = ["system", "mount s", "peak RSS MB", *[f"cold {r}r MB/s (img/s)" for r in readers],
                  "pass 2 MB/s", "pass 3 MB/s", "header s", "header fetched÷asked", "ImageFolder img/s",
                  "find+stat s", "find+stat S3 requests"]
        rows = []
        for name in ("s3fsimg", "rclone", "s3fs", "boto3"):
            res = per.get(name)
            if res is None:
                continue
            if res.error:
                rows.append([name, f"failed: {res.error[:80]}"] + [""] * (len(header) - 2))
                continue
            rows.append([
                name, fmt(min(res.mount_s)) if res.mount_s else "", fmt(res.rss_mb) if res.rss_mb else "",
                *[f"{fmt(_mbps(total, res.cold[r]))} ({fmt(n / res.cold[r])})" if r in res.cold else ""
                  for r in readers],
                fmt(_mbps(total, res.pass2)) if res.pass2 else "", fmt(_mbps(total, res.pass3)) if res.pass3 else "",
                fmt(res.header_s) if res.header_s is not None else "",
                f"{res.header_ratio:.2f}" if res.header_ratio is not None else "",
                fmt(n / res.imagefolder) if res.imagefolder else "",
                fmt(res.find_s) if res.find_s is not None else "",
                str(res.find_requests) if res.find_requests is not None else ""])
        for name in ("s3fsimg", "rclone", "s3fs"):
            near_res = per[name].local if name in per else None
            if near_res is not None and near_res.pass2 and near_res.pass3 and near_res.imagefolder:
                rows.append([f"local copy (next to {name})", "", "", *["" for _ in readers],
                             fmt(_mbps(total, near_res.pass2)), fmt(_mbps(total, near_res.pass3)), "", "",
                             fmt(n / near_res.imagefolder), "", ""])
        rows.append(["local copy (before and after)", "", "", *["" for _ in readers], fmt(_mbps(total, local.pass2)),
                     fmt(_mbps(total, local.pass3)), "", "", fmt(n / local.imagefolder) if local.imagefolder else "",
                     fmt(local.find_s) if local.find_s else "", "0"])
        sec.tables.append(([f"{latency} ms: {header[0]}", *header[1:]], rows))
        sec.tables.append(_cpu_table(latency, per, ours.local or local, workers if latency == WORKERS_LATENCY else {},
                                     total))
        for name, res in [*per.items(), *((f"s3fsimg --workers {w}", r) for w, r in workers.items()
                                          if latency == WORKERS_LATENCY)]:
            for problem in res.bad:
                sec.notes.append(f"**{name} at {latency} ms: {problem}**")
    sec.notes.append(
        "How each system runs (each mount in the foreground so its peak RSS can be read, on a fresh cache "
        "directory): s3fsimg: `python -m s3fsimg mount MP --foreground` with S3_ENDPOINT_URL=proxy, "
        "S3_ADDRESSING_STYLE=path, DATASET_CACHE_DIR=fresh dir, DATASET_CACHE_MAX_BYTES=50G (defaults otherwise: "
        "256 KiB blocks, objects up to 1 MiB fetched whole). rclone: `rclone mount lab:BUCKET MP "
        + " ".join(RCLONE_FLAGS) + " --cache-dir DIR`, remote configured through RCLONE_CONFIG_LAB_TYPE=s3, "
        "PROVIDER=Other, ENDPOINT=proxy, FORCE_PATH_STYLE=true, REGION=us-east-1 (other settings default: "
        "--vfs-read-chunk-size 128M, --dir-cache-time 5m, --buffer-size 16M). s3fs: `s3fs BUCKET MP -f "
        "-o use_cache=DIR -o ro -o url=http://PROXY -o use_path_request_style -o passwd_file=FILE` (0600; "
        "other settings default: parallel_count 5, multipart_size 10 MB, stat_cache_expire none).")
    sec.notes.append(
        "Ratios: throughputs are baseline time ÷ s3fsimg time (higher is better); header-read time is the "
        "faster peer's time ÷ s3fsimg's; find + stat is s3fsimg's time ÷ the local tree's (lower is better). "
        "The local copy is read with the same code: 8 readers, page cache dropped (its pass-2 figure) or "
        "page-cached (pass 3); the ImageFolder loop runs right after pass 3 on each side, so both trees are "
        "cached (the local one in the page cache). Passes 2 and 3 and the ImageFolder loop of each system are "
        "the best of "
        f"{'one round' if quick else 'two rounds'}, alternating with the same workloads on the local copy; the "
        "ratios use those adjacent local figures (other engineers' jobs share this 2-core machine). "
        "Peak RSS is the highest VmHWM of the mount process over its mounts at that latency, summed with its "
        "workers' (an upper bound: pages shared after the fork count once per worker).")
    sec.notes.append(
        "CPU s/GB: user + system CPU seconds of the mount process and its workers (/proc/PID/stat, read before "
        "and after each pass, children included), divided by the GB the pass served, summed over its rounds "
        "(10 ms clock ticks: the page-cache pass uses a few ticks). "
        f"`--workers N` rows: a fresh mount at {WORKERS_LATENCY} ms per round, cold read then pass 2 and pass 3 "
        f"(the best of {PASS_REPEATS} each), "
        f"{'one round' if quick else 'two rounds in alternating order'}; the default (one worker per core, at "
        f"most 8) is {min(os.cpu_count() or 1, 8)} here. "
        "After find: a fresh mount, `find` over images/ first (so rclone has listed every directory), then the "
        "cold read of the data; s3fs is left out (its find alone takes ~100 s at 25 ms).")
    sec.notes.append(
        "Block maps: a second bucket holds the same upload with its blocks/ keys deleted, as another tool's "
        "upload would leave it (blocks served unverified, the map's GET answered 404). Header reads (64 KiB of "
        f"each of the {len(large)} images over 1 MB, one after another) and the cold read of every image run on "
        "fresh mounts in A-B-B-A order, each figure the best of its rounds; fetched counts every body byte S3 "
        "sent (images/ and blocks/).")
