"""An S3 on loopback that fails on purpose: moto behind a proxy that throttles chosen requests.

``FaultyS3`` forwards every request to the real (moto) server, except that
the first ``times`` requests matching a fault are answered as S3 answers
when it throttles (``503 SlowDown``, with its XML error body), without
reaching moto at all. What it answered is recorded, so a test can see that a
request really was refused before it was retried.
"""

from __future__ import annotations

import http.client
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self
from urllib.parse import urlsplit

SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)


class FaultyS3:
    def __init__(self, upstream: str) -> None:
        self.faults: Counter[tuple[str, str]] = Counter()  # (method, path) -> refusals still to give
        self.refused: Counter[tuple[str, str]] = Counter()
        self._lock = threading.Lock()
        parts = urlsplit(upstream)
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def forward(self) -> None:
                owner._handle(self, parts.hostname or "127.0.0.1", parts.port or 80)

            def do_GET(self) -> None:
                self.forward()

            def do_HEAD(self) -> None:
                self.forward()

            def do_PUT(self) -> None:
                self.forward()

            def log_message(self, format: str, *args: object) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: object, client_address: object) -> None:
                pass  # a client that closes a connection with a body unread is no fault of the proxy

        self._server = Server(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05})

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def refuse(self, method: str, path: str, times: int = 1) -> None:
        with self._lock:
            self.faults[(method, path)] += times

    def _handle(self, handler: BaseHTTPRequestHandler, host: str, port: int) -> None:
        path = handler.path.split("?", 1)[0]
        body = handler.rfile.read(int(handler.headers.get("Content-Length") or 0))
        with self._lock:
            refuse = self.faults[(handler.command, path)] > 0
            if refuse:
                self.faults[(handler.command, path)] -= 1
                self.refused[(handler.command, path)] += 1
        if refuse:
            handler.send_response(503)
            handler.send_header("Content-Type", "application/xml")
            handler.send_header("Content-Length", str(len(SLOW_DOWN)))
            handler.end_headers()
            if handler.command != "HEAD":
                handler.wfile.write(SLOW_DOWN)
            return
        upstream = http.client.HTTPConnection(host, port, timeout=30)
        try:
            upstream.request(handler.command, handler.path, body=body or None, headers=dict(handler.headers))
            answer = upstream.getresponse()
            payload = answer.read()
        finally:
            upstream.close()
        handler.send_response(answer.status)
        for name, value in answer.getheaders():
            if name.lower() not in ("content-length", "transfer-encoding", "connection"):
                handler.send_header(name, value)
        handler.send_header("Content-Length", str(len(payload)))
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(payload)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
