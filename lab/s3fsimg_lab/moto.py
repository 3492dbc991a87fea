"""moto's S3 server as a separate process, plus the boto3 helpers the lab and tests share.

Owns: :class:`MotoServer` (start on a free loopback port, wait until it answers, stop for sure),
:func:`lab_env` (an environment with fake credentials and no path to a developer's real AWS profile),
:func:`s3_client` (a boto3 S3 client for a lab endpoint) and :func:`make_public` (public-read policy,
so moto answers anonymous requests).
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from s3fsimg_lab.procs import kill_process, stop_process

LOOPBACK = "127.0.0.1"
ACCESS_KEY = "testing"
SECRET_KEY = "testing-secret-do-not-print"
REGION = "us-east-1"

# Variables of the real machine that must never reach the lab (profiles, real credentials, endpoints).
_AWS_LEAKY = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_CA_BUNDLE",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
)

_NOWHERE = "/nonexistent/s3fsimg-lab"


def lab_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Return ``base`` (default ``os.environ``) with fake AWS credentials and no real AWS config.

    ``AWS_CONFIG_FILE`` and ``AWS_SHARED_CREDENTIALS_FILE`` point at nonexistent files, instance metadata
    lookups are disabled, and every profile/token/endpoint variable of the real machine is removed.
    """
    env = dict(os.environ if base is None else base)
    for name in _AWS_LEAKY:
        env.pop(name, None)
    env.update(
        {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": REGION,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_CONFIG_FILE": f"{_NOWHERE}/config",
            "AWS_SHARED_CREDENTIALS_FILE": f"{_NOWHERE}/credentials",
            "AWS_EC2_METADATA_DISABLED": "true",
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        }
    )
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        env.pop(name, None)
    return env


def free_port() -> int:
    """A loopback TCP port that was free a moment ago (callers retry if it was taken meanwhile)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> Callable[[], None] | None:
    """On Linux, when called from the main thread: a preexec_fn that makes the child get SIGTERM when
    this process dies (so a killed pytest leaves no moto behind). PDEATHSIG follows the *thread* that
    forked, hence main thread only."""
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    prctl = libc.prctl

    def preexec() -> None:
        prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG

    return preexec


class MotoServer:
    """moto's server in its own process on ``127.0.0.1:<free port>``.

    >>> with MotoServer() as moto:
    ...     client = s3_client(moto.url)
    """

    def __init__(self, port: int | None = None, start_timeout: float = 30.0) -> None:
        self._want_port = port
        self.start_timeout = start_timeout
        self.port: int = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._logdir = tempfile.TemporaryDirectory(prefix="moto-lab-")
        self.log_path = Path(self._logdir.name) / "moto.log"

    @property
    def url(self) -> str:
        """Endpoint URL, e.g. ``http://127.0.0.1:40123``."""
        return f"http://{LOOPBACK}:{self.port}"

    def start(self) -> MotoServer:
        """Start the process and wait until it answers; raise RuntimeError (with its log) if it cannot."""
        attempts = 1 if self._want_port else 3
        last = ""
        for _ in range(attempts):
            self.port = self._want_port or free_port()
            try:
                self._spawn_and_wait()
                return self
            except RuntimeError as exc:
                last = str(exc)
                self.stop()
        raise RuntimeError(last)

    def _spawn_and_wait(self) -> None:
        env = lab_env()
        env["MOTO_PORT"] = str(self.port)
        env["PYTHONUNBUFFERED"] = "1"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", LOOPBACK, "-p", str(self.port)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                preexec_fn=_die_with_parent(),
            )
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"moto server exited with {self.proc.returncode} on port {self.port}:\n{self.log_tail()}"
                )
            if self.ping():
                return
            time.sleep(0.05)
        raise RuntimeError(f"moto server did not answer within {self.start_timeout}s:\n{self.log_tail()}")

    def ping(self, timeout: float = 1.0) -> bool:
        """True when the server answers HTTP (any status) on its port."""
        try:
            with urllib.request.urlopen(f"{self.url}/moto-api/data.json", timeout=timeout) as resp:
                resp.read()
            return True
        except urllib.error.HTTPError:
            return True
        except OSError:
            return False

    def log_tail(self, n: int = 4000) -> str:
        """The last ``n`` characters of the server's log."""
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def reset(self) -> None:
        """Forget every bucket and object (moto's reset API)."""
        req = urllib.request.Request(f"{self.url}/moto-api/reset", method="POST")
        with urllib.request.urlopen(req, timeout=10) as resp:
            resp.read()

    def stop(self, timeout: float = 5.0) -> None:
        """Terminate the process, kill it if it does not exit within ``timeout``; idempotent."""
        proc, self.proc = self.proc, None
        stop_process(proc, timeout)

    def close(self) -> None:
        """Stop the server and remove its log directory."""
        self.stop()
        self._logdir.cleanup()

    def __enter__(self) -> MotoServer:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def __del__(self) -> None:
        kill_process(getattr(self, "proc", None))


def s3_client(
    endpoint_url: str,
    *,
    retries: int | None = None,
    connect_timeout: float = 5.0,
    read_timeout: float = 30.0,
    anonymous: bool = False,
    max_pool_connections: int = 10,
    **config: Any,
) -> Any:
    """A boto3 S3 client for a lab endpoint: path-style addressing, fake credentials, us-east-1.

    ``retries`` is the total number of attempts (``1`` = no retries; ``None`` = botocore's default).
    Extra keyword arguments go to ``botocore.config.Config``.
    """
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config

    cfg: dict[str, Any] = {
        "s3": {"addressing_style": "path"},
        "connect_timeout": connect_timeout,
        "read_timeout": read_timeout,
        "max_pool_connections": max_pool_connections,
    }
    if retries is not None:
        cfg["retries"] = {"total_max_attempts": retries, "mode": "standard"}
    if anonymous:
        cfg["signature_version"] = UNSIGNED
    cfg.update(config)
    session = boto3.session.Session(aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY, region_name=REGION)
    return session.client("s3", endpoint_url=endpoint_url, config=Config(**cfg))


def make_public(client: Any, bucket: str) -> None:
    """Give ``bucket`` a public-read policy (GetObject, ListBucket) so unsigned requests succeed."""
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "PublicRead",
                "Effect": "Allow",
                "Principal": "*",
                "Action": ["s3:GetObject", "s3:GetObjectVersion"],
                "Resource": [f"arn:aws:s3:::{bucket}/*"],
            },
            {
                "Sid": "PublicList",
                "Effect": "Allow",
                "Principal": "*",
                "Action": ["s3:ListBucket", "s3:GetBucketLocation"],
                "Resource": [f"arn:aws:s3:::{bucket}"],
            },
        ],
    }
    client.put_bucket_policy(Bucket=bucket, Policy=json.dumps(policy))
