"""A reader of files through a mount, as a separate process (`python -m tests.mountreader ...`), for the
crash and sharing tests (tests/test_crash.py): a reader blocked in a mount that dies must not take
pytest with it.

Reads the files listed in ``--targets FILE`` (JSON: a list of ``{"path", "source", "sha256"}``: the file
in the mount, its source file, its hash) with ``--threads`` threads, each picking targets at random
(seeded): half the time the whole file in 1 MiB reads, checked against its sha256; else one pread of
4 KiB, 64 KiB or 300 KB at a random offset, checked against the same bytes of the source file (a read
shorter than asked before end of file is "short", a wrong one). It runs ``--passes`` passes over every
target (each target once a pass, whole, then one pread) or, with ``--seconds``, random reads until that
time has passed (or ``--stop-after-errors`` reads have failed: a dead mount fails every read at once).
Prints one JSON line: ``{"pid", "ok", "bad": [...], "short": [...], "errors": {errno
name: n}, "first_errors": [...]}``; exits 0 when every read was correct and none failed.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import random
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

SIZES = (4096, 65536, 300_000)


class Report:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ok = 0
        self.bad: list[str] = []
        self.short: list[str] = []
        self.errors: Counter[str] = Counter()
        self.first_errors: list[str] = []

    def error(self, target: dict[str, Any], exc: OSError) -> None:
        with self.lock:
            self.errors[errno.errorcode.get(exc.errno or 0, str(exc.errno))] += 1
            if len(self.first_errors) < 10:
                self.first_errors.append(f"{target['path']}: {exc}")


def read_whole(target: dict[str, Any], report: Report) -> None:
    try:
        with open(target["path"], "rb", buffering=0) as f:
            parts = []
            while piece := f.read(1 << 20):
                parts.append(piece)
    except OSError as exc:
        report.error(target, exc)
        return
    digest = hashlib.sha256(b"".join(parts)).hexdigest()
    with report.lock:
        if digest == target["sha256"]:
            report.ok += 1
        else:
            report.bad.append(f"whole {target['path']}: {sum(map(len, parts))} bytes, sha256 {digest}")


def read_part(target: dict[str, Any], rng: random.Random, report: Report) -> None:
    size = os.path.getsize(target["source"])
    want = rng.choice(SIZES)
    offset = rng.randrange(0, max(1, size - want // 2))
    with open(target["source"], "rb") as src:
        src.seek(offset)
        expected = src.read(want)
    try:
        fd = os.open(target["path"], os.O_RDONLY)
        try:
            got = os.pread(fd, want, offset)
        finally:
            os.close(fd)
    except OSError as exc:
        report.error(target, exc)
        return
    with report.lock:
        if got == expected:
            report.ok += 1
        elif expected.startswith(got):
            report.short.append(f"pread {target['path']} @{offset}+{want}: {len(got)} of {len(expected)} bytes")
        else:
            report.bad.append(f"pread {target['path']} @{offset}+{want}: wrong bytes")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.mountreader")
    ap.add_argument("--targets", required=True)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--passes", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stop-after-errors", type=int, default=0)
    args = ap.parse_args(argv)
    with open(args.targets, encoding="utf-8") as f:
        targets: list[dict[str, Any]] = json.load(f)
    report = Report()

    def worker(i: int) -> None:
        rng = random.Random(args.seed * 1000 + i)
        if args.seconds:
            end = time.monotonic() + args.seconds
            while time.monotonic() < end:
                if args.stop_after_errors and sum(report.errors.values()) >= args.stop_after_errors:
                    return
                target = rng.choice(targets)
                if rng.random() < 0.5:
                    read_whole(target, report)
                else:
                    read_part(target, rng, report)
            return
        for p in range(args.passes):
            order = list(targets)
            random.Random(args.seed * 1000 + p).shuffle(order)  # one order for every thread: each takes a share
            for target in order[i::args.threads]:
                read_whole(target, report)
                read_part(target, rng, report)

    with ThreadPoolExecutor(args.threads) as pool:
        list(pool.map(worker, range(args.threads)))
    print(json.dumps({"pid": os.getpid(), "ok": report.ok, "bad": report.bad, "short": report.short,
                      "errors": dict(report.errors), "first_errors": report.first_errors}), flush=True)
    return 0 if not (report.bad or report.short or report.errors) else 1


if __name__ == "__main__":
    sys.exit(main())
