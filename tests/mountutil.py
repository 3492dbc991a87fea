"""Helpers for the mount tests: a fake-manifest generator, and mounting in a subprocess with sure teardown.

`fake_manifest` writes a manifest of N well-formed entries whose objects need not exist (index and
listing benchmarks). `MountProcess` starts `s3fsimg mount --foreground` in a subprocess, waits for
the mount with a timeout (failing early, with the process's output, if it died), and always tears
down: `fusermount3 -u -z`, then terminate, then kill.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pytest

from s3fsimg_lab.procs import stop_process


def fake_manifest(path: Path, n: int, *, dirs: int = 1000, dup_every: int = 0, with_ids: bool = True,
                  with_paths: bool = True) -> int:
    """Write `n` entries to `path`; every `dup_every`-th line repeats an earlier object under a new
    name. Returns the number of distinct objects."""
    objects = 0
    with open(path, "w", encoding="utf-8") as out:
        for i in range(n):
            if dup_every and i and i % dup_every == 0:
                seed = i - 1  # never itself a repeat (dup_every > 1)
            else:
                seed = i
                objects += 1
            sha = hashlib.sha256(str(seed).encode()).hexdigest()
            d = {"sha256": sha, "path": f"images/{sha[:2]}/{sha[2:4]}/{sha}.jpg", "bytes": 1000 + seed % 5000,
                 "content_type": "image/jpeg", "width": 64, "height": 48}
            if with_ids:
                d["logical_id"] = f"ID-{i:08d}"
            d["etag"] = f'"{sha[:32]}"'
            if with_paths:
                d["source_path"] = f"class{i % dirs:04d}/img{i:08d}.jpg"
            out.write(json.dumps(d, separators=(",", ":")) + "\n")
    return objects


# -- mounting in a subprocess ------------------------------------------------------------------



def fuse_available() -> str | None:
    """None when FUSE mounts can be tested here, else why not."""
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    if shutil.which("fusermount3") is None:
        return "no fusermount3"
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR))
    except OSError as exc:
        return f"/dev/fuse: {exc.strerror}"
    return None


fuse_test = pytest.mark.skipif(fuse_available() is not None, reason=f"FUSE unavailable: {fuse_available()}")


def is_mounted(mountpoint: Path) -> bool:
    target = os.path.abspath(mountpoint)
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        return any(line.split()[4] == target for line in f)


class MountProcess:
    """`python -m s3fsimg mount MP --foreground` in a subprocess; `stop()` always leaves nothing behind."""

    def __init__(self, mountpoint: Path, *, env: Mapping[str, str] | None = None, args: Sequence[str] = (),
                 log_file: Path | None = None, preexec: Sequence[str] = (), workers: int | None = None) -> None:
        """`workers`: `--workers N`; when None, the mount's default, or DATASET_MOUNT_WORKERS of this
        process's environment even when `env` lacks it (so `DATASET_MOUNT_WORKERS=4 pytest ...` runs every
        mount test with 4 workers)."""
        self.mountpoint = mountpoint
        self.log_file = log_file or mountpoint.parent / f"{mountpoint.name}.log"
        self.cmd = [*preexec, sys.executable, "-m", "s3fsimg", "mount", str(mountpoint), "--foreground",
                    "--log-file", str(self.log_file), *args]
        if workers is not None:
            self.cmd += ["--workers", str(workers)]
        self.env = dict(os.environ if env is None else env)
        if "DATASET_MOUNT_WORKERS" in os.environ:
            self.env.setdefault("DATASET_MOUNT_WORKERS", os.environ["DATASET_MOUNT_WORKERS"])
        self.env.setdefault("DATASET_LOG_LEVEL", "info")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> MountProcess:
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     cwd=str(Path(__file__).resolve().parent.parent))
        self.wait_mounted(timeout)
        return self

    def output(self) -> str:
        text = ""
        if self.proc is not None and self.proc.poll() is not None and self.proc.stdout is not None:
            text += self.proc.stdout.read().decode(errors="replace")
        if self.log_file.exists():
            text += "\n--- log ---\n" + self.log_file.read_text(errors="replace")[-5000:]
        return text

    def wait_mounted(self, timeout: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if is_mounted(self.mountpoint):
                try:
                    os.stat(self.mountpoint)
                    return
                except OSError:
                    pass
            if self.proc.poll() is not None:
                out = self.output()
                self.stop()
                pytest.fail(f"mount process exited with {self.proc.returncode} before mounting:\n{out}")
            time.sleep(0.05)
        self.stop()
        pytest.fail(f"mount did not come up in {timeout}s:\n{self.output()}")

    def stop(self, timeout: float = 10.0) -> None:
        """Lazy unmount, then terminate, then kill: always, whatever state things are in."""
        if is_mounted(self.mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)], capture_output=True, check=False)
        stop_process(self.proc, timeout)
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()

    def __enter__(self) -> MountProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def scratch_mountpoint(prefix: str = "s3fsimg-mnt-") -> Iterator[Path]:
    """A new empty mountpoint that other users can reach (pytest's tmp_path is 0700); whatever is left
    mounted on it is lazily unmounted, and the directory removed, at the end."""
    top = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(top, 0o755)
    mp = top / "mnt"
    mp.mkdir()
    os.chmod(mp, 0o755)
    try:
        yield mp
    finally:
        if is_mounted(mp):
            subprocess.run(["fusermount3", "-u", "-z", str(mp)], check=False, capture_output=True)
        shutil.rmtree(top, ignore_errors=True)


@contextlib.contextmanager
def mounted_tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` (`6m`) mounted at `path` (0700), lazily unmounted at the end; the test is skipped
    with the reason when it cannot be mounted."""
    path.mkdir(exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
                       capture_output=True, text=True, check=False)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)
