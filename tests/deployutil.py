"""Helpers shared by the deployment tests (fstab, warm, examples, containers).

`uploaded(...)`: a small dataset (SampleFiles) uploaded with the product's uploader, with its entries.
`mount_daemons(mp)`: PIDs of processes whose command line names a mountpoint (to prove a mount's
process has exited after `umount`, and to stop leftovers by PID in teardown).
`shared_mnt_dir()`: a mountpoint other users can reach, always unmounted afterwards.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from s3fsimg.manifest import Entry
from tests.cacheworker import build_workset, upload_dir
from tests.mountutil import is_mounted, scratch_mountpoint

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(os.environ.get("VIRTUAL_ENV", ROOT / ".venv")) / "bin"


@dataclass
class Uploaded:
    """A dataset in the lab bucket: its source directory and manifest entries."""

    root: Path
    entries: dict[str, Entry]  # sha256 -> Entry

    def source_sha(self) -> dict[str, str]:
        """source_path -> sha256 of the uploaded files."""
        return {e.source_path: e.sha256 for e in self.entries.values() if e.source_path}


def uploaded(dest: Path, env: Mapping[str, str], small: Iterable[Any], large: Iterable[Any] = ()) -> Uploaded:
    root = build_workset(dest, small, large)
    return Uploaded(root=root, entries=upload_dir(root, env))


def sha256_file(path: Path | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def mount_daemons(mountpoint: Path) -> list[int]:
    """PIDs of live processes (not zombies) whose command line contains `mountpoint` as one argument."""
    target = os.fsencode(os.path.abspath(mountpoint))
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            args = (d / "cmdline").read_bytes().split(b"\0")
            state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and target in args:
            pids.append(int(d.name))
    return pids


def wait_gone(mountpoint: Path, timeout: float = 15.0) -> list[int]:
    """Wait until no process names `mountpoint`; return the PIDs still there at the timeout."""
    deadline = time.monotonic() + timeout
    while (pids := mount_daemons(mountpoint)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return pids


def stop_daemons(mountpoint: Path) -> None:
    """Teardown: lazy-unmount `mountpoint`, then SIGTERM and at last SIGKILL the processes that name it."""
    if is_mounted(mountpoint):
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True, check=False)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in mount_daemons(mountpoint):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        if not wait_gone(mountpoint, 5.0):
            return


@contextlib.contextmanager
def shared_mnt_dir(prefix: str = "s3fsimg-mnt-") -> Iterator[Path]:
    """`mountutil.scratch_mountpoint`, whose daemonised mounts are also stopped afterwards."""
    with scratch_mountpoint(prefix) as mp:
        try:
            yield mp
        finally:
            stop_daemons(mp)


def clean_env(**extra: str) -> dict[str, str]:
    """The test process's environment without the product's and AWS's variables (a fresh shell)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("S3_", "DATASET_", "AWS_"))}
    env.update(extra)
    return env
