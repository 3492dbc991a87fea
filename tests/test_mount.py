"""The mount, for real: a subprocess mounts a dataset uploaded to the loopback S3 through the lab proxy.

Each test covers "Done when" points of issue 4; fixtures always unmount and stop what they started.
"""

from __future__ import annotations

import concurrent.futures
import errno
import hashlib
import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from s3fsimg.config import Config
from s3fsimg.manifest import Entry, iter_entries
from s3fsimg_lab.images import SampleSet
from s3fsimg_lab.proxy import LabProxy
from tests.asuser import probe_as_other_user
from tests.mountutil import MountProcess, fuse_test, is_mounted

pytestmark = [fuse_test, pytest.mark.fuse]

try:
    import s3fsimg.reader  # noqa: F401

    HAVE_READER = True
except ImportError:  # pragma: no cover
    HAVE_READER = False
needs_reader = pytest.mark.skipif(not HAVE_READER, reason="s3fsimg.reader is not there yet")


class Dataset:
    def __init__(self, env: dict[str, str], root: Path, manifest: Path) -> None:
        self.env = env
        self.root = root
        self.manifest = manifest
        self.entries: list[Entry] = [e for _, e in iter_entries(manifest)]

    def source_bytes(self, e: Entry) -> bytes:
        assert e.source_path is not None
        return (self.root / e.source_path).read_bytes()


@pytest.fixture
def dataset(s3_env: dict[str, str], sample_dir: SampleSet, tmp_path: Path, proxy: LabProxy) -> Dataset:
    from s3fsimg.uploader import upload

    config = Config.load(env=s3_env)
    map_flag = {"logical_map": sample_dir.map_path} if sample_dir.map_path else {}
    upload(config.with_(**map_flag), Path(sample_dir), show_progress=False)
    local = tmp_path / "manifest.jsonl"
    from s3fsimg.s3 import S3Store

    local.write_bytes(S3Store(config).get_bytes(config.manifest_key))
    proxy.reset()
    return Dataset(dict(os.environ), Path(sample_dir), local)


@pytest.fixture
def mounted(dataset: Dataset, mnt_dir: Path, proxy: LabProxy) -> Iterator[MountProcess]:
    m = MountProcess(mnt_dir, env=dataset.env)
    try:
        m.start()
        proxy.reset()
        yield m
    finally:
        m.stop()


def sha_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def find_files(top: Path) -> list[str]:
    out = subprocess.run(["find", str(top), "-type", "f", "-print0"], capture_output=True, check=True).stdout
    return [p.decode() for p in out.split(b"\0") if p]


def names_count(ds: Dataset) -> int:
    objects = {e.sha256 for e in ds.entries}
    ids = {(e.logical_id, e.path) for e in ds.entries if e.logical_id}
    paths = [e for e in ds.entries if e.source_path]
    return len(objects) + len(ids) + len(paths) + 1


