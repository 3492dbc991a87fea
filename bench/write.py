"""Write side (issue 2): manifest hashing vs `sha256sum`, `s3fsimg upload` vs `rclone copy`, and a
no-op re-upload as a fraction of the first, at 0 ms and 25 ms proxy latency."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from functools import partial
from pathlib import Path
from typing import Any

from bench.common import ROOT, Lab, Report, best_of, run_timed, step, timed
from s3fsimg.config import Config
from s3fsimg.scan import scan
from s3fsimg.uploader import upload


def rclone_env(lab: Lab) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"}  # Debian's rclone refuses it
    env.update({
        "RCLONE_CONFIG_LAB_TYPE": "s3",
        "RCLONE_CONFIG_LAB_PROVIDER": "Other",
        "RCLONE_CONFIG_LAB_ENDPOINT": lab.url,
        "RCLONE_CONFIG_LAB_ACCESS_KEY_ID": env["AWS_ACCESS_KEY_ID"],
        "RCLONE_CONFIG_LAB_SECRET_ACCESS_KEY": env["AWS_SECRET_ACCESS_KEY"],
        "RCLONE_CONFIG_LAB_REGION": "us-east-1",
        "RCLONE_CONFIG_LAB_FORCE_PATH_STYLE": "true",
        "RCLONE_CONFIG": "/nonexistent/rclone.conf",
    })
    return env


def run(lab: Lab, report: Report, args: Any, data: Path) -> None:
    sec = report.section("Write side: manifest and upload",
                         f"Data: {sum(1 for p in data.rglob('*') if p.is_file())} files, "
                         f"{sum(p.stat().st_size for p in data.rglob('*') if p.is_file()) / 1e6:.0f} MB "
                         "(generated JPEG/PNG/WebP/GIF, nested folders, copies, decoys), page-cached.")
    for p in data.rglob("*"):
        if p.is_file():
            p.read_bytes()
    rounds = 2 if args.quick else 3
    with step("hashing"):
        t_ours = best_of(rounds, lambda: sum(1 for _ in scan(data)))
        files = [str(p) for p in sorted(data.rglob("*")) if p.is_file()]
        t_sum = best_of(rounds, lambda: subprocess.run(["sha256sum", *files], stdout=subprocess.DEVNULL,
                                                       check=True))
    sec.add("manifest hashing (in process, all cores)", t_ours, "s", baseline="one sha256sum process",
            ratio=t_sum / t_ours, goal=1.5)

    for latency in (0, 25):
        lab.latency(latency)
        with tempfile.TemporaryDirectory(prefix="bench-write-") as tmp:
            cache = Path(tmp) / "cache"
            bucket = lab.new_bucket("up")
            env = lab.env(bucket, cache)
            cmd = [sys.executable, "-m", "s3fsimg", "upload", str(data)]
            t_first, proc = run_timed(cmd, env, cwd=ROOT)
            if proc.returncode != 0:
                raise SystemExit(f"upload failed: {proc.stderr}")
            t_again, proc = run_timed(cmd, env, cwd=ROOT)
            rbucket = lab.new_bucket("rclone")
            t_rclone, rproc = run_timed(["rclone", "copy", str(data), f"lab:{rbucket}/images"], rclone_env(lab))
            if rproc.returncode != 0:
                sec.notes.append(f"rclone copy failed at {latency} ms: {rproc.stderr.strip()[:300]}")
        sec.add(f"upload, {latency} ms latency", t_first, "s", baseline="rclone copy (defaults)",
                ratio=t_rclone / t_first, goal=1.0)
        sec.add(f"no-op re-upload, {latency} ms latency", t_again, "s", baseline="first upload",
                ratio=t_again / t_first, goal=0.05, lower_is_better=True)
        with tempfile.TemporaryDirectory(prefix="bench-write-") as tmp:
            config = Config(bucket=lab.new_bucket("inproc"), endpoint_url=lab.url, addressing_style="path",
                            cache_dir=Path(tmp) / "cache")
            t_first_in, _ = timed(partial(upload, config, data, show_progress=False))
            t_again_in, again = timed(partial(upload, config, data, show_progress=False))
            assert again.uploaded == 0
        sec.add(f"no-op re-upload in process, {latency} ms latency", t_again_in, "s",
                baseline="first upload in process", ratio=t_again_in / t_first_in, goal=0.05, lower_is_better=True)
    lab.latency(0)
    sec.notes.append(
        "Ratios: hashing and upload are baseline time ÷ s3fsimg time (higher is better); the re-upload is "
        "its time ÷ the first upload's (lower is better). Both upload commands run as a user runs them "
        "(new processes, Python start-up included). rclone copies every file by name (copies and decoys "
        "too, content-type by extension); s3fsimg puts each distinct image once, recognised by its bytes, "
        "with a SHA-256 checksum, then the manifest. The re-upload walks and stats DIR, answers from its "
        "hash cache, makes one LIST and one HEAD, and PUTs nothing; run as a command, most of its time is the "
        "start-up of Python, botocore and its client (about 0.25 s), which the in-process figures leave out.")
