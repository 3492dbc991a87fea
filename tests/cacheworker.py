"""Helpers for the cache tests, and a worker process they run (`python -m tests.cacheworker ...`).

As a module (imported by tests/test_cache.py, test_reader.py, test_dataset.py):

* :func:`build_workset` writes a directory of chosen sample images (small ones and >1 MB ones);
* :func:`upload_dir` uploads a directory as a dataset and returns its manifest entries by sha256;
* :func:`start_worker` / :func:`run_workers` run worker processes with the product's environment;
* :func:`cache_usage` measures the real disk usage of a cache directory's objects/ and blocks/.

As a program, one worker: reads every id in ``--ids FILE`` (one sha256 a line) through ``Dataset``
(``--mode fetch``: the verified path, then its bytes; ``--mode read``: ``open().read()``; ``--mode
chunks``: ``open()`` then reads of ``--chunk`` bytes), checks each against its sha256, and prints one
JSON line: ``{"pid", "ok", "bad": [sha...], "errors": [message...], "seconds"}``. ``--passes`` repeats,
``--shuffle SEED`` changes the order per worker, ``--progress FILE`` appends one line per image done
(so a test can kill the worker mid-fill), ``--threads`` reads with that many threads. It exits 0 when
everything it read was correct, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ helpers


def build_workset(dest: Path, small: Iterable[Any], large: Iterable[Any] = ()) -> Path:
    """Copy the given SampleFiles (small ones, then large ones) into `dest` (no map, no decoys)."""
    dest.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    for i, f in enumerate([*small, *large]):
        if f.sha256 in seen:
            continue
        seen.add(f.sha256)
        ext = f.path.suffix
        shutil.copyfile(f.path, dest / f"img_{i:04d}{ext}")
    return dest


def upload_dir(directory: Path, env: Mapping[str, str]) -> dict[str, Any]:
    """Upload `directory` as a dataset with the product's own uploader; return {sha256: Entry}."""
    from s3fsimg.config import Config
    from s3fsimg.s3 import S3Store
    from s3fsimg.uploader import upload

    config = Config.load(env=dict(env))
    upload(config, directory, show_progress=False)
    store = S3Store(config)
    return {e.sha256: e for e in read_manifest_bytes(store.get_bytes(config.manifest_key))}


def read_manifest_bytes(raw: bytes) -> list[Any]:
    """Parse manifest bytes into Entries (strict parser of the product)."""
    from s3fsimg.manifest import parse_entry

    return [parse_entry(json.loads(line)) for line in raw.decode().splitlines() if line.strip()]


def worker_env(env: Mapping[str, str], **extra: str) -> dict[str, str]:
    out = dict(os.environ)
    out.update(env)
    out.update(extra)
    out["PYTHONPATH"] = str(ROOT) + (os.pathsep + out["PYTHONPATH"] if out.get("PYTHONPATH") else "")
    out.setdefault("DATASET_LOG_LEVEL", "warning")
    return out


