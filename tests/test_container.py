"""The container image, built and run: fetch in a container, a mount inside a privileged container, a host
mount shared into a container and read by another user, and both compose patterns.

The engine: Docker (Debian's docker.io). When none answers and this is root with `dockerd` installed, the
session starts one (`dockerd`, stopped by its PID at the end); otherwise every test here skips with the
reason. The base image: `S3FSIMG_TEST_BASE` when set (e.g. python:3.11-slim-bookworm where a registry is
reachable), else scripts/docker-base.sh makes one with debootstrap (cached under /var/cache, so a second
run only checks it). Containers reach the lab's S3 (on 127.0.0.1) with `--network host`.

Heavy: the first run builds the base (~40 s) and the image (~60 s); later runs reuse both.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from s3fsimg_lab.proxy import LabProxy
from tests.deployutil import ROOT, Uploaded, uploaded
from tests.mountutil import MountProcess, fuse_available, is_mounted

pytestmark = pytest.mark.timeout(900)
IMAGE = "s3fsimg:test"
LAB_ENV = ("S3_BUCKET", "S3_ENDPOINT_URL", "S3_ADDRESSING_STYLE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
           "AWS_REGION", "AWS_EC2_METADATA_DISABLED")
#: A program run in the container: every image under a directory decoded by Pillow, with its sha256.
READ_IMAGES = """
import hashlib, os, pathlib, sys
from PIL import Image
top = pathlib.Path(sys.argv[1])
for p in sorted(top.rglob("*")):
    if p.is_file():
        with Image.open(p) as im:
            im.load()
            size = im.size
        print(p.relative_to(top), hashlib.sha256(p.read_bytes()).hexdigest(), f"{size[0]}x{size[1]}", os.getuid())
"""


def _docker_cli() -> str | None:
    """The client beside dockerd when there is one (same release as the engine), else the first on PATH."""
    dockerd = shutil.which("dockerd")
    if dockerd:
        beside = Path(dockerd).resolve().parent.parent / "bin" / "docker"
        if beside.exists():
            return str(beside)
    return shutil.which("docker")


@dataclass
class Engine:
    cli: str
    started_pid: int | None  # the dockerd this session started, if it did

    def run(self, *args: str, timeout: float = 300, check: bool = True, input: str | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([self.cli, *args], capture_output=True, text=True, timeout=timeout, input=input,
                              env=env)
        if check and proc.returncode != 0:
            pytest.fail(f"docker {' '.join(args[:3])}... exited {proc.returncode}:\n{proc.stderr[-3000:]}")
        return proc


def _answers(cli: str) -> bool:
    try:
        return subprocess.run([cli, "info", "--format", "{{.ServerVersion}}"], capture_output=True,
                              timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _running_dockerd() -> int | None:
    """The PID of a running dockerd process, if any (whoever started it)."""
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if (d / "comm").read_text().strip() == "dockerd" and state != "Z":
                    return int(d.name)
            except (OSError, IndexError):
                continue
    return None


@pytest.fixture(scope="session")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    cli = _docker_cli()
    if cli is None:
        pytest.skip("no docker client (apt-get install docker.io)")
    if _answers(cli):
        yield Engine(cli, None)
        return
    dockerd = shutil.which("dockerd")
    if dockerd is None or os.geteuid() != 0:
        pytest.skip(f"no Docker engine answers, and none can be started here (dockerd: {dockerd}, uid {os.geteuid()})")
    if running := _running_dockerd():
        # A second dockerd would take over the first one's sockets (/var/run/docker.sock, containerd's)
        pytest.skip(f"a dockerd is running (pid {running}) but does not answer; not starting a second one")
    logdir = tmp_path_factory.mktemp("dockerd")
    log = open(logdir / "dockerd.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([dockerd, "--storage-driver=overlay2", "--pidfile", str(logdir / "dockerd.pid")],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not _answers(cli):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = (logdir / "dockerd.log").read_text(errors="replace")[-1500:]
                pytest.skip(f"dockerd could not start (exit {proc.poll()}):\n{tail}")
            time.sleep(0.5)
        yield Engine(cli, proc.pid)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


@pytest.fixture(scope="session")
def image(engine: Engine) -> str:
    """The image built from this checkout (BASE: S3FSIMG_TEST_BASE, or the debootstrapped local base)."""
    base = os.environ.get("S3FSIMG_TEST_BASE")
    if not base:
        if shutil.which("debootstrap") is None:
            pytest.skip("no base image: set S3FSIMG_TEST_BASE, or install debootstrap (apt-get install debootstrap)")
        path = f"{Path(engine.cli).parent}:{os.environ['PATH']}"  # the script's `docker` is the engine's client
        proc = subprocess.run(["bash", str(ROOT / "scripts" / "docker-base.sh")], capture_output=True, text=True,
                              timeout=600, env={**os.environ, "PATH": path})
        if proc.returncode != 0:
            pytest.fail(f"scripts/docker-base.sh failed:\n{proc.stderr[-3000:]}")
        base = proc.stdout.strip()
    engine.run("build", "--network", "host", "--build-arg", f"BASE={base}", "-t", IMAGE, str(ROOT), timeout=900)
    return IMAGE


@pytest.fixture
def lab(s3_env: dict[str, str], sample_set: object, large_set: object, tmp_path: Path, proxy: LabProxy) -> Uploaded:
    """12 small images and one large one in the lab bucket; counters reset."""
    ds = uploaded(tmp_path / "ws", s3_env, sample_set.images[:12], large_set.large[:1])  # type: ignore[attr-defined]
    proxy.reset()
    return ds


def _lab_args(s3_env: dict[str, str]) -> list[str]:
    args = []
    for k in LAB_ENV:
        if k in s3_env:
            args += ["-e", f"{k}={s3_env[k]}"]
    return args


def _parse_read(stdout: str) -> dict[str, tuple[str, str]]:
    """READ_IMAGES' lines -> {relative path: (sha256, uid)}."""
    out = {}
    for line in stdout.splitlines():
        rel, sha, _size, uid = line.rsplit(" ", 3)
        out[rel] = (sha, uid)
    return out


