"""Bytes from a user-supplied URL, within firm limits of time and size.

All outbound fetching lives here. Every hop of a redirect chain is followed by
hand: each one is checked by the URL policy (``url_policy.py``) and gets a
connection of its own to the very address that was checked. The host's name
goes only into the Host header and TLS (SNI and the certificate check), so a
second DNS answer cannot move the connection.

One deadline covers the whole fetch: DNS, connect, TLS handshake, status
line, headers and body, on every hop. A socket timeout bounds one call, not
their sum, so a host that sends a byte just inside each read timeout could
otherwise hold a fetch as long as it liked, headers included. Here every
blocking step gets the smaller of its own timeout and the time left
(``Deadline.cap``), and none starts once no time is left:

- the policy's DNS lookup runs in a thread of its own, which the fetch stops
  waiting for at the deadline (``getaddrinfo`` cannot be interrupted, so an
  abandoned lookup ends in the background when the resolver gives up);
- the TCP connect, then the TLS handshake, get the connect timeout;
- the response is read through a file (``DeadlineReader``) that sets the
  socket's timeout before every ``recv``. http.client reads the status line
  and headers through that same file, so a host that drips its headers is
  cut off exactly like one that drips its body.

So the fetcher drives urllib3's connection class itself, not requests: the
pinned address and the per-read timeout both have to be set on the
connection, which requests keeps behind its pool manager.

The body is read with ``read1`` (whatever bytes have arrived), and the byte
cap is enforced on what arrives, whatever Content-Length claimed. Whatever a
host or a URL gets wrong ends as an ``UpstreamError``, ``UpstreamTimeout``,
``ImageTooLarge`` or ``InvalidURL``, never as an exception of the libraries.
"""

from __future__ import annotations

import http.client
import io
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any
from urllib.parse import urljoin

import certifi
import urllib3.exceptions
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.response import BaseHTTPResponse
from urllib3.util.ssl_match_hostname import CertificateError

from chalicelib.errors import ImageTooLarge, InvalidURL, UpstreamError, UpstreamTimeout
from chalicelib.settings import FetchLimits
from chalicelib.url_policy import IPAddress, Resolver, Target, UrlPolicy, port_or_default, resolve_host

MAX_REDIRECTS = 3
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
READ_SIZE = 64 * 1024
USER_AGENT = "chalice-classifier/1.0 (+image classification)"


@dataclass(frozen=True)
class Deadline:
    """The monotonic instant by which a whole fetch must be over."""

    at: float

    def left(self) -> float:
        return self.at - time.monotonic()

    def cap(self, timeout: float) -> float:
        """``timeout``, or the time left if that is shorter; TimeoutError once none is."""
        left = self.left()
        if left <= 0:
            raise TimeoutError("the fetch deadline has passed")
        return min(timeout, left)


class ImageFetcher:
    """Image bytes from URLs, under ``limits`` and ``policy``.

    ``resolve`` and ``ca_bundle`` (a PEM file) stand in for the system resolver
    and certifi's certificate authorities, so tests can name hosts and serve HTTPS.
    """

    def __init__(
        self,
        limits: FetchLimits,
        policy: UrlPolicy,
        resolve: Resolver | None = None,
        ca_bundle: str | None = None,
    ) -> None:
        self._limits = limits
        self._policy = policy
        self._resolve = resolve or resolve_host
        self._ca_bundle = ca_bundle or certifi.where()

    def fetch(self, url: str, deadline: float | None = None) -> bytes:
        """The body at ``url``; ``deadline`` (monotonic) lets a batch share one budget."""
        clock = Deadline(deadline if deadline is not None else time.monotonic() + self._limits.deadline)
        resolve = partial(self._resolve_in_time, clock)
        for _ in range(MAX_REDIRECTS + 1):
            target = self._policy.check(url, resolve)
            with self._exchange(target, clock) as response:
                if response.status in REDIRECT_STATUSES:
                    url = _redirect_url(url, response)
                    continue
                if not 200 <= response.status < 300:
                    raise UpstreamError(
                        f"The image host answered HTTP {response.status} "
                        f"({response.reason[:100] if response.reason else 'no reason given'}); "
                        "expected 200 with an image."
                    )
                return self._read_body(response)
        raise UpstreamError(f"The image URL redirected more than {MAX_REDIRECTS} times; give the final URL.")

    def _resolve_in_time(self, clock: Deadline, host: str, port: int) -> Sequence[IPAddress]:
        """The resolver's answer, or UpstreamTimeout at the deadline while it is still thinking."""
        answer: Future[Sequence[IPAddress]] = Future()
        lookup = threading.Thread(
            target=_settle, args=(answer, self._resolve, host, port), name="resolve", daemon=True
        )
        lookup.start()
        try:
            return answer.result(timeout=max(clock.left(), 0))
        except TimeoutError:
            raise _timeout(self._limits) from None

    @contextmanager
    def _exchange(self, target: Target, clock: Deadline) -> Iterator[BaseHTTPResponse]:
        """The host's response to one GET, its status and headers read; the connection closes after."""
        connection = None
        response = None
        try:
            with self._host_errors("Could not get an answer from the image host"):
                connection = self._connection_to(target, clock)
                connection.request(
                    "GET",
                    target.path,
                    headers={
                        "Host": _host_header(target),
                        "User-Agent": USER_AGENT,
                        "Accept": "image/*",
                        "Accept-Encoding": "identity",
                    },
                    preload_content=False,
                    decode_content=False,
                )
                response = connection.getresponse()
            yield response
        finally:
            if response is not None:
                response.close()
            if connection is not None:
                connection.close()

    def _connection_to(self, target: Target, clock: Deadline) -> PinnedConnection:
        address = str(target.address)
        if target.scheme != "https":
            return PinnedConnection(address, target.port, clock, self._limits)
        return PinnedTLSConnection(
            address,
            target.port,
            clock,
            self._limits,
            server_hostname=target.host,
            assert_hostname=target.host,
            cert_reqs="CERT_REQUIRED",
            ca_certs=self._ca_bundle,
        )

    def _read_body(self, response: BaseHTTPResponse) -> bytes:
        cap = self._limits.max_bytes
        declared = _declared_length(response.headers.get("Content-Length"))
        if declared is not None and declared > cap:
            raise _too_large(cap, f"declares {declared:,} bytes")
        body = bytearray()
        with self._host_errors("The image host broke the connection mid-download"):
            while chunk := response.read1(READ_SIZE):
                body += chunk
                if len(body) > cap:
                    raise _too_large(cap, "sent more")
        return bytes(body)

    @contextmanager
    def _host_errors(self, failure: str) -> Iterator[None]:
        """What sockets, TLS, http.client and urllib3 raise about a host, as our 502 and 504."""
        try:
            yield
        except urllib3.exceptions.NewConnectionError as error:
            # Checked before timeouts: urllib3 makes a refused connection a kind of ConnectTimeoutError.
            raise UpstreamError(f"Could not connect to the image host: {_reason(error)}.") from error
        except (TimeoutError, urllib3.exceptions.TimeoutError) as error:
            raise _timeout(self._limits) from error
        except (
            OSError,
            http.client.HTTPException,
            urllib3.exceptions.HTTPError,
            CertificateError,
        ) as error:
            raise UpstreamError(f"{failure}: {_reason(error)}.") from error


