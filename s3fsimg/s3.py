"""The S3 store: the one place an S3 client is built, and the one place S3 errors are translated.

`S3Store(config)` owns a client configured from `Config` (endpoint, addressing style, anonymous
mode, region and retries from boto3's chain (botocore's standard retry mode unless the user set
another), timeouts, a pool sized to the caller's concurrency) and
offers the few operations the project needs, all keyed by paths relative to the dataset prefix.
Errors leave as `BackendError`/`NotFound` with one line naming the bucket and key; the message
never contains a credential.

A store is not shared across `fork()`: `Dataset` builds a new one in each process.

Ranged GETs of the data (`get_range`, every read of an image) skip the client's per-call machinery
once it has shown the way (`_DirectGet`): they are signed and sent on the client's own HTTP session,
about half the CPU of a `get_object` call, with the same errors.

Clients come from botocore's session directly, as boto3's do (the same credential chain, config and
wire behaviour): boto3's layer adds only resources and s3transfer, which nothing here uses, and
importing it adds to every command's and DataLoader worker's start-up (measured in docs/misses.md).
"""

from __future__ import annotations

import html
import logging
import os
import random
import re
import threading
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, Literal, cast

import botocore.exceptions as bexc
import botocore.session
import urllib3.exceptions
from botocore import UNSIGNED
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config as BotoConfig
from botocore.utils import percent_encode

from s3fsimg.config import Config
from s3fsimg.errors import BackendError, ConfigError, IntegrityError, NotFound, S3fsimgError

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

log = logging.getLogger(__name__)

#: Error codes that mean "your credentials or permissions", worth a specific message.
_AUTH_CODES = {
    "InvalidAccessKeyId": "the access key id is not known to the server (check AWS_ACCESS_KEY_ID / AWS_PROFILE)",
    "SignatureDoesNotMatch": "the secret key is wrong (check AWS_SECRET_ACCESS_KEY / AWS_PROFILE)",
    "ExpiredToken": "the session token has expired",
    "InvalidToken": "the session token is invalid",
    "AccessDenied": "access denied",
    "AllAccessDisabled": "access denied",
}
_RETRYABLE_CODES = {"500", "502", "503", "504", "InternalError", "SlowDown", "ServiceUnavailable",
                    "RequestTimeout", "RequestTimeTooSkewed", "ThrottlingException"}
#: What S3 answers for a missing object or bucket: its own code, or on a HEAD (no body) only the status,
#: which botocore gives as "404" or "NotFound".
_MISSING_CODES = {"object": ("NoSuchKey", "404", "NotFound"), "bucket": ("NoSuchBucket", "404", "NotFound")}