def start_worker(env: Mapping[str, str], ids: list[str], workdir: Path, *args: str,
                 name: str = "w") -> subprocess.Popen[str]:
    """Start one worker process on `ids`; its cwd is `workdir` (no stray .env is read)."""
    workdir.mkdir(parents=True, exist_ok=True)
    ids_file = workdir / f"{name}.ids"
    ids_file.write_text("\n".join(ids) + "\n")
    return subprocess.Popen(
        [sys.executable, "-m", "tests.cacheworker", "--ids", str(ids_file), *args],
        cwd=workdir, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def collect(proc: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    """Wait for a worker; return its JSON report (with "returncode" and "stderr")."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"worker {proc.pid} did not finish within {timeout}s:\n{err[-3000:]}") from None
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if not lines:
        raise AssertionError(f"worker {proc.pid} exited {proc.returncode} without a report:\n{err[-3000:]}")
    report: dict[str, Any] = json.loads(lines[-1])
    report["returncode"] = proc.returncode
    report["stderr"] = err
    return report


def run_workers(env: Mapping[str, str], ids: list[str], workdir: Path, n: int, *args: str,
                timeout: float = 60.0) -> list[dict[str, Any]]:
    procs = [start_worker(env, ids, workdir, *args, "--shuffle", str(i), name=f"w{i}") for i in range(n)]
    try:
        return [collect(p, timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def dir_usage(path: Path) -> int:
    """Real disk usage (allocated blocks, st_blocks * 512) of every file under `path`."""
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total


def cache_usage(cache_dir: Path) -> int:
    """Disk usage of the data a cache holds: v1/objects and v1/blocks."""
    base = Path(cache_dir) / "v1"
    return dir_usage(base / "objects") + dir_usage(base / "blocks")


def cache_files(cache_dir: Path, sha256: str) -> list[Path]:
    """Every object file and block file of one sha256 under a cache directory (temp files excluded)."""
    base = Path(cache_dir) / "v1"
    found = [p for p in (base / "objects").rglob(f"{sha256}*") if p.is_file()]
    found += [p for p in (base / "blocks").rglob("*") if p.is_file() and sha256 in p.parts]
    return found


class UsageSampler:
    """Samples `cache_usage` in a thread while workers run; `.peak` and `.samples` after `stop()`."""

    def __init__(self, cache_dir: Path, interval: float = 0.05) -> None:
        self.cache_dir = cache_dir
        self.interval = interval
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(cache_usage(self.cache_dir))
            self._stop.wait(self.interval)

    def __enter__(self) -> UsageSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(cache_usage(self.cache_dir))

    @property
    def peak(self) -> int:
        return max(self.samples, default=0)


# ------------------------------------------------------------------------------------------- worker


def _check(sha: str, data: bytes) -> bool:
    return hashlib.sha256(data).hexdigest() == sha


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.cacheworker")
    ap.add_argument("--ids", required=True, type=Path)
    ap.add_argument("--mode", choices=("fetch", "read", "chunks"), default="fetch")
    ap.add_argument("--chunk", type=int, default=100_000)
    ap.add_argument("--passes", type=int, default=1)
    ap.add_argument("--shuffle", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--progress", type=Path, default=None)
    args = ap.parse_args(argv)

    from s3fsimg.dataset import Dataset

    ids = [line.strip() for line in args.ids.read_text().splitlines() if line.strip()]
    ds = Dataset.from_env()
    report: dict[str, Any] = {"pid": os.getpid(), "ok": 0, "bad": [], "errors": []}
    lock = threading.Lock()
    progress = open(args.progress, "a", buffering=1) if args.progress else None  # noqa: SIM115

    def one(sha: str) -> None:
        try:
            if args.mode == "fetch":
                data = ds.fetch(sha).read_bytes()
            elif args.mode == "read":
                with ds.open(sha) as f:
                    data = f.read()
            else:
                parts = []
                with ds.open(sha) as f:
                    while True:
                        piece = f.read(args.chunk)
                        if not piece:
                            break
                        parts.append(piece)
                data = b"".join(parts)
        except Exception as exc:
            with lock:
                report["errors"].append(f"{sha}: {exc.__class__.__name__}: {exc}")
            return
        with lock:
            if _check(sha, data):
                report["ok"] += 1
            else:
                report["bad"].append(sha)
            if progress is not None:
                progress.write(sha + "\n")

    start = time.monotonic()
    for p in range(args.passes):
        order = list(ids)
        if args.shuffle is not None:
            random.Random(args.shuffle * 1000 + p).shuffle(order)
        if args.threads > 1:
            with ThreadPoolExecutor(args.threads) as pool:
                list(pool.map(one, order))
        else:
            for sha in order:
                one(sha)
    report["seconds"] = round(time.monotonic() - start, 3)
    print(json.dumps(report), flush=True)
    ds.close()
    return 0 if not report["bad"] and not report["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
