"""The fault soak (issue #11): a real mount and a `Dataset` in another process read one dataset at the
same time, through the lab proxy cycling faults, on one small cache under constant eviction; every byte
that comes back is compared with the source file.

    python -m tests.soak [--reads-per-side 1500] [--seed 1] [--json REPORT] [--workdir DIR]   (`just soak`)

tests/test_soak.py runs a reduced form in CI. What runs, all on loopback, in a scratch directory:
- moto and the counting, fault-injecting proxy in front of it (`s3fsimg_lab`);
- a seeded dataset made by Pillow: small images, mid-size noise images (under 1 MiB: fetched whole)
  and large 1-3 MB ones, uploaded by the real uploader through the proxy (objects over 1 MiB get
  block maps);
- `s3fsimg mount` (tests/mountutil.py) and two worker processes (`python -m tests.soak worker`): one
  reads through the mount, the other through `Dataset.open`; mount and Dataset share one cache
  directory bounded at 8 MiB, so eviction runs all the time;
- each worker runs 8 reader threads (seeded); a read picks a random object and is, half the time, the
  whole file in 1 MiB reads, else one read of 4 KiB, 64 KiB or 300 KB at a random offset;
- the fault phase, until each side has made `reads_per_side` reads and `min_fault_seconds` have
  passed: every 0.4 s the proxy gets 25 ms of base latency plus one fault (503 or 500 storm, body
  cut short, a flipped byte, latency past the read deadline, refused connections, hang, or none),
  on every key or on 5 chosen objects (their image and their block map), and the page cache is
  dropped (`/proc/sys/vm/drop_caches`, root);
- the recovery phase: faults cleared; reads go on for at least `min_recovery_seconds` and until the
  last `recovery_streak` reads of each side are correct (or `recovery_timeout` passes). Time to
  recover: from the clearing to the end of the last read, started after it, that was not correct.

Outcomes of a read: correct; failed cleanly (EIO from the mount, an s3fsimg error from the API);
unclean failure (any other error); wrong (a byte differs from the source, or more bytes than the
object has); short (fewer bytes than asked before end of file, those returned right: through the
mount, a partial read is read(2) again for the rest after a short count, as every correct program
does, so "short" is a 0-byte read before the end, the symptom of a shrunk inode). A hang is
one call (a read(2), a pread, an `open`, a `read` of the API) that outlived the read deadline by more
than `hang_margin`, or never returned. The report lists every wrong or short read with its first
differing offset, the object's size, whether the object has a block map and the fault in force; the
exit status is 1 on any wrong byte, short read, hang, unclean failure, or a side that did not recover.

Worker protocol: the worker prints `ready` once set up, starts reading on a `go` line on stdin (sent
with the first fault), appends one JSON line per read to its results file, stops on a `stop` line and
appends an `end` line naming any call still unfinished.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import functools
import hashlib
import json
import os
import random
import select
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20
PARTIAL_SIZES = (4096, 65536, 300_000)
WHOLE_READ = MiB


@dataclasses.dataclass
class SoakConfig:
    reads_per_side: int = 1500
    min_fault_seconds: float = 60.0  # and at least this long, so every fault meets many reads
    threads: int = 8
    seed: int = 1
    switch_seconds: float = 0.4
    read_deadline: float = 3.0
    hang_margin: float = 5.0  # a call slower than read_deadline + hang_margin is a hang
    cache_max_bytes: str = "8M"
    base_latency_ms: int = 25
    chosen_keys: int = 5
    small: int = 24
    mid: int = 8  # noise images of 150-950 KB: fetched whole, no block map
    large: int = 10  # noise images of 1.0-3.0 MB: block maps when over 1 MiB
    recovery_streak: int = 24
    min_recovery_seconds: float = 10.0  # lingering bad data (a corrupt cached block) gets time to show
    recovery_timeout: float = 60.0
    fault_phase_timeout: float = 1800.0
    drop_caches: bool = True


# -- reads and their judgement (worker side) -------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Target:
    sha256: str
    rel: str  # the manifest path, images/ab/cd/<sha>.<ext>
    size: int
    has_map: bool


def first_difference(a: bytes, b: bytes) -> int | None:
    """The first offset where a and b differ, within their common length."""
    common = min(len(a), len(b))
    for start in range(0, common, 65536):
        end = min(start + 65536, common)
        if a[start:end] != b[start:end]:
            return next(i for i in range(start, end) if a[i] != b[i])
    return None


def judge(got: bytes, expected: bytes) -> tuple[str, int | None]:
    """("correct" | "wrong" | "short", first differing offset or None). More bytes than expected is
    wrong (at the expected length); fewer, all right, is short."""
    if got == expected:
        return "correct", None
    diff = first_difference(got, expected)
    if diff is not None:
        return "wrong", diff
    if len(got) > len(expected):
        return "wrong", len(expected)
    return "short", None


class CallClock:
    """The start time of the call each thread is in, so calls that never return can be named."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.inflight: dict[int, tuple[float, str]] = {}

    @contextlib.contextmanager
    def call(self, slot: int, what: str, slowest: list[float]) -> Iterator[None]:
        start = time.monotonic()
        with self.lock:
            self.inflight[slot] = (start, what)
        try:
            yield
        finally:
            slowest[0] = max(slowest[0], time.monotonic() - start)
            with self.lock:
                self.inflight.pop(slot, None)

    def labelled(self, slot: int, label: str, slowest: list[float],
                 what: str) -> contextlib.AbstractContextManager[None]:
        return self.call(slot, f"{label}: {what}", slowest)


