"""Shared pytest fixtures: the S3 lab (moto + fault proxy), buckets, product environment, sample images.

Fixtures (scope → what they yield):

* ``moto_server`` (session) → :class:`s3fsimg_lab.moto.MotoServer`, running; ``.url``.
* ``moto_client`` (session) → boto3 S3 client straight to moto (setup/inspection that the proxy must not count).
* ``lab_proxy`` (session) → :class:`s3fsimg_lab.proxy.LabProxy` in front of moto.
* ``proxy`` (function) → the session proxy with faults cleared and counters reset; faults cleared again after.
* ``proxy_client`` (function) → boto3 S3 client through the proxy (botocore default retries).
* ``bucket`` (function) → name of a fresh, uniquely named bucket created directly on moto.
* ``make_bucket_public`` (function) → ``callable(bucket_name)`` giving a bucket a public-read policy.
* ``public_bucket`` (function) → like ``bucket``, with the public-read policy already set.
* ``s3_env`` (function) → dict of the product's env vars (S3_BUCKET, S3_ENDPOINT_URL=proxy URL,
  S3_ADDRESSING_STYLE=path, fake AWS keys, AWS_REGION, DATASET_CACHE_DIR, no real AWS config), also set in
  ``os.environ`` via monkeypatch.
* ``sample_set`` (session) → :class:`s3fsimg_lab.images.SampleSet` of 120 small images (read-only, shared).
* ``sample_dir`` (function) → a private copy of ``sample_set`` under ``tmp_path`` (a SampleSet; it is also
  ``os.PathLike`` and supports ``/``, so ``Path(sample_dir)`` and ``str(sample_dir)`` give its root).
* ``large_set`` (session) → SampleSet of 4 large (1–3 MB) noise PNGs under ``large/`` (read-only).

Unexpected logs fail tests: the plugin :mod:`tests.checklogs` (loaded below) fails a test in whose setup, call
or teardown a logger under ``s3fsimg`` or ``s3fsimg_lab`` emits a WARNING or worse in this process (from any
thread; child processes such as mounts and cache workers are not watched). A test that provokes one on
purpose declares it with ``with tests.checklogs.expect_logs(pattern, level=logging.WARNING, count=None):``
(``pattern`` is a regex searched in the message; ``count=N`` demands exactly N). See that module's docstring.

The developer's real AWS configuration never reaches a test: for the whole session ``AWS_CONFIG_FILE`` and
``AWS_SHARED_CREDENTIALS_FILE`` point at nonexistent files, profiles/tokens are removed and fake keys are set.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from s3fsimg_lab.images import SampleSet, make_dataset
from s3fsimg_lab.moto import MotoServer, lab_env, make_public, s3_client
from s3fsimg_lab.proxy import LabProxy
from tests.mountutil import scratch_mountpoint

pytest_plugins = ["tests.checklogs"]

# Applied at import, before any test module or fixture creates a boto3 session.
_SAVED_ENV = dict(os.environ)
_LAB_ENV = lab_env(_SAVED_ENV)
_TOUCHED = {k for k in set(_SAVED_ENV) | set(_LAB_ENV) if _SAVED_ENV.get(k) != _LAB_ENV.get(k)}
for _k in _TOUCHED:
    if _k in _LAB_ENV:
        os.environ[_k] = _LAB_ENV[_k]
    else:
        os.environ.pop(_k, None)


@pytest.fixture(scope="session", autouse=True)
def _no_real_aws() -> Iterator[None]:
    """Keep the lab environment for the session; put back what it changed afterwards."""
    try:
        yield
    finally:
        for k in _TOUCHED:
            if k in _SAVED_ENV:
                os.environ[k] = _SAVED_ENV[k]
            else:
                os.environ.pop(k, None)


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    server = MotoServer()
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def moto_client(moto_server: MotoServer) -> Any:
    return s3_client(moto_server.url)


@pytest.fixture(scope="session")
def lab_proxy(moto_server: MotoServer) -> Iterator[LabProxy]:
    lp = LabProxy(moto_server.url)
    try:
        lp.start()
        yield lp
    finally:
        lp.close()


@pytest.fixture
def proxy(lab_proxy: LabProxy) -> Iterator[LabProxy]:
    lab_proxy.clear_faults()
    lab_proxy.reset()
    try:
        yield lab_proxy
    finally:
        lab_proxy.clear_faults()


@pytest.fixture
def proxy_client(proxy: LabProxy) -> Any:
    return s3_client(proxy.url)


def _empty_and_delete(client: Any, name: str) -> None:
    try:
        paginator = client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=name):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                client.delete_objects(Bucket=name, Delete={"Objects": keys, "Quiet": True})
        client.delete_bucket(Bucket=name)
    except Exception:  # best effort: moto may already be gone
        pass


@pytest.fixture
def bucket(moto_client: Any) -> Iterator[str]:
    name = f"lab-{uuid.uuid4().hex[:12]}"
    moto_client.create_bucket(Bucket=name)
    try:
        yield name
    finally:
        _empty_and_delete(moto_client, name)


@pytest.fixture
def make_bucket_public(moto_client: Any) -> Callable[[str], None]:
    def apply(name: str) -> None:
        make_public(moto_client, name)

    return apply


@pytest.fixture
def public_bucket(bucket: str, make_bucket_public: Callable[[str], None]) -> str:
    make_bucket_public(bucket)
    return bucket


@pytest.fixture
def s3_env(bucket: str, proxy: LabProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    cache = tmp_path / "cache"
    env = {
        "S3_BUCKET": bucket,
        "S3_ENDPOINT_URL": proxy.url,
        "S3_ADDRESSING_STYLE": "path",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing-secret-do-not-print",
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": "/nonexistent/s3fsimg-lab/config",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/s3fsimg-lab/credentials",
        "AWS_EC2_METADATA_DISABLED": "true",
        "DATASET_CACHE_DIR": str(cache),
    }
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "S3_ANONYMOUS", "DATASET_PREFIX"):
        monkeypatch.delenv(name, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env


@pytest.fixture(scope="session")
def sample_set(tmp_path_factory: pytest.TempPathFactory) -> SampleSet:
    return make_dataset(tmp_path_factory.mktemp("samples") / "dataset", n=120, seed=7)


@pytest.fixture
def sample_dir(sample_set: SampleSet, tmp_path: Path) -> SampleSet:
    return sample_set.copy_to(tmp_path / "dataset")


@pytest.fixture(scope="session")
def large_set(tmp_path_factory: pytest.TempPathFactory) -> SampleSet:
    return make_dataset(
        tmp_path_factory.mktemp("large") / "dataset",
        n=0,
        seed=11,
        large=4,
        large_bytes=(1_000_000, 3_000_000),
        decoys=False,
        map_fraction=0,
    )


@pytest.fixture
def mnt_dir() -> Iterator[Path]:
    """A mountpoint other users can reach, cleaned up (lazy unmount) whatever the test did."""
    with scratch_mountpoint() as mp:
        yield mp