@pytest.mark.timeout(60)
def test_layout_listing_and_stat_make_no_request(dataset: Dataset, mounted: MountProcess, proxy: LabProxy) -> None:
    mp = mounted.mountpoint
    assert sorted(os.listdir(mp)) == ["by-id", "by-path", "images", "manifest.jsonl"]
    files = find_files(mp)
    assert len(files) == names_count(dataset)
    for e in dataset.entries:
        st = os.stat(mp / e.path)
        assert st.st_size == e.bytes and st.st_mode & 0o777 == 0o444 and st.st_uid == os.getuid()
        assert st.st_blocks == (e.bytes + 511) // 512
        if e.logical_id:
            assert os.stat(mp / "by-id" / e.logical_id / e.path.rsplit("/", 1)[1]).st_ino == st.st_ino
        if e.source_path:
            assert os.stat(mp / "by-path" / e.source_path).st_ino == st.st_ino
        assert os.getxattr(mp / e.path, "user.s3fsimg.sha256").decode() == e.sha256
    by_id = {p.name for p in (mp / "by-id").iterdir()}
    assert by_id == {e.logical_id for e in dataset.entries if e.logical_id}
    by_path = find_files(mp / "by-path")
    assert sorted(os.path.relpath(p, mp / "by-path") for p in by_path) == sorted(
        e.source_path for e in dataset.entries if e.source_path)
    subprocess.run(["stat", *files], capture_output=True, check=True)
    subprocess.run(["ls", "-lR", str(mp)], capture_output=True, check=True)
    assert os.stat(mp).st_mode & 0o777 == 0o555
    assert (mp / "manifest.jsonl").read_bytes() == dataset.manifest.read_bytes()
    assert proxy.counts()["requests"] == 0, proxy.counts()
    stats = json.loads(subprocess.run([sys.executable, "-m", "s3fsimg", "stats", str(mp), "--json"],
                                      capture_output=True, text=True, check=True, env=dataset.env).stdout)
    assert stats["entries"] == len(dataset.entries)
    assert "user.s3fsimg.stats" not in os.listxattr(mp)


@needs_reader
@pytest.mark.timeout(90)
def test_every_image_reads_back(dataset: Dataset, mounted: MountProcess, tmp_path: Path) -> None:
    from PIL import Image

    mp = mounted.mountpoint
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(mp / "images"), str(copy)], check=True)
    for e in dataset.entries:
        assert sha_of(copy / e.path.removeprefix("images/")) == e.sha256
        out = subprocess.run(["cat", str(mp / e.path)], capture_output=True, check=True).stdout
        assert hashlib.sha256(out).hexdigest() == e.sha256
        if e.width:
            with Image.open(mp / e.path) as im:
                assert im.size == (e.width, e.height)

    def check(e: Entry) -> bool:
        return sha_of(mp / "by-path" / e.source_path) == e.sha256 if e.source_path else True

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        assert all(pool.map(check, dataset.entries))
    rnd = random.Random(4)
    withsrc = [e for e in dataset.entries if e.source_path and e.bytes]
    for _ in range(200):
        e = rnd.choice(withsrc)
        src = dataset.source_bytes(e)
        off = rnd.randrange(len(src))
        size = rnd.randrange(1, 300_000)
        fd = os.open(mp / e.path, os.O_RDONLY)
        try:
            assert os.pread(fd, size, off) == src[off:off + size]
        finally:
            os.close(fd)


@pytest.mark.timeout(60)
def test_every_write_fails_with_erofs(dataset: Dataset, mounted: MountProcess) -> None:
    mp = mounted.mountpoint
    e = dataset.entries[0]
    f = mp / e.path
    attempts = [
        lambda: os.open(f, os.O_WRONLY),
        lambda: os.open(f, os.O_WRONLY | os.O_APPEND),
        lambda: os.open(f, os.O_RDWR),
        lambda: os.open(mp / "new.txt", os.O_WRONLY | os.O_CREAT, 0o644),
        lambda: os.mkdir(mp / "d"),
        lambda: os.rmdir(mp / "by-id"),
        lambda: os.unlink(f),
        lambda: os.rename(f, mp / "x"),
        lambda: os.symlink("x", mp / "s"),
        lambda: os.link(f, mp / "l"),
        lambda: os.chmod(f, 0o644),
        lambda: os.utime(f, (0, 0)),
        lambda: os.truncate(f, 0),
        lambda: os.setxattr(f, "user.x", b"1"),
        lambda: os.removexattr(f, "user.s3fsimg.sha256"),
        lambda: os.mknod(mp / "n"),
    ]
    for attempt in attempts:
        with pytest.raises(OSError) as info:
            attempt()
        assert info.value.errno == errno.EROFS, attempt
    assert not os.access(f, os.W_OK)
    assert mounted.proc is not None and mounted.proc.poll() is None


def _as_nobody(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd],
                          capture_output=True, text=True, check=False)