class Reader:
    """Reads through the mount (os calls) or the API (`Dataset.open`); one object shared by the threads."""

    def __init__(self, side: str, mountpoint: Path | None) -> None:
        self.side = side
        self.mountpoint = mountpoint
        self.entries: dict[str, Any] = {}
        if side == "api":
            from s3fsimg import Dataset

            self.dataset = Dataset.from_env()
            self.entries = {e.sha256: e for e in self.dataset.entries()}  # the index, before any fault

    def whole(self, target: Target, call: Callable[[str], contextlib.AbstractContextManager[None]]) -> bytes:
        parts: list[bytes] = []
        if self.side == "mount":
            assert self.mountpoint is not None
            with call("open"):
                fd = os.open(self.mountpoint / target.rel, os.O_RDONLY)
            try:
                while True:
                    with call(f"read at {sum(map(len, parts))}"):
                        chunk = os.read(fd, WHOLE_READ)
                    if not chunk:
                        return b"".join(parts)
                    parts.append(chunk)
            finally:
                os.close(fd)
        with call("open"):
            file = self.dataset.open(self.entries[target.sha256])
        with file:
            while True:
                with call(f"read at {sum(map(len, parts))}"):
                    chunk = file.read(WHOLE_READ)
                if not chunk:
                    return b"".join(parts)
                parts.append(chunk)

    def partial(self, target: Target, offset: int, size: int,
                call: Callable[[str], contextlib.AbstractContextManager[None]]) -> bytes:
        if self.side == "mount":
            assert self.mountpoint is not None
            with call("open"):
                fd = os.open(self.mountpoint / target.rel, os.O_RDONLY)
            try:
                # As every correct program does: a pread that returns fewer bytes than asked is not the
                # end of the file (read(2) returns what it has when a later page fails: the next pread
                # then fails with EIO). Only a 0-byte pread before the end is an end of file, and a
                # READ answered short makes the kernel shrink the file, so that is what "short" catches.
                parts: list[bytes] = []
                done = 0
                while done < size:
                    with call(f"pread {size - done} at {offset + done}"):
                        chunk = os.pread(fd, size - done, offset + done)
                    if not chunk:
                        break
                    parts.append(chunk)
                    done += len(chunk)
                return b"".join(parts)
            finally:
                os.close(fd)
        with call("open"):
            file = self.dataset.open(self.entries[target.sha256])
        with file:
            file.seek(offset)
            with call(f"read {size} at {offset}"):
                return file.read(size)


