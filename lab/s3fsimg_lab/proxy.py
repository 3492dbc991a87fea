"""A counting, fault-injecting HTTP/1.1 reverse proxy for S3 (moto) and its in-test controller.

Owns two things:

* the proxy process, ``python -m s3fsimg_lab.proxy --upstream URL [--port P] [--control-port C]``: it forwards
  every request unchanged (method, path, query, headers incl. ``Host``, Content-Length and chunked /
  aws-chunked bodies) to the upstream over a keep-alive connection owned by the client connection's thread,
  streams the response back, counts requests and bytes by method and key, and injects faults chosen at run
  time. It listens on two ports: the *data* port (S3 traffic) and the *control* port (the ``/__lab__/``
  JSON API, which is never counted or faulted and keeps working while the data port refuses connections);
* :class:`LabProxy`, the controller tests use: starts/stops the process and wraps the control API.

Fault kinds (see :class:`Fault`): ``latency_ms`` (added before the request is forwarded),
``bandwidth_bps`` (cap on the response body rate of a connection), ``refuse`` (the connection is reset
without a response; a refuse fault without any selector or count closes the data port, so new connections
get ECONNREFUSED), ``error_status`` (500/503/... with an S3 XML error body), ``truncate`` (full
Content-Length, body cut after ``value`` bytes — default half — then the connection is closed),
``flip_byte`` (one body byte, at offset ``value`` — default the middle — is XORed with 0xFF), ``hang``
(no answer until the fault is cleared or replaced, or the proxy stops; then the request proceeds).
A fault applies to requests whose path contains ``match`` and/or matches ``regex``, whose method is in
``methods``; ``count`` limits it to the next N matching requests.

Control API (control port; also on the data port while it listens):
``GET /__lab__/counts``, ``POST /__lab__/reset``, ``GET /__lab__/faults``, ``POST /__lab__/faults``
(JSON list of faults, replaces), ``POST /__lab__/faults/add`` (one fault, appended),
``DELETE /__lab__/faults``, ``GET /__lab__/ping``.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import io
import json
import os
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, cast
from urllib.parse import unquote, urlsplit

from s3fsimg_lab.procs import kill_process, stop_process

FAULT_KINDS = ("latency_ms", "bandwidth_bps", "refuse", "error_status", "truncate", "flip_byte", "hang")
LAB_PREFIX = "/__lab__/"
_CHUNK = 256 * 1024
_SMALL_BODY = 128 * 1024
_MAX_LINE = 65536

_ERRORS = {
    500: ("InternalError", "We encountered an internal error. Please try again."),
    503: ("SlowDown", "Please reduce your request rate."),
    502: ("BadGateway", "The lab proxy injected a bad gateway error."),
    504: ("GatewayTimeout", "The lab proxy injected a gateway timeout."),
    400: ("BadRequest", "The lab proxy injected a bad request error."),
    403: ("AccessDenied", "Access Denied"),
    404: ("NoSuchKey", "The specified key does not exist."),
}
_REASONS = {
    200: "OK",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


@dataclass
class Fault:
    """One fault rule.

    ``kind`` is one of :data:`FAULT_KINDS`; ``value`` is its parameter (ms, bytes/s, HTTP status, bytes sent
    before truncation, offset of the flipped byte; unused by ``refuse``/``hang``). Selectors: ``match``
    (substring of the request path, which starts with ``/<bucket>/``), ``regex`` (``re.search`` on the
    path), ``methods`` (e.g. ``["GET"]``); all given selectors must hold. ``count``: only the next N
    matching requests (``None`` = unlimited).
    """

    kind: str
    value: float | None = None
    match: str | None = None
    regex: str | None = None
    methods: list[str] | None = None
    count: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; expected one of {FAULT_KINDS}")
        if self.methods is not None:
            self.methods = [m.upper() for m in self.methods]
        if self.regex is not None:
            re.compile(self.regex)

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Fault:
        known = {"kind", "value", "match", "regex", "methods", "count"}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown fault fields {sorted(unknown)}")
        return cls(**data)


# --------------------------------------------------------------------------------------------------
# proxy process side
# --------------------------------------------------------------------------------------------------


class _ActiveFault:
    def __init__(self, fault: Fault) -> None:
        self.fault = fault
        self.remaining = fault.count
        self.regex = re.compile(fault.regex) if fault.regex else None
        self.released = threading.Event()
        self.applied = 0

    @property
    def refuses_all(self) -> bool:
        f = self.fault
        return f.kind == "refuse" and f.match is None and f.regex is None and not f.methods and f.count is None

    def matches(self, method: str, path: str) -> bool:
        f = self.fault
        if self.remaining is not None and self.remaining <= 0:
            return False
        if f.methods and method not in f.methods:
            return False
        if f.match is not None and f.match not in path:
            return False
        return not (self.regex is not None and not self.regex.search(path))

    def to_json(self) -> dict[str, Any]:
        d = self.fault.to_json()
        d["remaining"] = self.remaining
        d["applied"] = self.applied
        return d


class _Stats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self.lock:
            self.requests = 0
            self.connections = 0
            self.request_bytes = 0
            self.response_bytes = 0
            self.by_method: Counter[str] = Counter()
            self.by_key: Counter[str] = Counter()
            self.by_method_key: dict[str, Counter[str]] = {}
            self.status: Counter[str] = Counter()
            self.response_bytes_by_key: Counter[str] = Counter()
            self.faults_applied: Counter[str] = Counter()

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {
                "requests": self.requests,
                "connections": self.connections,
                "request_bytes": self.request_bytes,
                "response_bytes": self.response_bytes,
                "by_method": dict(self.by_method),
                "by_key": dict(self.by_key),
                "by_method_key": {m: dict(c) for m, c in self.by_method_key.items()},
                "status": dict(self.status),
                "response_bytes_by_key": dict(self.response_bytes_by_key),
                "faults_applied": dict(self.faults_applied),
            }


def key_of(path: str) -> str:
    """The object key of a path-style request target: ``/bucket/a%20b?x=1`` -> ``a b``; bucket ops -> ``""``."""
    p = path.split("?", 1)[0].lstrip("/")
    _, _, key = p.partition("/")
    return unquote(key)


class _Closed(Exception):
    """The peer closed the connection (or the proxy is stopping)."""


class _Request:
    __slots__ = ("close", "expect", "head_lines", "length", "method", "path", "target", "te_chunked")

    def __init__(self) -> None:
        self.method = ""
        self.target = ""
        self.path = ""
        self.head_lines: list[bytes] = []
        self.length = 0
        self.te_chunked = False
        self.expect = False
        self.close = False


def _read_head(rfile: io.BufferedReader) -> tuple[bytes, list[bytes]] | None:
    """Read a start line and header lines; None on clean EOF before any byte."""
    line = rfile.readline(_MAX_LINE)
    while line in (b"\r\n", b"\n"):
        line = rfile.readline(_MAX_LINE)
    if not line:
        return None
    headers: list[bytes] = []
    while True:
        h = rfile.readline(_MAX_LINE)
        if not h:
            raise _Closed("EOF in headers")
        if h in (b"\r\n", b"\n"):
            return line, headers
        headers.append(h)
        if len(headers) > 500:
            raise _Closed("too many headers")


def _header_map(lines: list[bytes]) -> dict[str, str]:
    out: dict[str, str] = {}
    for h in lines:
        name, _, value = h.partition(b":")
        k = name.strip().lower().decode("latin-1")
        v = value.strip().decode("latin-1")
        out[k] = f"{out[k]}, {v}" if k in out else v
    return out


def _reset_socket(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0) so the client sees a connection reset at once."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


class _Upstream:
    """One keep-alive connection to the upstream, owned by one client-connection thread."""

    def __init__(self, host: str, port: int, server: ProxyServer) -> None:
        self.host = host
        self.port = port
        self.server = server
        self.sock: socket.socket | None = None
        self.rfile: io.BufferedReader | None = None
        self.fresh = False

    def ensure(self) -> None:
        if self.sock is not None:
            r, _, _ = select.select([self.sock], [], [], 0)
            if r:  # EOF or stray bytes: not reusable
                self.close()
        if self.sock is None:
            sock = socket.socket(self.server.up_family, socket.SOCK_STREAM)
            try:
                sock.connect(self.server.up_addr)
            except OSError:
                sock.close()
                raise
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sock = sock
            self.rfile = cast(io.BufferedReader, sock.makefile("rb", 65536))
            self.fresh = True
            self.server.track(sock)
        else:
            self.fresh = False

    def close(self) -> None:
        if self.sock is not None:
            self.server.untrack(self.sock)
            with contextlib.suppress(OSError):
                self.sock.close()
        if self.rfile is not None:
            with contextlib.suppress(OSError, ValueError):
                self.rfile.close()
        self.sock = None
        self.rfile = None



def _close_listener(lst: socket.socket | None) -> None:
    """Stop a listening socket (its accept loop then ends)."""
    if lst is not None:
        with contextlib.suppress(OSError):
            lst.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            lst.close()


def _shut_all(socks: list[socket.socket]) -> None:
    """Shut every connection down (their threads then end)."""
    for s in socks:
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)


class ProxyServer:
    """The proxy's listening sockets, connection threads, counters and faults (inside the proxy process)."""

    def __init__(self, upstream: str, host: str = "127.0.0.1", port: int = 0, control_port: int = 0) -> None:
        u = urlsplit(upstream)
        if u.scheme != "http" or not u.hostname:
            raise ValueError(f"upstream must be http://host:port, got {upstream!r}")
        self.up_host = u.hostname
        self.up_port = u.port or 80
        family, _, _, _, addr = socket.getaddrinfo(self.up_host, self.up_port, type=socket.SOCK_STREAM)[0]
        self.up_family, self.up_addr = family, addr  # resolved once: no lookup per upstream connection
        self.host = host
        self.stats = _Stats()
        self.stop_event = threading.Event()
        self.flock = threading.Lock()
        self.faults: list[_ActiveFault] = []
        self._socks: set[socket.socket] = set()
        self._data_socks: set[socket.socket] = set()
        self._slock = threading.Lock()
        self.control_listener = self._listen(control_port)
        self.control_port = int(self.control_listener.getsockname()[1])
        self.data_listener: socket.socket | None = self._listen(port)
        self.port = int(self.data_listener.getsockname()[1])
        self._data_lock = threading.Lock()

    # ---- sockets -------------------------------------------------------------------------------
    def _listen(self, port: int) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((self.host, port))
        s.listen(256)
        return s

    def track(self, sock: socket.socket, data: bool = False) -> None:
        with self._slock:
            self._socks.add(sock)
            if data:
                self._data_socks.add(sock)

    def untrack(self, sock: socket.socket) -> None:
        with self._slock:
            self._socks.discard(sock)
            self._data_socks.discard(sock)

    def serve(self) -> None:
        """Start the accept threads (returns at once)."""
        threading.Thread(
            target=self._accept_loop, args=(self.control_listener, True), daemon=True, name="lab-control"
        ).start()
        assert self.data_listener is not None
        threading.Thread(
            target=self._accept_loop, args=(self.data_listener, False), daemon=True, name="lab-data"
        ).start()

    def _accept_loop(self, listener: socket.socket, control: bool) -> None:
        while not self.stop_event.is_set():
            try:
                sock, _ = listener.accept()
            except OSError:
                return  # listener closed (stop, or data port closed by a refuse fault)
            if not control:
                with self.stats.lock:
                    self.stats.connections += 1
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.track(sock, data=not control)
            threading.Thread(target=self._connection, args=(sock, control), daemon=True).start()

    def _close_data_port(self) -> None:
        with self._data_lock:
            lst, self.data_listener = self.data_listener, None
            _close_listener(lst)
            with self._slock:
                victims = list(self._data_socks)
            _shut_all(victims)

    def _open_data_port(self) -> None:
        with self._data_lock:
            if self.data_listener is not None or self.stop_event.is_set():
                return
            deadline = time.monotonic() + 5
            while True:
                try:
                    self.data_listener = self._listen(self.port)
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            threading.Thread(
                target=self._accept_loop, args=(self.data_listener, False), daemon=True, name="lab-data"
            ).start()

    def stop(self) -> None:
        """Stop accepting, release hung requests, close every connection."""
        self.stop_event.set()
        with self.flock:
            for af in self.faults:
                af.released.set()
        for lst in (self.control_listener, self.data_listener):
            _close_listener(lst)
        with self._slock:
            socks = list(self._socks)
        _shut_all(socks)

    # ---- faults --------------------------------------------------------------------------------
    def set_faults(self, faults: list[Fault]) -> None:
        new = [_ActiveFault(f) for f in faults]
        with self.flock:
            old, self.faults = self.faults, new
        for af in old:
            af.released.set()
        self._sync_refuse()

    def add_fault(self, fault: Fault) -> None:
        with self.flock:
            self.faults.append(_ActiveFault(fault))
        self._sync_refuse()

    def _sync_refuse(self) -> None:
        with self.flock:
            refuse = any(af.refuses_all for af in self.faults)
        if refuse:
            self._close_data_port()
        else:
            self._open_data_port()

    def _select(self, method: str, path: str) -> list[_ActiveFault]:
        with self.flock:
            hit = [af for af in self.faults if af.matches(method, path)]
            for af in hit:
                if af.remaining is not None:
                    af.remaining -= 1
                af.applied += 1
        if hit:
            with self.stats.lock:
                for af in hit:
                    self.stats.faults_applied[af.fault.kind] += 1
        return hit

    # ---- connections ---------------------------------------------------------------------------
    def _connection(self, sock: socket.socket, control: bool) -> None:
        rfile = cast(io.BufferedReader, sock.makefile("rb", 65536))
        upstream = _Upstream(self.up_host, self.up_port, self)
        keep = True
        try:
            while keep and not self.stop_event.is_set():
                head = _read_head(rfile)
                if head is None:
                    break
                req = self._parse_request(*head)
                if control or req.path.startswith(LAB_PREFIX):
                    keep = self._control(sock, rfile, req)
                else:
                    keep = self._data(sock, rfile, req, upstream)
        except (OSError, _Closed, ValueError):
            keep = False
        finally:
            upstream.close()
            self.untrack(sock)
            with contextlib.suppress(OSError, ValueError):
                rfile.close()
            with contextlib.suppress(OSError):
                sock.close()

    @staticmethod
    def _parse_request(line: bytes, lines: list[bytes]) -> _Request:
        req = _Request()
        parts = line.decode("latin-1").rstrip("\r\n").split(" ")
        if len(parts) != 3:
            raise _Closed(f"bad request line {line!r}")
        req.method, req.target, version = parts
        req.method = req.method.upper()
        req.path = req.target
        if req.target.startswith(("http://", "https://")):
            u = urlsplit(req.target)
            req.path = u.path + (f"?{u.query}" if u.query else "")
        h = _header_map(lines)
        req.te_chunked = "chunked" in h.get("transfer-encoding", "").lower()
        req.length = int(h.get("content-length", "0") or 0) if not req.te_chunked else 0
        req.expect = h.get("expect", "").lower() == "100-continue"
        conn = h.get("connection", "").lower()
        req.close = "close" in conn or (version == "HTTP/1.0" and "keep-alive" not in conn)
        req.head_lines = [line] + [x for x in lines if not x.lower().startswith(b"expect:")]
        return req

    def _read_body(self, sock: socket.socket, rfile: io.BufferedReader, req: _Request, sink: Any) -> int:
        """Relay the request body (raw framing) from the client to ``sink(bytes)``; return body bytes."""
        if req.expect:
            sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            req.expect = False
        total = 0
        if req.te_chunked:
            buf = bytearray()
            while True:
                size_line = rfile.readline(_MAX_LINE)
                if not size_line:
                    raise _Closed("EOF in chunked body")
                buf += size_line
                size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while True:
                        t = rfile.readline(_MAX_LINE)
                        if not t:
                            raise _Closed("EOF in trailers")
                        buf += t
                        if t in (b"\r\n", b"\n"):
                            break
                    break
                left = size + 2  # data + CRLF
                while left:
                    data = rfile.read(min(left, _CHUNK))
                    if not data:
                        raise _Closed("EOF in chunk")
                    buf += data
                    left -= len(data)
                    if len(buf) >= _CHUNK:
                        sink(bytes(buf))
                        total += len(buf)
                        buf.clear()
            if buf:
                sink(bytes(buf))
                total += len(buf)
        else:
            left = req.length
            while left:
                data = rfile.read(min(left, _CHUNK))
                if not data:
                    raise _Closed("EOF in body")
                sink(data)
                total += len(data)
                left -= len(data)
        return total

    def _data(self, sock: socket.socket, rfile: io.BufferedReader, req: _Request, up: _Upstream) -> bool:
        method, path = req.method, req.path
        key = key_of(path)
        st = self.stats
        with st.lock:
            st.requests += 1
            st.by_method[method] += 1
            st.by_key[key] += 1
            st.by_method_key.setdefault(method, Counter())[key] += 1

        faults = self._select(method, path) if self.faults else []
        latency = 0.0
        bandwidth: float | None = None
        status: int | None = None
        truncate: float | None = None
        truncate_on = False
        flip: float | None = None
        flip_on = False
        for af in faults:
            f = af.fault
            if f.kind == "hang":
                while not af.released.wait(0.25):
                    if self.stop_event.is_set():
                        break
                if self.stop_event.is_set():
                    raise _Closed("stopping")
            elif f.kind == "refuse":
                self.untrack(sock)
                _reset_socket(sock)
                raise _Closed("refused")
            elif f.kind == "latency_ms":
                latency += float(f.value or 0) / 1000.0
            elif f.kind == "bandwidth_bps":
                bw = float(f.value or 0)
                if bw > 0:
                    bandwidth = bw if bandwidth is None else min(bandwidth, bw)
            elif f.kind == "error_status":
                status = int(f.value or 503)
            elif f.kind == "truncate":
                truncate_on, truncate = True, f.value
            elif f.kind == "flip_byte":
                flip_on, flip = True, f.value
        if latency > 0 and self.stop_event.wait(latency):
            raise _Closed("stopping")

        if status is not None:
            return self._send_error(sock, rfile, req, status)

        # ---- forward the request ----
        for attempt in (0, 1):
            up.ensure()
            assert up.sock is not None and up.rfile is not None
            upsock, uprfile = up.sock, up.rfile
            head = b"".join(req.head_lines) + b"\r\n"
            has_body = req.te_chunked or req.length > 0
            try:
                if has_body:
                    upsock.sendall(head)
                    n = self._read_body(sock, rfile, req, upsock.sendall)
                    with st.lock:
                        st.request_bytes += n
                else:
                    upsock.sendall(head)
                resp_head = _read_head(uprfile)
                while resp_head is not None and resp_head[0].split(b" ", 2)[1:2] == [b"100"]:
                    resp_head = _read_head(uprfile)  # we answered 100-continue ourselves
                if resp_head is None:
                    raise _Closed("upstream closed")
                break
            except (OSError, _Closed):
                up.close()
                if attempt == 0 and not has_body and not up.fresh:
                    continue  # stale keep-alive connection: retry once on a new one
                return self._send_error(sock, rfile, req, 502, drain=False)

        assert resp_head is not None
        status_line, resp_lines = resp_head
        parts = status_line.split(b" ", 2)
        code = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
        rh = _header_map(resp_lines)
        up_close = "close" in rh.get("connection", "").lower() or parts[0] == b"HTTP/1.0"
        with st.lock:
            st.status[str(code)] += 1

        if method == "HEAD" or code in (204, 304) or 100 <= code < 200:
            mode, length = "none", 0
        elif "chunked" in rh.get("transfer-encoding", "").lower():
            mode, length = "chunked", -1
        elif "content-length" in rh:
            mode, length = "length", int(rh["content-length"])
        else:
            mode, length = "eof", -1
            up_close = True

        cut: int | None = None
        if truncate_on and mode != "none":
            cut = int(truncate) if truncate is not None else (length // 2 if length >= 0 else 0)
        flip_at: int | None = None
        if flip_on and mode != "none":
            flip_at = int(flip) if flip is not None else (length // 2 if length > 0 else 0)

        if mode != "eof" and not req.close:
            # Connection is hop-by-hop: moto (werkzeug) closes after every response, but the client side
            # stays keep-alive; only this thread's upstream connection is renewed.
            resp_lines = [x for x in resp_lines if not x[:11].lower().startswith((b"connection:", b"keep-alive:"))]
        head_out = status_line + b"".join(resp_lines) + b"\r\n"
        sent = 0
        try:
            if mode == "none":
                sock.sendall(head_out)
            elif mode == "length" and length <= _SMALL_BODY and bandwidth is None:
                body = uprfile.read(length) if length else b""
                if len(body) != length:
                    up_close = True
                if flip_at is not None and 0 <= flip_at < len(body):
                    b = bytearray(body)
                    b[flip_at] ^= 0xFF
                    body = bytes(b)
                if cut is not None:
                    body = body[:cut]
                sock.sendall(head_out + body)
                sent = len(body)
            else:
                sock.sendall(head_out)
                sent = self._stream_body(sock, uprfile, mode, length, cut, flip_at, bandwidth)
        except (OSError, _Closed):
            up.close()  # unread upstream bytes: that connection cannot be reused
            raise _Closed("client went away") from None
        finally:
            with st.lock:
                st.response_bytes += sent
                st.response_bytes_by_key[key] += sent

        if cut is not None:
            up.close()
            sock.shutdown(socket.SHUT_RDWR)
            return False
        if up_close:
            up.close()
            if mode == "eof":
                return False
        return not req.close

    def _stream_body(
        self,
        sock: socket.socket,
        uprfile: io.BufferedReader,
        mode: str,
        length: int,
        cut: int | None,
        flip_at: int | None,
        bandwidth: float | None,
    ) -> int:
        """Copy a response body upstream -> client; return body bytes sent (framing excluded)."""
        step = _CHUNK if bandwidth is None else max(1024, min(65536, int(bandwidth / 20)))
        start = time.monotonic()
        sent = 0  # body bytes (decoded for chunked)

        def emit(data: bytes | memoryview, framing: tuple[bytes, bytes] | None = None) -> bool:
            """Send body data; False once the truncation point is reached."""
            nonlocal sent
            if flip_at is not None and sent <= flip_at < sent + len(data):
                b = bytearray(data)
                b[flip_at - sent] ^= 0xFF
                data = bytes(b)
            stop = False
            if cut is not None and sent + len(data) >= cut:
                data = data[: max(0, cut - sent)]
                stop = True
            if framing is not None and not stop:
                sock.sendall(framing[0] + bytes(data) + framing[1])
            elif data:
                sock.sendall(data)
            sent += len(data)
            if bandwidth is not None and data:
                ahead = sent / bandwidth - (time.monotonic() - start)
                if ahead > 0 and self.stop_event.wait(ahead):
                    raise _Closed("stopping")
            return not stop

        if mode == "length":
            # one reusable buffer: no per-chunk allocation (large bytes objects cost page faults)
            view = memoryview(bytearray(min(step, max(length, 1))))
            left = length
            while left > 0:
                n = uprfile.readinto1(view[: min(left, step)])
                if not n:
                    raise _Closed("upstream EOF in body")
                left -= n
                if not emit(view[:n]):
                    break
        elif mode == "eof":
            while True:
                data = uprfile.read1(step)
                if not data or not emit(data):
                    break
        else:  # chunked: re-frame each upstream chunk unchanged (bandwidth slices large chunks)
            while True:
                size_line = uprfile.readline(_MAX_LINE)
                if not size_line:
                    raise _Closed("upstream EOF in chunked body")
                size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    trailer = size_line
                    while True:
                        t = uprfile.readline(_MAX_LINE)
                        if not t:
                            raise _Closed("upstream EOF in trailers")
                        trailer += t
                        if t in (b"\r\n", b"\n"):
                            break
                    sock.sendall(trailer)
                    break
                data = uprfile.read(size)
                uprfile.read(2)
                if len(data) != size:
                    raise _Closed("upstream EOF in chunk")
                ok = True
                for i in range(0, size, step):
                    piece = data[i : i + step]
                    if not emit(piece, (b"%x\r\n" % len(piece), b"\r\n")):
                        ok = False
                        break
                if not ok:
                    break
        return sent

    def _send_error(
        self, sock: socket.socket, rfile: io.BufferedReader, req: _Request, status: int, drain: bool = True
    ) -> bool:
        close = req.close or req.expect or not drain
        if drain and not req.expect:
            n = self._read_body(sock, rfile, req, lambda _b: None)
            with self.stats.lock:
                self.stats.request_bytes += n
        code, message = _ERRORS.get(status, ("InternalError", "Injected error."))
        rid = uuid.uuid4().hex[:16].upper()
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{code}</Code><Message>{message}</Message>"
            f"<Resource>{req.path.split('?', 1)[0]}</Resource><RequestId>{rid}</RequestId></Error>"
        ).encode()
        payload = b"" if req.method == "HEAD" else body
        head = (
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
            f"Content-Type: application/xml\r\nContent-Length: {len(body)}\r\n"
            f"x-amz-request-id: {rid}\r\nServer: s3fsimg-lab-proxy\r\n"
            f"Connection: {'close' if close else 'keep-alive'}\r\n\r\n"
        ).encode()
        with self.stats.lock:
            self.stats.status[str(status)] += 1
            self.stats.response_bytes += len(payload)
            self.stats.response_bytes_by_key[key_of(req.path)] += len(payload)
        sock.sendall(head + payload)
        return not close

    # ---- control API ---------------------------------------------------------------------------
    def _control(self, sock: socket.socket, rfile: io.BufferedReader, req: _Request) -> bool:
        chunks: list[bytes] = []
        self._read_body(sock, rfile, req, chunks.append)
        raw = b"".join(chunks)
        path = req.path.split("?", 1)[0].rstrip("/")
        status: int = 200
        result: Any = None
        try:
            if path == "/__lab__/ping":
                result = {"ok": True, "port": self.port, "control_port": self.control_port}
            elif path == "/__lab__/counts" and req.method == "GET":
                result = self.stats.snapshot()
            elif path == "/__lab__/reset" and req.method == "POST":
                self.stats.reset()
                result = self.stats.snapshot()
            elif path == "/__lab__/faults" and req.method == "GET":
                with self.flock:
                    result = [af.to_json() for af in self.faults]
            elif path == "/__lab__/faults" and req.method in ("POST", "PUT"):
                data = json.loads(raw or b"[]")
                if isinstance(data, dict):
                    data = data.get("faults", [])
                self.set_faults([Fault.from_json(d) for d in data])
                result = {"ok": True, "faults": len(data)}
            elif path == "/__lab__/faults/add" and req.method == "POST":
                self.add_fault(Fault.from_json(json.loads(raw)))
                result = {"ok": True}
            elif path == "/__lab__/faults" and req.method == "DELETE":
                self.set_faults([])
                result = {"ok": True}
            else:
                status, result = 404, {"error": f"no control endpoint {req.method} {path}"}
        except (ValueError, TypeError, re.error) as exc:
            status, result = 400, {"error": str(exc)}
        body = json.dumps(result).encode()
        head = (
            f"HTTP/1.1 {status} {_REASONS.get(status, 'X')}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: {'close' if req.close else 'keep-alive'}\r\n\r\n"
        ).encode()
        sock.sendall(head + (b"" if req.method == "HEAD" else body))
        return not req.close


def _watch_parent(ppid: int, server: ProxyServer) -> None:
    while not server.stop_event.wait(1.0):
        if os.getppid() != ppid:
            server.stop()
            return


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m s3fsimg_lab.proxy``."""
    ap = argparse.ArgumentParser(prog="python -m s3fsimg_lab.proxy", description=__doc__.split("\n")[0])
    ap.add_argument("--upstream", required=True, help="upstream URL, e.g. http://127.0.0.1:5000")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="data port (0 = any free port)")
    ap.add_argument("--control-port", type=int, default=0, help="control port (0 = any free port)")
    ap.add_argument("--ready-file", help="write {port, control_port, pid} JSON here once listening")
    ap.add_argument("--parent-pid", type=int, help="exit when this parent process goes away")
    args = ap.parse_args(argv)

    server = ProxyServer(args.upstream, args.host, args.port, args.control_port)

    def on_signal(_sig: int, _frame: Any) -> None:
        server.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.serve()
    info = {"port": server.port, "control_port": server.control_port, "pid": os.getpid()}
    if args.ready_file:
        tmp = f"{args.ready_file}.tmp"
        Path(tmp).write_text(json.dumps(info))
        os.replace(tmp, args.ready_file)
    print(json.dumps(info), flush=True)
    if args.parent_pid:
        threading.Thread(target=_watch_parent, args=(args.parent_pid, server), daemon=True).start()
    while not server.stop_event.wait(0.5):
        pass
    server.stop()
    return 0


# --------------------------------------------------------------------------------------------------
# test side
# --------------------------------------------------------------------------------------------------


class LabProxy:
    """Controller for a proxy process in front of ``upstream`` (a moto URL).

    >>> with LabProxy(moto.url) as proxy:
    ...     client = s3_client(proxy.url)
    ...     proxy.add_fault("error_status", 503, match="images/", count=2)
    ...     proxy.get_count("GET", "images/")
    """

    def __init__(self, upstream: str, start_timeout: float = 15.0) -> None:
        self.upstream = upstream
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.control_port = 0
        self._tmp = tempfile.TemporaryDirectory(prefix="lab-proxy-")
        self.log_path = Path(self._tmp.name) / "proxy.log"

    @property
    def url(self) -> str:
        """Data URL: give this to clients as the S3 endpoint."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def control_url(self) -> str:
        return f"http://127.0.0.1:{self.control_port}"

    def start(self) -> LabProxy:
        """Start the process and wait until its control port answers."""
        ready = Path(self._tmp.name) / "ready.json"
        # The child imports this same copy of the lab (installed editable, or on PYTHONPATH already).
        lab_dir = str(Path(__file__).resolve().parents[1])
        env = dict(os.environ)
        env["PYTHONPATH"] = lab_dir + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env["PYTHONUNBUFFERED"] = "1"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "s3fsimg_lab.proxy",
                    "--upstream",
                    self.upstream,
                    "--ready-file",
                    str(ready),
                    "--parent-pid",
                    str(os.getpid()),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=lab_dir,
                start_new_session=True,
            )
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                msg = self.log_path.read_text(errors="replace")[-4000:]
                self.stop()
                raise RuntimeError(f"lab proxy exited with {self.proc and self.proc.returncode}:\n{msg}")
            if ready.exists():
                info = json.loads(ready.read_text())
                self.port, self.control_port = int(info["port"]), int(info["control_port"])
                self._call("GET", "/__lab__/ping")
                return self
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"lab proxy did not start within {self.start_timeout}s")

    def stop(self, timeout: float = 5.0) -> None:
        """Terminate the process (kill after ``timeout``); idempotent. Releases hung requests."""
        proc, self.proc = self.proc, None
        stop_process(proc, timeout)

    def log_text(self) -> str:
        """The proxy process's output so far (tracebacks of unexpected errors end up here)."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def close(self) -> None:
        """Stop the process and remove its temporary directory."""
        self.stop()
        self._tmp.cleanup()

    def __enter__(self) -> LabProxy:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def __del__(self) -> None:
        kill_process(getattr(self, "proc", None))

    # ---- control API ---------------------------------------------------------------------------
    def _call(self, method: str, path: str, body: Any = None) -> Any:
        conn = http.client.HTTPConnection("127.0.0.1", self.control_port, timeout=10)
        try:
            data = None if body is None else json.dumps(body).encode()
            headers = {"Content-Type": "application/json"} if data is not None else {}
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            payload = json.loads(resp.read() or b"null")
            if resp.status != 200:
                raise RuntimeError(f"lab proxy {method} {path}: {resp.status} {payload}")
            return payload
        finally:
            conn.close()

    def counts(self) -> dict[str, Any]:
        """Counters: requests, connections, request_bytes, response_bytes, by_method, by_key,
        by_method_key ({method: {key: n}}), status ({"200": n}), response_bytes_by_key, faults_applied."""
        result: dict[str, Any] = self._call("GET", "/__lab__/counts")
        return result

    def reset(self) -> None:
        """Zero every counter."""
        self._call("POST", "/__lab__/reset")

    def set_faults(self, faults: Iterable[Fault | dict[str, Any]]) -> None:
        """Replace the fault list (hung requests of removed faults are released)."""
        items = [f.to_json() if isinstance(f, Fault) else Fault.from_json(f).to_json() for f in faults]
        self._call("POST", "/__lab__/faults", items)

    def add_fault(
        self,
        kind: str,
        value: float | None = None,
        *,
        match: str | None = None,
        regex: str | None = None,
        methods: Iterable[str] | None = None,
        count: int | None = None,
    ) -> Fault:
        """Append one fault; see :class:`Fault` for the fields."""
        fault = Fault(kind, value, match, regex, list(methods) if methods is not None else None, count)
        self._call("POST", "/__lab__/faults/add", fault.to_json())
        return fault

    def clear_faults(self) -> None:
        """Remove every fault (releases hung requests, reopens a refused data port)."""
        self._call("DELETE", "/__lab__/faults")

    def faults(self) -> list[dict[str, Any]]:
        """The active faults, each with ``remaining`` (count left) and ``applied`` (times used)."""
        result: list[dict[str, Any]] = self._call("GET", "/__lab__/faults")
        return result

    @contextlib.contextmanager
    def fault(self, kind: str, value: float | None = None, **selectors: Any) -> Iterator[Fault]:
        """``with proxy.fault("hang", match="k"):`` — the fault list is cleared on exit."""
        f = self.add_fault(kind, value, **selectors)
        try:
            yield f
        finally:
            self.clear_faults()

    def get_count(self, method: str | None = None, key_substring: str = "") -> int:
        """Requests with ``method`` (any if None) whose key contains ``key_substring``."""
        by_mk: dict[str, dict[str, int]] = self.counts()["by_method_key"]
        return sum(
            n
            for m, keys in by_mk.items()
            if method is None or m == method.upper()
            for k, n in keys.items()
            if key_substring in k
        )

    def get_bytes(self, key_substring: str = "") -> int:
        """Response body bytes sent for keys containing ``key_substring``."""
        by_key: dict[str, int] = self.counts()["response_bytes_by_key"]
        return sum(n for k, n in by_key.items() if key_substring in k)


if __name__ == "__main__":
    sys.exit(main())
