"""A dataset under a key prefix, read anonymously from a public bucket (and refused from a private one)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from s3fsimg.config import Config
from s3fsimg.dataset import Dataset
from s3fsimg.uploader import upload
from s3fsimg_lab.images import SampleSet

ROOT = Path(__file__).resolve().parent.parent


def test_prefix_layout_and_anonymous_reads(sample_dir: SampleSet, s3_env: dict[str, str], moto_client: Any,
                                           bucket: str, make_bucket_public: Any, tmp_path: Path) -> None:
    config = Config.load({"prefix": "datasets/cats-v1"})
    upload(config, sample_dir.root, show_progress=False)
    keys = [o["Key"] for o in moto_client.list_objects_v2(Bucket=bucket)["Contents"]]
    assert keys and all(k.startswith("datasets/cats-v1/") for k in keys)
    assert "datasets/cats-v1/manifests/inventory-v1.jsonl" in keys
    first = sample_dir.images[0]
    assert f"datasets/cats-v1/{first.s3_path}" in keys

    env = {**os.environ, "S3_ANONYMOUS": "1", "DATASET_PREFIX": "datasets/cats-v1",
           "DATASET_CACHE_DIR": str(tmp_path / "anon-cache")}
    env.pop("AWS_ACCESS_KEY_ID")
    env.pop("AWS_SECRET_ACCESS_KEY")
    denied = subprocess.run([sys.executable, "-m", "s3fsimg", "fetch", first.sha256], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert denied.returncode == 1
    assert "access denied" in denied.stderr.lower() and "Traceback" not in denied.stderr
    signed_env = {**env, "AWS_ACCESS_KEY_ID": s3_env["AWS_ACCESS_KEY_ID"],  # its own cache: the anonymous
                  "AWS_SECRET_ACCESS_KEY": s3_env["AWS_SECRET_ACCESS_KEY"],  # fetch below must GET the object
                  "DATASET_CACHE_DIR": str(tmp_path / "signed-cache")}
    signed = subprocess.run([sys.executable, "-m", "s3fsimg", "fetch", first.sha256, "--no-anonymous"],
                            env=signed_env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert signed.returncode == 0, signed.stderr  # the flag overrides S3_ANONYMOUS=1 from the environment

    make_bucket_public(bucket)
    ok = subprocess.run([sys.executable, "-m", "s3fsimg", "fetch", first.sha256], env=env, cwd=ROOT,
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert Path(ok.stdout.strip()).read_bytes() == first.path.read_bytes()

    anon = Config.load({"prefix": "datasets/cats-v1", "anonymous": True, "cache_dir": str(tmp_path / "api")})
    with Dataset(anon) as ds:
        assert len(ds) == len(sample_dir.images)
        with ds.open(first.sha256) as f:
            assert f.read() == first.path.read_bytes()
