"""A real threaded HTTP server on 127.0.0.1 that serves archives with chosen faults.

Each path is a :class:`Route`: the bytes to serve plus the faults to inject
(statuses before success, a dropped connection, an ignored Range header, ...).
Every request is recorded (method, path, headers) so a test can assert that a
retry or a resume really happened::

    with ArchiveServer() as server:
        url = server.add("/data.zip", body, statuses=[503, 503], retry_after="1")
        ...
        assert [r.status for r in server.requests_for("/data.zip")] == [503, 503, 200]

Used by the download tests, the benchmark and the end-to-end pipeline test.
"""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

LOGIN_PAGE = (
    b"<!DOCTYPE html>\n<html><head><title>Sign in</title></head>"
    b"<body><form action='/login'><input name='user'></form></body></html>\n"
)


@dataclass
class Route:
    """What one path serves, and how it misbehaves.

    ``statuses`` are answered (and used up) one per request before the body is
    served, e.g. ``[503, 503]``; ``retry_after`` goes with each of them.
    ``drop_after`` closes the connection after that many body bytes, for the
    first ``drops`` requests. ``ignore_range`` answers every request with the
    whole body (200). ``content_type=None`` sends no Content-Type;
    ``send_length=False`` sends no Content-Length (the body ends at close).
    ``rate`` throttles the body to that many bytes per second.
    """

    body: bytes
    content_type: str | None = "application/zip"
    statuses: list[int] = field(default_factory=list)
    retry_after: str | None = None
    drop_after: int | None = None
    drops: int = 1
    ignore_range: bool = False
    etag: str | None = None
    send_length: bool = True
    rate: int | None = None

    def __post_init__(self) -> None:
        if self.etag is None:
            self.etag = '"' + hashlib.sha256(self.body).hexdigest()[:16] + '"'


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    headers: dict[str, str]
    status: int
    time: float

    def header(self, name: str) -> str | None:
        """A request header, case-insensitively."""
        for key, value in self.headers.items():
            if key.lower() == name.lower():
                return value
        return None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def do_GET(self) -> None:
        self._serve(head=False)

    def _serve(self, head: bool) -> None:
        route, status, drop = self._next_answer()
        if route is None:
            self._record(404)
            return self._plain(404, b"not found\n")
        if status is not None:
            self._record(status)
            extra = {"Retry-After": route.retry_after} if route.retry_after else {}
            return self._plain(status, f"status {status}\n".encode(), extra)
        start = self._honoured_range_start(route)
        if start is not None and start >= len(route.body):
            self._record(416)
            return self._plain(416, b"", {"Content-Range": f"bytes */{len(route.body)}"})
        code = 200 if start is None else 206
        self._record(code)
        payload = memoryview(route.body)[start or 0 :]
        self._send_headers(route, code, start or 0, len(payload))
        if head:
            return
        if drop is not None:
            return self._write_then_drop(payload[:drop])
        self._write_body(payload, route.rate)

    def _next_answer(self) -> tuple[Route | None, int | None, int | None]:
        """This path's route, and the fault it answers with now (a status, or the body
        bytes before the connection drops), used up under the lock."""
        owner = self.server.owner
        with owner.lock:
            route = owner.routes.get(self.path.split("?", 1)[0])
            status = route.statuses.pop(0) if route and route.statuses else None
            drop = None
            if route and status is None and route.drop_after is not None and route.drops > 0:
                route.drops -= 1
                drop = route.drop_after
        return route, status, drop

    def _honoured_range_start(self, route: Route) -> int | None:
        """Where the requested ``Range`` starts, when the route honours it (None: whole body)."""
        wanted = self.headers.get("Range")
        if_range = self.headers.get("If-Range")
        if wanted and not route.ignore_range and (if_range is None or if_range == route.etag):
            return _range_start(wanted)
        return None

    def _send_headers(self, route: Route, code: int, start: int, length: int) -> None:
        self.send_response(code)
        if route.content_type:
            self.send_header("Content-Type", route.content_type)
        if route.send_length:
            self.send_header("Content-Length", str(length))
        else:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.send_header("Accept-Ranges", "none" if route.ignore_range else "bytes")
        self.send_header("ETag", route.etag or "")
        if code == 206:
            size = len(route.body)
            self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        self.end_headers()

    def _write_then_drop(self, part: memoryview) -> None:
        self.wfile.write(part)
        self.wfile.flush()
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _write_body(self, payload: memoryview, rate: int | None) -> None:
        """``payload`` in chunks, throttled to ``rate`` bytes per second when set."""
        step = max(256, rate // 10) if rate else 1 << 20
        try:
            for offset in range(0, len(payload), step):
                self.wfile.write(payload[offset : offset + step])
                if rate:
                    time.sleep(step / rate)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _plain(self, code: int, text: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(text)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(text)

    def _record(self, status: int) -> None:
        owner = self.server.owner
        entry = Request(
            self.command, self.path.split("?", 1)[0], dict(self.headers), status, time.monotonic()
        )
        with owner.lock:
            owner.requests.append(entry)


def _range_start(value: str) -> int | None:
    """The first byte of a ``bytes=N-`` range (the only form clients here send)."""
    unit, _, spec = value.partition("=")
    first, dash, _last = spec.partition("-")
    if unit.strip() != "bytes" or not dash or not first.strip().isdigit():
        return None
    return int(first)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    owner: ArchiveServer


class ArchiveServer:
    """A loopback HTTP server on an ephemeral port; start with ``with`` or :meth:`start`."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.requests: list[Request] = []
        self.lock = threading.Lock()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> ArchiveServer:
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.owner = self
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> ArchiveServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._httpd is not None, "server not started"
        return self._httpd.server_address[1]

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def add(self, path: str, body: bytes, **faults: Any) -> str:
        """Serve ``body`` at ``path`` with the given :class:`Route` faults; returns its URL."""
        if not path.startswith("/"):
            raise ValueError(f"path {path!r} must start with /")
        with self.lock:
            self.routes[path] = Route(body, **faults)
        return self.url(path)

    def add_login_page(self, path: str) -> str:
        """An HTML sign-in page where the archive should be (what many portals answer)."""
        return self.add(path, LOGIN_PAGE, content_type="text/html; charset=utf-8")

    def requests_for(self, path: str, method: str = "GET") -> list[Request]:
        with self.lock:
            return [r for r in self.requests if r.path == path and r.method == method]

    def count(self, path: str | None = None) -> int:
        with self.lock:
            return sum(1 for r in self.requests if path is None or r.path == path)


@contextmanager
def closed_port() -> Iterator[int]:
    """A loopback port that refuses connections for as long as the block runs: bound and
    never listening, so no other process can take it meanwhile."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("127.0.0.1", 0))
        yield held.getsockname()[1]


def unused_port() -> int:
    """A loopback port that nothing listens on (bound, then released), for a server that
    must know its port before it starts (Airflow's api-server is named in the task's
    execution API URL)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
