"""Finding, building or reusing the index of a bucket's manifest, and the local copies of manifests.

`load_index` HEADs the bucket's manifest, reuses or downloads a local copy, and opens its index;
`ensure_index` opens the index of a local manifest file, building it first (in a child process,
`python -m s3fsimg.index_build build`) when it is missing.

On-disk layout, under the cache directory::

    <cache_dir>/manifests/<key>.jsonl   local copy of a bucket's manifest; <key> hashes the endpoint, bucket,
    <cache_dir>/manifests/<key>.json    manifest key and ETag; the .json records ETag, Last-Modified, sha256
    <cache_dir>/index/<sha256>.sqlite   the index of the manifest whose bytes hash to <sha256>
    <cache_dir>/index/<sha256>.lock     flock held while building, so two processes never both build
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, cast

from s3fsimg.config import private_dirs
from s3fsimg.errors import BackendError, ManifestError, NotFound, S3fsimgError
from s3fsimg.files import atomic_write, locked
from s3fsimg.index import Index
from s3fsimg.index_build import child_env

if TYPE_CHECKING:
    from s3fsimg.config import Config
    from s3fsimg.s3 import S3Store

log = logging.getLogger(__name__)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def ensure_index(manifest_file: Path, index_dir: Path, *, digest: str | None = None, where: str | None = None,
                 mtime_ns: int | None = None) -> Index:
    """The open index of a local manifest, built under `index_dir/<sha256>.sqlite` if missing (under an
    flock, so concurrent processes build it once)."""
    digest = digest or _sha256_file(manifest_file)
    private_dirs(index_dir)
    dest = index_dir / f"{digest}.sqlite"
    with contextlib.suppress(ManifestError):
        return Index.open(dest, manifest_digest=digest)
    with locked(index_dir / f"{digest}.lock"):
        try:
            return Index.open(dest, manifest_digest=digest)  # another process built it meanwhile
        except ManifestError:
            pass
        started = time.monotonic()
        report = _build_in_child(manifest_file, dest, digest=digest, where=where, mtime_ns=mtime_ns)
        log.info("built the index of %s in %.1fs (builder process peak RSS %.0f MB, its parsing helpers %.0f MB)",
                 where or manifest_file, time.monotonic() - started, report.get("maxrss_mb", 0),
                 report.get("parse_helpers_maxrss_mb", 0))
        log.debug("index build phases (s): %s", {k: round(v, 2) for k, v in report.items()})
    return Index.open(dest, manifest_digest=digest)


def _build_in_child(manifest_file: Path, dest: Path, *, digest: str, where: str | None,
                    mtime_ns: int | None) -> dict[str, float]:
    """`build_index` in a fresh interpreter (`python -m s3fsimg.index_build build`), so that the memory the
    build needs (SQLite's sorter and page cache, the parser's batches) is never held by the calling
    process, a mount that then serves for days. Returns the child's report (phase times, peak RSS)."""
    cmd = [sys.executable, "-m", "s3fsimg.index_build", "build", str(manifest_file), str(dest), "--digest", digest]
    if where is not None:
        cmd += ["--where", where]
    if mtime_ns is not None:
        cmd += ["--mtime-ns", str(mtime_ns)]
    proc = subprocess.run(cmd, capture_output=True, env=child_env(), check=False)
    lines = proc.stdout.decode(errors="replace").strip().splitlines()
    try:
        report = json.loads(lines[-1]) if lines else {}
    except ValueError:
        report = {}
    if proc.returncode == 3 and "error" in report:
        raise ManifestError(report["error"])
    if proc.returncode != 0 or not isinstance(report, dict):
        tail = proc.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no message"]
        raise ManifestError(f"{where or manifest_file}: building the index failed (exit {proc.returncode}): "
                            f"{tail[0]}")
    return report