@pytest.mark.timeout(60)
@pytest.mark.skipif(os.getuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv")
@pytest.mark.parametrize("allow_other", [False, True])
def test_other_users_need_allow_other(dataset: Dataset, mnt_dir: Path, allow_other: bool) -> None:
    args = ["--allow-other"] if allow_other else []
    with MountProcess(mnt_dir, env=dataset.env, args=args):
        result = _as_nobody("ls", str(mnt_dir / "by-id"))
        if allow_other:
            assert result.returncode == 0, result.stderr
            assert len(result.stdout.split()) == len({e.logical_id for e in dataset.entries if e.logical_id})
        else:
            assert result.returncode != 0
            assert "Permission denied" in result.stderr
        # uid 65534 (setuid in the child): every kind of access is EACCES, or reads the right bytes
        some = dataset.entries[:3]
        paths = [mnt_dir, mnt_dir / "by-path", *(mnt_dir / e.path for e in some),
                 *(mnt_dir / "by-path" / e.source_path for e in some if e.source_path)]
        tried = probe_as_other_user(paths)
        if allow_other:
            expected = {str(p): "ok" for p in paths[:2]}
            expected.update({str(mnt_dir / e.path): e.sha256 for e in some})
            expected.update({str(mnt_dir / "by-path" / e.source_path): e.sha256 for e in some if e.source_path})
        else:
            expected = {str(p): "EACCES" for p in paths}
        assert tried == expected


@needs_reader
@pytest.mark.timeout(90)
def test_sigkill_lazy_unmount_and_remount_reuses_the_cache(dataset: Dataset, mnt_dir: Path,
                                                          proxy: LabProxy) -> None:
    m = MountProcess(mnt_dir, env=dataset.env).start()
    try:
        for e in dataset.entries:
            assert sha_of(mnt_dir / e.path) == e.sha256
        assert m.proc is not None
        m.proc.send_signal(signal.SIGKILL)
        m.proc.wait(10)
        with pytest.raises(OSError):
            os.listdir(mnt_dir)  # ENOTCONN: the dead mount is still attached
    finally:
        m.stop()
    assert not is_mounted(mnt_dir)
    proxy.reset()
    with MountProcess(mnt_dir, env=dataset.env):
        for e in dataset.entries:
            assert sha_of(mnt_dir / e.path) == e.sha256
    assert proxy.get_count("GET", "images/") == 0, proxy.counts()["by_method_key"]


@needs_reader
@pytest.mark.timeout(60)
def test_hung_s3_request_does_not_delay_listing_or_cached_reads(dataset: Dataset, mounted: MountProcess,
                                                                proxy: LabProxy) -> None:
    mp = mounted.mountpoint
    cached, hung = dataset.entries[0], next(e for e in dataset.entries[1:] if e.sha256 != dataset.entries[0].sha256)
    assert sha_of(mp / cached.path) == cached.sha256
    result: dict[str, Any] = {}
    with proxy.fault("hang", match=hung.sha256):
        t = threading.Thread(target=lambda: result.update(data=(mp / hung.path).read_bytes()), daemon=True)
        t.start()
        deadline = time.monotonic() + 10
        while proxy.get_count("GET", hung.sha256) == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert t.is_alive()
        for d in ("by-id", "by-path", "images"):
            started = time.monotonic()
            subprocess.run(["ls", "-lR", str(mp / d)], capture_output=True, check=True)
            assert time.monotonic() - started < 1.0
        started = time.monotonic()
        assert sha_of(mp / cached.path) == cached.sha256
        assert time.monotonic() - started < 1.0
    t.join(30)
    assert hashlib.sha256(result["data"]).hexdigest() == hung.sha256


@needs_reader
@pytest.mark.timeout(90)
def test_corrupt_object_is_eio_then_reads_once_fixed(dataset: Dataset, mounted: MountProcess,
                                                     proxy: LabProxy) -> None:
    mp = mounted.mountpoint
    e = max(dataset.entries, key=lambda x: x.bytes)
    with proxy.fault("flip_byte", match=e.sha256), pytest.raises(OSError) as info:
        (mp / e.path).read_bytes()
    assert info.value.errno == errno.EIO
    assert mounted.proc is not None and mounted.proc.poll() is None
    assert sha_of(mp / e.path) == e.sha256
    assert "EIO" in mounted.log_file.read_text()


@needs_reader
@pytest.mark.timeout(90)
def test_refused_connections_cached_reads_work_uncached_fail_then_recover(dataset: Dataset, mnt_dir: Path,
                                                                          proxy: LabProxy) -> None:
    env = {**dataset.env, "DATASET_READ_DEADLINE": "3s"}
    with MountProcess(mnt_dir, env=env):
        cached, other = dataset.entries[0], next(e for e in dataset.entries if e.sha256 != dataset.entries[0].sha256)
        assert sha_of(mnt_dir / cached.path) == cached.sha256
        with proxy.fault("refuse"):
            assert sha_of(mnt_dir / cached.path) == cached.sha256
            started = time.monotonic()
            with open(mnt_dir / other.path, "rb") as f, pytest.raises(OSError) as info:
                f.read(4096)  # the open succeeds (metadata is local); the read fails
            assert info.value.errno == errno.EIO
            # one deadline, not two: the kernel re-sends a failed read-ahead READ as a one-page READ,
            # which must not wait a second deadline
            assert time.monotonic() - started < 2 * 3 - 0.5
        assert sha_of(mnt_dir / other.path) == other.sha256


def _cli(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "s3fsimg", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, check=False)


@pytest.mark.timeout(60)
def test_daemon_mount_stats_and_umount(dataset: Dataset, mnt_dir: Path) -> None:
    log = mnt_dir.parent / "daemon.log"
    try:
        r = _cli("mount", str(mnt_dir), "--log-file", str(log), env=dataset.env)
        assert r.returncode == 0, r.stderr
        assert stat.S_IMODE(log.stat().st_mode) == 0o600  # it names buckets and keys
        assert is_mounted(mnt_dir)
        assert len(os.listdir(mnt_dir / "by-id")) > 0
        stats = json.loads(_cli("stats", str(mnt_dir), "--json", env=dataset.env).stdout)
        assert stats["entries"] == len(dataset.entries)
        again = _cli("mount", str(mnt_dir), env=dataset.env)
        assert again.returncode != 0 and "already mounted" in again.stderr
        r = _cli("umount", str(mnt_dir), env=dataset.env)
        assert r.returncode == 0, r.stderr
        assert not is_mounted(mnt_dir)
        r = _cli("umount", str(mnt_dir), env=dataset.env)
        assert r.returncode != 0 and "not mounted" in r.stderr
    finally:
        if is_mounted(mnt_dir):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt_dir)], check=False)