def _error_code(exc: bexc.ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _is_missing(code: str, what: Literal["object", "bucket"]) -> bool:
    """Whether an error code says the object (or the bucket) does not exist."""
    return code in _MISSING_CODES[what]


@dataclass(frozen=True)
class GetResult:
    data: bytes
    etag: str | None
    total_size: int | None


def quoted_etag(value: object) -> str | None:
    """An ETag as the manifest records it: in double quotes, as S3 sends it (HTTP's entity-tag).
    Some S3-compatible servers send it bare: it is quoted here, so every ETag this module returns
    compares equal whichever call saw it. None when there is none (or it cannot be one)."""
    if not isinstance(value, str):
        return None
    inner = value[1:-1] if len(value) >= 2 and value[0] == value[-1] == '"' else value
    return f'"{inner}"' if inner and '"' not in inner else None


def translate(exc: BaseException, where: str) -> S3fsimgError:
    """Turn a botocore/urllib3 exception into one of ours, with one line saying what and where."""
    if isinstance(exc, S3fsimgError):
        return exc
    if isinstance(exc, bexc.ClientError):
        err = exc.response.get("Error", {})
        code = _error_code(exc)
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code == "NoSuchBucket":  # (a HEAD's bare 404 is taken as the object's, below)
            return NotFound(f"{where}: the bucket does not exist")
        if _is_missing(code, "object"):
            return NotFound(f"{where}: no such object")
        if code in _AUTH_CODES:
            return BackendError(f"{where}: {_AUTH_CODES[code]}")
        if code == "403" or status == 403:
            return BackendError(f"{where}: access denied (HTTP 403: wrong credentials or no permission)")
        return BackendError(f"{where}: S3 answered {code or status}: {err.get('Message', '')}".rstrip(": "))
    if isinstance(exc, bexc.NoCredentialsError):
        return BackendError(f"{where}: no AWS credentials found (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                            "AWS_PROFILE, or use --anonymous for a public bucket)")
    if isinstance(exc, bexc.EndpointConnectionError | bexc.ConnectionClosedError):
        return BackendError(f"{where}: cannot connect to the S3 endpoint ({exc.__class__.__name__})")
    if isinstance(exc, bexc.ReadTimeoutError | bexc.ConnectTimeoutError):
        return BackendError(f"{where}: S3 did not answer in time")
    if isinstance(exc, bexc.BotoCoreError | OSError):
        return BackendError(f"{where}: {exc.__class__.__name__}: {exc}")
    return BackendError(f"{where}: {exc.__class__.__name__}: {exc}")


def is_retryable(exc: BaseException) -> bool:
    """Transient faults worth another attempt within a read deadline."""
    if isinstance(exc, IntegrityError):
        return False
    if isinstance(exc, bexc.ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return _error_code(exc) in _RETRYABLE_CODES or int(status) >= 500
    return isinstance(exc, bexc.BotoCoreError | OSError | _ShortRead)


class _ShortRead(Exception):
    """The body ended before Content-Length bytes."""


class _DirectGet:
    """Ranged GETs of objects sent on the client's own HTTP session (its connection pool, TLS, proxy and
    timeout settings), without the client's per-call machinery (parameter validation, endpoint rules,
    event hooks, response parsing): ~0.5 of the ~1.1 ms of CPU a `get_object` call costs here
    (docs/misses.md). What it may send is learned from one GetObject the client made (`learn`): the URL
    the endpoint rules chose for a key (so the prefix for every other key), how the client signed it
    (plain SigV4 for service s3, signing only what a GET signs: region from its Authorization header; or
    not at all in anonymous mode) and its User-Agent. A request the client would have sent differently
    is never made: anything else (S3 Express session auth, SigV4A, SSE-C, botocore's adaptive retry
    mode) learns nothing and the client keeps making every GET.

    Errors come back as the client's would: a ClientError with the code and message S3 sent (so
    `translate` and `is_retryable` see no difference), botocore's connection errors from the session,
    and a broken body as botocore's ResponseStreamingError. A redirect, a 400 or a 403 (a bucket in
    another region, an expired token, a signature the server will not take) may not be the object's
    error: `get` returns None and forgets what it learned, and the client makes that GET, learning again
    when it succeeds (at most `_RELEARN` times)."""

    _AUTH = re.compile(r"AWS4-HMAC-SHA256 Credential=[^/,]+/\d{8}/([^/,]+)/s3/aws4_request, "
                       r"SignedHeaders=([a-z0-9;-]+), ")
    #: What a plain SigV4 GET signs. A client that signs more (S3 Express's session token, SSE-C, a
    #: checksum mode, request-payer) sends what this path would not: nothing is learned from it.
    _SIGNED = frozenset({"host", "range", "x-amz-content-sha256", "x-amz-date", "x-amz-security-token"})
    #: Times the direct path may be refused (3xx, 400, 403) and learned again before it is given up.
    _RELEARN = 3

    def __init__(self, client: Any, anonymous: bool) -> None:
        self.anonymous = anonymous
        self.route: _Route | None = None
        # botocore's adaptive retry mode throttles in its own handlers, which this path would skip.
        self.refusals_left = 0 if (client.meta.config.retries or {}).get("mode") == "adaptive" else self._RELEARN
        # The client's own HTTP session and credentials (private attributes: without them, no direct path).
        self.session: Any = getattr(getattr(client, "_endpoint", None), "http_session", None)
        self.credentials: Any = getattr(getattr(client, "_request_signer", None), "_credentials", None)
        self._seen = threading.local()  # (url, Authorization, User-Agent) of this thread's last GetObject
        me = weakref.ref(self)  # the client holds the hook: no cycle keeping a dropped store's pool alive

        def remember(request: Any, **_: Any) -> None:
            direct = me()
            if direct is not None:
                direct._seen.sent = (request.url, _text(request.headers.get("Authorization")),
                                     _text(request.headers.get("User-Agent")))

        client.meta.events.register("before-send.s3.GetObject", remember)

    @property
    def enabled(self) -> bool:
        return self.refusals_left > 0

    def forget_sent(self) -> None:
        """Before the client's GetObject whose route `learn` may take: nothing older can be taken for it."""
        self._seen.sent = None

    def learn(self, key: str) -> None:
        """After the client's GetObject of `key` succeeded in this thread: take the route it used."""
        sent = getattr(self._seen, "sent", None)
        self._seen.sent = None
        if sent is None or not self.enabled or self.route is not None or self.session is None:
            return
        url, auth, agent = sent
        quoted = _quote(key)
        if "?" in url or not url.endswith("/" + quoted):
            return
        signing: str | None = None
        if auth is None:
            if not self.anonymous:
                return
        else:
            match = self._AUTH.match(auth)
            if match is None or not set(match.group(2).split(";")) <= self._SIGNED or self.credentials is None:
                return
            signing = match.group(1)
        self.route = _Route(url[:-len(quoted)], signing, agent)

    def get(self, key: str, start: int, end: int) -> tuple[Any, bytes] | None:
        """(headers, body) of a 2xx answer to GET bytes [start, end) of `key`; a ClientError for an
        error S3 answered; None when the client must make this GET (see the class docstring)."""
        route = self.route
        if route is None:
            return None
        headers = {"Range": f"bytes={start}-{end - 1}"}
        if route.agent:
            headers["User-Agent"] = route.agent
        request = AWSRequest(method="GET", url=route.base + _quote(key), headers=headers)
        if route.region is not None:
            S3SigV4Auth(self.credentials.get_frozen_credentials(), "s3", route.region).add_auth(request)
        prepared = request.prepare()
        prepared.stream_output = True  # the body is read below, in one piece
        response = self.session.send(prepared)
        raw = response.raw
        try:
            try:
                body = raw.read()
            except urllib3.exceptions.ReadTimeoutError as exc:
                raise bexc.ReadTimeoutError(endpoint_url=prepared.url, error=exc) from None
            except urllib3.exceptions.HTTPError as exc:  # a body cut short, a connection reset
                raise bexc.ResponseStreamingError(error=exc) from None
        finally:
            raw.release_conn()
        status = response.status_code
        if 200 <= status < 300:  # (the caller checks the length, as the client's answer's)
            return response.headers, body
        if 300 <= status < 400 or status in (400, 403):
            # A redirect or 400: another region, an expired token. A 403: maybe a signature only this
            # path gets wrong. The client answers these, and the path is learned again when the client
            # succeeds, a few times: a server that keeps refusing it gets every GET from the client.
            self.route = None
            self.refusals_left -= 1
            return None
        message = _xml_tag(body, "Message") or str(getattr(raw, "reason", "") or "")  # (as the client's)
        error: Any = {"Error": {"Code": _xml_tag(body, "Code") or str(status), "Message": message},
                      "ResponseMetadata": {"HTTPStatusCode": status}}
        raise bexc.ClientError(error, "GetObject")


@dataclass(frozen=True)
class _Route:
    """How `_DirectGet` sends a GET: the URL of a key is `base` + the key, quoted as botocore quotes it;
    `region` is SigV4's (service s3), None when unsigned; `agent` the client's User-Agent."""
    base: str
    region: str | None
    agent: str | None


def _quote(key: str) -> str:
    """A key as the client puts it in a URL (botocore's quoting of a greedy `{Key+}` label)."""
    return percent_encode(key, safe="/~")


def _text(value: str | bytes | None) -> str | None:
    return value.decode("latin-1") if isinstance(value, bytes) else value


def _xml_tag(body: bytes, name: str) -> str:
    """The text of the first <name> element of an S3 error body ("" when there is none)."""
    match = re.search(rf"<{name}>([^<]*)</{name}>".encode(), body[:4096])
    return html.unescape(match.group(1).decode("utf-8", "replace")) if match else ""


_shared_loader: Any = None  # botocore's model loader, shared by every session of this process


def _new_session() -> botocore.session.Session:
    """A new botocore session (credentials and settings resolved afresh) that shares one model
    loader per process: the S3 service model is parsed once (not again for every later client, in
    forked DataLoader workers too). The loader holds only parsed JSON; a race here at worst parses twice."""
    global _shared_loader
    core = botocore.session.get_session()
    if _shared_loader is None:
        _shared_loader = core.get_component("data_loader")
    else:
        core.register_component("data_loader", _shared_loader)
    return core


class S3Store:
    """S3 operations under one bucket and prefix."""

    def __init__(self, config: Config, *, max_pool: int = 16, max_attempts: int | None = None,
                 default_attempts: int = 5) -> None:
        """`max_attempts`: botocore's retries (after the first try), 0 for a caller that retries
        itself; None: the user's setting (AWS_MAX_ATTEMPTS, the profile's max_attempts), else
        `default_attempts`."""
        self.config = config
        self.bucket = config.require_bucket()
        connect_timeout = min(5.0, max(1.0, config.read_deadline / 4))
        read_timeout = min(30.0, max(1.0, config.read_deadline / 2))
        try:
            core = _new_session()
            # The user's retry settings (AWS_RETRY_MODE / AWS_MAX_ATTEMPTS, the profile's retry_mode /
            # max_attempts) win; without them, botocore's standard mode (older botocores default to
            # "legacy") and `default_attempts`. A caller that retries itself gets no botocore retries.
            retries: dict[str, Any] = {}
            if not (os.environ.get("AWS_RETRY_MODE") or core.get_scoped_config().get("retry_mode")):
                retries["mode"] = "standard"
            if max_attempts is not None:
                retries["max_attempts"] = max_attempts
            elif core.get_config_variable("max_attempts") is None:
                retries["max_attempts"] = default_attempts
            boto_config = BotoConfig(
                # AWS_REGION (what the AWS CLI v2 and the other SDKs read) before botocore's own chain
                region_name=os.environ.get("AWS_REGION") or None,
                retries=retries,  # type: ignore[arg-type]
                connect_timeout=connect_timeout,
                read_timeout=read_timeout,
                max_pool_connections=max_pool,
                s3={"addressing_style": config.addressing_style},  # type: ignore[arg-type]
                signature_version=UNSIGNED if config.anonymous else None,
                # Checksums only where we ask for them (PUT with SHA-256); S3-compatible stores vary.
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            )
            self.client = cast("S3Client", core.create_client("s3", endpoint_url=config.endpoint_url,
                                                              config=boto_config))
            self._direct = _DirectGet(self.client, config.anonymous)
        except bexc.ProfileNotFound as exc:  # AWS_PROFILE names no profile: a configuration error
            raise ConfigError(f"AWS_PROFILE: {exc}") from None

    # -- names ---------------------------------------------------------------------------------
    def key(self, relative: str) -> str:
        return self.config.key(relative)

    def where(self, relative: str) -> str:
        return f"s3://{self.bucket}/{self.key(relative)}"

    # -- operations ----------------------------------------------------------------------------
    def check_bucket(self) -> None:
        """HEAD the bucket: a clear error for a missing bucket, bad credentials, no endpoint."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except bexc.ClientError as exc:
            code = _error_code(exc)
            if _is_missing(code, "bucket"):
                raise NotFound(f"s3://{self.bucket}: the bucket does not exist") from None
            if code in ("403", "AccessDenied"):
                raise BackendError(f"s3://{self.bucket}: access denied (wrong credentials or no permission "
                                   "on the bucket)") from None
            raise translate(exc, f"s3://{self.bucket}") from None
        except Exception as exc:
            raise translate(exc, f"s3://{self.bucket} at {self.endpoint}") from None

    @property
    def endpoint(self) -> str:
        return self.config.endpoint_url or "AWS"

    def stat(self, relative: str) -> dict[str, Any] | None:
        """Size, ETag and Last-Modified of an object, or None when it does not exist. A HEAD; in anonymous
        mode a refused HEAD is retried as a one-byte GET, since some S3-compatible servers grant
        unsigned GETs by bucket policy but not HEADs."""
        where = self.where(relative)
        try:
            resp = self.client.head_object(Bucket=self.bucket, Key=self.key(relative))
            return {"size": int(resp["ContentLength"]), "etag": quoted_etag(resp.get("ETag")),
                    "last_modified": resp.get("LastModified")}
        except bexc.ClientError as exc:
            code = _error_code(exc)
            if _is_missing(code, "object"):
                return None
            if not (self.config.anonymous and code in ("403", "AccessDenied")):
                raise translate(exc, where) from None
        except Exception as exc:
            raise translate(exc, where) from None
        try:
            got = self.client.get_object(Bucket=self.bucket, Key=self.key(relative), Range="bytes=0-0")
            got["Body"].read()
        except Exception as exc:
            err = translate(exc, where)
            if isinstance(err, NotFound):
                return None
            raise err from None
        total = str(got.get("ContentRange", "")).rsplit("/", 1)[-1]
        return {"size": int(total) if total.isdigit() else int(got["ContentLength"]),
                "etag": quoted_etag(got.get("ETag")), "last_modified": got.get("LastModified")}

    def list_objects(self, relative_prefix: str) -> Iterator[tuple[str, int, str | None]]:
        """(relative key, size, etag) of every object under `relative_prefix`."""
        full = self.key(relative_prefix)
        cut = len(self.config.prefix) + 1 if self.config.prefix else 0
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=full):
                for obj in page.get("Contents", []):
                    yield obj["Key"][cut:], int(obj["Size"]), quoted_etag(obj.get("ETag"))
        except Exception as exc:
            raise translate(exc, self.where(relative_prefix)) from None

    def put(self, relative: str, body: bytes | IO[bytes], *, content_type: str,
            sha256_b64: str | None = None) -> str | None:
        """PUT an object; with `sha256_b64` the server rejects a body that does not match. Returns the ETag."""
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": self.key(relative), "Body": body,
                                "ContentType": content_type}
        if sha256_b64 is not None:
            args["ChecksumSHA256"] = sha256_b64
        try:
            resp = self.client.put_object(**args)
        except Exception as exc:
            raise translate(exc, self.where(relative)) from None
        return quoted_etag(resp.get("ETag"))

    def get_bytes(self, relative: str) -> bytes:
        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=self.key(relative))
            return resp["Body"].read()
        except Exception as exc:
            raise translate(exc, self.where(relative)) from None

    def download_file(self, relative: str, fileobj: IO[bytes]) -> dict[str, Any]:
        """Stream an object into `fileobj`; returns its ETag and size."""
        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=self.key(relative))
            body = resp["Body"]
            size = 0
            for chunk in body.iter_chunks(1 << 20):
                fileobj.write(chunk)
                size += len(chunk)
        except Exception as exc:
            raise translate(exc, self.where(relative)) from None
        return {"etag": quoted_etag(resp.get("ETag")), "size": size}

    def get_range(self, relative: str, start: int, end: int, *, deadline: float) -> GetResult:
        """Bytes [start, end) of an object, retried on transient faults until `deadline`
        (a time.monotonic() value). Raises BackendError once the deadline has passed."""
        attempt = 0
        last: BaseException | None = None
        while True:
            attempt += 1
            try:
                return self._get_range_once(relative, start, end)
            except Exception as exc:
                if not is_retryable(exc):
                    raise translate(exc, self.where(relative)) from None
                last = exc
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                cause = translate(last, self.where(relative)) if last else None
                raise BackendError(f"{self.where(relative)}: giving up after {attempt} attempts "
                                   f"({cause})") from None
            backoff = min(remaining, 2.0, 0.05 * (2 ** min(attempt, 6)) * random.uniform(0.5, 1.0))
            log.debug("retrying %s bytes %d-%d in %.2fs: %s", self.key(relative), start, end, backoff, last)
            time.sleep(backoff)

    def _get_range_once(self, relative: str, start: int, end: int) -> GetResult:
        key = self.key(relative)
        direct = self._direct.get(key, start, end)
        if direct is not None:
            headers, data = direct
            etag, content_range = headers.get("ETag"), str(headers.get("Content-Range") or "")
        else:
            self._direct.forget_sent()
            resp = self.client.get_object(Bucket=self.bucket, Key=key, Range=f"bytes={start}-{end - 1}")
            data = resp["Body"].read()
            self._direct.learn(key)
            etag, content_range = resp.get("ETag"), str(resp.get("ContentRange") or "")
        total: int | None = None
        expected = end - start
        if content_range.startswith("bytes ") and "/" in content_range:
            span, tail = content_range[6:].split("/", 1)
            total = int(tail) if tail.isdigit() else None
            first, _, last = span.partition("-")
            if first.isdigit() and last.isdigit():
                expected = int(last) - int(first) + 1  # an object shorter than asked: the caller sees `total`
        if len(data) != expected:
            raise _ShortRead(f"got {len(data)} of {expected} bytes")
        return GetResult(data=data, etag=quoted_etag(etag), total_size=total)
