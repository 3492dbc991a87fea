"""The uploader: put every image of a directory into S3 once, under its content address, then the manifest.

Order of work, which is what makes a killed run safe to re-run:
1. the logical map is parsed and checked against DIR's file names (a bad map uploads nothing);
2. the bucket is checked (clear errors for a missing bucket, bad credentials, no endpoint);
3. which objects exist is learnt by LIST of `images/` when DIR is large, else by HEAD per object;
4. each file is read once, hashed, and the same bytes are PUT (with their SHA-256 checksum, so a
   server that checks rejects a damaged body) when absent; identical files are PUT once;
5. only when every PUT has succeeded is the manifest PUT, last. A run killed before that leaves
   objects without a manifest naming them, never a manifest naming a missing object.

Imports config, s3, manifest and scan only; nothing of the read path.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from s3fsimg.config import Config
from s3fsimg.errors import BackendError, UsageError
from s3fsimg.manifest import Entry, write_manifest
from s3fsimg.progress import progress_bar
from s3fsimg.s3 import S3Store
from s3fsimg.scan import LogicalMap, relpaths, scan

log = logging.getLogger(__name__)

#: Above this many local files, one LIST of images/ is cheaper than a HEAD per object.
HEAD_LIMIT = 1000


@dataclass
class UploadReport:
    uploaded: int = 0
    uploaded_bytes: int = 0
    present: int = 0
    duplicates: int = 0
    entries: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    manifest_uploaded: bool = False
    seconds: float = 0.0


class _Uploads:
    """Decides, per sha256, whether this run PUTs the object; thread-safe."""

    def __init__(self, store: S3Store, known: dict[str, str] | None) -> None:
        self.store = store
        self.known = known  # key -> etag from a LIST, or None for HEAD mode
        self.lock = threading.Lock()
        self.claimed: dict[str, threading.Event] = {}
        self.etags: dict[str, str | None] = {}
        self.report = UploadReport()

    def handle(self, entry: Entry, data: bytes) -> str | None:
        """Called from scan worker threads with the bytes that were hashed; returns the object's ETag."""
        with self.lock:
            event = self.claimed.get(entry.sha256)
            if event is None:
                self.claimed[entry.sha256] = event = threading.Event()
                mine = True
            else:
                mine = False
        if not mine:
            event.wait()
            with self.lock:
                self.report.duplicates += 1
                if entry.sha256 not in self.etags:
                    raise BackendError(f"{self.store.where(entry.path)}: upload failed (see the first error)")
                return self.etags[entry.sha256]
        try:
            etag = self._ensure(entry, data)
            with self.lock:
                self.etags[entry.sha256] = etag
            return etag
        finally:
            event.set()

    def _ensure(self, entry: Entry, data: bytes) -> str | None:
        if self.known is not None:
            if entry.path in self.known:
                with self.lock:
                    self.report.present += 1
                return self.known[entry.path]
        else:
            head = self.store.head(entry.path)
            if head is not None and head["size"] == entry.bytes:
                with self.lock:
                    self.report.present += 1
                return str(head["etag"]) if head["etag"] else None
        checksum = base64.b64encode(hashlib.sha256(data).digest()).decode()
        if checksum != base64.b64encode(bytes.fromhex(entry.sha256)).decode():
            raise AssertionError("bytes changed between hashing and upload")  # cannot happen: same buffer
        etag = self.store.put(entry.path, data, content_type=entry.content_type, sha256_b64=checksum)
        with self.lock:
            self.report.uploaded += 1
            self.report.uploaded_bytes += len(data)
        return etag


def upload(config: Config, directory: Path, *, workers: int = 16, show_progress: bool | None = None) -> UploadReport:
    """Upload DIR as a dataset; see the module docstring for the order of work."""
    started = time.monotonic()
    if not directory.is_dir():
        raise UsageError(f"{directory}: not a directory")
    config.require_bucket()
    lmap = LogicalMap.load(config.logical_map) if config.logical_map else LogicalMap.empty()
    count = 0
    for _ in relpaths(directory):
        count += 1
    if len(lmap):
        lmap.check_against(relpaths(directory))

    store = S3Store(config, max_pool=workers + 4)
    store.check_bucket()
    known: dict[str, str] | None = None
    if count > HEAD_LIMIT:
        known = {}
        for rel, _size, etag in store.list_objects("images/"):
            known[rel] = etag
    uploads = _Uploads(store, known)
    report = uploads.report

    with tempfile.TemporaryDirectory(prefix="s3fsimg-upload-") as tmp:
        manifest_tmp = Path(tmp) / "manifest.jsonl"
        with open(manifest_tmp, "w", encoding="utf-8", newline="\n") as out, \
                progress_bar(total=count, unit="file", desc="upload", enabled=show_progress) as bar:

            def entries():  # type: ignore[no-untyped-def]
                for result in scan(directory, logical_map=lmap, workers=workers, on_bytes=uploads.handle):
                    bar.update(1)
                    if result.entry is None:
                        report.skipped.append((result.rel, result.skipped or "skipped"))
                        log.info("skipped %s: %s", result.rel, result.skipped)
                        continue
                    report.entries += 1
                    yield Entry(**{**result.entry.to_dict(), "etag": result.extra})

            write_manifest(entries(), out)
        manifest_bytes = manifest_tmp.read_bytes()
        # Every object the manifest names is now confirmed present (PUT succeeded, or LIST/HEAD saw it).
        remote = store.head(config.manifest_key)
        local_md5 = '"' + hashlib.md5(manifest_bytes, usedforsecurity=False).hexdigest() + '"'
        if remote is None or remote["etag"] != local_md5 or remote["size"] != len(manifest_bytes):
            store.put(config.manifest_key, manifest_bytes, content_type="application/x-ndjson",
                      sha256_b64=base64.b64encode(hashlib.sha256(manifest_bytes).digest()).decode())
            report.manifest_uploaded = True
    report.seconds = time.monotonic() - started
    return report
