"""The demo: the whole story against a local S3 server (moto, its own process on 127.0.0.1).

Generates a sample dataset with Pillow (a few hundred JPEG and PNG files in nested folders, with
copies and a logical map), then runs the real commands: upload, validate, upload again (no PUT),
random-fetch through the cache, mount, list and read through the mount, stats, unmount. Everything
it starts is stopped at the end, also on Ctrl-C. Run it with `just demo` (or the README's command).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from s3fsimg_lab.images import make_dataset
from s3fsimg_lab.moto import MotoServer, s3_client

ROOT = Path(__file__).resolve().parent.parent


def step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def run(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "s3fsimg", *args]
    print("$ s3fsimg " + " ".join(args), flush=True)
    proc = subprocess.run(cmd, env=env, text=True, capture_output=True, cwd=ROOT)
    out = (proc.stdout + proc.stderr).strip()
    lines = out.splitlines()
    shown = lines if len(lines) <= 12 else [*lines[:10], f"... ({len(lines) - 10} more lines)"]
    for line in shown:
        print("  " + line)
    if check and proc.returncode != 0:
        raise SystemExit(f"demo: `s3fsimg {' '.join(args)}` failed with exit {proc.returncode}")
    return proc


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=300, help="how many sample images (default 300)")
    parser.add_argument("--no-mount", action="store_true", help="skip the FUSE part")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="s3fsimg-demo-"))
    mountpoint = work / "mnt"
    mounted = False
    moto = MotoServer()
    try:
        step("starting a local S3 server (moto) on 127.0.0.1")
        moto.start()
        print(f"  endpoint {moto.url}")
        s3_client(moto.url).create_bucket(Bucket="demo-images")
        env = {
            **os.environ,
            "S3_BUCKET": "demo-images",
            "S3_ENDPOINT_URL": moto.url,
            "S3_ADDRESSING_STYLE": "path",
            "AWS_ACCESS_KEY_ID": "demo",
            "AWS_SECRET_ACCESS_KEY": "demo-secret",
            "AWS_REGION": "us-east-1",
            "AWS_CONFIG_FILE": "/nonexistent",
            "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
            "DATASET_CACHE_DIR": str(work / "cache"),
            "DATASET_CACHE_MAX_BYTES": "1G",
        }
        step(f"generating {args.images} sample images with Pillow")
        sample = make_dataset(work / "dataset", n=args.images, seed=1, large=3,
                              large_bytes=(1_200_000, 3_000_000))
        print(f"  {len(sample.images)} images ({len(sample.duplicates)} copies), "
              f"{len(sample.non_images)} other files, map {sample.map_path}")
        env["DATASET_LOGICAL_MAP"] = str(sample.map_path)

        step("manifest (local, no S3)")
        run(env, "manifest", str(sample.root), "--out", str(work / "manifest.jsonl"))
        step("upload")
        run(env, "upload", str(sample.root))
        step("upload again: nothing to PUT")
        run(env, "upload", str(sample.root))
        step("validate the bucket's manifest, and HEAD every object")
        run(env, "validate", "--check-objects")
        step("random-fetch through the cache")
        run(env, "random-fetch", "--n", "5", "--seed", "42")
        lid = next(iter(sorted(sample.logical_ids.values())))
        run(env, "fetch", lid)
        run(env, "cache", "stats")

        if args.no_mount:
            return 0
        if not Path("/dev/fuse").exists() or shutil.which("fusermount3") is None:
            print("\n(skipping the mount: /dev/fuse or fusermount3 is missing)")
            return 0
        step("mount read-only, list and read")
        mountpoint.mkdir()
        run(env, "mount", str(mountpoint))
        mounted = True
        for sub in ("", "by-id", "by-path"):
            names = sorted(os.listdir(mountpoint / sub))
            more = " ..." if len(names) > 5 else ""
            print(f"  ls {mountpoint / sub}: {len(names)} entries: {', '.join(names[:5])}{more}")
        files = [p for p in (mountpoint / "by-path").rglob("*") if p.is_file()]
        started = time.monotonic()
        total = sum(len(p.read_bytes()) for p in files)
        took = time.monotonic() - started
        print(f"  read {len(files)} files ({total / 1e6:.1f} MB) through the mount in {took:.2f}s")
        run(env, "stats", str(mountpoint))
        return 0
    finally:
        if mounted:
            subprocess.run([sys.executable, "-m", "s3fsimg", "umount", str(mountpoint)], capture_output=True)
            subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True)
        moto.close()
        shutil.rmtree(work, ignore_errors=True)
        print("\n== stopped everything the demo started")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
