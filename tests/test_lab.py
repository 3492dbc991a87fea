"""Tests of the test lab itself: moto process, proxy counting and every fault kind, sample images."""

from __future__ import annotations

import csv
import hashlib
import http.client
import io
import json
import os
import re
import socket
import threading
import time
from pathlib import Path
from typing import Any

import boto3
import pytest
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    EndpointConnectionError,
    IncompleteReadError,
    ReadTimeoutError,
    ResponseStreamingError,
)
from PIL import Image

from s3fsimg_lab.images import SampleSet, make_dataset, make_large_image
from s3fsimg_lab.moto import MotoServer, s3_client
from s3fsimg_lab.proxy import Fault, LabProxy, key_of

# Clients that see the proxy's raw behaviour: one attempt, short timeouts, no checksum validation
# (moto returns the CRC the client uploaded, and botocore would otherwise hide a flipped byte behind its own
# checksum error).


def raw_client(url: str, read_timeout: float = 5.0, **kw: Any) -> Any:
    return s3_client(
        url,
        retries=1,
        connect_timeout=2,
        read_timeout=read_timeout,
        response_checksum_validation="when_required",
        request_checksum_calculation="when_required",
        **kw,
    )


@pytest.fixture
def raw(proxy: LabProxy) -> Any:
    return raw_client(proxy.url)


def put(moto_client: Any, bucket: str, key: str, data: bytes) -> None:
    moto_client.put_object(Bucket=bucket, Key=key, Body=data)


# ---------------------------------------------------------------------------------------------- counting


def test_counts_by_method_and_key(proxy: LabProxy, raw: Any, bucket: str) -> None:
    raw.put_object(Bucket=bucket, Key="images/aa/bb/one.jpg", Body=b"1" * 1000)
    raw.put_object(Bucket=bucket, Key="dir with space/two.png", Body=b"2" * 300)
    for _ in range(3):
        assert raw.get_object(Bucket=bucket, Key="images/aa/bb/one.jpg")["Body"].read() == b"1" * 1000
    raw.head_object(Bucket=bucket, Key="dir with space/two.png")
    raw.list_objects_v2(Bucket=bucket)

    c = proxy.counts()
    assert c["by_method"] == {"PUT": 2, "GET": 4, "HEAD": 1}
    assert c["requests"] == 7
    assert c["by_method_key"]["GET"]["images/aa/bb/one.jpg"] == 3
    assert c["by_method_key"]["GET"][""] == 1  # ListObjectsV2 is a bucket-level GET
    assert c["by_key"]["dir with space/two.png"] == 2
    assert proxy.get_count("GET", "one.jpg") == 3
    assert proxy.get_count("get", "images/") == 3
    assert proxy.get_count(None, "two.png") == 2
    assert proxy.get_count("DELETE") == 0
    assert c["request_bytes"] >= 1300
    assert proxy.get_bytes("one.jpg") == 3000
    assert c["response_bytes"] >= 3000
    assert c["status"] == {"200": 7}

    proxy.reset()
    c = proxy.counts()
    assert c["requests"] == 0 and c["by_key"] == {} and c["response_bytes"] == 0


def test_key_of() -> None:
    assert key_of("/bkt/images/ab/cd/x.jpg?partNumber=1") == "images/ab/cd/x.jpg"
    assert key_of("/bkt?list-type=2") == ""
    assert key_of("/bkt/a%20b/c%2Bd") == "a b/c+d"


def test_control_api_is_not_counted(proxy: LabProxy) -> None:
    for port in (proxy.control_port, proxy.port):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/__lab__/counts")
        resp = conn.getresponse()
        assert resp.status == 200
        assert json.loads(resp.read())["requests"] == 0
        conn.request("GET", "/__lab__/nope")
        assert conn.getresponse().status == 404
        conn.close()
    conn = http.client.HTTPConnection("127.0.0.1", proxy.control_port, timeout=5)
    conn.request("POST", "/__lab__/faults", body=b'[{"kind": "bogus"}]')
    assert conn.getresponse().status == 400
    conn.close()
    assert proxy.counts()["requests"] == 0


