"""`S3Store.get_range` through `_DirectGet`: the client's first GET shows the way, later GETs skip the
client's per-call machinery. Against moto over HTTP through the lab proxy: the bytes, the requests the
proxy counts, and the errors (the same as the client's) must not change."""

from __future__ import annotations

import time
from typing import Any

import pytest

from s3fsimg.config import Config
from s3fsimg.errors import BackendError, NotFound
from s3fsimg.s3 import S3Store
from s3fsimg_lab.proxy import LabProxy

pytestmark = pytest.mark.timeout(60)

ODD_KEY = "odd prefix/ü+&=;~(1)/images/ab/cd/x.jpg"  # quoted on the wire: space, non-ASCII, reserved characters


def _store(env: dict[str, str], **kw: Any) -> S3Store:
    return S3Store(Config.load(), max_attempts=0, **kw)


def _get(store: S3Store, key: str, start: int, end: int) -> bytes:
    return store.get_range(key, start, end, deadline=time.monotonic() + 5).data


def test_after_the_first_get_the_direct_path_serves_the_same_bytes_with_one_request_each(
        s3_env: dict[str, str], proxy: LabProxy, proxy_client: Any, bucket: str) -> None:
    body = bytes(range(256)) * 4000
    proxy_client.put_object(Bucket=bucket, Key="a/first.jpg", Body=b"first")
    proxy_client.put_object(Bucket=bucket, Key=ODD_KEY, Body=body)
    store = _store(s3_env)
    assert store._direct.route is None
    assert _get(store, "a/first.jpg", 0, 5) == b"first"  # the client's GET
    assert store._direct.route is not None and store._direct.route.region == "us-east-1"
    proxy.reset()
    result = store.get_range(ODD_KEY, 1000, 600_000, deadline=time.monotonic() + 5)
    assert result.data == body[1000:600_000]
    assert result.total_size == len(body)
    assert result.etag == proxy_client.head_object(Bucket=bucket, Key=ODD_KEY)["ETag"]
    assert proxy.get_count("GET") == 1


def test_errors_on_the_direct_path_are_the_clients(s3_env: dict[str, str], proxy: LabProxy, proxy_client: Any,
                                                   bucket: str) -> None:
    proxy_client.put_object(Bucket=bucket, Key="k.jpg", Body=b"x" * 1000)
    store = _store(s3_env)
    _get(store, "k.jpg", 0, 10)
    assert store._direct.route is not None
    with pytest.raises(NotFound, match=rf"s3://{bucket}/missing.jpg: no such object"):
        _get(store, "missing.jpg", 0, 10)
    # A 503 is retried within the deadline; once it passes, one line says what S3 answered.
    proxy.reset()
    with proxy.fault("error_status", 503, count=2):
        assert _get(store, "k.jpg", 0, 10) == b"x" * 10
    assert proxy.get_count("GET") == 3
    with proxy.fault("error_status", 503), pytest.raises(BackendError, match=r"giving up after \d+ attempts"):
        store.get_range("k.jpg", 0, 10, deadline=time.monotonic() + 0.3)
    # A body cut short is retried too, and never returned.
    with proxy.fault("truncate", 100, count=1):
        assert _get(store, "k.jpg", 0, 1000) == b"x" * 1000
    assert store._direct.route is not None  # none of these made it forget the way


def test_a_403_goes_back_to_the_client(s3_env: dict[str, str], proxy: LabProxy, proxy_client: Any,
                                       bucket: str) -> None:
    """A 403 on the direct path may be a signature only it gets wrong: the client makes that GET, so the
    user sees the client's answer, and the direct path is learned again from it."""
    proxy_client.put_object(Bucket=bucket, Key="k.jpg", Body=b"y" * 100)
    store = _store(s3_env)
    _get(store, "k.jpg", 0, 10)
    assert store._direct.route is not None
    proxy.reset()
    with proxy.fault("error_status", 403, count=1):
        assert _get(store, "k.jpg", 0, 100) == b"y" * 100
    assert proxy.get_count("GET") == 2  # the direct GET refused, then the client's
    assert store._direct.route is not None
    with proxy.fault("error_status", 403), pytest.raises(BackendError, match="access denied"):
        _get(store, "k.jpg", 0, 100)


