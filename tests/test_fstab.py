"""Host integration: the FUSE mount helper form (`mount -t fuse.s3fsimg`, /etc/fstab lines), the systemd
units in deploy/, and a mount inside its own mount namespace (as a container runtime makes one).

The mount tests run the real chain: mount(8) -> mount.fuse3 -> /bin/sh -> `s3fsimg BUCKET MP -o ...`.
mount(8) starts helpers without PATH, so `s3fsimg` must be on the shell's default PATH: the
`program_on_default_path` fixture links this checkout's program into /usr/local/bin for the test
(and removes the link), or skips when another `s3fsimg` is there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from s3fsimg.errors import ConfigError, UsageError
from s3fsimg.fstab import HelperCall, is_helper_call, translate
from s3fsimg_lab.images import SampleSet
from s3fsimg_lab.proxy import LabProxy
from tests.deployutil import (
    ROOT,
    VENV_BIN,
    Uploaded,
    clean_env,
    mount_daemons,
    sha256_file,
    shared_mnt_dir,
    uploaded,
    wait_gone,
)
from tests.mountutil import fuse_available, is_mounted

DEPLOY = ROOT / "deploy"
PROGRAM = VENV_BIN / "s3fsimg"
LINK = Path("/usr/local/bin/s3fsimg")


# -- the helper form, translated (no mount) ---------------------------------------------------------


def test_helper_form_is_told_from_commands() -> None:
    commands = ["mount", "fetch", "warm"]
    assert is_helper_call(["my-bucket", "/mnt/ds", "-o", "ro"], commands)
    assert is_helper_call(["my-bucket", "/mnt/ds"], commands)
    assert not is_helper_call(["mount", "/mnt/ds"], commands)
    assert not is_helper_call(["--version"], commands)
    assert not is_helper_call(["my-bucket"], commands)
    assert not is_helper_call(["my-bucket", "--help"], commands)


def test_options_become_variables_and_flags(tmp_path: Path) -> None:
    env_file = tmp_path / "ds.env"
    env_file.write_text("# credentials\nAWS_ACCESS_KEY_ID=abc\nexport DATASET_PREFIX=from-file\n"
                        "DATASET_CACHE_MAX_BYTES=1G\nDATASET_CACHE_DIR=relcache\n")
    # what mount.fuse3 passes for the contract's fstab line (it drops _netdev and nofail, adds dev,suid)
    call = translate(["my-bucket", "/mnt/ds", "-o",
                      f"ro,allow_other,cache_dir=/var/cache/s3fsimg,prefix=cats,env_file={env_file},"
                      "endpoint_url=http://127.0.0.1:9000,addressing_style=path,anonymous,x-systemd.automount,"
                      "_netdev,nofail,comment=ds,dev,suid"], cwd="/somewhere")
    assert call.mount_args == ["mount", "/mnt/ds", "--allow-other"]
    assert call.env == {
        "AWS_ACCESS_KEY_ID": "abc",
        "S3_BUCKET": "my-bucket",
        "DATASET_PREFIX": "cats",  # the option beats the env file
        "DATASET_CACHE_MAX_BYTES": "1G",
        "DATASET_CACHE_DIR": "/var/cache/s3fsimg",
        "S3_ENDPOINT_URL": "http://127.0.0.1:9000",
        "S3_ADDRESSING_STYLE": "path",
        "S3_ANONYMOUS": "1",
    }


def test_relative_paths_are_made_absolute(tmp_path: Path) -> None:
    (tmp_path / "ds.env").write_text("DATASET_CACHE_DIR=cache-from-file\n")
    call = translate(["b", "mnt", "-o", "env_file=ds.env,log_file=logs/m.log,nonempty", "-f"], cwd=str(tmp_path))
    assert call == HelperCall(
        mount_args=["mount", str(tmp_path / "mnt"), "--log-file", str(tmp_path / "logs/m.log"), "--allow-non-empty",
                    "--foreground"],
        env={"DATASET_CACHE_DIR": str(tmp_path / "cache-from-file"), "S3_BUCKET": "b"})


@pytest.mark.parametrize(("args", "error", "message"), [
    (["b", "/mnt", "-o", "cache-dir=/x"], ConfigError, "'cache-dir': unknown option"),
    (["b", "/mnt", "-o", "uid=1000"], ConfigError, "'uid': unknown option"),
    (["b", "/mnt", "-o", "cache_dir"], ConfigError, "-o cache_dir: needs a value"),
    (["b", "/mnt", "-o", "allow_other=1"], ConfigError, "-o allow_other: takes no value"),
    (["b", "/mnt", "-o", "env_file=/nonexistent/ds.env"], ConfigError, "no such file"),
    (["b", "/mnt", "-o", "bucket=other"], ConfigError, "names bucket 'b' but -o bucket= names 'other'"),
    (["b", "/mnt", "-x"], UsageError, "'-x': unknown flag"),
    (["b", "/mnt", "extra"], UsageError, "usage: s3fsimg BUCKET MOUNTPOINT"),
    (["b", "/mnt", "-o"], UsageError, "missing its options"),
])
def test_bad_options_are_refused(args: list[str], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        translate(args, cwd="/")


def test_bad_option_exits_2_with_one_line(tmp_path: Path) -> None:
    proc = subprocess.run([str(PROGRAM), "my-bucket", str(tmp_path), "-o", "ro,cache_dri=/x"],
                          capture_output=True, text=True, env=clean_env(), timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("s3fsimg: error: -o 'cache_dri': unknown option"), proc.stderr


# -- systemd units -----------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize(("unit", "as_name"), [("mnt-ds.mount", "mnt-ds.mount"),
                                               ("s3fsimg@.service", "s3fsimg@ds.service")])
def test_units_pass_systemd_analyze_verify(unit: str, as_name: str, tmp_path: Path) -> None:
    """`systemd-analyze verify` of each unit, the program path pointed at this checkout's program
    (verify checks that ExecStart's program exists). Any warning fails the test too."""
    text = (DEPLOY / unit).read_text()
    assert "/usr/local/bin/s3fsimg" in text or unit.endswith(".mount")
    (tmp_path / as_name).write_text(text.replace("/usr/local/bin/s3fsimg", str(PROGRAM)))
    proc = subprocess.run(["systemd-analyze", "verify", str(tmp_path / as_name)], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "SYSTEMD_LOG_LEVEL": "warning"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "", proc.stderr


def test_fstab_example_matches_the_unit() -> None:
    """The fstab example's line and the .mount unit say the same (bucket, mountpoint, type, options)."""
    lines = [ln.split() for ln in (DEPLOY / "fstab.example").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert len(lines) == 1
    what, where, fstype, options, *_ = lines[0]
    unit = dict(ln.split("=", 1) for ln in (DEPLOY / "mnt-ds.mount").read_text().splitlines() if "=" in ln
                and not ln.startswith("#"))
    assert (unit["What"], unit["Where"], unit["Type"]) == (what, where, fstype)
    assert set(unit["Options"].split(",")) == set(options.split(",")) - {"nofail"}
    call = translate([what, where, "-o", options.replace("env_file=/etc/s3fsimg/ds.env,", "")
                      .replace(",env_file=/etc/s3fsimg/ds.env", "")])
    assert call.env["DATASET_CACHE_DIR"] == "/var/cache/s3fsimg"


# -- real mounts through mount(8) ---------------------------------------------------------------------

needs_mount_helper = pytest.mark.skipif(
    fuse_available() is not None or os.geteuid() != 0 or shutil.which("mount.fuse3") is None,
    reason=f"needs root, mount.fuse3 and FUSE ({fuse_available() or 'FUSE ok'}; uid {os.geteuid()})")


@pytest.fixture
def program_on_default_path() -> Iterator[Path]:
    """This checkout's `s3fsimg` as /usr/local/bin/s3fsimg (mount(8) runs helpers without PATH)."""
    made = False
    if LINK.is_symlink() and not LINK.exists():  # left by a run whose checkout is gone
        LINK.unlink()
    if LINK.is_symlink() or LINK.exists():
        if LINK.resolve() != PROGRAM.resolve():
            pytest.skip(f"{LINK} is another s3fsimg ({LINK.resolve()}); the test will not replace it")
    else:
        LINK.symlink_to(PROGRAM)
        made = True
    try:
        yield LINK
    finally:
        if made:
            LINK.unlink(missing_ok=True)


@pytest.fixture
def lab_dataset(s3_env: dict[str, str], sample_set: SampleSet, tmp_path: Path) -> Uploaded:
    return uploaded(tmp_path / "ws", s3_env, sample_set.images[:12])


def _env_file(path: Path, s3_env: dict[str, str], *more: str) -> Path:
    """Credentials and the rest of the lab's settings, as an administrator would write them."""
    keep = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_CONFIG_FILE",
            "AWS_SHARED_CREDENTIALS_FILE", "AWS_EC2_METADATA_DISABLED", "S3_ADDRESSING_STYLE", *more)
    path.write_text("".join(f"{k}={s3_env[k]}\n" for k in keep))
    path.chmod(0o600)
    return path


def _check_read(mp: Path, ds: Uploaded) -> None:
    for source_path, sha in ds.source_sha().items():
        f = mp / "by-path" / source_path
        assert sha256_file(f) == sha, source_path
        with Image.open(f) as im:
            im.load()
    assert os.getxattr(next(iter(mp.glob("images/*/*/*"))), "user.s3fsimg.sha256").decode() in ds.entries


def _mount_type(mp: Path) -> str:
    target = os.path.abspath(mp)
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if left.split()[4] == target:
                return right.split()[0]
    return ""


@needs_mount_helper
@pytest.mark.timeout(120)
def test_mount_t_fuse_s3fsimg_reads_and_umount_unmounts(
        lab_dataset: Uploaded, s3_env: dict[str, str], program_on_default_path: Path, tmp_path: Path,
        proxy: LabProxy) -> None:
    env_file = _env_file(tmp_path / "ds.env", s3_env)
    cache = tmp_path / "cache"
    with shared_mnt_dir() as mp:
        options = (f"ro,_netdev,nofail,allow_other,cache_dir={cache},endpoint_url={s3_env['S3_ENDPOINT_URL']},"
                   f"env_file={env_file}")
        proc = subprocess.run(["mount", "-t", "fuse.s3fsimg", s3_env["S3_BUCKET"], str(mp), "-o", options],
                              capture_output=True, text=True, env=clean_env(), cwd="/", timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert is_mounted(mp) and _mount_type(mp) == "fuse.s3fsimg"
        _check_read(mp, lab_dataset)
        assert any(cache.rglob("*.png")) or any(cache.rglob("*.jpg")), "the cache_dir option was not used"
        assert proxy.get_count("GET", "images/") > 0
        proc = subprocess.run(["umount", str(mp)], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert not is_mounted(mp)
        assert wait_gone(mp) == [], "the mount's process is still running after umount"


@needs_mount_helper
@pytest.mark.timeout(120)
def test_fstab_line_mount_a_and_s3fsimg_umount(
        lab_dataset: Uploaded, s3_env: dict[str, str], program_on_default_path: Path, tmp_path: Path) -> None:
    """The contract's fstab line (in a private fstab file: `mount -T FILE`), `mount -a`, `s3fsimg umount`."""
    env_file = _env_file(tmp_path / "ds.env", s3_env, "S3_ENDPOINT_URL")
    with shared_mnt_dir() as mp:
        fstab = tmp_path / "fstab"
        fstab.write_text(f"# test\n{s3_env['S3_BUCKET']}  {mp}  fuse.s3fsimg  "
                         f"ro,_netdev,nofail,allow_other,cache_dir={tmp_path / 'cache'},env_file={env_file}  0 0\n")
        proc = subprocess.run(["mount", "-a", "-T", str(fstab)], capture_output=True, text=True, env=clean_env(),
                              cwd=str(tmp_path), timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert is_mounted(mp)
        _check_read(mp, lab_dataset)
        proc = subprocess.run([str(PROGRAM), "umount", str(mp)], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert not is_mounted(mp)
        assert wait_gone(mp) == []


@needs_mount_helper
@pytest.mark.timeout(60)
def test_helper_mount_with_a_bad_option_fails_and_leaves_nothing(
        s3_env: dict[str, str], program_on_default_path: Path, tmp_path: Path) -> None:
    with shared_mnt_dir() as mp:
        proc = subprocess.run(["mount", "-t", "fuse.s3fsimg", s3_env["S3_BUCKET"], str(mp), "-o", "ro,cache_size=1G"],
                              capture_output=True, text=True, env=clean_env(), timeout=60)
        assert proc.returncode != 0
        assert "-o 'cache_size': unknown option" in proc.stderr
        assert not is_mounted(mp)


@pytest.mark.skipif(fuse_available() is not None or os.geteuid() != 0 or shutil.which("unshare") is None,
                    reason=f"needs root, unshare and FUSE ({fuse_available()})")
@pytest.mark.timeout(120)
def test_mount_in_its_own_namespace_is_unseen_by_the_host(
        lab_dataset: Uploaded, s3_env: dict[str, str], tmp_path: Path) -> None:
    """`unshare -m` (a new mount namespace, private propagation, as a container runtime makes): the mount
    is read inside, the host sees neither the mount nor its files, and it ends with the namespace's umount."""
    ready, go, pidfile, out = (tmp_path / n for n in ("ready", "go", "pid", "out.txt"))
    with shared_mnt_dir() as mp:
        script = f"""
set -e
{PROGRAM} mount --foreground --log-file {tmp_path / 'mount.log'} {mp} & echo $! > {pidfile}
for i in $(seq 300); do mountpoint -q {mp} && break; sleep 0.1; done
mountpoint -q {mp}
touch {ready}
for i in $(seq 300); do [ -e {go} ] && break; sleep 0.1; done
{sys.executable} -c 'import hashlib, pathlib, sys
top = pathlib.Path(sys.argv[1])
for p in sorted(top.rglob("*")):
    if p.is_file(): print(p.relative_to(top), hashlib.sha256(p.read_bytes()).hexdigest())' {mp / 'by-path'} > {out}
{PROGRAM} umount {mp}
wait
"""
        proc = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                                env=os.environ.copy(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            while not ready.exists():
                assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
                assert time.monotonic() < deadline, "the namespaced mount did not come up"
                time.sleep(0.1)
            assert not is_mounted(mp), "the host sees the namespace's mount"
            assert os.listdir(mp) == []
            go.touch()
            assert proc.wait(timeout=60) == 0, proc.stdout.read().decode() if proc.stdout else ""
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if pidfile.exists():
                pid = int(pidfile.read_text())
                if pid in mount_daemons(mp):
                    os.kill(pid, 15)
            if proc.stdout:
                proc.stdout.close()
        got = dict(line.split(" ") for line in out.read_text().splitlines())
        assert got == lab_dataset.source_sha()
        assert not is_mounted(mp)
        assert wait_gone(mp) == []