@pytest.mark.timeout(60)
@pytest.mark.skipif(os.getuid() != 0, reason="the kernel-side settings need root")
@pytest.mark.parametrize("workers", [1, 2], ids=["one-process", "two-workers"])
def test_the_mount_is_tuned_once_init_is_answered(dataset: Dataset, mnt_dir: Path, workers: int) -> None:
    """The readahead and background limit that the mount sets after INIT (`mount.tune_after_init`) are the
    kernel's once it is ready: a user reads in 1 MiB requests, not 128 KiB ones."""
    from s3fsimg.mount import MAX_BACKGROUND, READ_AHEAD_KB, connection_dir

    m = MountProcess(mnt_dir, env=dataset.env, workers=workers).start()
    try:
        dev = os.stat(mnt_dir).st_dev
        bdi = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
        # MountProcess returns once the mount answers; the tuning follows within moments (a daemon
        # mount's `s3fsimg mount` returns only after it).
        deadline = time.monotonic() + 10
        while int(bdi.read_text()) != READ_AHEAD_KB and time.monotonic() < deadline:
            time.sleep(0.05)
        assert int(bdi.read_text()) == READ_AHEAD_KB
        conn = connection_dir(mnt_dir)
        if conn.is_dir():
            while int((conn / "max_background").read_text()) != MAX_BACKGROUND and time.monotonic() < deadline:
                time.sleep(0.05)
            assert int((conn / "max_background").read_text()) == MAX_BACKGROUND
    finally:
        m.stop()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("workers", [1, None], ids=["one-process", "default-workers"])
