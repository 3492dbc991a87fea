"""Trying paths as another local user, for the security tests (tests/test_cache.py, test_mount.py).

`probe_as_other_user(paths)` runs a small probe in a child process that has dropped to uid/gid 65534
(nobody) through `os.setuid` in a `preexec_fn` (so it needs root), with the system's python3 (the
project's venv may live under a directory other users cannot enter). For each path the probe stats it,
then lists it (a directory) or reads it whole (a file), and answers either the errno's name
(`"EACCES"`) or `"ok"` (a directory) / the sha256 of the bytes read (a file).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterable

import pytest

OTHER_UID = 65534  # nobody
_PYTHON = next((p for p in ("/usr/bin/python3", shutil.which("python3")) if p and os.access(p, os.X_OK)), None)

needs_root = pytest.mark.skipif(os.getuid() != 0 or _PYTHON is None,
                                reason="needs root (setuid to another user) and a system python3")

_PROBE = r"""
import errno, hashlib, json, os, stat, sys
out = {}
for p in json.load(sys.stdin):
    try:
        if stat.S_ISDIR(os.stat(p).st_mode):
            os.listdir(p)
            out[p] = "ok"
        else:
            with open(p, "rb") as f:
                out[p] = hashlib.sha256(f.read()).hexdigest()
    except OSError as exc:
        out[p] = errno.errorcode.get(exc.errno, str(exc.errno))
print(json.dumps(out))
"""


def _become_other_user() -> None:
    os.setgroups([])
    os.setgid(OTHER_UID)
    os.setuid(OTHER_UID)


def probe_as_other_user(paths: Iterable[str | os.PathLike[str]], timeout: float = 60) -> dict[str, str]:
    """{path: "ok" | sha256 of the file | errno name} for each path, tried as uid/gid 65534."""
    assert _PYTHON is not None
    names = [os.fspath(p) for p in paths]
    r = subprocess.run([_PYTHON, "-c", _PROBE], input=json.dumps(names), capture_output=True, text=True,
                       preexec_fn=_become_other_user, cwd="/", env={"PATH": "/usr/bin:/bin"}, timeout=timeout,
                       check=False)
    assert r.returncode == 0, r.stderr
    result: dict[str, str] = json.loads(r.stdout)
    return result