class _Unseekable(io.RawIOBase):
    """A read-only stream without seek/tell, so botocore cannot know its length up front."""

    def __init__(self, data: bytes) -> None:
        self._buf = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        chunk = self._buf.read(len(b))
        b[: len(chunk)] = chunk
        return len(chunk)


def test_uploads_chunked_multipart_and_streaming(proxy: LabProxy, moto_client: Any, bucket: str) -> None:
    client = s3_client(proxy.url)  # default checksums: aws-chunked bodies with trailers
    expected = os.urandom(300_000)
    client.upload_fileobj(_Unseekable(expected), bucket, "stream.bin")
    big = os.urandom(6 * 1024 * 1024)
    cfg = TransferConfig(multipart_threshold=5 * 1024 * 1024, multipart_chunksize=5 * 1024 * 1024)
    client.upload_fileobj(io.BytesIO(big), bucket, "multi.bin", Config=cfg)
    assert moto_client.get_object(Bucket=bucket, Key="multi.bin")["Body"].read() == big
    got = client.get_object(Bucket=bucket, Key="stream.bin")["Body"].read()
    assert got == expected
    assert client.get_object(Bucket=bucket, Key="multi.bin", Range="bytes=100-199")["Body"].read() == big[100:200]
    assert proxy.get_count("POST", "multi.bin") == 2  # create + complete
    assert proxy.get_count("PUT", "multi.bin") == 2  # two parts


def test_public_bucket_anonymous_through_proxy(proxy: LabProxy, moto_client: Any, bucket: str) -> None:
    put(moto_client, bucket, "pub.txt", b"public")
    anon = s3_client(proxy.url, anonymous=True, retries=1)
    with pytest.raises(ClientError) as err:
        anon.get_object(Bucket=bucket, Key="pub.txt")
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    from s3fsimg_lab.moto import make_public

    make_public(moto_client, bucket)
    assert anon.get_object(Bucket=bucket, Key="pub.txt")["Body"].read() == b"public"


# ---------------------------------------------------------------------------------------------- faults


def test_latency_per_key(proxy: LabProxy, raw: Any, moto_client: Any, bucket: str) -> None:
    put(moto_client, bucket, "slow.bin", b"s")
    put(moto_client, bucket, "fast.bin", b"f")
    raw.get_object(Bucket=bucket, Key="fast.bin")["Body"].read()  # warm the connection
    proxy.add_fault("latency_ms", 400, match="slow")
    t = time.monotonic()
    raw.get_object(Bucket=bucket, Key="slow.bin")["Body"].read()
    assert time.monotonic() - t >= 0.38
    t = time.monotonic()
    raw.get_object(Bucket=bucket, Key="fast.bin")["Body"].read()
    assert time.monotonic() - t < 0.3
    assert proxy.counts()["faults_applied"] == {"latency_ms": 1}


def test_error_status_surfaces_and_count_limits(proxy: LabProxy, raw: Any, moto_client: Any, bucket: str) -> None:
    put(moto_client, bucket, "k.bin", b"data")
    proxy.add_fault("error_status", 503, match="k.bin", count=2)
    for _ in range(2):
        with pytest.raises(ClientError) as err:
            raw.get_object(Bucket=bucket, Key="k.bin")
        assert err.value.response["Error"]["Code"] == "SlowDown"
        assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
    assert raw.get_object(Bucket=bucket, Key="k.bin")["Body"].read() == b"data"
    assert proxy.faults()[0]["remaining"] == 0
    assert proxy.get_count("GET", "k.bin") == 3


