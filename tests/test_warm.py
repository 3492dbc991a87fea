"""Cache warm-up: `s3fsimg warm` and `Dataset.prefetch`, counted at the lab proxy.

Done-when points of issue 12 covered here: after `warm --all`, a full read of a mount makes zero
GETs; after `Dataset.prefetch(ids)`, `fetch` of those ids makes zero GETs; warming more than the
bound stops there and says so in one line; paths of a mount (files and directories) name their
objects; a terminal gets a progress bar, a pipe none.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import pty
import select
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from s3fsimg.dataset import Dataset
from s3fsimg.manifest import Entry
from s3fsimg.warm import distinct, plan, read_id_file
from s3fsimg_lab.proxy import LabProxy
from tests.checklogs import expect_logs
from tests.deployutil import ROOT, Uploaded, sha256_file, shared_mnt_dir, uploaded
from tests.mountutil import MountProcess, fuse_test

pytestmark = pytest.mark.timeout(120)


def run(*args: str, env: dict[str, str] | None = None, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "s3fsimg", *args], capture_output=True, text=True, input=stdin,
                          env=env if env is not None else dict(os.environ), cwd=str(ROOT), timeout=120)


@pytest.fixture
def lab(s3_env: dict[str, str], sample_set: object, large_set: object, tmp_path: Path,
        proxy: LabProxy) -> Uploaded:
    """20 small images and the 4 large (1-3 MB) ones in the lab bucket; counters reset."""
    ds = uploaded(tmp_path / "ws", s3_env, sample_set.images[:20], large_set.large)  # type: ignore[attr-defined]
    proxy.reset()
    return ds


def image_gets(proxy: LabProxy) -> int:
    return proxy.get_count("GET", "images/")


# -- the plan -----------------------------------------------------------------------------------------


def _entry(i: int, size: int) -> Entry:
    sha = f"{i:064x}"
    return Entry(sha256=sha, path=f"images/{sha[:2]}/{sha[2:4]}/{sha}.jpg", bytes=size, content_type="image/jpeg")


def test_plan_takes_the_prefix_that_fits_and_distinct_keeps_order() -> None:
    a, b, c, d = _entry(1, 400), _entry(2, 300), _entry(3, 300), _entry(4, 1)
    assert distinct([a, b, a, c, b]) == [a, b, c]
    assert plan([a, b, c, d], 1000) == [a, b, c]  # 1000 fits exactly
    assert plan([a, b, c, d], 999) == [a, b]  # c would pass the bound: it and all after it are left out
    assert plan([a], 0) == []


def test_id_file_skips_blank_lines_and_comments(tmp_path: Path) -> None:
    f = tmp_path / "ids.txt"
    f.write_text("# next epoch\nDAO-1\n\n  DAO-2  \n#DAO-3\n")
    assert list(read_id_file(str(f))) == ["DAO-1", "DAO-2"]


# -- warm and fetch ----------------------------------------------------------------------------------


@fuse_test
@pytest.mark.fuse
def test_after_warm_all_a_full_read_of_the_mount_makes_no_get(lab: Uploaded, proxy: LabProxy) -> None:
    proc = run("warm", "--all")
    assert proc.returncode == 0, proc.stderr
    n = len(lab.entries)
    assert proc.stdout.startswith(f"warmed {n} images ("), proc.stdout
    assert f"{n} fetched" in proc.stdout and "0 already cached" in proc.stdout
    assert proc.stderr == ""  # no bar in a pipe, no note: everything fit
    assert image_gets(proxy) == n

    with shared_mnt_dir() as mp:
        m = MountProcess(mp, env=dict(os.environ)).start()
        try:
            proxy.reset()
            seen = 0
            for path in sorted(mp.rglob("*")):
                if path.is_file():
                    data_sha = sha256_file(path)
                    if path.name != "manifest.jsonl":
                        assert data_sha == os.getxattr(path, "user.s3fsimg.sha256").decode()
                    seen += 1
            assert seen > n
            assert proxy.get_count("GET") == 0, proxy.counts()["by_method_key"]
        finally:
            m.stop()

    again = run("warm", "--all")
    assert again.returncode == 0
    assert "0 fetched" in again.stdout and f"{n} already cached" in again.stdout


def test_after_prefetch_fetch_of_those_ids_makes_no_get(lab: Uploaded, proxy: LabProxy,
                                                         s3_env: dict[str, str]) -> None:
    entries = sorted(lab.entries.values(), key=lambda e: e.sha256)
    chosen = [e.sha256 for e in entries[::2]]
    with Dataset.from_env() as ds:
        report = ds.prefetch(chosen)
    assert (report.fetched, report.cached, report.failed, report.stopped_at_bound) == (len(chosen), 0, 0, False)
    assert image_gets(proxy) == len(chosen)

    proxy.reset()
    proc = run("fetch", *chosen)
    assert proc.returncode == 0, proc.stderr
    paths = proc.stdout.split()
    assert [sha256_file(p) for p in paths] == chosen
    assert image_gets(proxy) == 0

    others = [e.sha256 for e in entries[1::2]]
    proc = run("fetch", others[0])
    assert proc.returncode == 0 and image_gets(proxy) >= 1  # the counter does see fetches that miss


def test_warming_more_than_the_bound_stops_there_and_says_so(lab: Uploaded, proxy: LabProxy,
                                                              s3_env: dict[str, str], tmp_path: Path) -> None:
    order = sorted(lab.entries.values(), key=lambda e: e.sha256)
    ids_file = tmp_path / "epoch.txt"
    ids_file.write_text("".join(e.sha256 + "\n" for e in order))
    bound = sum(e.bytes for e in order[:10]) + 10  # the first 10 fit, the 11th does not
    env = {**os.environ, "DATASET_CACHE_MAX_BYTES": str(bound)}
    proc = run("warm", "--from", str(ids_file), env=env)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("note: stopped at the cache bound"), proc.stderr
    assert f": 10 of {len(order)} images (" in lines[0]
    assert proc.stdout.startswith("warmed 10 images")
    assert image_gets(proxy) == 10

    stats = run("cache", "stats", "--json", env=env)
    assert stats.returncode == 0, stats.stderr
    assert json.loads(stats.stdout)["bytes"] <= bound
    proxy.reset()
    fetched = run("fetch", *(e.sha256 for e in order[:10]), env=env)
    assert fetched.returncode == 0, fetched.stderr
    assert image_gets(proxy) == 0  # the first ten of the order are the ones kept

    # the API: the same plan, and a warning
    with expect_logs(r"prefetch: stopped at the cache bound", level=logging.WARNING, count=1), \
            Dataset.from_env(cache_max_bytes=str(bound)) as ds:
        report = ds.prefetch([e.sha256 for e in order])
    assert report.stopped_at_bound and report.planned == 10 and report.cached == 10


def test_warm_by_logical_id_from_stdin_and_failures(lab: Uploaded, proxy: LabProxy, s3_env: dict[str, str]) -> None:
    entries = sorted(lab.entries.values(), key=lambda e: e.sha256)
    victim = entries[0]
    env = {**os.environ, "DATASET_READ_DEADLINE": "2s"}
    with proxy.fault("error_status", 403, match=victim.sha256):
        proc = run("warm", "--from", "-", env=env, stdin="\n".join(e.sha256 for e in entries[:5]))
    assert proc.returncode == 1
    assert "warmed 4 images" in proc.stdout and "1 failed" in proc.stdout
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("s3fsimg: error: 1 of 5 images could not be warmed; the first: ")

    proc = run("warm", "no-such-id")
    assert proc.returncode == 1 and "'no-such-id': no image with this sha256 or logical_id" in proc.stderr
    proc = run("warm")
    assert proc.returncode == 2 and "nothing to warm" in proc.stderr


@fuse_test
@pytest.mark.fuse
def test_paths_in_a_mount_name_their_objects(lab: Uploaded, proxy: LabProxy, tmp_path: Path) -> None:
    large = sorted((e for e in lab.entries.values() if e.bytes >= 1_000_000), key=lambda e: e.sha256)
    small = sorted((e for e in lab.entries.values() if e.bytes < 1_000_000), key=lambda e: e.sha256)
    assert large and small
    with shared_mnt_dir() as mp:
        m = MountProcess(mp, env=dict(os.environ)).start()
        try:
            proxy.reset()
            one_by_path = mp / "by-path" / small[0].source_path  # type: ignore[operator]
            by_image = mp / small[1].path
            by_dir = mp / "by-path"
            proc = run("warm", str(one_by_path), str(by_image))
            assert proc.returncode == 0, proc.stderr
            assert proc.stdout.startswith("warmed 2 images"), proc.stdout
            assert proxy.get_count("GET", "images/") == 2  # listing and xattrs cost no request

            proc = run("warm", str(by_dir))  # a directory: every image under it
            assert proc.returncode == 0, proc.stderr
            n = len(lab.entries)
            assert proc.stdout.startswith(f"warmed {n} images"), proc.stdout
            assert f"{n - 2} fetched" in proc.stdout and "2 already cached" in proc.stdout

            outside = run("warm", str(tmp_path))
            assert outside.returncode == 1 and "not inside a mount of s3fsimg" in outside.stderr
            manifest = run("warm", str(mp / "manifest.jsonl"))
            assert manifest.returncode == 1 and "not an image of the mount" in manifest.stderr
        finally:
            m.stop()


def _drain(fd: int) -> bytes:
    out = b""
    while select.select([fd], [], [], 0.1)[0]:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        out += chunk
    return out


def test_progress_bar_on_a_terminal(lab: Uploaded) -> None:
    main_fd, sub_fd = pty.openpty()
    fcntl.ioctl(sub_fd, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a terminal has a size
    proc = subprocess.Popen([sys.executable, "-m", "s3fsimg", "warm", "--all"], stdout=subprocess.PIPE,
                            stderr=sub_fd, stdin=subprocess.DEVNULL, cwd=str(ROOT))
    err = b""
    try:  # the terminal's other end stays open here until the output is read (a closed one may drop it)
        out = proc.communicate(timeout=60)[0].decode()
        err = _drain(main_fd)
    finally:
        os.close(sub_fd)
        os.close(main_fd)
    assert proc.returncode == 0
    assert b"warm" in err and (b"B/s" in err or b"iB" in err), (err[-500:], out)
    assert out.startswith("warmed ")
