"""A proxy on loopback in front of moto's server, for faults moto itself never makes.

``MotoProxy`` forwards every request to moto unchanged and relays the answer,
unless a subclass's ``answer`` returns one of its own: a throttled S3 read
(tests/support/faulty_s3.py), or an SQS batch with an entry failed
(tests/support/flaky_sqs.py). Point a client's endpoint at
``endpoint`` instead of moto's.
"""

from __future__ import annotations

import http.client
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from tests.support.http_server import InBackground

# Set by the proxy for the body it sends, never copied from the upstream's answer.
_FRAMING_HEADERS = ("content-length", "transfer-encoding", "connection")


@dataclass(frozen=True)
class Reply:
    status: int
    headers: list[tuple[str, str]]
    body: bytes


class MotoProxy(InBackground):
    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self._upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def relay(self) -> None:
                owner._relay(self)

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = relay  # noqa: N815 - http.server's names

            def log_message(self, format: str, *args: object) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: object, client_address: object) -> None:
                pass  # a client that closes a connection with a body unread is no fault of the proxy

        super().__init__(Server(("127.0.0.1", 0), Handler))

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def answer(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Reply | None:
        """A reply of the proxy's own for this request, or None to forward it as it is."""
        return None

    def forward(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Reply:
        """The request sent on to moto, and its answer."""
        upstream = http.client.HTTPConnection(*self._upstream, timeout=30)
        try:
            upstream.request(method, path, body=body or None, headers=headers)
            answer = upstream.getresponse()
            return Reply(answer.status, answer.getheaders(), answer.read())
        finally:
            upstream.close()

    def _relay(self, handler: BaseHTTPRequestHandler) -> None:
        body = handler.rfile.read(int(handler.headers.get("Content-Length") or 0))
        headers = dict(handler.headers)
        reply = self.answer(handler.command, handler.path, headers, body) or self.forward(
            handler.command, handler.path, headers, body
        )
        handler.send_response(reply.status)
        for name, value in reply.headers:
            if name.lower() not in _FRAMING_HEADERS:
                handler.send_header(name, value)
        handler.send_header("Content-Length", str(len(reply.body)))
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(reply.body)
