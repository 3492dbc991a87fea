"""The examples in examples/, run as a user runs them (scripts in subprocesses) against the lab.

torch is not a dependency: the loaders run with a plain multiprocessing loader always, and with
torch.utils.data.DataLoader when torch can be imported (`S3FSIMG_TORCH_DIR` names a directory to add
to the examples' PYTHONPATH, as .ci/run does with a CPU build where the machine has one); else those
tests skip with the reason.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from s3fsimg_lab.images import SampleSet
from s3fsimg_lab.moto import free_port
from s3fsimg_lab.proxy import LabProxy
from tests.cacheworker import upload_dir
from tests.deployutil import ROOT, sha256_file, shared_mnt_dir
from tests.mountutil import MountProcess, fuse_test

EXAMPLES = ROOT / "examples"
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
pytestmark = pytest.mark.timeout(180)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    torch_dir = os.environ.get("S3FSIMG_TORCH_DIR")
    if torch_dir:
        env["PYTHONPATH"] = torch_dir + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _torch_missing() -> str | None:
    proc = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True, text=True, env=_env(),
                          timeout=120)
    if proc.returncode == 0:
        return None
    return ("torch is not importable (install a CPU build, e.g. `pip install --target DIR torch==2.13.0`, "
            "and set S3FSIMG_TORCH_DIR=DIR): " + (proc.stderr.strip().splitlines() or ["?"])[-1])


needs_torch = pytest.mark.skipif(_torch_missing() is not None, reason=str(_torch_missing()))


def example(name: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True,
                          env=env or _env(), cwd=str(ROOT), timeout=170)


@pytest.fixture
def uploaded_tree(s3_env: dict[str, str], sample_dir: SampleSet, proxy: LabProxy) -> SampleSet:
    """The sample tree (cats/, dogs/, birds/, misc/ ... with a logical map) uploaded; counters reset."""
    env = {**s3_env, "DATASET_LOGICAL_MAP": str(sample_dir.map_path)} if sample_dir.map_path else s3_env
    upload_dir(Path(sample_dir), env)
    proxy.reset()
    return sample_dir


@pytest.fixture
def mounted(uploaded_tree: SampleSet) -> Iterator[Path]:
    with shared_mnt_dir() as mp:
        m = MountProcess(mp, env=dict(os.environ)).start()
        try:
            yield mp
        finally:
            m.stop()


def _expected_imagefolder(tree: SampleSet) -> tuple[list[str], list[str], list[int]]:
    """What torchvision's ImageFolder makes of the source tree: classes, sample paths, targets."""
    root = Path(tree)
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    paths, targets = [], []
    for i, cls in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(root / cls):
            dirnames.sort()
            for name in sorted(filenames):
                if name.lower().endswith(IMG_EXTENSIONS):
                    paths.append(os.path.relpath(os.path.join(dirpath, name), root))
                    targets.append(i)
    return classes, paths, targets


@fuse_test
@pytest.mark.fuse
def test_imagefolder_over_by_path_with_plain_workers(uploaded_tree: SampleSet, mounted: Path) -> None:
    proc = example("imagefolder.py", str(mounted), "--workers", "3")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    classes, paths, targets = _expected_imagefolder(uploaded_tree)
    images = {f.rel for f in uploaded_tree.images}
    # the mount's by-path tree lists only images: the source's decoys with image names are not there
    paths_on_mount = [p for p in paths if p in images]
    assert out["classes"] == classes
    assert out["paths"] == paths_on_mount
    assert out["targets"] == [t for p, t in zip(paths, targets, strict=True) if p in images]
    sizes = []
    for rel in paths_on_mount:
        with Image.open(Path(uploaded_tree) / rel) as im:
            sizes.append(list(im.size))
    assert out["sizes"] == sizes


@fuse_test
@pytest.mark.fuse
@needs_torch
def test_imagefolder_with_torch_dataloader(uploaded_tree: SampleSet, mounted: Path) -> None:
    proc = example("imagefolder.py", str(mounted), "--loader", "torch", "--workers", "2")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    _, paths, targets = _expected_imagefolder(uploaded_tree)
    images = {f.rel for f in uploaded_tree.images}
    assert out["targets"] == [t for p, t in zip(paths, targets, strict=True) if p in images]


