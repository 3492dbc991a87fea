"""The write side end to end: upload a generated dataset to the local S3 server through the counting
proxy, validate it, re-upload (no PUT), survive SIGKILL, refuse a bad map, and fail clearly (no
traceback, no secret) on wrong credentials, an unreachable endpoint and a missing bucket. An MPO goes up
as image/jpeg; what a manifest cannot name (non-UTF-8 names, FIFOs, symlink loops) is skipped, not fatal.
A wrong-size object at an image's key is replaced (HEAD and LIST modes); a DIR without images uploads
nothing and leaves the bucket's manifest alone; a hash cache that cannot be used (cache dir a file,
read-only, full disk) costs a warning and a re-hash, never the upload."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from s3fsimg.blockmap import BlockMap, blockmap_key
from s3fsimg.config import Config
from s3fsimg.manifest import parse_line
from s3fsimg.uploader import HEAD_LIMIT, hash_cache_path, upload
from s3fsimg_lab.images import SampleSet, make_dataset, make_large_image
from s3fsimg_lab.moto import free_port
from s3fsimg_lab.procs import stop_process
from s3fsimg_lab.proxy import LabProxy
from tests.checklogs import expect_logs
from tests.test_manifest import png_bytes, write_mpo, write_old_hash_cache

ROOT = Path(__file__).resolve().parent.parent


def cli(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "s3fsimg", *args], env={**os.environ, **env}, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def bucket_objects(client: Any, bucket: str) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            out[obj["Key"]] = obj
    return out


@pytest.mark.timeout(180)
def test_upload_validate_reupload(sample_dir: SampleSet, s3_env: dict[str, str], proxy: LabProxy,
                                  moto_client: Any, bucket: str) -> None:
    env = {**s3_env, "DATASET_LOGICAL_MAP": str(sample_dir.map_path)}
    proc = cli(env, "upload", str(sample_dir.root))
    assert proc.returncode == 0, proc.stderr
    distinct = sample_dir.distinct_images
    assert f"uploaded {len(distinct)} objects" in proc.stdout
    for f in sample_dir.non_images:
        assert f"skipped {f.rel}: not an image" in proc.stderr

    objects = bucket_objects(moto_client, bucket)
    image_keys = {k for k in objects if k.startswith("images/")}
    assert image_keys == {f.s3_path for f in distinct.values()}
    for f in list(distinct.values())[:20]:
        head = moto_client.head_object(Bucket=bucket, Key=f.s3_path)
        assert head["ContentType"] == f.content_type
        assert head["ContentLength"] == f.size
    manifest = moto_client.get_object(Bucket=bucket, Key="manifests/inventory-v1.jsonl")["Body"].read()
    entries = [parse_line(line) for line in manifest.splitlines()]
    assert len(entries) == len(sample_dir.images)  # one line per name, copies included
    by_src = {e.source_path: e for e in entries}
    for f in sample_dir.images:
        e = by_src[f.rel]
        assert (e.sha256, e.bytes, e.content_type, e.width, e.height) == (
            f.sha256, f.size, f.content_type, f.width, f.height)
        assert e.logical_id == f.logical_id
        assert e.etag == objects[e.path]["ETag"]

    assert cli(env, "validate").returncode == 0
    checked = cli(env, "validate", "--check-objects")
    assert checked.returncode == 0, checked.stderr

    proxy.reset()
    again = cli(env, "upload", str(sample_dir.root))
    assert again.returncode == 0, again.stderr
    assert proxy.get_count("PUT", "images/") == 0
    assert proxy.get_count("PUT") == 0  # the manifest is unchanged too
    assert "uploaded 0 objects" in again.stdout


def test_manifest_command_is_stable_and_offline(sample_dir: SampleSet, tmp_path: Path) -> None:
    env = {"DATASET_LOGICAL_MAP": str(sample_dir.map_path), "S3_ENDPOINT_URL": "http://127.0.0.1:9"}
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    assert cli(env, "manifest", str(sample_dir.root), "--out", str(a)).returncode == 0
    assert cli(env, "manifest", str(sample_dir.root), "--out", str(b)).returncode == 0
    assert a.read_bytes() == b.read_bytes()
    assert cli({}, "validate", str(a)).returncode == 0


def test_symlinks_do_not_lead_outside(tmp_path: Path) -> None:
    inside = make_dataset(tmp_path / "d", n=3, seed=3, decoys=False, map_fraction=0, odd_names=False)
    outside = make_dataset(tmp_path / "outside", n=2, seed=4, decoys=False, map_fraction=0, odd_names=False)
    (inside.root / "escape").symlink_to(outside.root)
    (inside.root / "loop").symlink_to(inside.root)
    out = tmp_path / "m.jsonl"
    proc = cli({}, "manifest", str(inside.root), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "skipped escape: symlink leads outside DIR" in proc.stderr
    sources = [parse_line(line).source_path for line in out.read_text().splitlines()]
    assert not any(s and s.startswith("escape") for s in sources)
    assert sorted(s for s in sources if s and not s.startswith("loop")) == sorted(f.rel for f in inside.images)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("filename,logical_id\ncats/a.jpg,DAO-1,extra\n", ":2: expected 2 columns"),
        ("filename,logical_id\ncats/a.jpg,bad/id\n", ":2: logical_id 'bad/id' contains '/'"),
        ("x.jpg,DAO-1\nx.jpg,DAO-2\n", ":2: 'x.jpg' is ambiguous"),
        ("filename,logical_id\n/etc/x.jpg,DAO-1\n", ":2: filename '/etc/x.jpg' is absolute"),
    ],
)
def test_invalid_logical_map_uploads_nothing(sample_dir: SampleSet, s3_env: dict[str, str], proxy: LabProxy,
                                             tmp_path: Path, content: str, message: str) -> None:
    bad_map = tmp_path / "map.csv"
    bad_map.write_text(content)
    proxy.reset()
    proc = cli({**s3_env, "DATASET_LOGICAL_MAP": str(bad_map)}, "upload", str(sample_dir.root))
    assert proc.returncode == 1
    assert f"{bad_map}{message}" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proxy.counts()["requests"] == 0


def test_basename_matching_two_files_is_ambiguous(tmp_path: Path) -> None:
    d = make_dataset(tmp_path / "d", n=2, seed=5, decoys=False, map_fraction=0, odd_names=False)
    first = d.images[0]
    twin = d.root / "other" / Path(first.rel).name
    twin.parent.mkdir()
    twin.write_bytes(first.path.read_bytes())
    m = tmp_path / "map.csv"
    m.write_text(f"filename,logical_id\n{Path(first.rel).name},DAO-7\n")
    proc = cli({"DATASET_LOGICAL_MAP": str(m)}, "manifest", str(d.root), "--out", str(tmp_path / "o.jsonl"))
    assert proc.returncode == 1
    assert f"{m}:2: '{Path(first.rel).name}' is ambiguous" in proc.stderr


@pytest.mark.timeout(240)
def test_killed_upload_is_completed_by_rerun_and_never_exposes_a_dangling_manifest(
    tmp_path: Path, s3_env: dict[str, str], proxy: LabProxy, moto_client: Any, bucket: str
) -> None:
    data = make_dataset(tmp_path / "d", n=150, seed=9, map_fraction=0)
    first = tmp_path / "first"
    first.mkdir()
    for f in data.images[:10]:  # an earlier, smaller dataset: a manifest is already in the bucket
        (first / f.rel.replace("/", "_")).write_bytes(f.path.read_bytes())
    assert cli(s3_env, "upload", str(first)).returncode == 0

    problems: list[str] = []
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            try:
                body = moto_client.get_object(Bucket=bucket, Key="manifests/inventory-v1.jsonl")["Body"].read()
            except Exception:
                continue
            keys = set(bucket_objects(moto_client, bucket))
            for line in body.splitlines():
                path = json.loads(line)["path"]
                if path not in keys:
                    problems.append(path)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        proxy.add_fault("latency_ms", 40, methods=["PUT"])
        proc = subprocess.Popen([sys.executable, "-m", "s3fsimg", "upload", str(data.root), "--workers", "4"],
                                env={**os.environ, **s3_env}, cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while proxy.get_count("PUT", "images/") < 30 and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        proxy.clear_faults()
        uploaded_before = len([k for k in bucket_objects(moto_client, bucket) if k.startswith("images/")])
        assert uploaded_before < len(data.distinct_images)  # it really was cut part-way

        rerun = cli(s3_env, "upload", str(data.root))
        assert rerun.returncode == 0, rerun.stderr
    finally:
        stop.set()
        poller.join(timeout=10)
    assert problems == []
    keys = set(bucket_objects(moto_client, bucket))
    assert {f.s3_path for f in data.distinct_images.values()} <= keys
    assert cli(s3_env, "validate", "--check-objects").returncode == 0


# -- clear failures, no secrets --------------------------------------------------------------------------


def _assert_clean_failure(proc: subprocess.CompletedProcess[str], secret: str, *needles: str) -> None:
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert secret not in out
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("s3fsimg: error: ")
    for needle in needles:
        assert needle in last, last
    assert "Traceback" not in out.split("DEBUG")[0]  # any traceback only inside debug records


@pytest.fixture
def authenticating_moto() -> Any:
    """A second moto server that checks credentials (its IAM knows no keys)."""
    port = free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import urllib.request

        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1)
                break
            except Exception as exc:
                if getattr(exc, "code", None):  # an HTTP error answer: it is up
                    break
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("authenticating moto did not start") from None
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process(proc)


@pytest.mark.parametrize("level", ["debug", "warning"])
def test_wrong_credentials(level: str, sample_dir: SampleSet, s3_env: dict[str, str], authenticating_moto: str) -> None:
    secret = "wrong-secret-k3y-must-not-leak"
    env = {**s3_env, "S3_ENDPOINT_URL": authenticating_moto, "AWS_ACCESS_KEY_ID": "AKIAWRONGKEYID0000",
           "AWS_SECRET_ACCESS_KEY": secret, "AWS_SESSION_TOKEN": "session-token-must-not-leak"}
    proc = cli(env, "upload", str(sample_dir.root), "--log-level", level)
    _assert_clean_failure(proc, secret, "access denied", s3_env["S3_BUCKET"])
    assert "session-token-must-not-leak" not in proc.stdout + proc.stderr
    assert "AKIAWRONGKEYID0000" not in proc.stdout + proc.stderr


@pytest.mark.parametrize("level", ["debug", "warning"])
def test_unreachable_endpoint(level: str, sample_dir: SampleSet, s3_env: dict[str, str]) -> None:
    env = {**s3_env, "S3_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}
    proc = cli(env, "upload", str(sample_dir.root), "--log-level", level)
    _assert_clean_failure(proc, s3_env["AWS_SECRET_ACCESS_KEY"], "cannot connect", env["S3_ENDPOINT_URL"])


@pytest.mark.parametrize("level", ["debug", "warning"])
def test_missing_bucket(level: str, sample_dir: SampleSet, s3_env: dict[str, str]) -> None:
    env = {**s3_env, "S3_BUCKET": "no-such-bucket-here"}
    proc = cli(env, "upload", str(sample_dir.root), "--log-level", level)
    _assert_clean_failure(proc, s3_env["AWS_SECRET_ACCESS_KEY"], "s3://no-such-bucket-here", "does not exist")


def test_validate_of_a_missing_bucket_manifest(s3_env: dict[str, str]) -> None:
    proc = cli(s3_env, "validate")
    _assert_clean_failure(proc, s3_env["AWS_SECRET_ACCESS_KEY"], "manifests/inventory-v1.jsonl", "no such object")


def test_reupload_after_changes_uses_fresh_bytes(sample_dir: SampleSet, s3_env: dict[str, str], proxy: LabProxy,
                                                 moto_client: Any, bucket: str) -> None:
    assert cli(s3_env, "upload", str(sample_dir.root)).returncode == 0
    victim, edited = sample_dir.images[0], sample_dir.images[5]
    moto_client.delete_object(Bucket=bucket, Key=victim.s3_path)  # lost from the bucket
    other = next(f for f in sample_dir.images if f.sha256 != edited.sha256 and f.content_type == edited.content_type)
    time.sleep(0.01)
    edited.path.write_bytes(other.path.read_bytes())  # content changed under the same name
    proxy.reset()
    proc = cli(s3_env, "upload", str(sample_dir.root))
    assert proc.returncode == 0, proc.stderr
    assert proxy.get_count("PUT", "images/") == 1
    assert moto_client.get_object(Bucket=bucket, Key=victim.s3_path)["Body"].read() == victim.path.read_bytes()
    manifest = moto_client.get_object(Bucket=bucket, Key="manifests/inventory-v1.jsonl")["Body"].read()
    by_src = {e.source_path: e for e in map(parse_line, manifest.splitlines())}
    assert by_src[edited.rel].sha256 == other.sha256


def test_check_objects_reports_a_missing_object_once(sample_dir: SampleSet, s3_env: dict[str, str],
                                                     moto_client: Any, bucket: str) -> None:
    assert cli(s3_env, "upload", str(sample_dir.root)).returncode == 0
    original, _copy = sample_dir.duplicates[0]
    victim = sample_dir.by_rel[original]
    key = victim.s3_path
    assert key is not None  # an image
    moto_client.delete_object(Bucket=bucket, Key=key)
    proc = cli(s3_env, "validate", "--check-objects")
    assert proc.returncode == 1
    missing = [line for line in proc.stderr.splitlines() if key in line and "does not exist" in line]
    assert len(missing) == 1, proc.stderr  # two names of one object: one HEAD, one error


# -- what phones write, odd names, special files ----------------------------------------------------------


def test_upload_of_an_mpo_puts_a_jpg_of_type_image_jpeg(tmp_path: Path, s3_env: dict[str, str], moto_client: Any,
                                                        bucket: str) -> None:
    data = write_mpo(tmp_path / "d" / "phone.jpg")
    sha = hashlib.sha256(data).hexdigest()
    proc = cli(s3_env, "upload", str(tmp_path / "d"))
    assert proc.returncode == 0, proc.stderr
    key = f"images/{sha[:2]}/{sha[2:4]}/{sha}.jpg"
    assert set(bucket_objects(moto_client, bucket)) == {key, "manifests/inventory-v1.jsonl"}
    assert moto_client.head_object(Bucket=bucket, Key=key)["ContentType"] == "image/jpeg"
    manifest = moto_client.get_object(Bucket=bucket, Key="manifests/inventory-v1.jsonl")["Body"].read()
    [entry] = [parse_line(line) for line in manifest.splitlines()]
    assert (entry.path, entry.content_type) == (key, "image/jpeg")
    assert cli(s3_env, "validate", "--check-objects").returncode == 0


def test_reupload_does_not_trust_a_hash_cache_of_an_older_version(tmp_path: Path, s3_env: dict[str, str],
                                                                   moto_client: Any, bucket: str) -> None:
    """A run before the MPO fix cached image/mpo for this unchanged file: the new run must not reuse it."""
    root = tmp_path / "d"
    data = write_mpo(root / "phone.jpg")
    sha = hashlib.sha256(data).hexdigest()
    write_old_hash_cache(hash_cache_path(Config.load(env=s3_env), root), root, "phone.jpg")
    proc = cli(s3_env, "upload", str(root))
    assert proc.returncode == 0, proc.stderr
    assert set(bucket_objects(moto_client, bucket)) == {f"images/{sha[:2]}/{sha[2:4]}/{sha}.jpg",
                                                        "manifests/inventory-v1.jsonl"}
    manifest = moto_client.get_object(Bucket=bucket, Key="manifests/inventory-v1.jsonl")["Body"].read()
    assert [parse_line(line).content_type for line in manifest.splitlines()] == ["image/jpeg"]


def test_an_unusable_hash_cache_is_started_again(tmp_path: Path, s3_env: dict[str, str], moto_client: Any,
                                                 bucket: str) -> None:
    """The hash cache is only a cache: a torn or foreign file there costs a re-hash, not the upload."""
    root = tmp_path / "d"
    root.mkdir()
    (root / "a.png").write_bytes(png_bytes("red"))
    cache_file = hash_cache_path(Config.load(env=s3_env), root)
    cache_file.parent.mkdir(parents=True)
    cache_file.write_bytes(b"not a database" * 100)
    proc = cli(s3_env, "upload", str(root))
    assert proc.returncode == 0, proc.stderr
    assert "hash cache" in proc.stderr and "unusable" in proc.stderr
    assert len(bucket_objects(moto_client, bucket)) == 2  # the image and the manifest
    assert cli(s3_env, "upload", str(root)).stderr == ""  # the new cache works


@pytest.mark.timeout(120)
@pytest.mark.parametrize("dir_name", [b"upload", b"up\xfeload"], ids=["utf8-dir", "latin1-dir"])
def test_upload_skips_what_a_manifest_cannot_name_and_completes(tmp_path: Path, s3_env: dict[str, str],
                                                                 proxy: LabProxy, moto_client: Any, bucket: str,
                                                                 dir_name: bytes) -> None:
    """Names that are not UTF-8 (in a DIR whose own name may not be UTF-8 either), a FIFO and a symlink loop
    are skipped with a reason; nothing of theirs is PUT, and the run ends with the manifest, exit 0."""
    broot = os.fsencode(tmp_path) + b"/" + dir_name
    os.mkdir(broot)
    os.mkdir(broot + b"/dir\xff")
    files = {b"ok.png": png_bytes("red"), b"caf\xe9.png": png_bytes("green"), b"dir\xff/x.png": png_bytes("blue")}
    for name, content in files.items():
        fd = os.open(broot + b"/" + name, os.O_CREAT | os.O_WRONLY, 0o644)
        os.write(fd, content)
        os.close(fd)
    os.mkfifo(broot + b"/fifo.png")
    os.symlink(b"loop", broot + b"/loop")
    root = os.fsdecode(broot)

    proxy.reset()
    proc = cli(s3_env, "upload", root, timeout=90)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert {line for line in proc.stderr.splitlines() if line.startswith("skipped ")} == {
        "skipped caf\\xe9.png: name is not valid UTF-8",
        "skipped dir\\xff: directory name is not valid UTF-8 (nothing under it is scanned)",
        "skipped fifo.png: not a regular file (FIFO)",
        "skipped loop: symlink loop",
    }
    sha = hashlib.sha256(files[b"ok.png"]).hexdigest()
    key = f"images/{sha[:2]}/{sha[2:4]}/{sha}.png"
    assert set(bucket_objects(moto_client, bucket)) == {key, "manifests/inventory-v1.jsonl"}
    assert proxy.get_count("PUT", "images/") == 1
    manifest = moto_client.get_object(Bucket=bucket, Key="manifests/inventory-v1.jsonl")["Body"].read()
    assert [parse_line(line).source_path for line in manifest.splitlines()] == ["ok.png"]

    again = cli(s3_env, "upload", root, timeout=90)  # the hash cache of a DIR so named works too
    assert again.returncode == 0, again.stderr
    assert "uploaded 0 objects" in again.stdout


# -- a wrong-size object at an image's key ----------------------------------------------------------------


def write_pngs(root: Path, n: int) -> list[Path]:
    """n distinct small PNGs under root."""
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = root / f"p{i:03d}.png"
        path.write_bytes(png_bytes((i % 256, i // 256, 7), (3, 2)))
        paths.append(path)
    return paths


def image_key(path: Path) -> str:
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    return f"images/{sha[:2]}/{sha[2:4]}/{sha}.png"


@pytest.mark.timeout(180)
@pytest.mark.parametrize("n", [5, HEAD_LIMIT + 5], ids=["head", "list"])
def test_a_wrong_size_object_at_an_image_key_is_uploaded_again(tmp_path: Path, s3_env: dict[str, str],
                                                                proxy: LabProxy, moto_client: Any, bucket: str,
                                                                n: int) -> None:
    """A truncated body at an image's key (a buggy proxy, a hand-made object) is not "already in the bucket":
    with a HEAD per object or one LIST of images/ (above HEAD_LIMIT files), the re-run PUTs the file's bytes."""
    root = tmp_path / "d"
    paths = write_pngs(root, n)
    assert cli(s3_env, "upload", str(root)).returncode == 0
    victim = paths[n // 2]
    key = image_key(victim)
    moto_client.put_object(Bucket=bucket, Key=key, Body=b"0123456789", ContentType="image/png")

    proxy.reset()
    proc = cli(s3_env, "upload", str(root))
    assert proc.returncode == 0, proc.stderr
    assert proxy.get_count("PUT", key) == 1
    assert proxy.get_count("PUT", "images/") == 1  # only the damaged one
    if n > HEAD_LIMIT:
        assert proxy.get_count("HEAD", "images/") == 0  # really the LIST path
    assert "uploaded 1 objects" in proc.stdout
    assert moto_client.get_object(Bucket=bucket, Key=key)["Body"].read() == victim.read_bytes()
    assert cli(s3_env, "validate", "--check-objects").returncode == 0

    proxy.reset()
    again = cli(s3_env, "upload", str(root))  # repaired: nothing to do
    assert again.returncode == 0, again.stderr
    assert proxy.get_count("PUT") == 0


# -- a DIR without images ---------------------------------------------------------------------------------


@pytest.mark.parametrize("contents", ["empty", "no-images", "many-non-images"])
def test_upload_of_a_dir_without_images_uploads_nothing_and_keeps_the_manifest(
    tmp_path: Path, s3_env: dict[str, str], proxy: LabProxy, moto_client: Any, bucket: str, contents: str
) -> None:
    first = tmp_path / "first"
    write_pngs(first, 2)
    assert cli(s3_env, "upload", str(first)).returncode == 0
    before = moto_client.get_object(Bucket=bucket, Key="manifests/inventory-v1.jsonl")
    before_body = before["Body"].read()

    root = tmp_path / "d"
    root.mkdir()
    files = {"empty": 0, "no-images": 2, "many-non-images": HEAD_LIMIT + 3}[contents]
    for i in range(files):
        (root / f"notes{i:03d}.txt").write_text("not an image")
    proxy.reset()
    proc = cli(s3_env, "upload", str(root))
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"s3fsimg: error: {root}: no images found ({files} files skipped")
    assert last.endswith("; nothing uploaded")
    assert proxy.get_count("PUT") == 0
    after = moto_client.get_object(Bucket=bucket, Key="manifests/inventory-v1.jsonl")
    assert after["Body"].read() == before_body
    assert after["ETag"] == before["ETag"]


