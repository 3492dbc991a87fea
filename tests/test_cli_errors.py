"""The CLI boundary: a user's mistake is one line on stderr saying what and where, a non-zero exit, no
traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

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
def test_manifest_out_in_a_directory_that_cannot_be_created(image_dir: Path, tmp_path: Path) -> None:
    """A missing directory is created; one under /proc cannot be: the OSError is one line naming it."""
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


@pytest.mark.timeout(120)
def test_ctrl_c_during_a_slow_fetch_exits_at_once(s3_env: dict[str, str], proxy: Any, large_set: Any,
                                                   tmp_path: Path) -> None:
    """Ctrl-C does not wait for a transfer in flight (the audit measured 23 s), and leaves nothing in the
    cache that a later fetch would serve as valid."""
    import hashlib
    import signal
    import time

    assert s3fsimg("upload", str(large_set.root), env=s3_env, cwd=tmp_path).returncode == 0
    big = max(large_set.root.rglob("*.png"), key=lambda p: p.stat().st_size)
    sha = hashlib.sha256(big.read_bytes()).hexdigest()
    with proxy.fault("bandwidth_bps", 50_000, match=sha):  # ~40 s for the object
        proc = subprocess.Popen([sys.executable, "-m", "s3fsimg", "fetch", sha], env={**os.environ, **s3_env},
                                cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while proxy.get_count("GET", sha) == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=60)
        took = time.monotonic() - sent
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert took < 5, took
    again = s3fsimg("fetch", sha, env=s3_env, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert hashlib.sha256(Path(again.stdout.strip()).read_bytes()).hexdigest() == sha


@pytest.mark.timeout(120)
def test_a_server_that_never_answers_fails_within_about_one_deadline(s3_env: dict[str, str], proxy: Any,
                                                                      tmp_path: Path) -> None:
    """The first contact (the manifest's HEAD) tries twice, each waiting half the read deadline: with a
    4 s deadline it fails in about 4 s (it took six tries, ~14 s, before)."""
    import time

    with proxy.fault("hang"):
        started = time.monotonic()
        proc = s3fsimg("fetch", "0" * 64, env={**s3_env, "DATASET_READ_DEADLINE": "4s"}, cwd=tmp_path)
        took = time.monotonic() - started
    one_line_error(proc, 1, "manifest")
    assert took < 9, took


@pytest.mark.timeout(60)
def test_manifest_of_a_directory_without_images_writes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "d"
    root.mkdir()
    (root / "notes.txt").write_text("not an image")
    out = tmp_path / "m.jsonl"
    out.write_text("previous manifest\n")
    proc = s3fsimg("manifest", str(root), "--out", str(out), cwd=tmp_path)
    one_line_error(proc, 1, str(root), "no images found (1 files skipped)")
    assert out.read_text() == "previous manifest\n"  # not replaced by an empty one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "m.jsonl"]