@fuse_test
@pytest.mark.fuse
def test_read_tree_checks_every_image(uploaded_tree: SampleSet, mounted: Path) -> None:
    proc = example("read_tree.py", str(mounted / "by-path"))
    assert proc.returncode == 0, proc.stderr
    n = len(uploaded_tree.images)
    assert proc.stdout.startswith(f"read {n} images"), proc.stdout
    assert f"; {n} checked against their sha256" in proc.stdout


def test_fetch_loader_workers_share_one_cache(uploaded_tree: SampleSet, proxy: LabProxy) -> None:
    """4 workers, a shuffled epoch, prefetch first: every object is GET once in all, and every worker
    read the bytes of the id it was given."""
    proc = example("fetch_loader.py", "--workers", "4", "--seed", "3", "--prefetch")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    distinct = {f.sha256 for f in uploaded_tree.images}
    assert sorted(out["ids"]) == sorted(distinct) and out["ids"] != sorted(distinct)
    assert out["sha256"] == out["ids"]
    assert out["prefetch"]["fetched"] == len(distinct)
    assert proxy.get_count("GET", "images/") == len(distinct)


def test_fetch_loader_without_prefetch_fetches_in_the_workers(uploaded_tree: SampleSet, proxy: LabProxy) -> None:
    proc = example("fetch_loader.py", "--workers", "3")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["prefetch"] is None and out["sha256"] == out["ids"]
    assert proxy.get_count("GET", "images/") == len({f.sha256 for f in uploaded_tree.images})


@needs_torch
def test_fetch_loader_with_torch_dataloader(uploaded_tree: SampleSet) -> None:
    proc = example("fetch_loader.py", "--loader", "torch", "--workers", "2", "--seed", "1")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert sorted(out["ids"]) == sorted({f.sha256 for f in uploaded_tree.images})


def test_demo_s3_serves_an_empty_bucket_and_writes_its_settings(tmp_path: Path) -> None:
    """The README's local S3: ready when demo.env appears; upload and fetch with those settings; the
    settings file is gone when it stops."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(EXAMPLES / "demo_s3.py"), "--port", str(port), "--images", "20",
                             "--dir", str(tmp_path / "demo")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=_env(), cwd=str(tmp_path))
    env_file = tmp_path / "demo" / "demo.env"
    try:
        deadline = time.monotonic() + 60
        while not env_file.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.stdout else ""
            time.sleep(0.2)
        settings = dict(line.split("=", 1) for line in env_file.read_text().splitlines())
        assert settings["S3_ENDPOINT_URL"] == f"http://127.0.0.1:{port}" and settings["S3_BUCKET"] == "demo-images"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("S3_", "DATASET_", "AWS_"))}
        env.update(settings, DATASET_CACHE_DIR=str(tmp_path / "cache"), AWS_CONFIG_FILE="/nonexistent",
                   AWS_SHARED_CREDENTIALS_FILE="/nonexistent")
        images = tmp_path / "demo" / "images"
        up = subprocess.run([sys.executable, "-m", "s3fsimg", "upload", str(images), "--logical-map",
                             str(tmp_path / "demo" / "images.map.csv")], capture_output=True, text=True, env=env,
                            timeout=120)
        assert up.returncode == 0, up.stderr
        assert up.stdout.startswith("uploaded ")
        fetched = subprocess.run([sys.executable, "-m", "s3fsimg", "fetch", "DAO-00001"], capture_output=True,
                                 text=True, env=env, timeout=120)
        assert fetched.returncode == 0, fetched.stderr
        with Image.open(fetched.stdout.strip()) as im:
            im.load()
        path = fetched.stdout.strip()
        assert sha256_file(path) == Path(path).name.split(".")[0]  # the cache file is the object it names
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if proc.stdout:
                proc.stdout.close()
    assert proc.returncode == 0
    assert not env_file.exists()
