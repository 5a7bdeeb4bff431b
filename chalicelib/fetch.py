"""Bytes from a user-supplied URL, within firm limits of time and size.

All outbound fetching lives here, so the URL policy has one place to live.
Every hop of a redirect chain is followed by hand rather than by requests, so
each one is checked by the same policy and counted against one deadline.
The body is read with ``read1`` (whatever bytes have arrived) rather than a
fixed-size ``read``, so a server that drips bytes cannot hold a read open past
the deadline, and the byte cap is enforced on what arrives, whatever
Content-Length claimed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import requests
import urllib3.exceptions

from chalicelib.errors import ImageTooLarge, InvalidURL, UpstreamError, UpstreamTimeout

MAX_REDIRECTS = 3
MAX_URL_LENGTH = 2048
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


class ImageFetcher:
    def __init__(self, limits: FetchLimits) -> None:
        self._limits = limits

    def fetch(self, url: str) -> bytes:
        deadline = time.monotonic() + self._limits.deadline
        with requests.Session() as session:
            # No proxy, netrc or CA bundle comes from the environment.
            session.trust_env = False
            for _ in range(MAX_REDIRECTS + 1):
                check_url(url)
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


def check_url(url: str) -> None:
    """Refuse anything but an absolute http(s) URL with a host."""
    if len(url) > MAX_URL_LENGTH:
        raise InvalidURL(f"The image URL is {len(url)} characters long; the limit is {MAX_URL_LENGTH}.")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError as error:
        raise InvalidURL(f"The image URL is not valid: {error}.") from error
    if parts.scheme.lower() not in ("http", "https"):
        raise InvalidURL(f"The image URL must start with http:// or https://, got {url[:100]!r}.")
    if not parts.hostname:
        raise InvalidURL(f"The image URL has no host name: {url[:100]!r}.")


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