def classify_error(side: str, exc: BaseException) -> tuple[str, str]:
    """("failed" | "unclean", description): EIO from the mount and an s3fsimg error from the API are
    the contract's clean failures; anything else is not."""
    from s3fsimg.errors import S3fsimgError

    if isinstance(exc, OSError) and exc.errno is not None and not isinstance(exc, S3fsimgError):
        name = errno.errorcode.get(exc.errno, str(exc.errno))
        clean = exc.errno == errno.EIO
        return ("failed" if clean else "unclean"), f"{name}: {exc.strerror}"
    if side == "api" and isinstance(exc, S3fsimgError):
        return "failed", f"{type(exc).__name__}: {str(exc)[:200]}"
    return "unclean", f"{type(exc).__name__}: {str(exc)[:200]}"


def worker_main(args: argparse.Namespace) -> int:
    plan = json.loads(Path(args.plan).read_text())
    side: str = args.side
    targets = [Target(**t) for t in plan["targets"]]
    sources: dict[str, bytes] = {}
    for t, source in zip(targets, plan["sources"], strict=True):
        data = Path(source).read_bytes()
        assert hashlib.sha256(data).hexdigest() == t.sha256, source
        sources[t.sha256] = data
    mountpoint = Path(plan["mountpoint"]) if side == "mount" else None
    reader = Reader(side, mountpoint)
    clock = CallClock()
    stop = threading.Event()
    out_lock = threading.Lock()
    results = open(args.results, "a", encoding="utf-8")  # noqa: SIM115 (closed by os._exit's flush below)

    def emit(record: dict[str, Any]) -> None:
        with out_lock:
            results.write(json.dumps(record) + "\n")
            results.flush()

    def run_thread(slot: int) -> None:
        rng = random.Random(f"{plan['seed']}-{side}-{slot}")
        n = 0
        while not stop.is_set():
            n += 1
            target = rng.choice(targets)
            expected_all = sources[target.sha256]
            whole = rng.random() < 0.5
            if whole:
                offset, asked = 0, target.size
            else:
                asked = rng.choice(PARTIAL_SIZES)
                offset = rng.randrange(target.size) if target.size else 0
            expected = expected_all[offset : offset + asked]
            slowest = [0.0]

            call = functools.partial(clock.labelled, slot, f"{'whole' if whole else 'partial'} {target.sha256[:12]}",
                                     slowest)

            record: dict[str, Any] = {"type": "read", "side": side, "thread": slot, "n": n,
                                      "kind": "whole" if whole else "partial", "sha": target.sha256,
                                      "size": target.size, "map": target.has_map, "offset": offset,
                                      "asked": asked, "expected": len(expected)}
            start = time.monotonic()
            try:
                got = reader.whole(target, call) if whole else reader.partial(target, offset, asked, call)
            except Exception as exc:
                status, error = classify_error(side, exc)
                record.update(status=status, error=error, got=None, diff=None)
            else:
                status, diff = judge(got, expected)
                record.update(status=status, error=None, got=len(got), diff=diff)
            record.update(start=start, end=time.monotonic(), slowest=slowest[0])
            emit(record)

    threads = [threading.Thread(target=run_thread, args=(i,), daemon=True) for i in range(plan["threads"])]
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() == "go":
            for thread in threads:
                thread.start()
        elif line.strip() == "stop":
            break
    stop.set()
    grace = time.monotonic() + plan["read_deadline"] + plan["hang_margin"] + 10
    for thread in threads:
        thread.join(max(0.0, grace - time.monotonic()))
    now = time.monotonic()
    with clock.lock:
        unfinished = [{"thread": slot, "call": what, "seconds": now - started}
                      for slot, (started, what) in clock.inflight.items()]
    emit({"type": "end", "side": side, "unfinished": unfinished})
    results.close()
    sys.stdout.flush()
    os._exit(0)  # a thread stuck in a FUSE read cannot be joined


# -- faults (orchestrator side) --------------------------------------------------------------------------


FAULT_MENU = ("503", "500", "truncate", "flip_byte", "latency", "refuse", "hang", "none")


