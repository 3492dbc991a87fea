"""The uploader: put every image of a directory into S3 once, under its content address, then the manifest.

Order of work, which is what makes a killed run safe to re-run:
1. the logical map is parsed and checked against DIR's file names (a bad map uploads nothing);
2. the bucket is checked (clear errors for a missing bucket, bad credentials, no endpoint);
3. which objects exist is learnt by LIST of `images/` when DIR is large, else by HEAD per object; an
   object counts as present only when its size is the file's (a key is content-addressed, so a
   truncated or hand-made object there is replaced by the file's bytes);
4. each file is read once, hashed, and the same bytes are PUT (with their SHA-256 checksum, so a
   server that checks rejects a damaged body) when absent; identical files are PUT once. A hash
   cache (`<cache_dir>/hashes/`, see `scan.HashCache`) spares re-reading unchanged files on a
   re-run; a file it vouches for that must be PUT is read and hashed again first;
5. each object larger than `config.whole_object_max` gets its block map (`blockmap.py`, the SHA-256
   of each `config.block_size` block) at `blocks/ab/cd/<sha256>`, PUT after its object, whether the
   object was PUT now or was already there. A map counts as present when a LIST of `blocks/` (LIST
   mode) or a HEAD (HEAD mode) shows it with the size of the map this run would write, so a re-run
   adds exactly the maps a dataset lacks (datasets uploaded before maps existed, a deleted map, a
   block size changed); a map vouched for by the hash cache alone is built from the file, streaming,
   after checking its SHA-256 is still the entry's;
6. only when every PUT has succeeded is the manifest PUT, last. A run killed before that leaves
   objects without a manifest naming them, never a manifest naming a missing object. A DIR in which
   no image is found is refused (UsageError) before any PUT: its empty manifest would replace the
   bucket's and hide the whole dataset.

Imports config, s3, manifest, scan and blockmap only; nothing of the read path.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import logging
import os
import tempfile
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from s3fsimg.blockmap import BlockMap, blockmap_key, encoded_size
from s3fsimg.config import Config
from s3fsimg.errors import UsageError
from s3fsimg.manifest import Entry, write_manifest
from s3fsimg.progress import progress_bar
from s3fsimg.s3 import S3Store
from s3fsimg.scan import HashCache, LogicalMap, entry_from_bytes, prepare, read_regular, scan, shown

log = logging.getLogger(__name__)

#: Above this many local files, one LIST of images/ and one of blocks/ (1 request per 1000 keys) replace a
#: HEAD per object and per block map.
HEAD_LIMIT = 100


@dataclass
class UploadReport:
    uploaded: int = 0
    uploaded_bytes: int = 0
    present: int = 0
    duplicates: int = 0
    maps_uploaded: int = 0  # block maps PUT by this run (new objects, and objects that had none)
    maps_present: int = 0  # block maps already in the bucket
    entries: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    map_note: str | None = None  # logical-map rows that matched no file (LogicalMap.unmatched_note)
    manifest_uploaded: bool = False
    seconds: float = 0.0


class _Uploads:
    """Makes sure each object is in the bucket, PUTting each distinct one at most once; thread-safe."""

    def __init__(self, store: S3Store, known: dict[str, tuple[int, str | None]] | None,
                 known_maps: dict[str, int] | None, logical_map: LogicalMap, config: Config) -> None:
        self.store = store
        self.known = known  # path -> (size, ETag) from a LIST of images/, or None: HEAD each object
        self.known_maps = known_maps  # key -> size from a LIST of blocks/, or None: HEAD each map
        self.block_size = config.block_size
        self.whole_object_max = config.whole_object_max
        self.logical_map = logical_map
        self.lock = threading.Lock()
        self.done: dict[str, Future[str | None]] = {}  # sha256 -> ETag once present
        self.report = UploadReport()

    def handle(self, entry: Entry, data: bytes | None, path: Path) -> Entry:
        """Called from scan worker threads with the bytes that were hashed (None when the hash cache
        vouched for an unchanged file). Returns the manifest entry with the object's ETag."""
        with self.lock:
            fut = self.done.get(entry.sha256)
            mine = fut is None
            if fut is None:
                fut = self.done[entry.sha256] = Future()
        if not mine:
            etag = fut.result()  # raises if the first copy failed
            with self.lock:
                self.report.duplicates += 1
            return dataclasses.replace(entry, etag=etag)
        try:
            entry, etag = self._ensure(entry, data, path)
            fut.set_result(etag)
        except BaseException as exc:
            fut.set_exception(exc)
            raise
        return dataclasses.replace(entry, etag=etag)

    def _present(self, entry: Entry) -> tuple[bool, str | None]:
        """Whether the object is in the bucket with the file's size (and its ETag if so). An object of
        another size at the key is not the file's bytes: it is PUT again, over the wrong one."""
        if self.known is not None:
            listed = self.known.get(entry.path)
            size, etag = listed if listed is not None else (None, None)
        else:
            head = self.store.stat(entry.path)
            size, etag = (int(head["size"]), head["etag"]) if head is not None else (None, None)
        if size is None:
            return False, None
        if size != entry.bytes:
            log.info("%s: %d bytes in the bucket, not %d; uploading it again", entry.path, size, entry.bytes)
            return False, None
        return True, etag or None

    def _ensure(self, entry: Entry, data: bytes | None, path: Path) -> tuple[Entry, str | None]:
        present, etag = self._present(entry)
        if present:
            with self.lock:
                self.report.present += 1
        else:
            data, etag = self._put_object(entry, data, path)
        if entry.bytes > self.whole_object_max:
            self._ensure_map(entry, data, path)
        return entry, etag

    def _put_object(self, entry: Entry, data: bytes | None, path: Path) -> tuple[bytes, str | None]:
        """PUT the file's bytes at the entry's key; returns the bytes PUT and the ETag."""
        if data is None:  # known only from the hash cache: read and hash the bytes we are about to PUT
            try:
                _st, data = read_regular(path)
            except OSError as exc:
                raise UsageError(f"{path}: cannot read it to upload it ({exc.strerror}); run the upload again") \
                    from None
            fresh = entry_from_bytes(entry.source_path or path.name, data, self.logical_map)
            if fresh is None or fresh.sha256 != entry.sha256:
                raise UsageError(f"{path}: changed while being uploaded; run the upload again")
        checksum = base64.b64encode(hashlib.sha256(data).digest()).decode()
        etag = self.store.put(entry.path, data, content_type=entry.content_type, sha256_b64=checksum)
        with self.lock:
            self.report.uploaded += 1
            self.report.uploaded_bytes += len(data)
        return data, etag

    def _ensure_map(self, entry: Entry, data: bytes | None, path: Path) -> None:
        """PUT the object's block map unless the bucket has it (at the size this run would write).
        Whether it is there is known before any byte is read: a map's size depends on the object's
        size and the block size only (a re-run with a hash cache reads no file)."""
        key = blockmap_key(entry.sha256)
        if self.known_maps is not None:
            size = self.known_maps.get(key)
        else:
            head = self.store.stat(key)
            size = int(head["size"]) if head is not None else None
        expected = encoded_size(entry.sha256, entry.bytes, self.block_size)
        if size == expected:
            with self.lock:
                self.report.maps_present += 1
            return
        if size is not None:
            log.info("%s: %d bytes in the bucket, not %d; writing it again", key, size, expected)
        if data is not None:
            blockmap = BlockMap.of_bytes(data, block_size=self.block_size)
        else:  # vouched for by the hash cache only: build it from the file, and check it is the entry's
            try:
                blockmap = BlockMap.of_file(path, block_size=self.block_size)
            except OSError as exc:
                raise UsageError(f"{path}: cannot read it to upload its block map ({exc.strerror}); "
                                 "run the upload again") from None
            if blockmap.sha256 != entry.sha256 or blockmap.size != entry.bytes:
                raise UsageError(f"{path}: changed while being uploaded; run the upload again")
        raw = blockmap.to_bytes()
        self.store.put(key, raw, content_type="application/json",
                       sha256_b64=base64.b64encode(hashlib.sha256(raw).digest()).decode())
        with self.lock:
            self.report.maps_uploaded += 1