def test_error_status_methods_and_retries(proxy: LabProxy, raw: Any, moto_client: Any, bucket: str) -> None:
    put(moto_client, bucket, "k.bin", b"data")
    proxy.set_faults([Fault("error_status", 500, methods=["HEAD"])])
    with pytest.raises(ClientError) as err:
        raw.head_object(Bucket=bucket, Key="k.bin")
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 500
    raw.put_object(Bucket=bucket, Key="k2.bin", Body=b"x" * 5000)  # PUT is not selected
    assert raw.get_object(Bucket=bucket, Key="k2.bin")["Body"].read() == b"x" * 5000
    # botocore's own retries get past a count-limited 500 (InternalError)
    proxy.set_faults([{"kind": "error_status", "value": 500, "regex": r"k2\.bin$", "count": 2}])
    retrying = s3_client(proxy.url, retries=4)
    proxy.reset()
    assert retrying.get_object(Bucket=bucket, Key="k2.bin")["Body"].read() == b"x" * 5000
    assert proxy.get_count("GET", "k2.bin") == 3
    assert proxy.counts()["status"] == {"500": 2, "200": 1}


@pytest.mark.parametrize("size", [5000, 700_000])
def test_flip_byte_changes_exactly_one_byte(
    proxy: LabProxy, raw: Any, moto_client: Any, bucket: str, size: int
) -> None:
    data = os.urandom(size)
    put(moto_client, bucket, "flip.bin", data)
    proxy.add_fault("flip_byte", match="flip.bin", count=1)
    got = raw.get_object(Bucket=bucket, Key="flip.bin")["Body"].read()
    assert len(got) == len(data)
    diff = [i for i in range(size) if got[i] != data[i]]
    assert diff == [size // 2]
    proxy.add_fault("flip_byte", 7, match="flip.bin", count=1)
    got = raw.get_object(Bucket=bucket, Key="flip.bin")["Body"].read()
    assert [i for i in range(size) if got[i] != data[i]] == [7]
    assert raw.get_object(Bucket=bucket, Key="flip.bin")["Body"].read() == data  # count used up


@pytest.mark.parametrize("size", [5000, 700_000])
def test_truncate_gives_incomplete_read(proxy: LabProxy, raw: Any, moto_client: Any, bucket: str, size: int) -> None:
    put(moto_client, bucket, "cut.bin", os.urandom(size))
    proxy.add_fault("truncate", match="cut.bin", count=1)
    resp = raw.get_object(Bucket=bucket, Key="cut.bin")
    assert resp["ContentLength"] == size
    with pytest.raises((IncompleteReadError, ResponseStreamingError)):
        resp["Body"].read()
    assert len(raw.get_object(Bucket=bucket, Key="cut.bin")["Body"].read()) == size


def test_refuse_for_one_key_resets_connection(proxy: LabProxy, raw: Any, moto_client: Any, bucket: str) -> None:
    put(moto_client, bucket, "bad.bin", b"b")
    put(moto_client, bucket, "good.bin", b"g")
    proxy.add_fault("refuse", match="bad.bin")
    t = time.monotonic()
    with pytest.raises(ConnectionClosedError):
        raw.get_object(Bucket=bucket, Key="bad.bin")
    assert time.monotonic() - t < 2
    assert raw.get_object(Bucket=bucket, Key="good.bin")["Body"].read() == b"g"


def test_refuse_all_closes_the_port(proxy: LabProxy, raw: Any, moto_client: Any, bucket: str) -> None:
    put(moto_client, bucket, "k.bin", b"k")
    assert raw.get_object(Bucket=bucket, Key="k.bin")["Body"].read() == b"k"  # pooled connection
    proxy.add_fault("refuse")
    t = time.monotonic()
    with pytest.raises(EndpointConnectionError):
        raw.get_object(Bucket=bucket, Key="k.bin")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=2).close()
    assert time.monotonic() - t < 2
    assert proxy.counts()["requests"] == 1  # the control port still answers
    proxy.clear_faults()
    assert raw.get_object(Bucket=bucket, Key="k.bin")["Body"].read() == b"k"


