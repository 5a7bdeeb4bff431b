"""A real HTTP server on 127.0.0.1 whose routes a test sets up.

Each route is a function of the request handler, so a test can answer with
an image, an error status, a redirect, or misbehave on purpose (drip bytes,
lie about Content-Length, never stop). Every request is recorded, so a test
can also prove that a refused URL was never fetched.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

Route = Callable[[BaseHTTPRequestHandler], None]


def serve_bytes(body: bytes, content_type: str = "image/jpeg", status: int = 200) -> Route:
    def route(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(status)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    return route


def redirect_to(location: str, status: int = 302) -> Route:
    def route(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(status)
        handler.send_header("Location", location)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    return route


class RoutedHTTPServer:
    """Serves ``routes`` on one address; 127.0.0.1 and a free port unless told otherwise."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.routes: dict[str, Route] = {}
        self.requests: list[str] = []
        self.host_headers: list[str] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                owner.requests.append(self.path)
                owner.host_headers.append(self.headers.get("Host", ""))
                route = owner.routes.get(self.path)
                if route is None:
                    self.send_error(404)
                    return
                route(self)

            def log_message(self, format: str, *args: object) -> None:
                pass

        class Server(ThreadingHTTPServer):
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
            daemon_threads = True

            def handle_error(self, request: object, client_address: object) -> None:
                pass  # a client hanging up on a misbehaving route is the point of the test

        self._host = host
        self._server = Server((host, port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def url(self, path: str) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self.port}{path}"

    def __enter__(self) -> RoutedHTTPServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


def drip(byte_every: float, total: int = 1000) -> Route:
    """Headers at once, then one byte per ``byte_every`` seconds: a slow-loris host."""

    def route(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "image/jpeg")
        handler.send_header("Content-Length", str(total))
        handler.end_headers()
        try:
            for _ in range(total):
                handler.wfile.write(b"\xff")
                handler.wfile.flush()
                time.sleep(byte_every)
        except OSError:
            return  # the client gave up, as it should

    return route


def endless(chunk: bytes = b"\x00" * 65536, declared_length: int | None = None) -> Route:
    """A body that never ends, optionally behind a Content-Length that lies about it."""

    def route(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "image/jpeg")
        if declared_length is not None:
            handler.send_header("Content-Length", str(declared_length))
        handler.send_header("Connection", "close")
        handler.end_headers()
        handler.close_connection = True
        try:
            for _ in range(100_000):  # bounded: about 6.5 GB at most, never reached
                handler.wfile.write(chunk)
        except OSError:
            return

    return route


def stall(seconds: float) -> Route:
    """Accept the request, then say nothing for ``seconds``."""

    def route(handler: BaseHTTPRequestHandler) -> None:
        time.sleep(seconds)
        serve_bytes(b"late")(handler)

    return route