def test_anonymous_direct_gets_are_unsigned(s3_env: dict[str, str], proxy: LabProxy, proxy_client: Any,
                                            public_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    proxy_client.put_object(Bucket=public_bucket, Key="p.jpg", Body=b"public" * 100)
    monkeypatch.setenv("S3_ANONYMOUS", "1")
    store = _store(s3_env)
    _get(store, "p.jpg", 0, 6)
    assert store._direct.route is not None and store._direct.route.region is None
    proxy.reset()
    assert _get(store, "p.jpg", 6, 600) == (b"public" * 100)[6:600]
    assert proxy.get_count("GET") == 1


def test_a_direct_get_is_signed_exactly_as_the_client_signs_it(s3_env: dict[str, str], proxy_client: Any,
                                                                 bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """moto does not check signatures, so the proof is the Authorization header itself: with the clock
    held still, the direct GET's is the client's, byte for byte (a session token signed in too)."""
    import datetime

    import botocore.auth

    monkeypatch.setenv("AWS_SESSION_TOKEN", "a-session-token")
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda *a, **k: datetime.datetime(2026, 12, 3, 12))
    proxy_client.put_object(Bucket=bucket, Key="k.jpg", Body=b"k" * 10)
    proxy_client.put_object(Bucket=bucket, Key=ODD_KEY, Body=b"o" * 10)
    store = _store(s3_env)
    _get(store, "k.jpg", 0, 10)
    assert store._direct.route is not None
    sent: list[Any] = []
    store.client.meta.events.register("before-send.s3.GetObject", lambda request, **_: sent.append(request))
    store.client.get_object(Bucket=bucket, Key=ODD_KEY, Range="bytes=0-4")["Body"].read()
    session = store._direct.session
    direct_send = session.send

    def send(prepared: Any) -> Any:
        sent.append(prepared)
        return direct_send(prepared)

    monkeypatch.setattr(session, "send", send)
    assert _get(store, ODD_KEY, 0, 5) == b"o" * 5
    client_request, direct_request = sent
    assert direct_request.url == client_request.url
    for header in ("Authorization", "X-Amz-Security-Token", "X-Amz-Date", "Range", "X-Amz-Content-SHA256"):
        assert _bytes(direct_request.headers[header]) == _bytes(client_request.headers[header]), header


def _bytes(value: str | bytes) -> bytes:
    return value.encode() if isinstance(value, str) else value


@pytest.mark.parametrize("authorization", [
    # S3 Express One Zone: the session's credentials, service s3express, a signed session token
    "AWS4-HMAC-SHA256 Credential=AK/20261203/us-west-2/s3express/aws4_request, "
    "SignedHeaders=host;range;x-amz-content-sha256;x-amz-date;x-amz-s3session-token, Signature=ab",
    # plain s3, but signing a header this path does not send (SSE-C)
    "AWS4-HMAC-SHA256 Credential=AK/20261203/us-east-1/s3/aws4_request, "
    "SignedHeaders=host;range;x-amz-content-sha256;x-amz-date;"
    "x-amz-server-side-encryption-customer-key, Signature=ab",
    # SigV4A
    "AWS4-ECDSA-P256-SHA256 Credential=AK/20261203/s3/aws4_request, SignedHeaders=host;x-amz-date, Signature=ab",
])
def test_nothing_is_learned_from_a_get_signed_otherwise(s3_env: dict[str, str], authorization: str) -> None:
    store = _store(s3_env)
    store._direct._seen.sent = (f"{s3_env['S3_ENDPOINT_URL']}/b/k.jpg", authorization, "agent")
    store._direct.learn("k.jpg")
    assert store._direct.route is None
    store._direct._seen.sent = (f"{s3_env['S3_ENDPOINT_URL']}/b/k.jpg", authorization.replace(
        "s3express", "s3").replace(";x-amz-s3session-token", "").replace(
        ";x-amz-server-side-encryption-customer-key", ""), "agent")
    store._direct.learn("k.jpg")
    assert (store._direct.route is not None) == authorization.startswith("AWS4-HMAC-SHA256")


def test_a_server_that_keeps_refusing_the_direct_path_gets_every_get_from_the_client(
        s3_env: dict[str, str], proxy: LabProxy, proxy_client: Any, bucket: str) -> None:
    proxy_client.put_object(Bucket=bucket, Key="k.jpg", Body=b"r" * 10)
    store = _store(s3_env)
    _get(store, "k.jpg", 0, 10)
    for _ in range(3):
        assert store._direct.route is not None
        with proxy.fault("error_status", 403, count=1):
            assert _get(store, "k.jpg", 0, 10) == b"r" * 10  # refused, then the client's
    assert store._direct.route is None and not store._direct.enabled
    proxy.reset()
    assert _get(store, "k.jpg", 0, 10) == b"r" * 10
    assert proxy.get_count("GET") == 1 and store._direct.route is None


def test_adaptive_retry_mode_keeps_every_get_on_the_client(s3_env: dict[str, str], proxy_client: Any, bucket: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_RETRY_MODE", "adaptive")
    proxy_client.put_object(Bucket=bucket, Key="k.jpg", Body=b"a" * 10)
    store = _store(s3_env)
    _get(store, "k.jpg", 0, 10)
    assert store._direct.route is None
