"""A fault and latency injector for tests and benchmarks: a real HTTP proxy on loopback in front
of an object-store server.

:class:`FaultProxy` listens on a free loopback port; clients use its ``endpoint`` in place of
the server's. With ``delay_s`` > 0 every request waits that long in the proxy before it is
forwarded (or faulted), as a round trip to a distant store would; each connection has its own
thread, so concurrent requests wait concurrently (latency, not a bandwidth limit).
``FaultProxy(upstream, fraction=0.0, delay_s=0.03)`` injects latency only. For a seeded random
``fraction`` of requests it injects a fault instead of an answer, one of ``kinds`` chosen at
random:

- ``"500"``: ``500 Internal Server Error`` with an S3 ``InternalError`` XML body;
- ``"503"``: ``503 Slow Down`` with an S3 ``SlowDown`` XML body;
- ``"drop"``: the connection is closed without an answer (the request is not forwarded);
- ``"lost"``: the request is forwarded and done, then the connection is closed before the
  answer (the client cannot know that it succeeded).

Every other request is forwarded unchanged (one request at a time per client connection,
keep-alive, Content-Length and chunked bodies) and its answer relayed. ``injected`` counts the
faults, ``by_kind`` them per kind, ``forwarded`` the requests that reached the server,
``by_method`` every request received per HTTP method, ``delayed`` the requests held for
``delay_s`` and ``delayed_s`` the delay injected in all. ``in_flight`` is the number of
requests received and not yet answered (or dropped), ``max_in_flight`` the most there were at
once: above 1, the client had requests overlapping in time.
"""

from __future__ import annotations

import collections
import http.client
import random
import socket
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

KINDS = ("500", "503", "drop", "lost")
_ERRORS = {
    "500": (500, "InternalError", "We encountered an internal error. Please try again."),
    "503": (503, "SlowDown", "Please reduce your request rate."),
}
_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade"}
_HOP |= {"proxy-connection", "proxy-authenticate", "proxy-authorization"}


class FaultProxy:
    """A fault and latency injector: forwards HTTP to ``upstream``, holding every request for
    ``delay_s`` and failing a seeded share ``fraction`` of them."""

    def __init__(
        self,
        upstream: str,
        fraction: float = 0.1,
        seed: int = 0,
        kinds: tuple[str, ...] = ("500", "503", "drop"),
        delay_s: float = 0.0,
    ) -> None:
        unknown = set(kinds) - set(KINDS)
        if unknown or not kinds or not 0.0 <= fraction <= 1.0:
            raise ValueError(f"kinds must be among {KINDS}, fraction in [0, 1]: {kinds} {fraction}")
        if not delay_s >= 0.0:  # also refuses NaN
            raise ValueError(f"delay_s must be >= 0 seconds: {delay_s}")
        parsed = urllib.parse.urlsplit(upstream)
        self.upstream = (parsed.hostname or "127.0.0.1", parsed.port or 80)
        self.fraction, self.kinds = float(fraction), tuple(kinds)
        self.delay_s = float(delay_s)
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.injected = 0
        self.forwarded = 0
        self.delayed = 0
        self.delayed_s = 0.0
        self.in_flight = 0
        self.max_in_flight = 0
        self.by_kind: collections.Counter[str] = collections.Counter()
        self.by_method: collections.Counter[str] = collections.Counter()
        self._server: ThreadingHTTPServer | None = None
        self._sockets: set[socket.socket] = set()

    @property
    def endpoint(self) -> str:
        if self._server is None:
            raise RuntimeError("the fault proxy is not running; use it as a context manager")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def draw(self) -> str | None:
        """The fault for the next request, or None to forward it."""
        with self._lock:
            if self._rng.random() >= self.fraction:
                self.forwarded += 1
                return None
            kind = self._rng.choice(self.kinds)
            self.injected += 1
            self.by_kind[kind] += 1
            if kind == "lost":
                self.forwarded += 1
            return kind

    def arrive(self, method: str) -> None:
        """Count a request by ``method`` (and as in flight until :meth:`depart`), then hold it
        for ``delay_s`` (none when it is 0)."""
        with self._lock:
            self.by_method[method] += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            if self.delay_s > 0.0:
                self.delayed += 1
                self.delayed_s += self.delay_s
        if self.delay_s > 0.0:
            time.sleep(self.delay_s)

    def reset_max_in_flight(self) -> None:
        """Start :attr:`max_in_flight` afresh from the requests in flight now."""
        with self._lock:
            self.max_in_flight = self.in_flight

    def depart(self) -> None:
        """A request that :meth:`arrive` counted has been answered (or dropped)."""
        with self._lock:
            self.in_flight -= 1

    def __enter__(self) -> FaultProxy:
        proxy = self

        class Handler(_Handler):
            owner = proxy

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        with self._lock:
            for sock in list(self._sockets):  # idle keep-alive connections of clients
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        self._server = None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect
    owner: FaultProxy
    _upstream: http.client.HTTPConnection | None = None

    def setup(self) -> None:
        super().setup()
        with self.owner._lock:
            self.owner._sockets.add(self.connection)

    def finish(self) -> None:
        with self.owner._lock:
            self.owner._sockets.discard(self.connection)
        if self._upstream is not None:
            self._upstream.close()
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        pass

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _drop(self) -> None:
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _forward(self, body: bytes) -> http.client.HTTPResponse:
        skip = _HOP | {"expect", "content-length"}  # 100-continue was answered here already
        headers = {k: v for k, v in self.headers.items() if k.lower() not in skip}
        if body or "Content-Length" in self.headers or "Transfer-Encoding" in self.headers:
            headers["Content-Length"] = str(len(body))
        for fresh in (False, True):  # a kept-alive upstream connection may have gone stale
            if self._upstream is None or fresh:
                if self._upstream is not None:
                    self._upstream.close()
                self._upstream = http.client.HTTPConnection(*self.owner.upstream, timeout=60)
            try:
                self._upstream.request(self.command, self.path, body=body, headers=headers)
                return self._upstream.getresponse()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                if fresh:
                    raise
        raise AssertionError("unreachable")

    def _handle(self) -> None:
        body = self._body()
        self.owner.arrive(self.command)
        try:
            self._answer(body)
        finally:
            self.owner.depart()

    def _answer(self, body: bytes) -> None:
        kind = self.owner.draw()
        if kind == "drop":
            return self._drop()
        if kind in _ERRORS:
            status, code, message = _ERRORS[kind]
            xml = (
                '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>'
                f"{code}</Code><Message>{message}</Message><Resource>{self.path}</Resource>"
                f"<RequestId>fault-injector</RequestId></Error>"
            ).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(xml)))
            self.end_headers()
            if self.command != "HEAD":  # an answer to HEAD has no body
                self.wfile.write(xml)
            return None
        response = self._forward(body)
        payload = response.read()
        if kind == "lost":
            return self._drop()
        self.send_response_only(response.status, response.reason)
        for key, value in response.getheaders():
            if key.lower() not in _HOP and key.lower() != "content-length":
                self.send_header(key, value)
        length = response.getheader("Content-Length") if self.command == "HEAD" else None
        self.send_header("Content-Length", length or str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)
        if response.will_close and self._upstream is not None:
            self._upstream.close()
            self._upstream = None
        return None

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = do_OPTIONS = _handle  # noqa: N815