@contextlib.contextmanager
def container(engine: Engine, *args: str) -> Iterator[str]:
    """`docker run -d ARGS`; the container is removed (forcibly) afterwards."""
    name = f"s3fsimg-test-{uuid.uuid4().hex[:10]}"
    engine.run("run", "-d", "--name", name, *args)
    try:
        yield name
    finally:
        engine.run("rm", "-f", "-v", name, check=False)


def _wait_for(engine: Engine, name: str, *probe: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while engine.run("exec", name, *probe, check=False).returncode != 0:
        state = engine.run("inspect", "-f", "{{.State.Status}}", name, check=False).stdout.strip()
        if state != "running" or time.monotonic() > deadline:
            logs = engine.run("logs", name, check=False)
            pytest.fail(f"container {name} ({state}): {' '.join(probe)} never succeeded:\n{logs.stdout}{logs.stderr}")
        time.sleep(0.3)


# -- the image ----------------------------------------------------------------------------------------


def test_image_runs_s3fsimg_as_an_unprivileged_user(engine: Engine, image: str) -> None:
    assert engine.run("run", "--rm", image, "--version").stdout.strip() == "s3fsimg, version 0.1.0"
    config = json.loads(engine.run("image", "inspect", image).stdout)[0]
    assert config["Config"]["Entrypoint"] == ["s3fsimg"]
    assert config["Config"]["User"] == "s3fsimg"
    assert engine.run("run", "--rm", "--entrypoint", "id", image, "-u").stdout.strip() == "1000"
    probe = engine.run("run", "--rm", "--entrypoint", "sh", image, "-c",
                       "command -v s3fsimg; command -v fusermount3; command -v gcc || echo no-compiler; "
                       "stat -c '%U %a' /mnt/images /var/cache/s3fsimg; grep -c '^user_allow_other' /etc/fuse.conf; "
                       "python -c 'import pyfuse3, PIL; print(\"imports ok\")'").stdout.split("\n")
    assert probe[:2] == ["/opt/s3fsimg/bin/s3fsimg", "/usr/bin/fusermount3"]
    assert "no-compiler" in probe and "imports ok" in probe
    assert "s3fsimg 755" in probe and probe.count("s3fsimg 755") == 2
    size_mb = config["Size"] / 1e6
    assert size_mb < 300, f"the image is {size_mb:.0f} MB"


def test_fetch_in_a_container_with_a_cache_volume(engine: Engine, image: str, lab: Uploaded,
                                                  s3_env: dict[str, str], proxy: LabProxy) -> None:
    volume = f"s3fsimg-test-cache-{uuid.uuid4().hex[:8]}"
    ids = sorted(lab.entries)[:5]
    run = ["run", "--rm", "--network", "host", *_lab_args(s3_env), "-v", f"{volume}:/var/cache/s3fsimg", image]
    try:
        first = engine.run(*run, "fetch", *ids)
        paths = first.stdout.split()
        assert len(paths) == 5 and all(p.startswith("/var/cache/s3fsimg/") for p in paths), first.stdout
        assert proxy.get_count("GET", "images/") == 5
        # the files in the volume are those objects
        sums = engine.run("run", "--rm", "-v", f"{volume}:/var/cache/s3fsimg", "--entrypoint", "sha256sum", image,
                          *paths).stdout.split("\n")
        assert [line.split()[0] for line in sums if line] == ids
        # a new container with the same volume: served from the cache
        proxy.reset()
        second = engine.run(*run, "fetch", *ids)
        assert second.stdout.split() == paths
        assert proxy.get_count("GET", "images/") == 0
    finally:
        engine.run("volume", "rm", "-f", volume, check=False)


@pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse on this host")
def test_mount_inside_a_privileged_container(engine: Engine, image: str, lab: Uploaded,
                                             s3_env: dict[str, str]) -> None:
    """--device /dev/fuse --cap-add SYS_ADMIN (and apparmor=unconfined, which hosts with AppArmor need:
    docker-default denies mount(2)); images read with Pillow in the container; `docker stop` unmounts."""
    with container(engine, "--init", "--network", "host", "--user", "root", "--device", "/dev/fuse",
                   "--cap-add", "SYS_ADMIN", "--security-opt", "apparmor=unconfined", *_lab_args(s3_env),
                   image, "mount", "--foreground", "/mnt/images") as name:
        _wait_for(engine, name, "mountpoint", "-q", "/mnt/images")
        read = engine.run("exec", name, "python", "-c", READ_IMAGES, "/mnt/images/by-path")
        got = _parse_read(read.stdout)
        assert {rel: sha for rel, (sha, _) in got.items()} == lab.source_sha()
        engine.run("stop", "-t", "20", name)
        state = json.loads(engine.run("inspect", name).stdout)[0]["State"]
        assert state["ExitCode"] == 0, engine.run("logs", name, check=False).stderr
        logs = engine.run("logs", name, check=False)
        assert "Traceback" not in logs.stdout + logs.stderr


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory on a shared mount (bind-mounted on itself, made shared), as rslave needs; a host with
    systemd has / shared already. Everything under it is unmounted afterwards."""
    top = Path(tempfile.mkdtemp(prefix="s3fsimg-shared-"))
    os.chmod(top, 0o755)
    subprocess.run(["mount", "--bind", str(top), str(top)], check=True)
    subprocess.run(["mount", "--make-shared", str(top)], check=True)
    try:
        yield top
    finally:
        for mp in (top / "mnt", top):
            if is_mounted(mp):
                subprocess.run(["umount", "-l", str(mp)], check=False, capture_output=True)
        shutil.rmtree(top, ignore_errors=True)


@pytest.mark.skipif(fuse_available() is not None or os.geteuid() != 0,
                    reason=f"needs root and FUSE on the host ({fuse_available()})")
def test_host_mount_shared_into_a_container_read_by_another_user(
        engine: Engine, image: str, lab: Uploaded, shared_dir: Path) -> None:
    """The container starts first (unprivileged, no network, uid 1000); the host then mounts with
    --allow-other; the mount appears in the container through `-v MP:/data:ro,rslave` and is read there;
    the host's unmount disappears from it too."""
    mp = shared_dir / "mnt"
    mp.mkdir()
    os.chmod(mp, 0o755)
    with container(engine, "--network", "none", "--user", "1000:1000", "-v", f"{mp}:/data:ro,rslave",
                   "--entrypoint", "sleep", image, "600") as name:
        m = MountProcess(mp, env=dict(os.environ), args=["--allow-other"]).start()
        try:
            _wait_for(engine, name, "test", "-d", "/data/by-path")
            read = engine.run("exec", name, "python", "-c", READ_IMAGES, "/data/by-path")
            got = _parse_read(read.stdout)
            assert {rel: sha for rel, (sha, _) in got.items()} == lab.source_sha()
            assert {uid for _, uid in got.values()} == {"1000"}
            denied = engine.run("exec", name, "sh", "-c", "touch /data/x", check=False)
            assert denied.returncode != 0 and "Read-only file system" in denied.stderr
        finally:
            m.stop()
        assert not is_mounted(mp)
        gone = engine.run("exec", name, "sh", "-c", "ls /data", check=False)
        assert gone.returncode == 0 and gone.stdout.strip() == ""


# -- compose ------------------------------------------------------------------------------------------


def _compose(engine: Engine) -> list[str] | None:
    """`docker compose` (v2 plugin) or `docker-compose` (v1), whichever works here."""
    if subprocess.run([engine.cli, "compose", "version"], capture_output=True).returncode == 0:
        return [engine.cli, "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


@pytest.mark.skipif(fuse_available() is not None or os.geteuid() != 0,
                    reason=f"needs root and FUSE on the host ({fuse_available()})")
def test_compose_patterns(engine: Engine, image: str, lab: Uploaded, s3_env: dict[str, str], tmp_path: Path,
                          shared_dir: Path) -> None:
    """compose.yaml's two patterns with the README's commands: the in-container mount read with
    examples/read_tree.py through `exec`, and the host mount read by `run --rm reader`."""
    compose = _compose(engine)
    if compose is None:
        pytest.skip("neither `docker compose` nor docker-compose is installed (apt-get install docker-compose)")
    env_file = tmp_path / "lab.env"
    env_file.write_text("".join(f"{k}={s3_env[k]}\n" for k in LAB_ENV if k in s3_env))
    project = f"s3fsimgtest{uuid.uuid4().hex[:8]}"
    mp = shared_dir / "mnt"
    mp.mkdir()
    os.chmod(mp, 0o755)
    env = {**os.environ, "S3FSIMG_IMAGE": image, "S3FSIMG_ENV_FILE": str(env_file), "S3FSIMG_HOST_MOUNT": str(mp),
           "PATH": f"{Path(engine.cli).parent}:{os.environ['PATH']}"}
    base = [*compose, "-p", project, "-f", str(ROOT / "compose.yaml")]

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([*base, *args], capture_output=True, text=True, env=env, timeout=300, cwd=str(ROOT))
        if check and proc.returncode != 0:
            pytest.fail(f"{' '.join(args)}: exit {proc.returncode}\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}")
        return proc

    assert run("config", "-q").returncode == 0
    n = len(lab.source_sha())
    try:
        run("--profile", "in-container", "up", "-d", "--no-build", "mount")
        deadline = time.monotonic() + 60
        while run("--profile", "in-container", "exec", "-T", "mount", "mountpoint", "-q", "/mnt/images",
                  check=False).returncode != 0:
            assert time.monotonic() < deadline, run("--profile", "in-container", "logs", check=False).stdout
            time.sleep(0.5)
        read = run("--profile", "in-container", "exec", "-T", "mount", "python", "/examples/read_tree.py",
                   "/mnt/images/by-path")
        assert read.stdout.startswith(f"read {n} images"), read.stdout
        assert f"{n} checked against their sha256" in read.stdout
    finally:
        run("--profile", "in-container", "down", "-v", "-t", "20", check=False)

    m = MountProcess(mp, env=dict(os.environ), args=["--allow-other"]).start()
    try:
        read = run("--profile", "host-mount", "run", "--rm", "-T", "reader")
        assert read.stdout.strip().splitlines()[-1].startswith(f"read {n} images"), read.stdout
    finally:
        m.stop()
        run("--profile", "host-mount", "down", "-v", check=False)