def test_sigterm_unmounts_cleanly(dataset: Dataset, mnt_dir: Path, workers: int | None) -> None:
    m = MountProcess(mnt_dir, env=dataset.env, workers=workers).start()
    try:
        assert m.proc is not None
        # requests answered first, so the loop's wait is the fast one (session.RequestWait) at the signal
        for e in dataset.entries[:20]:
            os.stat(mnt_dir / e.path)
        m.proc.send_signal(signal.SIGTERM)
        assert m.proc.wait(15) == 0, m.output()
        assert not is_mounted(mnt_dir)
    finally:
        m.stop()


@pytest.mark.timeout(60)
def test_mount_failures_are_one_clear_line(dataset: Dataset, mnt_dir: Path, tmp_path: Path) -> None:
    env = dataset.env
    r = _cli("mount", str(tmp_path / "missing"), env=env)
    assert r.returncode == 1 and "does not exist" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    (tmp_path / "file").write_text("x")
    r = _cli("mount", str(tmp_path / "file"), env=env)
    assert r.returncode == 1 and "not a directory" in r.stderr
    bad = {**env, "DATASET_MANIFEST_KEY": "manifests/nothing-here.jsonl"}
    r = _cli("mount", str(mnt_dir), env=bad)
    assert r.returncode == 1 and "no manifest" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not is_mounted(mnt_dir)
    r = _cli("mount", str(mnt_dir), env={**env, "S3_BUCKET": "no-such-bucket"})
    assert r.returncode == 1 and "s3://no-such-bucket: the bucket does not exist" in r.stderr, r.stderr
    (mnt_dir / "mine.txt").write_text("hidden by a mount")
    r = _cli("mount", str(mnt_dir), env=env)
    assert r.returncode == 1 and "not empty" in r.stderr and "--allow-non-empty" in r.stderr, r.stderr
    assert not is_mounted(mnt_dir)
    try:
        r = _cli("mount", str(mnt_dir), "--allow-non-empty", env=env)
        assert r.returncode == 0, r.stderr
        assert sorted(os.listdir(mnt_dir)) == ["by-id", "by-path", "images", "manifest.jsonl"]
        nested = _cli("mount", str(mnt_dir / "images"), env=env)  # inside our own mount: not empty
        assert nested.returncode == 1 and "not empty" in nested.stderr, nested.stderr
    finally:
        _cli("umount", str(mnt_dir), env=env)
    assert (mnt_dir / "mine.txt").read_text() == "hidden by a mount"
    (mnt_dir / "mine.txt").unlink()


@pytest.mark.timeout(60)
def test_invalid_manifest_fails_with_its_line(dataset: Dataset, mnt_dir: Path, moto_client: Any) -> None:
    env = dataset.env
    body = dataset.manifest.read_bytes() + b'{"sha256": "nope"}\n'
    moto_client.put_object(Bucket=env["S3_BUCKET"], Key="manifests/inventory-v1.jsonl", Body=body)
    r = _cli("mount", str(mnt_dir), env=env)
    line = len(dataset.manifest.read_bytes().splitlines()) + 1
    assert r.returncode == 1
    assert f"s3://{env['S3_BUCKET']}/manifests/inventory-v1.jsonl:{line}:" in r.stderr, r.stderr
    assert not is_mounted(mnt_dir)