class PinnedConnection(HTTPConnection):
    """An HTTP connection to one checked address, each of its steps ended by the deadline."""

    def __init__(self, address: str, port: int, clock: Deadline, limits: FetchLimits, **tls: Any) -> None:
        super().__init__(address, port, timeout=clock.cap(limits.connect_timeout), **tls)
        self._clock = clock
        self._connect_timeout = limits.connect_timeout
        self.response_class = partial(DeadlineResponse, read_timeout=partial(clock.cap, limits.read_timeout))

    def _new_conn(self) -> socket.socket:
        self.timeout = self._clock.cap(self._connect_timeout)
        sock = super()._new_conn()
        # The TLS handshake and sending the request come next, on what is left.
        sock.settimeout(self._clock.cap(self._connect_timeout))
        return sock


class PinnedTLSConnection(PinnedConnection, HTTPSConnection):
    """The same over TLS, the certificate checked against the host's name, not the address."""


class DeadlineResponse(http.client.HTTPResponse):
    """http.client's response, reading its socket only through a ``DeadlineReader``."""

    def __init__(
        self, sock: socket.socket, *args: Any, read_timeout: Callable[[], float], **kwargs: Any
    ) -> None:
        super().__init__(sock, *args, **kwargs)
        self.fp = io.BufferedReader(DeadlineReader(sock, self.fp.detach(), read_timeout))


class DeadlineReader(io.RawIOBase):
    """A socket's reads, each given ``read_timeout()`` seconds: the read timeout, less near the deadline."""

    def __init__(self, sock: socket.socket, raw: io.RawIOBase, read_timeout: Callable[[], float]) -> None:
        super().__init__()
        self._sock = sock
        self._raw = raw  # the socket's own reader: it keeps the socket open while the response needs it
        self._read_timeout = read_timeout

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int | None:
        self._sock.settimeout(self._read_timeout())
        return self._raw.readinto(buffer)

    def close(self) -> None:
        self._raw.close()
        super().close()


def _host_header(target: Target) -> str:
    host = f"[{target.host}]" if ":" in target.host else target.host
    return host if target.port == port_or_default(target.scheme, None) else f"{host}:{target.port}"


def _settle(answer: Future[Any], call: Callable[..., Any], *args: Any) -> None:
    try:
        answer.set_result(call(*args))
    except BaseException as error:  # handed to the waiting thread, which raises it
        answer.set_exception(error)


def _redirect_url(url: str, response: BaseHTTPResponse) -> str:
    """Where a redirect points, resolved against ``url``; the policy checks it next."""
    location = _header_text(response.headers.get("Location", "")).strip()
    if not location:
        raise UpstreamError(f"The image host answered HTTP {response.status} with no Location to follow.")
    try:
        return urljoin(url, location)
    except ValueError as error:
        raise InvalidURL(
            f"The image host redirected to {location[:100]!r}, which is not a valid URL: {error}."
        ) from error


def _header_text(value: str) -> str:
    """A header as text: http.client reads header bytes as Latin-1, but hosts mostly send UTF-8."""
    try:
        return value.encode("latin-1").decode("utf-8")
    except UnicodeError:
        return value


def _declared_length(value: str | None) -> int | None:
    """Content-Length as a number; None if missing or not plain ASCII digits (``²`` is a digit to str)."""
    if value is None or not (value.isascii() and value.isdigit()):
        return None
    return int(value)


def _timeout(limits: FetchLimits) -> UpstreamTimeout:
    return UpstreamTimeout(
        f"The image host did not deliver the image within {limits.deadline:g} s "
        f"(connect {limits.connect_timeout:g} s, read {limits.read_timeout:g} s)."
    )


def _too_large(cap: int, what: str) -> ImageTooLarge:
    return ImageTooLarge(
        f"The image is larger than the {cap:,}-byte limit (MAX_IMAGE_BYTES): the host {what}."
    )


def _reason(error: BaseException) -> str:
    """The innermost cause, without the wrappers urllib3 puts around it."""
    while error.__context__ is not None:
        error = error.__context__
    return type(error).__name__ if not str(error) else f"{type(error).__name__}: {str(error)[:200]}"