@dataclasses.dataclass
class Switch:
    at: float  # time.monotonic()
    kind: str
    scope: str  # "all" or "5 keys"
    value: float | None
    keys: tuple[str, ...] = ()
    applied: int = 0


def next_switch(rng: random.Random, config: SoakConfig, shas: list[str]) -> Switch:
    kind = rng.choice(FAULT_MENU)
    scope = "all" if rng.random() < 0.5 else f"{config.chosen_keys} keys"
    keys = tuple(rng.sample(shas, min(config.chosen_keys, len(shas)))) if scope != "all" else ()
    value: float | None = None
    if kind == "truncate":
        value = rng.choice([None, 0.0, float(rng.randrange(1, 300_000))])
    elif kind == "flip_byte":
        value = rng.choice([None, float(rng.randrange(0, 262_144))])
    elif kind == "latency":
        value = config.read_deadline * 1000 + 1000
    return Switch(0.0, kind, scope, value, keys)


def proxy_faults(switch: Switch, config: SoakConfig) -> list[dict[str, Any]]:
    """The proxy's fault list for a switch: base latency, and the switch's fault (on its keys)."""
    faults: list[dict[str, Any]] = [{"kind": "latency_ms", "value": config.base_latency_ms}]
    if switch.kind == "none":
        return faults
    kind, value = {"503": ("error_status", 503.0), "500": ("error_status", 500.0),
                   "latency": ("latency_ms", switch.value)}.get(switch.kind, (switch.kind, switch.value))
    fault: dict[str, Any] = {"kind": kind}
    if value is not None:
        fault["value"] = value
    if switch.keys:  # both images/ab/cd/<sha>.<ext> and blocks/ab/cd/<sha>
        fault["regex"] = "|".join(switch.keys)
    faults.append(fault)
    return faults


def drop_page_cache() -> bool:
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


# -- the run ---------------------------------------------------------------------------------------------


