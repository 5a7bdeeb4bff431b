"""Bytes from a user-supplied URL, within firm limits of time and size.

All outbound fetching lives here. Every hop of a redirect chain is followed by
hand rather than by requests, so each one is checked by the URL policy
(``url_policy.py``), connected to the very address that was checked, and
counted against one deadline.
The body is read with ``read1`` (whatever bytes have arrived) rather than a
fixed-size ``read``, so a server that drips bytes cannot hold a read open past
the deadline, and the byte cap is enforced on what arrives, whatever
Content-Length claimed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin

import requests
import urllib3.exceptions
from requests.adapters import HTTPAdapter

from chalicelib.errors import ImageTooLarge, InvalidURL, UpstreamError, UpstreamTimeout
from chalicelib.url_policy import Resolver, Target, UrlPolicy, port_or_default

MAX_REDIRECTS = 3
READ_SIZE = 64 * 1024
USER_AGENT = "chalice-classifier/1.0 (+image classification)"


@dataclass(frozen=True)
class FetchLimits:
    """How long and how much the service will read from an image host."""

    connect_timeout: float = 3.0
    read_timeout: float = 5.0
    # One budget for the whole download, redirects included; well under API
    # Gateway's 29 s so the caller gets our 504, not the gateway's.
    deadline: float = 10.0
    max_bytes: int = 10 * 1024 * 1024


class PinnedAddressAdapter(HTTPAdapter):
    """Connects to the address the URL policy checked, never to a fresh DNS answer.

    The URL keeps its host name, so the Host header, TLS SNI and certificate
    checks still use the name; only the socket goes to the pinned address.
    This is how requests-hardened pins, with the address chosen by our policy.
    """

    def __init__(self) -> None:
        super().__init__(max_retries=0)
        self._pins: dict[tuple[str, int], str] = {}

    def pin(self, target: Target) -> None:
        address = str(target.address)
        self._pins[(target.host, target.port)] = f"[{address}]" if target.address.version == 6 else address

    def build_connection_pool_key_attributes(
        self, request: requests.PreparedRequest, verify: bool | str, cert: Any = None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        host_params, pool_kwargs = super().build_connection_pool_key_attributes(request, verify, cert)
        host, port = host_params["host"], host_params["port"]
        pinned = self._pins[(host, port_or_default(host_params["scheme"], port))]
        netloc = f"[{host}]" if ":" in host else host
        request.headers["Host"] = netloc if port is None else f"{netloc}:{port}"
        if host_params["scheme"] == "https":
            pool_kwargs["assert_hostname"] = host
            pool_kwargs["server_hostname"] = host
        host_params["host"] = pinned
        return host_params, pool_kwargs


class ImageFetcher:
    def __init__(self, limits: FetchLimits, policy: UrlPolicy, resolve: Resolver | None = None) -> None:
        self._limits = limits
        self._policy = policy
        self._resolve = resolve

    def fetch(self, url: str, deadline: float | None = None) -> bytes:
        """The body at ``url``; ``deadline`` (monotonic) lets a batch share one budget."""
        deadline = deadline if deadline is not None else time.monotonic() + self._limits.deadline
        adapter = PinnedAddressAdapter()
        with requests.Session() as session:
            # No proxy, netrc or CA bundle comes from the environment.
            session.trust_env = False
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            for _ in range(MAX_REDIRECTS + 1):
                adapter.pin(self._policy.check(url, self._resolve))
                with self._get(session, url, deadline) as response:
                    if response.is_redirect:
                        url = urljoin(url, response.headers["Location"])
                        continue
                    if response.status_code >= 400:
                        raise UpstreamError(
                            f"The image host answered HTTP {response.status_code} "
                            f"({response.reason or 'no reason given'}); expected 200 with an image."
                        )
                    return self._read_body(response, deadline)
        raise UpstreamError(f"The image URL redirected more than {MAX_REDIRECTS} times; give the final URL.")

    def _get(self, session: requests.Session, url: str, deadline: float) -> requests.Response:
        remaining = _remaining(deadline)
        try:
            return session.get(
                url,
                stream=True,
                allow_redirects=False,
                timeout=(
                    min(self._limits.connect_timeout, remaining),
                    min(self._limits.read_timeout, remaining),
                ),
                headers={"User-Agent": USER_AGENT, "Accept": "image/*", "Accept-Encoding": "identity"},
            )
        except requests.exceptions.Timeout as error:
            raise _timeout(self._limits) from error
        except (requests.exceptions.InvalidURL, requests.exceptions.InvalidSchema) as error:
            raise InvalidURL(f"The image URL is not valid: {error}") from error
        except requests.exceptions.RequestException as error:
            raise UpstreamError(f"Could not connect to the image host: {_reason(error)}.") from error

    def _read_body(self, response: requests.Response, deadline: float) -> bytes:
        cap = self._limits.max_bytes
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > cap:
            raise _too_large(cap, f"declares {int(declared):,} bytes")
        body = bytearray()
        try:
            while chunk := response.raw.read1(READ_SIZE):
                body += chunk
                if len(body) > cap:
                    raise _too_large(cap, "sent more")
                if time.monotonic() > deadline:
                    raise _timeout(self._limits)
        except (urllib3.exceptions.TimeoutError, TimeoutError) as error:
            raise _timeout(self._limits) from error
        except (urllib3.exceptions.HTTPError, OSError) as error:
            raise UpstreamError(
                f"The image host broke the connection mid-download: {_reason(error)}."
            ) from error
        return bytes(body)


def _remaining(deadline: float) -> float:
    return max(deadline - time.monotonic(), 0.001)


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
    """The innermost cause, without the URL-laden wrappers requests puts around it."""
    while error.__context__ is not None:
        error = error.__context__
    return type(error).__name__ if not str(error) else f"{type(error).__name__}: {str(error)[:200]}"
