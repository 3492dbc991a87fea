"""The Python API through the lab (moto behind the counting proxy): objects replaced in the bucket are
never returned and never cached; an unreachable S3 fails uncached reads within the read deadline and
serves cached ones; fork safety; Pillow; unknown ids."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from s3fsimg.dataset import Dataset
from s3fsimg.errors import BackendError, IntegrityError, NotFound
from s3fsimg.manifest import Entry
from tests.cacheworker import build_workset, cache_files, upload_dir
from tests.checklogs import expect_logs

pytestmark = pytest.mark.timeout(90)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def lab_set(s3_env: dict[str, str], sample_set: Any, large_set: Any, tmp_path: Path) -> dict[str, Entry]:
    """8 small images and the 4 large (1-3 MB) ones uploaded; {sha256: Entry}."""
    return upload_dir(build_workset(tmp_path / "ws", sample_set.images[:8], large_set.large), s3_env)


def _small(entries: dict[str, Entry]) -> list[Entry]:
    return sorted((e for e in entries.values() if e.bytes < 1_000_000), key=lambda e: e.sha256)


def _large(entries: dict[str, Entry]) -> list[Entry]:
    return sorted((e for e in entries.values() if e.bytes >= 1_000_000), key=lambda e: e.sha256)


def _cache(s3_env: dict[str, str]) -> Path:
    return Path(s3_env["DATASET_CACHE_DIR"])


# ------------------------------------------------------------------------------ replaced objects


def _strip_etags(moto_client: Any, bucket: str, key: str) -> None:
    raw = moto_client.get_object(Bucket=bucket, Key=key)["Body"].read().decode()
    lines = []
    for line in raw.splitlines():
        obj = json.loads(line)
        obj.pop("etag", None)
        lines.append(json.dumps(obj))
    moto_client.put_object(Bucket=bucket, Key=key, Body=("\n".join(lines) + "\n").encode())


def _other_bytes(size: int, how: str) -> bytes:
    base = hashlib.sha256(how.encode()).digest()
    n = {"same-size": size, "larger": size + 1000, "smaller": size - 1000}[how]
    return (base * (n // 32 + 1))[:n]


@pytest.mark.parametrize("how", ["same-size", "larger", "smaller"])
@pytest.mark.parametrize("with_etag", [True, False], ids=["etag", "no-etag"])
@pytest.mark.parametrize("which", ["small", "large"])
def test_replaced_object_is_never_returned(lab_set: dict[str, Entry], s3_env: dict[str, str], moto_client: Any,
                                           bucket: str, proxy: Any, which: str, with_etag: bool, how: str) -> None:
    victim = (_small if which == "small" else _large)(lab_set)[0]
    if not with_etag:
        _strip_etags(moto_client, bucket, "manifests/inventory-v1.jsonl")
    moto_client.put_object(Bucket=bucket, Key=victim.path, Body=_other_bytes(victim.bytes, how))
    cache = _cache(s3_env)
    for mode in ("fetch", "read", "chunks"):
        ds = Dataset.from_env(read_deadline="5s", block_size="64K")  # a fresh reader: no memory of failures
        try:
            entry = ds.resolve(victim.sha256)
            assert (entry.etag is not None) == with_etag
            t0 = time.monotonic()
            with pytest.raises(IntegrityError) as info:
                if mode == "fetch":
                    ds.fetch(victim.sha256)
                elif mode == "read":
                    with ds.open(victim.sha256) as f:
                        f.read()
                else:
                    with ds.open(victim.sha256) as f:
                        while f.read(100_000):
                            pass
            assert victim.path in str(info.value)
            assert time.monotonic() - t0 < 5, "an integrity failure is not retried until the deadline"
            # A second attempt in the same process fails too.
            with pytest.raises(IntegrityError):
                ds.fetch(victim.sha256)
        finally:
            ds.close()
        time.sleep(0.2)  # background read-ahead, if any, has finished
        assert cache_files(cache, victim.sha256) == [], mode
    # The other objects are unaffected.
    with Dataset.from_env() as ds:
        for e in lab_set.values():
            if e.sha256 != victim.sha256:
                assert _digest(ds.fetch(e.sha256).read_bytes()) == e.sha256


# --------------------------------------------------------------------------------- S3 unreachable


def test_refused_connections_cached_served_uncached_fail_in_deadline(lab_set: dict[str, Entry], proxy: Any,
                                                                     s3_env: dict[str, str]) -> None:
    small, large = _small(lab_set), _large(lab_set)
    cached = small[:4] + large[:2]
    uncached = small[4:6] + large[2:3]
    deadline = 3.0
    ds = Dataset.from_env(read_deadline="3s")
    try:
        for e in cached[:-1]:
            ds.fetch(e.sha256)
        with ds.open(cached[-1].sha256) as f:  # a large one cached through the block path
            assert _digest(f.read()) == cached[-1].sha256
        proxy.add_fault("refuse")
        proxy.reset()
        for e in cached:
            assert _digest(ds.fetch(e.sha256).read_bytes()) == e.sha256
            with ds.open(e.sha256) as f:
                assert _digest(f.read()) == e.sha256
        timings = []
        for e in uncached:
            for op in ("fetch", "read"):
                t0 = time.monotonic()
                with pytest.raises(BackendError) as info:
                    if op == "fetch":
                        ds.fetch(e.sha256)
                    else:
                        with ds.open(e.sha256) as f:
                            f.read()
                elapsed = time.monotonic() - t0
                timings.append(elapsed)
                assert elapsed < deadline + 1.5, (op, elapsed)
                assert e.path in str(info.value), str(info.value)
        print("refused: elapsed per failed read", [round(t, 2) for t in timings])
        assert proxy.counts()["requests"] == 0  # nothing got through (the port was closed)
        proxy.clear_faults()
        for e in uncached:
            assert _digest(ds.fetch(e.sha256).read_bytes()) == e.sha256
    finally:
        proxy.clear_faults()
        ds.close()


def test_fresh_dataset_serves_cache_while_s3_is_down(lab_set: dict[str, Entry], proxy: Any) -> None:
    with Dataset.from_env() as ds:
        for e in lab_set.values():
            ds.fetch(e.sha256)
    proxy.add_fault("refuse")
    try:
        with (
            expect_logs(r"S3 cannot be reached .*; serving the local copy of the manifest", count=1),
            Dataset.from_env(read_deadline="3s") as ds,
        ):
            for e in lab_set.values():
                with ds.open(e.sha256) as f:
                    assert _digest(f.read()) == e.sha256
    finally:
        proxy.clear_faults()


# ------------------------------------------------------------------------------------------- fork


def test_dataset_across_fork(lab_set: dict[str, Entry], proxy: Any) -> None:
    entries = sorted(lab_set.values(), key=lambda e: e.sha256)
    ds = Dataset.from_env()
    try:
        assert _digest(ds.fetch(entries[0].sha256).read_bytes()) == entries[0].sha256
        with ds.open(entries[-1].sha256) as f:
            f.read(1000)  # a parent with a stream, a pool and a ledger connection in use
        children = []
        for k in range(3):
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:  # child
                code = 1
                try:
                    os.close(r)
                    mine = [*entries[k::3], entries[0]]
                    out = []
                    for e in mine:
                        out.append(_digest(ds.fetch(e.sha256).read_bytes()) == e.sha256)
                        with ds.open(e.sha256) as f:
                            out.append(_digest(f.read()) == e.sha256)
                    os.write(w, json.dumps(out).encode())
                    code = 0
                finally:
                    os._exit(code)
            os.close(w)
            children.append((pid, r))
        for pid, r in children:
            chunks = []
            t0 = time.monotonic()
            while chunk := os.read(r, 65536):
                chunks.append(chunk)
            os.close(r)
            _, status = os.waitpid(pid, 0)
            assert time.monotonic() - t0 < 60
            assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
            results = json.loads(b"".join(chunks))
            assert results and all(results)
        # The parent still works after its children used (and left) the cache.
        for e in entries:
            assert _digest(ds.fetch(e.sha256).read_bytes()) == e.sha256
    finally:
        ds.close()


def test_dataset_with_multiprocessing_fork_pool(lab_set: dict[str, Entry], proxy: Any) -> None:
    import multiprocessing

    ds = Dataset.from_env()
    shas = sorted(lab_set)
    ds.fetch(shas[0])
    global _POOL_DS
    _POOL_DS = ds
    try:
        with multiprocessing.get_context("fork").Pool(3) as pool:
            results = pool.map(_pool_fetch, shas, chunksize=1)
        assert results == shas
    finally:
        _POOL_DS = None
        ds.close()


_POOL_DS: Dataset | None = None


def _pool_fetch(sha: str) -> str:
    assert _POOL_DS is not None
    return _digest(_POOL_DS.fetch(sha).read_bytes())


# ------------------------------------------------------------------------------------ API surface


def test_open_works_with_pillow(lab_set: dict[str, Entry], sample_set: Any, large_set: Any, proxy: Any) -> None:
    sizes = {f.sha256: (f.width, f.height) for f in [*sample_set.images, *large_set.large]}
    with Dataset.from_env() as ds:
        for e in lab_set.values():
            with ds.open(e.sha256) as f, Image.open(f) as img:
                assert img.size == sizes[e.sha256]
                img.load()  # decoding reads the whole file through the stream
            if e.width is not None:
                assert (e.width, e.height) == sizes[e.sha256]
            # seek/tell behave like a file
            with ds.open(e.sha256) as f:
                f.seek(-10, os.SEEK_END)
                assert f.tell() == e.bytes - 10
                tail = f.read()
                assert len(tail) == 10
                f.seek(0)
                assert _digest(f.read()) == e.sha256


def test_logical_ids_and_entries(s3_env: dict[str, str], sample_dir: Any, proxy: Any) -> None:
    from s3fsimg.config import Config
    from s3fsimg.uploader import upload

    upload(Config.load({"logical_map": str(sample_dir.map_path)}, env=s3_env), Path(sample_dir), show_progress=False)
    with Dataset.from_env() as ds:
        entries = list(ds.entries())
        assert len(entries) == len(ds) > 0
        with_id = [f for f in sample_dir.images if f.logical_id]
        for f in with_id[:10]:
            assert _digest(ds.fetch(f.logical_id).read_bytes()) == f.sha256


def test_unknown_ids_raise_not_found_naming_the_id(lab_set: dict[str, Entry], proxy: Any) -> None:
    unknown_sha = "0" * 64
    with Dataset.from_env() as ds:
        for ident in ("DAO-99999", unknown_sha, "no such thing/..", "", os.fsdecode(b"\xff\xfe")):
            with pytest.raises(NotFound) as info:
                ds.fetch(ident)
            assert repr(ident) in str(info.value) or ident in str(info.value)
            with pytest.raises(NotFound):
                ds.open(ident)
        with pytest.raises(NotFound) as info:
            ds.fetch("x" * 10_000)
        assert len(str(info.value)) < 300  # a huge id is not echoed whole
    assert proxy.get_count("GET", unknown_sha) == 0
