"""A real HTTP front for a PACS that can answer 429 (with Retry-After) and counts requests in flight."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx


class Front:
    """What the front does and saw: throttle the next N requests, hold each request, peak concurrency."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.throttle = 0  # the next N requests are answered 429
        self.retry_after = "1"
        self.hold_s = 0.0
        self.lock = threading.Lock()
        self.in_flight = 0
        self.peak = 0
        self.seen: list[tuple[float, int]] = []  # (monotonic time, status answered)
        self.port = 0

    @property
    def dicomweb(self) -> str:
        return f"dicomweb://127.0.0.1:{self.port}/dicom-web"


def _handler(front: Front) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            with front.lock:
                front.in_flight += 1
                front.peak = max(front.peak, front.in_flight)
                throttled = front.throttle > 0
                front.throttle -= 1 if throttled else 0
            time.sleep(front.hold_s)
            if throttled:
                self._answer(429, {"Retry-After": front.retry_after}, b"slow down")
                return
            headers = {k: v for k, v in self.headers.items() if k.lower() in ("accept", "authorization")}
            try:
                upstream = httpx.get(front.upstream + self.path, headers=headers, timeout=30)
            except httpx.HTTPError:
                self._answer(502, {}, b"upstream unreachable")
                return
            kept = {"Content-Type": upstream.headers.get("Content-Type", "application/octet-stream")}
            self._answer(upstream.status_code, kept, upstream.content)

        def _answer(self, status: int, headers: dict[str, str], body: bytes) -> None:
            # No longer in flight once answering: the client may send its next request at once.
            with front.lock:
                front.in_flight -= 1
                front.seen.append((time.monotonic(), status))
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler


@contextmanager
def pacs_front(upstream: str) -> Iterator[Front]:
    """A front on a free loopback port forwarding to ``upstream`` (http://host:port)."""
    front = Front(upstream)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(front))
    server.daemon_threads = True
    front.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield front
    finally:
        server.shutdown()
        server.server_close()