def test_hang_blocks_until_cleared(proxy: LabProxy, raw: Any, moto_client: Any, bucket: str) -> None:
    put(moto_client, bucket, "hang.bin", b"h" * 100)
    proxy.add_fault("hang", match="hang.bin")
    quick = raw_client(proxy.url, read_timeout=0.5)
    t = time.monotonic()
    with pytest.raises(ReadTimeoutError):
        quick.get_object(Bucket=bucket, Key="hang.bin")
    assert 0.4 < time.monotonic() - t < 3

    result: dict[str, Any] = {}

    def fetch() -> None:
        t0 = time.monotonic()
        result["data"] = raw.get_object(Bucket=bucket, Key="hang.bin")["Body"].read()
        result["elapsed"] = time.monotonic() - t0

    th = threading.Thread(target=fetch)
    th.start()
    time.sleep(0.6)
    assert th.is_alive()
    proxy.clear_faults()
    th.join(5)
    assert not th.is_alive()
    assert result["data"] == b"h" * 100 and result["elapsed"] >= 0.5


def test_hang_with_count_hangs_only_n_requests(proxy: LabProxy, moto_client: Any, bucket: str) -> None:
    put(moto_client, bucket, "h.bin", b"h")
    proxy.add_fault("hang", match="h.bin", count=1)
    quick = raw_client(proxy.url, read_timeout=0.4)
    with pytest.raises(ReadTimeoutError):
        quick.get_object(Bucket=bucket, Key="h.bin")
    assert quick.get_object(Bucket=bucket, Key="h.bin")["Body"].read() == b"h"


def test_bandwidth_cap(proxy: LabProxy, raw: Any, moto_client: Any, bucket: str) -> None:
    data = os.urandom(400_000)
    put(moto_client, bucket, "bw.bin", data)
    proxy.add_fault("bandwidth_bps", 1_000_000, match="bw.bin")
    t = time.monotonic()
    assert raw.get_object(Bucket=bucket, Key="bw.bin")["Body"].read() == data
    assert 0.3 < time.monotonic() - t < 2.0