def load_index(config: Config, store: S3Store) -> tuple[Index, Path]:
    """The index of the bucket's manifest and the path of its local copy.

    The manifest is HEAD-ed; a local copy with the same ETag is reused, otherwise it is downloaded
    (atomically) into `<cache_dir>/manifests/`. When S3 cannot be reached, the most recent local
    copy of this bucket's manifest is used, with a warning, so a mount serves cached data while S3
    is away. An invalid manifest raises ManifestError naming `s3://bucket/key:LINE`.
    """
    where = store.where(config.manifest_key)
    manifests = private_dirs(config.cache_dir / "manifests")
    ident = f"{config.endpoint_url or 'aws'}|{store.bucket}|{store.key(config.manifest_key)}"
    try:
        info = _head_manifest(store, config.manifest_key, where)
    except BackendError as exc:
        cached = _latest_copy(manifests, ident)
        if cached is None:
            raise ManifestError(f"{where}: cannot read the manifest: {_reason(exc, where)}") from None
        log.warning("%s: S3 cannot be reached (%s); serving the local copy of the manifest from %s",
                    where, exc, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(cached["fetched_at"])))
        local = manifests / cached["file"]
        index = ensure_index(local, config.cache_dir / "index", digest=cached["sha256"], where=where,
                             mtime_ns=cached["mtime_ns"])
        return index, local
    key = hashlib.sha256(f"{ident}|{info['etag']}".encode()).hexdigest()[:32]
    local = manifests / f"{key}.jsonl"
    sidecar = manifests / f"{key}.json"
    meta = _read_sidecar(sidecar)
    if meta is None or not local.is_file() or local.stat().st_size != meta.get("size"):
        meta = _download_manifest(store, config.manifest_key, where, local, sidecar, ident, info)
    else:
        meta["fetched_at"] = time.time()
        try:
            _write_json(sidecar, meta)  # the most recent copy for an S3-down mount
        except OSError as exc:  # best effort (a full disk): the copy and its index are all there
            log.debug("cannot refresh %s: %s", sidecar, exc)
    index = ensure_index(local, config.cache_dir / "index", digest=meta["sha256"], where=where,
                         mtime_ns=meta["mtime_ns"])
    return index, local


def _head_manifest(store: S3Store, relative: str, where: str) -> dict[str, Any]:
    try:
        info = store.stat(relative)
    except BackendError:
        raise
    except S3fsimgError as err:
        raise ManifestError(f"{where}: cannot read the manifest: {_reason(err, where)}") from None
    if info is None:
        store.check_bucket()  # a HEAD answers 404 for a missing bucket too: say which is missing
        raise ManifestError(f"{where}: no manifest in the bucket (upload a dataset first)")
    modified = info.get("last_modified")
    mtime_ns = int(modified.timestamp() * 1e9) if modified is not None else 0
    return {"etag": str(info.get("etag") or ""), "size": int(info["size"]), "mtime_ns": mtime_ns}


def _download_manifest(store: S3Store, relative: str, where: str, local: Path, sidecar: Path, ident: str,
                       info: dict[str, Any]) -> dict[str, Any]:
    try:
        with atomic_write(local, fsync=True) as pending, pending.open("wb") as f:
            hashing = _HashingWriter(f)  # hashed as it arrives: the copy is not read back
            got = store.download_file(relative, cast(IO[bytes], hashing))
        digest = hashing.hash.hexdigest()
    except NotFound:
        raise ManifestError(f"{where}: no manifest in the bucket (upload a dataset first)") from None
    except BackendError as exc:
        raise ManifestError(f"{where}: cannot read the manifest: {_reason(exc, where)}") from None
    meta = {"ident": ident, "file": local.name, "etag": got.get("etag") or info["etag"], "size": got["size"],
            "sha256": digest, "mtime_ns": info["mtime_ns"], "fetched_at": time.time()}
    _write_json(sidecar, meta)
    return meta


def _reason(exc: Exception, where: str) -> str:
    """An error's message without the location the caller's message already starts with."""
    text = str(exc)
    return text[len(where) + 2:] if text.startswith(f"{where}: ") else text


class _HashingWriter:
    """A binary file's `write`, hashing what goes through it."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f = f
        self.hash = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        return self.f.write(data)


def _read_sidecar(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and "sha256" in data and "file" in data else None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    with atomic_write(path) as pending, pending.open("w", encoding="utf-8") as f:
        json.dump(data, f)


def _latest_copy(manifests: Path, ident: str) -> dict[str, Any] | None:
    best: dict[str, Any] | None = None
    for sidecar in manifests.glob("*.json"):
        meta = _read_sidecar(sidecar)
        if meta is None or meta.get("ident") != ident or not (manifests / meta["file"]).is_file():
            continue
        if best is None or meta.get("fetched_at", 0) > best.get("fetched_at", 0):
            best = meta
    return best


__all__ = ["ensure_index", "load_index"]