def _skipped_summary(skipped: list[tuple[str, str]]) -> str:
    """`3 files skipped, first notes.txt: not an image` (the skip lines are not printed on an error)."""
    text = f"{len(skipped)} files skipped"
    if skipped:
        rel, reason = skipped[0]
        text += f", first {rel}: {reason}"
    return text


def hash_cache_path(config: Config, directory: Path) -> Path:
    """Where the hash cache of DIR lives: in the cache directory, one file per directory path."""
    digest = hashlib.sha256(os.fsencode(directory.resolve())).hexdigest()[:32]  # any bytes, UTF-8 or not
    return config.cache_dir / "hashes" / f"{digest}.sqlite"


def upload(config: Config, directory: Path, *, workers: int = 16, show_progress: bool | None = None) -> UploadReport:
    """Upload DIR as a dataset; see the module docstring for the order of work."""
    started = time.monotonic()
    config.require_bucket()
    lmap, count = prepare(directory, config.logical_map)
    if count == 0:
        raise UsageError(f"{shown(os.fspath(directory))}: no images found (0 files skipped); nothing uploaded")

    store = S3Store(config, max_pool=workers + 4)
    store.check_bucket()
    known: dict[str, tuple[int, str | None]] | None = None
    known_maps: dict[str, int] | None = None
    if count > HEAD_LIMIT:
        known = {}
        for rel, size, etag in store.list_objects("images/"):
            known[rel] = (size, etag)
        known_maps = {rel: size for rel, size, _etag in store.list_objects("blocks/")}
    uploads = _Uploads(store, known, known_maps, lmap, config)
    report = uploads.report
    report.map_note = lmap.unmatched_note()
    hash_cache = HashCache(hash_cache_path(config, directory))

    with tempfile.TemporaryDirectory(prefix="s3fsimg-upload-") as tmp:
        manifest_tmp = Path(tmp) / "manifest.jsonl"
        with open(manifest_tmp, "w", encoding="utf-8", newline="\n") as out, \
                progress_bar(total=count, unit="file", desc="upload", enabled=show_progress) as bar:

            def entries():  # type: ignore[no-untyped-def]
                for result in scan(directory, logical_map=lmap, workers=workers, on_file=uploads.handle,
                                   hash_cache=hash_cache):
                    bar.update(1)
                    if result.entry is None:
                        report.skipped.append((result.rel, result.skipped or "skipped"))
                        log.info("skipped %s: %s", result.rel, result.skipped)
                        continue
                    report.entries += 1
                    yield result.entry

            try:
                write_manifest(entries(), out)
            finally:
                hash_cache.close()
        if report.entries == 0:  # an empty manifest over the bucket's would wipe the dataset
            raise UsageError(f"{shown(os.fspath(directory))}: no images found ({_skipped_summary(report.skipped)}); "
                             "nothing uploaded")
        manifest_bytes = manifest_tmp.read_bytes()
        # Every object the manifest names is now confirmed present (PUT succeeded, or LIST/HEAD saw it),
        # and so is the block map of every object over whole_object_max.
        remote = store.stat(config.manifest_key)
        local_md5 = '"' + hashlib.md5(manifest_bytes, usedforsecurity=False).hexdigest() + '"'
        if remote is None or remote["etag"] != local_md5 or remote["size"] != len(manifest_bytes):
            store.put(config.manifest_key, manifest_bytes, content_type="application/x-ndjson",
                      sha256_b64=base64.b64encode(hashlib.sha256(manifest_bytes).digest()).decode())
            report.manifest_uploaded = True
    report.seconds = time.monotonic() - started
    return report
