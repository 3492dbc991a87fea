"""Helpers for the mount tests: a fake-manifest generator, and mounting in a subprocess with sure teardown.

`fake_manifest` writes a manifest of N well-formed entries whose objects need not exist (index and
listing benchmarks). `MountProcess` starts `s3fsimg mount --foreground` in a subprocess, waits for
the mount with a timeout (failing early, with the process's output, if it died), and always tears
down: `fusermount3 -u -z`, then terminate, then kill.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


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