# -- a hash cache that cannot be used ---------------------------------------------------------------------


def _cache_warnings(proc: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in proc.stderr.splitlines() if "hash cache" in line]


def _assert_uploaded_without_the_cache(proc: subprocess.CompletedProcess[str], db: Path, reason: str,
                                       moto_client: Any, bucket: str, root: Path) -> None:
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    [warning] = _cache_warnings(proc)
    assert " WARNING " in warning
    assert f"hash cache {db} unusable (" in warning and "); hashing every file" in warning, warning
    assert reason in warning, warning
    keys = set(bucket_objects(moto_client, bucket))
    assert {image_key(p) for p in root.iterdir()} | {"manifests/inventory-v1.jsonl"} == keys


@pytest.mark.parametrize("where", ["cache-dir", "hashes"])
def test_a_hash_cache_path_that_is_a_file_costs_a_warning_not_the_upload(
    tmp_path: Path, s3_env: dict[str, str], moto_client: Any, bucket: str, where: str
) -> None:
    root = tmp_path / "d"
    write_pngs(root, 3)
    cache_dir = Path(s3_env["DATASET_CACHE_DIR"])
    if where == "cache-dir":
        cache_dir.write_text("a file, not a directory")
        reason = "cache/hashes: Not a directory"
    else:
        cache_dir.mkdir()
        (cache_dir / "hashes").write_text("a file, not a directory")
        reason = "hashes: exists and is not a directory"
    db = hash_cache_path(Config.load(env=s3_env), root)
    proc = cli(s3_env, "upload", str(root))
    _assert_uploaded_without_the_cache(proc, db, reason, moto_client, bucket, root)