class Results:
    """Reads a worker's results file as it grows."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: list[dict[str, Any]] = []
        self.end: dict[str, Any] | None = None
        self._offset = 0
        self._partial = b""

    def poll(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return
        self._offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            record = json.loads(line)
            if record["type"] == "end":
                self.end = record
            else:
                self.records.append(record)


def build_dataset(root: Path, config: SoakConfig) -> None:
    from s3fsimg_lab.images import make_dataset, make_large_image

    make_dataset(root, n=config.small, seed=config.seed, large=config.large, large_bytes=(1_000_000, 3_000_000),
                 decoys=False, odd_names=False, map_fraction=0)
    rng = random.Random(f"mid-{config.seed}")
    for i in range(config.mid):
        make_large_image(root / "mid" / f"mid_{i:03d}.png", rng.randint(150_000, 950_000), seed=config.seed * 100 + i)


def product_env(base: dict[str, str], **values: str) -> dict[str, str]:
    env = dict(base)
    for name in list(env):
        if name.startswith(("S3_", "DATASET_")):
            del env[name]
    env.update(values)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [base.get("PYTHONPATH")])])
    return env


def run(config: SoakConfig, workdir: Path, log: Callable[[str], None]) -> dict[str, Any]:
    from s3fsimg.blockmap import blockmap_key
    from s3fsimg.manifest import parse_line
    from s3fsimg_lab.moto import MotoServer, lab_env, s3_client
    from s3fsimg_lab.proxy import LabProxy
    from tests.mountutil import MountProcess

    workdir.mkdir(parents=True, exist_ok=True)
    dataset_dir = workdir / "dataset"
    if not dataset_dir.exists():
        build_dataset(dataset_dir, config)
    started = time.monotonic()
    with MotoServer() as moto, LabProxy(moto.url) as proxy:
        client = s3_client(moto.url)
        bucket = f"soak-{os.getpid()}"
        client.create_bucket(Bucket=bucket)
        cache_dir = workdir / "cache"
        env = product_env(lab_env(), S3_BUCKET=bucket, S3_ENDPOINT_URL=proxy.url, S3_ADDRESSING_STYLE="path",
                          DATASET_CACHE_DIR=str(cache_dir), DATASET_CACHE_MAX_BYTES=config.cache_max_bytes,
                          DATASET_READ_DEADLINE=f"{config.read_deadline}s", DATASET_LOG_LEVEL="warning")
        upload = subprocess.run([sys.executable, "-m", "s3fsimg", "upload", str(dataset_dir)], env=env, cwd=ROOT,
                                capture_output=True, text=True, timeout=600)
        if upload.returncode != 0:
            raise RuntimeError(f"upload failed: {upload.stderr}")
        log(upload.stdout.strip())
        keys = {o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
                for o in page.get("Contents", [])}
        manifest = client.get_object(Bucket=bucket, Key="manifests/inventory-v1.jsonl")["Body"].read()
        targets: dict[str, Target] = {}
        sources: dict[str, str] = {}
        for line in manifest.splitlines():
            entry = parse_line(line)
            if entry.sha256 not in targets:
                targets[entry.sha256] = Target(entry.sha256, entry.path, entry.bytes,
                                               blockmap_key(entry.sha256) in keys)
                sources[entry.sha256] = str(dataset_dir / (entry.source_path or ""))
        ordered = sorted(targets)
        plan = {"targets": [dataclasses.asdict(targets[s]) for s in ordered],
                "sources": [sources[s] for s in ordered], "seed": config.seed, "threads": config.threads,
                "read_deadline": config.read_deadline, "hang_margin": config.hang_margin,
                "mountpoint": str(workdir / "mnt")}
        plan_path = workdir / "plan.json"
        plan_path.write_text(json.dumps(plan))
        dataset_info = {"objects": len(targets), "bytes": sum(t.size for t in targets.values()),
                        "over_1MiB": sum(t.size > MiB for t in targets.values()),
                        "with_block_map": sum(t.has_map for t in targets.values()),
                        "largest": max(t.size for t in targets.values())}
        log(f"dataset: {dataset_info}")

        mount = MountProcess(workdir / "mnt", env=env, log_file=workdir / "mount.log")
        mount.start(timeout=120)
        workers: dict[str, subprocess.Popen[str]] = {}
        results: dict[str, Results] = {}
        try:
            for side in ("mount", "api"):
                path = workdir / f"results-{side}.jsonl"
                path.unlink(missing_ok=True)
                results[side] = Results(path)
                with open(workdir / f"worker-{side}.log", "w") as errlog:
                    workers[side] = subprocess.Popen(
                        [sys.executable, "-m", "tests.soak", "worker", "--side", side, "--plan", str(plan_path),
                         "--results", str(path)],
                        env=env, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errlog, text=True)
            for side, proc in workers.items():
                assert proc.stdout is not None
                ready, _, _ = select.select([proc.stdout], [], [], 300)
                line = proc.stdout.readline() if ready else ""
                if line.strip() != "ready":
                    raise RuntimeError(f"{side} worker did not start: {(workdir / f'worker-{side}.log').read_text()}")
            proxy.reset()
            report = cycle(config, proxy, workers, results, ordered, log)
        finally:
            for proc in workers.values():
                tell(proc, "stop")
            for proc in workers.values():
                try:
                    proc.wait(timeout=config.read_deadline + config.hang_margin + 30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            mount.stop()
        for r in results.values():
            r.poll()
        mount_log = (workdir / "mount.log").read_text(errors="replace") if (workdir / "mount.log").exists() else ""
    report.update(analyse(config, results, report, targets))
    report["dataset"] = dataset_info
    report["mount_log"] = {"lines": mount_log.count("\n"), "tracebacks": mount_log.count("Traceback"),
                           "errors": mount_log.count(" ERROR ")}
    report["seconds"] = round(time.monotonic() - started, 1)
    report["config"] = dataclasses.asdict(config)
    return report


def cycle(config: SoakConfig, proxy: Any, workers: dict[str, subprocess.Popen[str]],
          results: dict[str, Results], shas: list[str], log: Callable[[str], None]) -> dict[str, Any]:
    """The fault phase, then the recovery phase. Returns the schedule and the phase times."""
    rng = random.Random(f"faults-{config.seed}")
    switches: list[Switch] = []
    dropped = config.drop_caches
    began = time.monotonic()
    next_at = began
    timed_out = False
    last_progress = began
    while True:
        if switches:
            switches[-1].applied = sum(f.get("applied", 0) for f in proxy.faults()[1:])
        if time.monotonic() - began >= config.min_fault_seconds and all(
                len(r.records) >= config.reads_per_side for r in results.values()):
            break
        if time.monotonic() - began > config.fault_phase_timeout or any(p.poll() is not None for p in workers.values()):
            timed_out = True
            break
        switch = next_switch(rng, config, shas)
        proxy.set_faults(proxy_faults(switch, config))
        switch.at = time.monotonic()
        switches.append(switch)
        if len(switches) == 1:
            for proc in workers.values():
                tell(proc, "go")
        if dropped:
            dropped = drop_page_cache()
        next_at += config.switch_seconds
        time.sleep(max(0.0, next_at - time.monotonic()))
        for r in results.values():
            r.poll()
        if time.monotonic() - last_progress > 10:
            last_progress = time.monotonic()
            log(f"  {time.monotonic() - began:5.0f}s: " +
                ", ".join(f"{side} {len(r.records)} reads" for side, r in results.items()))
    proxy.clear_faults()
    if config.drop_caches:
        drop_page_cache()
    cleared = time.monotonic()
    log(f"faults stopped after {cleared - began:.0f}s and {len(switches)} switches; recovering")

    def recovered(r: Results) -> bool:
        after = [x for x in r.records if x["start"] >= cleared]
        return len(after) >= config.recovery_streak and all(
            x["status"] == "correct" for x in after[-config.recovery_streak:])

    while not timed_out:
        time.sleep(0.2)
        for r in results.values():
            r.poll()
        elapsed = time.monotonic() - cleared
        if elapsed >= config.recovery_timeout or (
                elapsed >= config.min_recovery_seconds and all(recovered(r) for r in results.values())):
            break
    return {"switches": [dataclasses.asdict(s) for s in switches], "fault_phase_began": began, "cleared": cleared,
            "fault_phase_timed_out": timed_out, "page_cache_dropped": dropped,
            "recovered": {side: recovered(r) for side, r in results.items()},
            "proxy_counts": proxy.counts()}


def tell(proc: subprocess.Popen[str], command: str) -> None:
    with contextlib.suppress(OSError, ValueError):
        assert proc.stdin is not None
        proc.stdin.write(command + "\n")
        proc.stdin.flush()


def fault_at(switches: list[dict[str, Any]], t: float, cleared: float) -> str:
    """The fault in force at monotonic time t."""
    if t >= cleared:
        return "none (faults cleared)"
    current = None
    for s in switches:
        if s["at"] <= t:
            current = s
        else:
            break
    if current is None:
        return "none (before the first switch)"
    value = "" if current["value"] is None else f" {current['value']:g}"
    return f"{current['kind']}{value} on {current['scope']}"


def analyse(config: SoakConfig, results: dict[str, Results], run_info: dict[str, Any],
            targets: dict[str, Target]) -> dict[str, Any]:
    cleared = run_info["cleared"]
    switches = run_info["switches"]
    limit = config.read_deadline + config.hang_margin
    sides: dict[str, dict[str, Any]] = {}
    anomalies: list[dict[str, Any]] = []
    recovery = 0.0
    for side, r in results.items():
        records = r.records
        counts: Counter[str] = Counter()
        for x in records:
            counts[x["status"]] += 1
            counts[f"{x['status']} {x['kind']}"] += 1
            if x["status"] in ("wrong", "short", "unclean") or x["slowest"] > limit:
                anomalies.append({**{k: x[k] for k in ("side", "kind", "sha", "size", "map", "offset", "asked",
                                                        "expected", "got", "diff", "status", "error")},
                                  "seconds": round(x["end"] - x["start"], 2), "slowest": round(x["slowest"], 2),
                                  "fault_at_start": fault_at(switches, x["start"], cleared),
                                  "fault_at_end": fault_at(switches, x["end"], cleared),
                                  "recovery_phase": x["start"] >= cleared})
            if x["start"] >= cleared and x["status"] != "correct":
                recovery = max(recovery, x["end"] - cleared)
        unfinished = (r.end or {}).get("unfinished", [])
        hangs = sum(x["slowest"] > limit for x in records) + len(unfinished)
        slowest = max(records, key=lambda x: x["slowest"], default=None)
        sides[side] = {
            "reads": len(records),
            "reads_under_faults": sum(x["start"] < cleared for x in records),
            "correct": counts["correct"],
            "failed_cleanly": counts["failed"],
            "unclean_failures": counts["unclean"],
            "wrong_whole": counts["wrong whole"],
            "wrong_partial": counts["wrong partial"],
            "short_whole": counts["short whole"],
            "short_partial": counts["short partial"],
            "hangs": hangs,
            "unfinished": unfinished,
            "worker_ended": r.end is not None,
            "slowest_call_s": round(slowest["slowest"], 2) if slowest else None,
            "slowest_call": (f"{slowest['kind']} of a {slowest['size']:,}-byte object, {slowest['status']}"
                             if slowest else None),
            "recovered": run_info["recovered"][side],
        }
    faults: Counter[str] = Counter()
    refused_windows = 0
    for s in switches:
        if s["kind"] == "none":
            continue
        label = f"{s['kind']} ({s['scope']})"
        if s["kind"] == "refuse" and s["scope"] == "all":
            refused_windows += 1  # the data port closed: connections refused, nothing counted by the proxy
        faults[label] += s["applied"]
    total = {k: sum(s[k] for s in sides.values() if isinstance(s[k], int)) for k in
             ("reads", "reads_under_faults", "correct", "failed_cleanly", "unclean_failures", "wrong_whole",
              "wrong_partial", "short_whole", "short_partial", "hangs")}
    reasons = []
    for key in ("wrong_whole", "wrong_partial", "short_whole", "short_partial", "hangs", "unclean_failures"):
        if total[key]:
            reasons.append(f"{total[key]} {key.replace('_', ' ')}")
    if run_info["fault_phase_timed_out"]:
        reasons.append("the fault phase did not complete (timeout, or a worker died)")
    for side, s in sides.items():
        if not s["recovered"]:
            reasons.append(f"{side} did not recover within {config.recovery_timeout:g}s")
        if not s["worker_ended"]:
            reasons.append(f"the {side} worker did not report its end")
    return {"sides": sides, "total": total, "anomalies": anomalies,
            "faults_injected": sum(faults.values()), "faults_by_kind": dict(faults),
            "refused_windows": refused_windows, "switches": len(switches),
            "recovery_seconds": round(recovery, 2), "failures": reasons, "ok": not reasons}


def render(report: dict[str, Any]) -> str:
    c = report["config"]
    d = report["dataset"]
    lines = [
        f"fault soak: seed {c['seed']}, {c['threads']} reader threads per side, read deadline {c['read_deadline']:g}s, "
        f"cache bound {c['cache_max_bytes']}, a fault switch every {c['switch_seconds']:g}s, "
        f"page cache dropped at each switch: {'yes' if report['page_cache_dropped'] else 'no'}; "
        f"{report['seconds']:g}s in all",
        f"dataset: {d['objects']} objects, {d['bytes']:,} bytes, {d['over_1MiB']} over 1 MiB "
        f"({d['with_block_map']} with a block map), largest {d['largest']:,}",
        f"faults injected: {report['faults_injected']:,} requests over {report['switches']} switches, "
        f"data port closed in {report['refused_windows']} of them; "
        + ", ".join(f"{k} {v}" for k, v in sorted(report["faults_by_kind"].items())),
        "",
        f"{'':22}{'mount':>12}{'api':>12}{'total':>12}",
    ]
    sides = report["sides"]
    for key in ("reads", "reads_under_faults", "correct", "failed_cleanly", "unclean_failures", "wrong_whole",
                "wrong_partial", "short_whole", "short_partial", "hangs"):
        lines.append(f"{key.replace('_', ' '):22}" + "".join(f"{sides[s][key]:>12,}" for s in ("mount", "api"))
                     + f"{report['total'][key]:>12,}")
    for s in ("mount", "api"):
        lines.append(f"slowest call ({s}): {sides[s]['slowest_call_s']}s, {sides[s]['slowest_call']}")
    lines.append(f"time to recover once faults stopped: {report['recovery_seconds']}s "
                 f"(recovered: mount {sides['mount']['recovered']}, api {sides['api']['recovered']})")
    log = report["mount_log"]
    lines.append(f"mount log: {log['tracebacks']} tracebacks, {log['errors']} ERROR lines")
    if report["anomalies"]:
        lines.append("")
        lines.append("wrong, short, unclean and slow reads:")
        for a in report["anomalies"][:60]:
            where = ""
            if a["diff"] is not None:
                where = f"first difference at {a['diff']:,} (object offset {a['offset'] + a['diff']:,})"
            elif a["got"] is not None and a["status"] == "short":
                where = f"ends at object offset {a['offset'] + a['got']:,} of {a['size']:,}"
            got = f"{a['got']:,} of {a['expected']:,} bytes" if a["got"] is not None else a["error"]
            lines.append(
                f"  {a['status']:7} {a['side']:5} {a['kind']:7} {a['size']:>9,}-byte object "
                f"({'block map' if a['map'] else 'no map'}) {a['sha'][:12]}, asked {a['asked']:,} at {a['offset']:,}: "
                f"{got} {where}; {a['seconds']}s (slowest call {a['slowest']}s); fault: {a['fault_at_start']}"
                + (f" -> {a['fault_at_end']}" if a["fault_at_end"] != a["fault_at_start"] else ""))
        if len(report["anomalies"]) > 60:
            lines.append(f"  ... {len(report['anomalies']) - 60} more in the JSON report")
    for side, s in sides.items():
        for u in s["unfinished"]:
            lines.append(f"  unfinished ({side}): {u['call']} after {u['seconds']:.1f}s")
    lines.append("")
    lines.append("PASS" if report["ok"] else "FAIL: " + "; ".join(report["failures"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.soak", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command")
    worker = sub.add_parser("worker", help="(internal) one side's reader process")
    worker.add_argument("--side", choices=("mount", "api"), required=True)
    worker.add_argument("--plan", required=True)
    worker.add_argument("--results", required=True)
    defaults = SoakConfig()
    parser.add_argument("--reads-per-side", type=int, default=defaults.reads_per_side)
    parser.add_argument("--min-fault-seconds", type=float, default=defaults.min_fault_seconds)
    parser.add_argument("--threads", type=int, default=defaults.threads)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--read-deadline", type=float, default=defaults.read_deadline)
    parser.add_argument("--hang-margin", type=float, default=defaults.hang_margin)
    parser.add_argument("--recovery-timeout", type=float, default=defaults.recovery_timeout)
    parser.add_argument("--no-drop-caches", action="store_true", help="leave the page cache alone")
    parser.add_argument("--workdir", type=Path, help="scratch directory (default: a temporary one, removed)")
    parser.add_argument("--json", type=Path, help="write the full report here")
    args = parser.parse_args(argv)
    if args.command == "worker":
        return worker_main(args)
    config = SoakConfig(reads_per_side=args.reads_per_side, min_fault_seconds=args.min_fault_seconds,
                        threads=args.threads, seed=args.seed, read_deadline=args.read_deadline,
                        hang_margin=args.hang_margin, recovery_timeout=args.recovery_timeout,
                        drop_caches=not args.no_drop_caches)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    with contextlib.ExitStack() as stack:
        workdir = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="s3fsimg-soak-")))
        report = run(config, workdir, log)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=str))
    print(render(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

