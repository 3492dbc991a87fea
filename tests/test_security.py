"""No secret leaks (issue 11): a whole run at debug level — upload, validate, fetch (also one that fails),
random-fetch, a daemon mount read through (whole and ranged reads), stats, umount — with a recognisable
fake access key, secret key and session token, leaves no credential, session token or request signature
in any stdout, stderr, log file, or any other file of the cache directory.

(The cache's modes and another user's attempts to read it: tests/test_cache.py
`test_cache_dir_is_private`; the mount and other users: tests/test_mount.py
`test_other_users_need_allow_other`.)
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from tests.cacheworker import build_workset
from tests.mountutil import fuse_test

ROOT = Path(__file__).resolve().parents[1]

# Shaped like real ones (a session token is long base64 with '/', '+' and '='); each holds a marker.
ACCESS_KEY = "AKIALEAKMARKERKEY777"
SECRET_KEY = "wJalrXUtnFEMI/K7MDENG+LeakMarkerSecret/xyz="
SESSION_TOKEN = ("IQoJb3JpZ2luX2VjEMarkerSessionToken//////////wEaCXVzLWVhc3QtMSJHMEUCIQD+abc/def"
                 "LeakMarkerTok3n+Zm9vYmFy/YmF6cXV4==")
MARKERS = ["LEAKMARKERKEY", "LeakMarkerSecret", "MarkerSessionToken", "LeakMarkerTok3n"]
#: what a leak looks like besides the values themselves: signatures and credential scopes, as botocore
#: writes them in its debug output (header, query string, and its "Signature:\n<hex>" line)
LEAK_PATTERNS = [
    re.compile(r"Signature=(?!\*\*\*)[0-9A-Za-z]"),
    re.compile(r"X-Amz-Signature=(?!\*\*\*)"),
    re.compile(r"Credential=(?!\*\*\*)[0-9A-Za-z]"),
    re.compile(r"X-Amz-Credential=(?!\*\*\*)"),
    re.compile(r"Signature:\s*[0-9a-f]{64}"),
    re.compile(r"(?i)x-amz-security-token['\"]?\s*[:=]\s*(?!b?['\"]?\*\*\*)b?['\"]?[0-9A-Za-z/+]"),
]


def leaks(text: str) -> list[str]:
    """Every secret, marker or signature-like string found in `text` (with a little context)."""
    found = []
    for secret in (ACCESS_KEY, SECRET_KEY, SESSION_TOKEN):
        for form in {secret, quote(secret, safe=""), quote(secret)}:
            if form in text:
                found.append(f"the value {form[:12]}...")
    for marker in MARKERS:
        if marker.lower() in text.lower():
            at = text.lower().index(marker.lower())
            found.append(f"marker {marker}: ...{text[max(0, at - 60):at + 20]!r}")
    for pattern in LEAK_PATTERNS:
        for m in pattern.finditer(text):
            found.append(f"{pattern.pattern}: ...{text[max(0, m.start() - 40):m.end() + 40]!r}")
    return found


@fuse_test
@pytest.mark.fuse
@pytest.mark.timeout(240)
def test_a_debug_run_leaks_no_credential_token_or_signature(s3_env: dict[str, str], sample_set: Any, large_set: Any,
                                                            proxy: Any, tmp_path: Path, mnt_dir: Path) -> None:
    env = {**os.environ, **s3_env, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
           "AWS_SESSION_TOKEN": SESSION_TOKEN, "DATASET_LOG_LEVEL": "debug", "PYTHONPATH": str(ROOT)}
    cache = Path(s3_env["DATASET_CACHE_DIR"])
    outputs: dict[str, str] = {}

    def run(name: str, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([sys.executable, "-m", "s3fsimg", *args], env=env, cwd=tmp_path, capture_output=True,
                           text=True, timeout=120, check=False)
        outputs[f"{name} stdout"], outputs[f"{name} stderr"] = r.stdout, r.stderr
        assert (r.returncode == 0) == ok, (name, r.returncode, r.stderr[-3000:])
        return r

    data = build_workset(tmp_path / "ds", list(sample_set.distinct_images.values())[:6], large_set.large[:2])
    run("upload", "upload", str(data))
    run("validate", "validate", "--check-objects")
    files = sorted(p for p in data.iterdir())
    shas = [hashlib.sha256(p.read_bytes()).hexdigest() for p in files]
    run("fetch", "fetch", *shas[:3])
    run("random-fetch", "random-fetch", "--n", "3", "--seed", "1")
    with proxy.fault("error_status", 403, match=shas[3]):  # an error, with its traceback in the debug log
        run("fetch-denied", "fetch", shas[3], ok=False)
    run("mount", "mount", str(mnt_dir))
    try:
        for sha in shas:
            named = list((mnt_dir / "images" / sha[:2] / sha[2:4]).glob(f"{sha}.*"))
            assert len(named) == 1, sha
            with open(named[0], "rb") as f:
                head = f.read(4096)
                f.seek(0)
                assert hashlib.sha256(f.read()).hexdigest() == sha
                assert head
        run("stats", "stats", str(mnt_dir), "--json")
    finally:
        run("umount", "umount", str(mnt_dir))
    run("cache-stats", "cache", "stats")

    assert "Signature" in outputs["upload stderr"] or "Authorization" in outputs["upload stderr"], \
        "debug output shows no request at all: nothing was checked"
    found = {name: hits for name, text in outputs.items() if (hits := leaks(text))}
    logs = [p for p in [*tmp_path.rglob("*"), *cache.rglob("*")] if p.is_file() and not p.is_relative_to(data)]
    assert any(p.name == "mount.log" for p in logs), "the daemon mount wrote no log"
    for p in logs:
        hits = leaks(p.read_bytes().decode("utf-8", "replace"))
        if hits:
            found[str(p)] = hits
    assert found == {}, "\n".join(f"{k}: {v[:5]}" for k, v in found.items())
