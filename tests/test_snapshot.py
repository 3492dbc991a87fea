"""The manifest replaced under a running mount (issue 11): the mount serves the manifest it mounted.

A first dataset is uploaded and mounted; a second upload replaces the bucket's manifest (some images
kept, some dropped, some added, one file's content changed under the same name, a logical id moved to
another image). The running mount keeps its snapshot: the same names (looked up for the first time
after the replacement, so the mount answers, not the kernel's caches), sizes, `manifest.jsonl`, and
the bytes of every object it names, including ones first read after the replacement; the new names
do not exist. A `Dataset` and a second mount started meanwhile on the same cache see the new
manifest, and the first mount still serves its own. A remount picks up the new manifest.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from s3fsimg.config import Config
from s3fsimg.dataset import Dataset
from s3fsimg.manifest import Entry, parse_line
from s3fsimg.s3 import S3Store
from s3fsimg.uploader import upload
from tests.mountutil import MountProcess, fuse_test

pytestmark = [fuse_test, pytest.mark.fuse]


def _put(root: Path, rel: str, src: Path) -> None:
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, root / rel)


def _upload(env: dict[str, str], root: Path, rows: list[tuple[str, str]]) -> tuple[bytes, list[Entry]]:
    """Upload `root` with a logical map of `rows`; the manifest's bytes and entries."""
    lmap = root.parent / f"{root.name}.map.csv"
    lmap.write_text("filename,logical_id\n" + "".join(f"{f},{i}\n" for f, i in rows))
    config = Config.load(env=env)
    upload(config.with_(logical_map=lmap), root, show_progress=False)
    raw = S3Store(config).get_bytes(config.manifest_key)
    return raw, [parse_line(line) for line in raw.splitlines() if line.strip()]


def tree(entries: list[Entry]) -> dict[str, tuple[int, str]]:
    """Every file of a mount of these entries: path -> (size, sha256)."""
    out: dict[str, tuple[int, str]] = {}
    for e in entries:
        out[e.path] = (e.bytes, e.sha256)
        if e.logical_id:
            out[f"by-id/{e.logical_id}/{e.path.rsplit('/', 1)[1]}"] = (e.bytes, e.sha256)
        if e.source_path:
            out[f"by-path/{e.source_path}"] = (e.bytes, e.sha256)
    return out


def walk(mp: Path) -> dict[str, int]:
    """Every file under a mount (manifest.jsonl aside): path -> size."""
    found = {}
    for dirpath, _dirs, files in os.walk(mp):
        for name in files:
            rel = os.path.relpath(os.path.join(dirpath, name), mp)
            if rel != "manifest.jsonl":
                found[rel] = os.stat(os.path.join(dirpath, name)).st_size
    return found


def sha_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def two_datasets(s3_env: dict[str, str], sample_set: Any, large_set: Any, tmp_path: Path) -> Iterator[Any]:
    small = list(sample_set.distinct_images.values())
    a, b = tmp_path / "a", tmp_path / "b"
    for i, f in enumerate(small[:10]):
        _put(a, f"cats/img_{i}{f.path.suffix}", f.path)
    _put(a, "big/L0.png", large_set.large[0].path)
    _put(a, f"changing{small[10].path.suffix}", small[10].path)
    for i, f in enumerate(small[:6]):  # kept
        _put(b, f"cats/img_{i}{f.path.suffix}", f.path)
    for i, f in enumerate(small[12:17]):  # added
        _put(b, f"dogs/new_{i}{f.path.suffix}", f.path)
    _put(b, "big/L1.png", large_set.large[1].path)  # L0 dropped, L1 added
    _put(b, f"changing{small[10].path.suffix}", small[11].path)  # same name, other bytes (same extension)
    yield a, [(f"cats/img_{i}{small[i].path.suffix}", f"ID-{i}") for i in range(4)], \
        b, [(f"dogs/new_0{small[12].path.suffix}", "ID-0"), (f"cats/img_1{small[1].path.suffix}", "ID-1")]


@pytest.mark.timeout(180)
def test_a_running_mount_serves_the_manifest_it_mounted_and_a_remount_the_new_one(
        s3_env: dict[str, str], two_datasets: Any, proxy: Any, tmp_path: Path) -> None:
    a, a_rows, b, b_rows = two_datasets
    env = dict(os.environ)
    old_raw, old = _upload(env, a, a_rows)
    old_tree = tree(old)
    mp, mp2 = tmp_path / "mnt", tmp_path / "mnt2"
    first = MountProcess(mp, env=env).start()
    try:
        assert sorted(os.listdir(mp)) == ["by-id", "by-path", "images", "manifest.jsonl"]
        read_before = old[0]  # one object cached before the replacement; nothing else looked up
        assert sha_of(mp / "by-path" / str(read_before.source_path)) == read_before.sha256

        new_raw, new = _upload(env, b, b_rows)  # the bucket's manifest is replaced
        new_tree = tree(new)
        assert new_raw != old_raw and set(new_tree) != set(old_tree)
        gone = sorted(set(old_tree) - set(new_tree))
        added = sorted(set(new_tree) - set(old_tree))
        changed = sorted(p for p in set(old_tree) & set(new_tree) if old_tree[p] != new_tree[p])
        assert gone and added and changed, (gone, added, changed)

        # the running mount: its own snapshot, whole
        assert walk(mp) == {p: size for p, (size, _sha) in old_tree.items()}
        assert (mp / "manifest.jsonl").read_bytes() == old_raw
        for p, (_size, sha) in old_tree.items():
            assert sha_of(mp / p) == sha, p
        for p in added:
            assert not (mp / p).exists(), p

        # a Dataset and a second mount on the same cache see the new manifest; the first keeps its own
        with Dataset.from_env() as ds:
            assert sorted(e.to_json() for e in ds.entries()) == sorted(e.to_json() for e in new)
        with MountProcess(mp2, env=env):
            assert walk(mp2) == {p: size for p, (size, _sha) in new_tree.items()}
            assert (mp2 / "manifest.jsonl").read_bytes() == new_raw
            for p in changed:
                assert sha_of(mp2 / p) == new_tree[p][1], p
                assert sha_of(mp / p) == old_tree[p][1], p
        assert walk(mp) == {p: size for p, (size, _sha) in old_tree.items()}
        assert (mp / "manifest.jsonl").read_bytes() == old_raw
    finally:
        first.stop()

    with MountProcess(mp, env=env):  # a remount: the new manifest
        assert walk(mp) == {p: size for p, (size, _sha) in new_tree.items()}
        assert (mp / "manifest.jsonl").read_bytes() == new_raw
        for p, (_size, sha) in new_tree.items():
            assert sha_of(mp / p) == sha, p
        for p in gone:
            assert not (mp / p).exists(), p
