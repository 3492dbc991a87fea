"""`s3fsimg cache verify` on a cache directory filled with real files (objects, blocks, block maps), some
damaged on disk: the command run as a user runs it (a subprocess), its one summary line, its exit status,
and what is left on disk. And a complete object damaged on disk is fetched again by the next read
through the API (`fetch`, `open()`), never served."""

from __future__ import annotations

import hashlib
import os
import random
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import pytest

from s3fsimg.blockmap import BlockMap
from s3fsimg.cache import STAMP_NS, DiskCache
from s3fsimg.dataset import Dataset
from tests.cacheworker import build_workset, upload_dir
from tests.checklogs import expect_logs

pytestmark = pytest.mark.timeout(120)

BS = 4096


def _blob(seed: int, size: int) -> tuple[bytes, str]:
    data = random.Random(seed).randbytes(size)
    return data, hashlib.sha256(data).hexdigest()


def _verify(cache_dir: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("S3_", "DATASET_"))}
    env["DATASET_CACHE_DIR"] = str(cache_dir)
    return subprocess.run([sys.executable, "-m", "s3fsimg", "cache", "verify"], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=60)


def _counts(line: str) -> dict[str, int]:
    m = re.fullmatch(r"cache (.+): checked (\d+) complete objects, (\d+) blocks, (\d+) block maps; "
                     r"(?:all intact|removed (\d+) damaged: (\d+) objects, (\d+) blocks, (\d+) block maps)", line)
    assert m, line
    keys = ["objects", "blocks", "maps", "removed", "bad_objects", "bad_blocks", "bad_maps"]
    return {k: int(v or 0) for k, v in zip(keys, m.groups()[1:], strict=True)}


def _flip(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x40
    path.write_bytes(bytes(raw))


@pytest.fixture
def filled(tmp_path: Path) -> dict[str, Any]:
    """A cache with 3 complete objects, 2 partial objects in 4 KiB blocks (one with its block map), and
    the map of a third object none of whose blocks is cached."""
    root = tmp_path / "cache"
    objects = [_blob(i, 10_000 + i) for i in range(3)]
    mapped, unmapped, lonely = _blob(10, 5 * BS + 100), _blob(11, 3 * BS), _blob(12, 2 * BS)
    with DiskCache(root, 1 << 30) as cache:
        paths = [cache.put_object_bytes(data, sha, "png") for data, sha in objects]
        for data, sha in (mapped, unmapped):
            for i in range(0, -(-len(data) // BS)):
                assert cache.put_block(sha, BS, i, data[i * BS:(i + 1) * BS])
        assert cache.put_blockmap(mapped[1], BlockMap.of_bytes(mapped[0], block_size=BS).to_bytes())
        assert cache.put_blockmap(lonely[1], BlockMap.of_bytes(lonely[0], block_size=BS).to_bytes())
    base = root / "v1"
    return {"root": root, "objects": paths, "mapped": mapped, "unmapped": unmapped, "lonely": lonely,
            "block": lambda sha, i: base / "blocks" / str(BS) / sha[:2] / sha / str(i),
            "map": lambda sha: base / "maps" / sha[:2] / sha}


def _all_files(root: Path) -> set[Path]:
    base = root / "v1"
    return {p for tree in ("objects", "blocks", "maps") for p in (base / tree).rglob("*") if p.is_file()}


def test_a_clean_cache_verifies_with_exit_0(filled: dict[str, Any], tmp_path: Path) -> None:
    before = _all_files(filled["root"])
    r = _verify(filled["root"], tmp_path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 1 and lines[0].endswith("all intact"), r.stdout
    assert _counts(lines[0]) == {"objects": 3, "blocks": 6 + 3, "maps": 2, "removed": 0, "bad_objects": 0,
                                 "bad_blocks": 0, "bad_maps": 0}
    assert _all_files(filled["root"]) == before


def test_damage_is_removed_counted_and_exits_1(filled: dict[str, Any], tmp_path: Path) -> None:
    root = filled["root"]
    mapped, unmapped = filled["mapped"], filled["unmapped"]
    bad_object = filled["objects"][1]
    _flip(bad_object, 5000)  # a changed byte in a complete object
    os.utime(bad_object, ns=(0, STAMP_NS))  # ... that even kept its stamp (a read would not notice)
    bad_crc_block = filled["block"](unmapped[1], 1)
    _flip(bad_crc_block, 100)  # fails its CRC
    # A block rewritten with a valid header and CRC but other bytes: only the block map can tell.
    forged = filled["block"](mapped[1], 2)
    other = b"\0" * BS
    forged.write_bytes(struct.pack(">4sI", b"S3B1", zlib.crc32(other)) + other)
    bad_map = filled["map"](filled["lonely"][1])
    _flip(bad_map, 20)
    before = _all_files(root)

    r = _verify(root, tmp_path)
    assert r.returncode == 1, (r.stdout, r.stderr)
    lines = r.stdout.splitlines()
    assert len(lines) == 1, r.stdout
    assert _counts(lines[0]) == {"objects": 3, "blocks": 9, "maps": 2, "removed": 4, "bad_objects": 1,
                                 "bad_blocks": 2, "bad_maps": 1}
    assert _all_files(root) == before - {bad_object, bad_crc_block, forged, bad_map}

    with DiskCache(root, 1 << 30) as cache:  # the ledger counts exactly what is left
        stats = cache.stats()
        assert (stats["objects"], stats["blocks"], stats["maps"]) == (2, 7, 1)
        assert stats["bytes"] == sum(p.stat().st_size for p in _all_files(root))
        assert cache.get_block(mapped[1], BS, 3, BS) == mapped[0][3 * BS:4 * BS]  # good ones stay usable

    r = _verify(root, tmp_path)  # nothing left to remove
    assert r.returncode == 0 and r.stdout.strip().endswith("all intact"), (r.stdout, r.stderr)


def test_verify_through_the_api_restamps_an_intact_object(filled: dict[str, Any]) -> None:
    """An intact complete object whose stamp was lost (copied with a new mtime) stays, stamped again."""
    path = filled["objects"][0]
    os.utime(path)
    with DiskCache(filled["root"], 1 << 30) as cache:
        report = cache.verify()
    assert report.removed == 0 and report.objects == 3
    assert path.stat().st_mtime_ns == STAMP_NS


# ------------------------------------------------------- the next read of a damaged object refetches it


@pytest.mark.parametrize("how", ["fetch", "open"])
def test_a_complete_object_damaged_on_disk_is_fetched_again(s3_env: dict[str, str], sample_set: Any,
                                                            proxy: Any, tmp_path: Path, how: str) -> None:
    entries = upload_dir(build_workset(tmp_path / "ws", list(sample_set.distinct_images.values())[:3]), s3_env)
    sha = sorted(entries)[0]
    with Dataset.from_env() as ds:
        path = ds.fetch(sha)
        good = path.read_bytes()
        _flip(path, len(good) // 2)  # e.g. a user's tool wrote into the file `fetch` handed out
        proxy.reset()
        with expect_logs(r"was modified on disk and no longer matches its hash; dropping it", count=1):
            if how == "fetch":
                data = ds.fetch(sha).read_bytes()
            else:
                with ds.open(sha) as f:
                    data = f.read()
    assert hashlib.sha256(data).hexdigest() == sha == hashlib.sha256(good).hexdigest()
    gets = proxy.counts()["by_method_key"].get("GET", {})
    assert sum(n for k, n in gets.items() if sha in k) >= 1  # fetched again from S3
