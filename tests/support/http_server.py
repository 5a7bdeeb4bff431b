"""A real HTTP server on 127.0.0.1 whose routes a test sets up.

Each route is a function of the request handler, so a test can answer with
an image, an error status, a redirect, or misbehave on purpose (drip bytes,
lie about Content-Length, never stop). Every request is recorded, so a test
can also prove that a refused URL was never fetched. Given a TLS context
(see ``CertificateAuthority``) the server speaks HTTPS.
"""

from __future__ import annotations

import datetime
import ipaddress
import socket
import socketserver
import ssl
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Self

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

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


class InBackground:
    """A ``socketserver`` server served on a thread of its own while a ``with`` block runs."""

    def __init__(self, server: socketserver.BaseServer) -> None:
        self._server = server
        # A short poll, so shutting the server down at the end of a test takes a moment, not half a second.
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


class RoutedHTTPServer(InBackground):
    """Serves ``routes`` on one address; 127.0.0.1 and a free port unless told otherwise."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, tls: ssl.SSLContext | None = None) -> None:
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
        self._scheme = "https" if tls else "http"
        server = Server((host, port), Handler)
        if tls is not None:
            server.socket = tls.wrap_socket(server.socket, server_side=True)
        super().__init__(server)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def url(self, path: str) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"{self._scheme}://{host}:{self.port}{path}"


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


def delayed(seconds: float, then: Route) -> Route:
    """Accept the request, say nothing for ``seconds``, then answer as ``then`` does."""

    def route(handler: BaseHTTPRequestHandler) -> None:
        time.sleep(seconds)
        then(handler)

    return route


def stall(seconds: float) -> Route:
    """Accept the request, then say nothing for ``seconds``."""
    return delayed(seconds, serve_bytes(b"late"))


def drip_headers(byte_every: float, seconds: float) -> Route:
    """The status line and headers one byte per ``byte_every`` seconds, for about ``seconds``.

    Each pause is shorter than any read timeout, so only a deadline that
    covers the whole header block can end the request.
    """
    padding = b"a" * int(seconds / byte_every)
    head = b"HTTP/1.1 200 OK\r\nX-Padding: " + padding + b"\r\nContent-Length: 0\r\n\r\n"

    def route(handler: BaseHTTPRequestHandler) -> None:
        handler.close_connection = True
        try:
            for index in range(len(head)):
                handler.wfile.write(head[index : index + 1])
                time.sleep(byte_every)
        except OSError:
            return

    return route


def raw_response(data: bytes) -> Route:
    """Send ``data`` as the whole response, verbatim, then hang up: for malformed HTTP."""

    def route(handler: BaseHTTPRequestHandler) -> None:
        handler.close_connection = True
        try:
            handler.wfile.write(data)
        except OSError:
            return

    return route


class CertificateAuthority:
    """A throwaway certificate authority: a PEM bundle to trust, and server contexts it signs."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self._key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "chalice-classifier test CA")])
        self._certificate = (
            _certificate_builder(name, name, self._key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self._key, hashes.SHA256())
        )
        self.bundle = str(directory / "ca.pem")
        Path(self.bundle).write_bytes(self._certificate.public_bytes(serialization.Encoding.PEM))

    def server_context(self, name: str) -> ssl.SSLContext:
        """A server's TLS context with a certificate for ``name`` (a DNS name or an IP address)."""
        key = ec.generate_private_key(ec.SECP256R1())
        try:
            alternative: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(name))
        except ValueError:
            alternative = x509.DNSName(name)
        certificate = (
            _certificate_builder(
                x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]),
                self._certificate.subject,
                key.public_key(),
            )
            .add_extension(x509.SubjectAlternativeName([alternative]), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        chain = self._directory / f"{name}.pem"
        chain.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            + certificate.public_bytes(serialization.Encoding.PEM)
        )
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(chain)
        return context


def _certificate_builder(
    subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey
) -> x509.CertificateBuilder:
    """A certificate valid for the next hour, from a few minutes ago (clocks drift)."""
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
    )