def test_client_disconnect_mid_response_keeps_proxy_alive(
    proxy: LabProxy, raw: Any, moto_client: Any, bucket: str
) -> None:
    data = os.urandom(2_000_000)
    put(moto_client, bucket, "big.bin", data)
    proxy.add_fault("bandwidth_bps", 2_000_000, match="big.bin", count=1)
    url = raw.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": "big.bin"})
    target = url.split(str(proxy.port), 1)[1]
    s = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    s.sendall(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{proxy.port}\r\n\r\n".encode())
    assert s.recv(100).startswith(b"HTTP/1.1 200")
    s.close()
    assert raw.get_object(Bucket=bucket, Key="big.bin")["Body"].read() == data


def test_stop_releases_hung_requests(moto_server: MotoServer, moto_client: Any, bucket: str) -> None:
    put(moto_client, bucket, "x.bin", b"x")
    with LabProxy(moto_server.url) as lp:
        lp.add_fault("hang")
        client = raw_client(lp.url, read_timeout=10)
        errors: list[BaseException] = []

        def fetch() -> None:
            try:
                client.get_object(Bucket=bucket, Key="x.bin")
            except BaseException as exc:
                errors.append(exc)

        th = threading.Thread(target=fetch)
        th.start()
        time.sleep(0.3)
        t = time.monotonic()
        lp.stop()
        th.join(5)
        assert not th.is_alive() and errors
        assert time.monotonic() - t < 5


def test_fault_validation() -> None:
    with pytest.raises(ValueError):
        Fault("explode")
    with pytest.raises(re.error):
        Fault("hang", regex="(")
    assert Fault.from_json({"kind": "latency_ms", "value": 5, "methods": ["get"]}).methods == ["GET"]


# ---------------------------------------------------------------------------------------------- environment


def test_s3_env_isolated_and_usable(s3_env: dict[str, str], proxy: LabProxy, bucket: str) -> None:
    assert os.environ["AWS_CONFIG_FILE"] == s3_env["AWS_CONFIG_FILE"]
    assert not Path(os.environ["AWS_CONFIG_FILE"]).exists()
    assert not Path(os.environ["AWS_SHARED_CREDENTIALS_FILE"]).exists()
    assert "AWS_PROFILE" not in os.environ
    assert s3_env["S3_ENDPOINT_URL"] == proxy.url and s3_env["S3_BUCKET"] == bucket
    # the standard boto3 chain picks everything up from the environment
    client = boto3.client("s3", endpoint_url=os.environ["S3_ENDPOINT_URL"])
    client.put_object(Bucket=os.environ["S3_BUCKET"], Key="env.txt", Body=b"e")
    assert proxy.get_count("PUT", "env.txt") == 1


# ---------------------------------------------------------------------------------------------- images


def test_sample_dir_images_readable(sample_dir: SampleSet) -> None:
    assert Path(sample_dir).is_dir() and os.fspath(sample_dir) == str(sample_dir.root)
    assert len(sample_dir.images) >= 120
    types = set()
    for f in sample_dir.images:
        with Image.open(f.path) as im:
            im.load()
            assert (im.width, im.height) == (f.width, f.height)
            types.add(Image.MIME[im.format])
        assert hashlib.sha256(f.path.read_bytes()).hexdigest() == f.sha256
        assert f.s3_path == f"images/{f.sha256[:2]}/{f.sha256[2:4]}/{f.sha256}.{f.ext}"
    assert {"image/jpeg", "image/png"} <= types
    assert {f.rel.count("/") for f in sample_dir.images} >= {1, 2}
    for f in sample_dir.non_images:
        with pytest.raises(Exception):  # noqa: B017 - any Pillow failure
            Image.open(f.path).load()
    assert (sample_dir / "misc/not_really.jpg").exists()


def test_sample_duplicates_identical(sample_dir: SampleSet) -> None:
    assert sample_dir.duplicates
    for orig, copy in sample_dir.duplicates:
        assert orig != copy
        assert (sample_dir / orig).read_bytes() == (sample_dir / copy).read_bytes()
    assert len(sample_dir.distinct_images) == len(sample_dir.images) - len(sample_dir.duplicates)


def test_sample_map_csv(sample_dir: SampleSet) -> None:
    mp = sample_dir.map_path
    assert mp is not None and mp.parent == sample_dir.root.parent
    with mp.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["filename", "logical_id"]
    by_name = {f.rel: f for f in sample_dir.files}
    basenames = {Path(f.rel).name: f for f in sample_dir.files}
    ids = [r[1] for r in rows[1:]]
    assert len(ids) == len(set(ids)) > 50
    by_base = 0
    for name, lid in rows[1:]:
        assert re.fullmatch(r"DAO-\d{5}", lid)
        f = by_name.get(name) or basenames[name]
        by_base += name not in by_name
        assert f.logical_id == lid and f.is_image
    assert by_base > 0
    assert sample_dir.logical_ids


def test_dataset_deterministic_and_large(tmp_path: Path) -> None:
    a = make_dataset(tmp_path / "a", n=20, seed=3, large=1, large_bytes=(1_000_000, 1_200_000))
    b = make_dataset(tmp_path / "b", n=20, seed=3, large=1, large_bytes=(1_000_000, 1_200_000))
    assert [(f.rel, f.sha256) for f in a.files] == [(f.rel, f.sha256) for f in b.files]
    (big,) = a.large
    assert 950_000 <= big.size <= 1_260_000
    with Image.open(big.path) as im:
        im.load()
    j = make_large_image(tmp_path / "j.jpg", 2_000_000, seed=1, fmt="jpg")
    assert 1_900_000 <= j.size <= 2_100_000 and j.content_type == "image/jpeg"


def test_proxy_log_has_no_tracebacks(lab_proxy: LabProxy) -> None:
    """Runs last in this file: nothing above made a proxy thread die with an unexpected error."""
    assert "Traceback" not in lab_proxy.log_text()
