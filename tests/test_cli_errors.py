"""The CLI boundary: a user's mistake is one line on stderr saying what and where, a non-zero exit, no
traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def s3fsimg(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "s3fsimg", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})}, cwd=cwd, check=False)


def one_line_error(proc: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("s3fsimg: error:")]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    from PIL import Image

    root = tmp_path / "images"
    root.mkdir()
    Image.new("RGB", (8, 8), "red").save(root / "a.png")
    return root


@pytest.mark.timeout(60)
def test_manifest_out_in_a_missing_directory(image_dir: Path, tmp_path: Path) -> None:
    one_line_error(s3fsimg("manifest", str(image_dir), "--out", "/proc/no-such-dir/m.jsonl", cwd=tmp_path),
                   1, "/proc/no-such-dir", "No such file or directory")


@pytest.mark.timeout(60)
def test_manifest_out_is_a_directory(image_dir: Path, tmp_path: Path) -> None:
    proc = s3fsimg("manifest", str(image_dir), "--out", str(tmp_path), cwd=tmp_path)
    one_line_error(proc, 1, str(tmp_path), "is a directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]  # no temporary file left behind


@pytest.mark.timeout(60)
def test_log_file_that_cannot_be_written(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    proc = s3fsimg("mount", str(tmp_path / "mnt"), "--bucket", "b", "--log-file", str(blocker / "x.log"), cwd=tmp_path)
    one_line_error(proc, 1, str(blocker))


@pytest.mark.timeout(60)
def test_a_missing_bucket_is_named_as_such(s3_env: dict[str, str], tmp_path: Path) -> None:
    proc = s3fsimg("fetch", "0" * 64, env={**s3_env, "S3_BUCKET": "no-such-bucket-here"}, cwd=tmp_path)
    one_line_error(proc, 1, "s3://no-such-bucket-here", "does not exist")


@pytest.mark.timeout(60)
def test_a_missing_logical_map_is_a_configuration_error(image_dir: Path, tmp_path: Path) -> None:
    proc = s3fsimg("manifest", str(image_dir), "--out", str(tmp_path / "m.jsonl"),
                   env={"DATASET_LOGICAL_MAP": str(tmp_path / "nope.csv")}, cwd=tmp_path)
    one_line_error(proc, 2, "nope.csv", "cannot read the logical map")
    assert not (tmp_path / "m.jsonl").exists()