def _mount_namespace_or_skip(probe_dir: Path) -> list[str]:
    """A command prefix that runs a shell script in a private mount namespace (mounts vanish with it)."""
    unshare = shutil.which("unshare")
    if unshare is None or os.geteuid() != 0:
        pytest.skip("needs root and unshare to mount a small or read-only filesystem")
    prefix = [unshare, "--mount", "--propagation", "private", "sh", "-ec"]
    probe_dir.mkdir(parents=True, exist_ok=True)
    probe = subprocess.run([*prefix, f"mount -t tmpfs -o size=64k tmpfs '{probe_dir}'"], capture_output=True,
                           text=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a mount namespace: {probe.stderr.strip()}")
    return prefix


def cli_with_mounts(prefix: list[str], script: str, env: dict[str, str],
                    *args: str) -> subprocess.CompletedProcess[str]:
    """Run `script` (the mounts) then the CLI, in the private mount namespace of `prefix`."""
    return subprocess.run([*prefix, f'{script}\nexec "$@"', "sh", sys.executable, "-m", "s3fsimg", *args],
                          env={**os.environ, **env}, cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("state", ["new", "existing"])
def test_a_read_only_hash_cache_costs_a_warning_not_the_upload(tmp_path: Path, s3_env: dict[str, str],
                                                                moto_client: Any, bucket: str, state: str) -> None:
    cache_dir = Path(s3_env["DATASET_CACHE_DIR"])
    prefix = _mount_namespace_or_skip(tmp_path / "probe")
    root = tmp_path / "d"
    write_pngs(root, 3)
    db = hash_cache_path(Config.load(env=s3_env), root)
    if state == "new":  # nothing there yet, and nothing can be created
        cache_dir.mkdir()
        script = f"mount -t tmpfs -o ro,size=64k tmpfs '{cache_dir}'"
        reason = "Read-only file system"
    else:  # an earlier run's cache, now on a read-only filesystem
        assert cli(s3_env, "upload", str(root)).returncode == 0
        assert db.is_file()
        for key in bucket_objects(moto_client, bucket):  # so that this run must PUT everything again
            moto_client.delete_object(Bucket=bucket, Key=key)
        (root / "p000.png").write_bytes(png_bytes("white", (5, 5)))  # one file to hash again
        script = f"mount --bind '{cache_dir}' '{cache_dir}'\nmount -o remount,bind,ro '{cache_dir}'"
        reason = "database"  # SQLite's words vary by version: "unable to open database file", "readonly database"
    proc = cli_with_mounts(prefix, script, s3_env, "upload", str(root))
    _assert_uploaded_without_the_cache(proc, db, reason, moto_client, bucket, root)


def test_a_full_disk_under_the_hash_cache_costs_a_warning_not_the_upload(
    tmp_path: Path, s3_env: dict[str, str], moto_client: Any, bucket: str
) -> None:
    cache_dir = Path(s3_env["DATASET_CACHE_DIR"])
    prefix = _mount_namespace_or_skip(tmp_path / "probe")
    cache_dir.mkdir()
    root = tmp_path / "d"
    write_pngs(root, 3)
    db = hash_cache_path(Config.load(env=s3_env), root)
    script = (f"mount -t tmpfs -o size=64k tmpfs '{cache_dir}'\nmkdir -m 700 '{db.parent}'\n"
              f"dd if=/dev/zero of='{cache_dir}/filler' bs=4k 2>/dev/null || true")
    proc = cli_with_mounts(prefix, script, s3_env, "upload", str(root))
    _assert_uploaded_without_the_cache(proc, db, "full", moto_client, bucket, root)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("pages", [1, 2], ids=["full-at-open", "full-at-flush"])
def test_a_hash_cache_that_fills_up_costs_a_warning_not_the_upload(
    tmp_path: Path, s3_env: dict[str, str], moto_client: Any, bucket: str, monkeypatch: pytest.MonkeyPatch,
    pages: int
) -> None:
    """SQLite's own "database or disk is full" (max_page_count), when the cache is created (1 page) or when
    the rows hashed in this run are written (2 pages: room for the empty table only)."""
    root = tmp_path / "d"
    write_pngs(root, HEAD_LIMIT + 20)
    config = Config.load(env=s3_env)
    db = hash_cache_path(config, root)
    real_connect = sqlite3.connect

    def connect(database: Any, *args: Any, **kwargs: Any) -> sqlite3.Connection:
        conn = real_connect(database, *args, **kwargs)
        if Path(database) == db:
            conn.execute(f"PRAGMA max_page_count={pages}")
        return conn

    monkeypatch.setattr(sqlite3, "connect", connect)
    with expect_logs(rf"^hash cache {re.escape(str(db))} unusable \(database or disk is full\); hashing every file$",
                     count=1):
        report = upload(config, root, workers=4, show_progress=False)
    assert (report.uploaded, report.entries, report.manifest_uploaded) == (HEAD_LIMIT + 20, HEAD_LIMIT + 20, True)
    assert len(bucket_objects(moto_client, bucket)) == HEAD_LIMIT + 21


def test_quoted_etag_gives_the_manifest_form_of_bare_and_quoted_etags() -> None:
    """Some S3-compatible servers send ETags bare: S3Store quotes every ETag it returns, so the manifest
    the uploader writes is valid and the reader's comparisons hold whichever call saw the ETag."""
    from s3fsimg.manifest import parse_entry
    from s3fsimg.s3 import quoted_etag

    assert quoted_etag('"9a8b"') == '"9a8b"'
    assert quoted_etag("9a8b") == '"9a8b"'
    assert quoted_etag('"9a8b-2"') == '"9a8b-2"'
    assert [quoted_etag(v) for v in (None, "", '""', 'a"b', 42)] == [None] * 5
    sha = hashlib.sha256(b"x").hexdigest()
    line = {"sha256": sha, "path": f"images/{sha[:2]}/{sha[2:4]}/{sha}.png", "bytes": 1, "content_type": "image/png",
            "etag": quoted_etag("bare-etag")}
    assert parse_entry(line).etag == '"bare-etag"'


# -- block maps -------------------------------------------------------------------------------------------


def bucket_maps(client: Any, bucket: str) -> dict[str, bytes]:
    """Every object under blocks/, with its bytes."""
    return {key: client.get_object(Bucket=bucket, Key=key)["Body"].read()
            for key in bucket_objects(client, bucket) if key.startswith("blocks/")}


def assert_map_of(raw: bytes, path: Path, block_size: int) -> None:
    """`raw` parses as the block map of the file's bytes, and each block's digest is the block's."""
    data = path.read_bytes()
    blockmap = BlockMap.from_bytes(raw, sha256=hashlib.sha256(data).hexdigest(), size=len(data))
    assert blockmap.block_size == block_size
    assert blockmap.block_count() == -(-len(data) // block_size)
    for i in range(blockmap.block_count()):
        start, end = blockmap.block_bounds(i)
        assert blockmap.check_block(i, data[start:end]), (path, i)
    assert blockmap == BlockMap.of_bytes(data, block_size=block_size)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("n_small", [3, HEAD_LIMIT + 5], ids=["head", "list"])
def test_upload_writes_a_block_map_for_each_large_object_and_a_rerun_adds_the_missing(
        tmp_path: Path, s3_env: dict[str, str], proxy: LabProxy, moto_client: Any, bucket: str,
        large_set: SampleSet, n_small: int) -> None:
    """Objects over DATASET_WHOLE_OBJECT_MAX (1 MiB) get a map at blocks/ab/cd/<sha256> that describes
    the file's bytes; small ones get none. A re-run after a map was deleted (a dataset uploaded before
    maps existed) PUTs that map only, from the hash cache's file (no object PUT), with a HEAD per map
    or one LIST of blocks/ (above HEAD_LIMIT files)."""
    data = large_set.copy_to(tmp_path / "d")
    write_pngs(data.root / "small", n_small)
    large = [f for f in data.large if f.size > 1 << 20]
    assert len(large) >= 2, [f.size for f in data.large]  # the seeded set has 1.0-3.0 MB images
    proc = cli(s3_env, "upload", str(data.root))
    assert proc.returncode == 0, proc.stderr
    assert f"block maps {len(large)} added, 0 already there" in proc.stdout
    maps = bucket_maps(moto_client, bucket)
    assert set(maps) == {blockmap_key(f.sha256) for f in large}  # no map for a small object
    for f in large:
        assert_map_of(maps[blockmap_key(f.sha256)], f.path, 256 << 10)
        head = moto_client.head_object(Bucket=bucket, Key=blockmap_key(f.sha256))
        assert head["ContentType"] == "application/json"

    victim = blockmap_key(large[0].sha256)
    moto_client.delete_object(Bucket=bucket, Key=victim)
    proxy.reset()
    again = cli(s3_env, "upload", str(data.root))
    assert again.returncode == 0, again.stderr
    assert f"block maps 1 added, {len(large) - 1} already there" in again.stdout
    assert "uploaded 0 objects" in again.stdout
    assert proxy.get_count("PUT", "blocks/") == proxy.get_count("PUT", victim) == 1
    assert proxy.get_count("PUT", "images/") == 0
    assert proxy.get_count("PUT", "manifests/") == 0  # the manifest did not change
    if n_small > HEAD_LIMIT:
        assert proxy.get_count("HEAD", "blocks/") == 0  # really the LIST path
    else:
        assert proxy.get_count("HEAD", "blocks/") == len(large)
    assert bucket_maps(moto_client, bucket) == maps  # the same bytes again

    proxy.reset()
    third = cli(s3_env, "upload", str(data.root))
    assert third.returncode == 0, third.stderr
    assert proxy.get_count("PUT") == 0
    assert f"block maps 0 added, {len(large)} already there" in third.stdout


@pytest.mark.timeout(180)
def test_block_maps_follow_the_threshold_and_the_block_size(tmp_path: Path, s3_env: dict[str, str],
                                                             moto_client: Any, bucket: str) -> None:
    """A map is written for bytes > DATASET_WHOLE_OBJECT_MAX (not for an object of exactly that size),
    with DATASET_BLOCK_SIZE blocks; a wrong-size map at the key is written again."""
    root = tmp_path / "d"
    files = [make_large_image(root / f"n{i}.png", size, seed=i) for i, size in enumerate((40_000, 70_000, 90_000))]
    at_limit = files[1]
    env = {**s3_env, "DATASET_WHOLE_OBJECT_MAX": str(at_limit.size), "DATASET_BLOCK_SIZE": "16K"}
    proc = cli(env, "upload", str(root))
    assert proc.returncode == 0, proc.stderr
    maps = bucket_maps(moto_client, bucket)
    assert set(maps) == {blockmap_key(files[2].sha256)}
    assert_map_of(maps[blockmap_key(files[2].sha256)], files[2].path, 16 << 10)

    moto_client.put_object(Bucket=bucket, Key=blockmap_key(files[2].sha256), Body=b"{}")
    again = cli(env, "upload", str(root))
    assert again.returncode == 0, again.stderr
    assert "block maps 1 added, 0 already there" in again.stdout
    assert bucket_maps(moto_client, bucket) == maps


@pytest.mark.timeout(180)
def test_block_maps_go_after_their_object_and_before_the_manifest(tmp_path: Path, s3_env: dict[str, str],
                                                                   proxy: LabProxy, moto_client: Any,
                                                                   bucket: str) -> None:
    """A map PUT that fails fails the upload before the manifest; an object PUT that fails leaves no map
    of that object. The re-run completes both."""
    root = tmp_path / "d"
    files = [make_large_image(root / f"n{i}.png", 1_300_000 + i * 100_000, seed=i) for i in range(3)]
    keys = {blockmap_key(f.sha256) for f in files}
    with proxy.fault("error_status", 400, match="/blocks/", methods=["PUT"]):
        proc = cli(s3_env, "upload", str(root))
    assert proc.returncode == 1
    assert proc.stderr.startswith("s3fsimg: error: s3://"), proc.stderr
    objects = bucket_objects(moto_client, bucket)
    assert not any(k.startswith("manifests/") for k in objects)
    assert not keys & set(objects)

    stuck = files[0]
    moto_client.delete_object(Bucket=bucket, Key=stuck.s3_path)
    with proxy.fault("error_status", 400, match=stuck.sha256, methods=["PUT"]):
        proc = cli(s3_env, "upload", str(root))
    assert proc.returncode == 1
    objects = bucket_objects(moto_client, bucket)
    assert blockmap_key(stuck.sha256) not in objects and stuck.s3_path not in objects
    assert not any(k.startswith("manifests/") for k in objects)

    proc = cli(s3_env, "upload", str(root))
    assert proc.returncode == 0, proc.stderr
    assert keys <= set(bucket_objects(moto_client, bucket))
    assert cli(s3_env, "validate", "--check-objects").returncode == 0
