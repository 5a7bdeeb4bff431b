"""CORS: which web origins may call the API, decided per request.

Chalice's own ``cors=`` is fixed in the template when ``app.py`` is
packaged, and its preflights are then answered by API Gateway, out of our
hands. So the headers are computed per request from ``CORS_ALLOW_ORIGIN``:
``*`` for any origin (the dev stage), a comma-separated list of exact
origins, or unset for no CORS at all (prod, until someone sets it). Anything
else (``*`` among origins, a path, a missing scheme) is refused with a
``ValueError`` that says why: a setting that silently allows nothing would
look, to the team behind the web client, exactly like a bug of ours.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

ALLOWED_METHODS = "GET, POST, OPTIONS"
# Content-Type, and the credentials a front door asks for (chalicelib/front_door.py):
# an API key, or an AWS SigV4 signature and its session token.
ALLOWED_HEADERS = (
    "Content-Type, x-api-key, Authorization, X-Amz-Date, X-Amz-Security-Token, X-Amz-Content-Sha256"
)
EXPOSED_HEADERS = "x-request-id"
PREFLIGHT_MAX_AGE = "600"


@dataclass(frozen=True)
class CorsPolicy:
    any_origin: bool = False
    origins: frozenset[str] = frozenset()

    @classmethod
    def from_setting(cls, value: str) -> CorsPolicy:
        value = value.strip()
        if value == "*":
            return cls(any_origin=True)
        return cls(origins=frozenset(_origin(part) for part in value.split(",") if part.strip()))

    def headers(self, origin: str | None, *, preflight: bool) -> dict[str, str]:
        """The CORS response headers for a request from ``origin``; none if it is not allowed."""
        if self.any_origin:
            headers = {"Access-Control-Allow-Origin": "*"}
        elif origin is not None and origin.rstrip("/").lower() in self.origins:
            headers = {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
        else:
            return {}
        headers["Access-Control-Expose-Headers"] = EXPOSED_HEADERS
        if preflight:
            headers["Access-Control-Allow-Methods"] = ALLOWED_METHODS
            headers["Access-Control-Allow-Headers"] = ALLOWED_HEADERS
            headers["Access-Control-Max-Age"] = PREFLIGHT_MAX_AGE
        return headers


def _origin(text: str) -> str:
    """One origin as browsers send it, ``scheme://host[:port]``; the trailing slash is forgiven."""
    origin = text.strip().rstrip("/")
    if origin == "*":
        raise ValueError("'*' allows any origin only on its own, not in a list")
    try:
        parts = urlsplit(origin)
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError as error:
        raise ValueError(f"{origin!r} is not an origin ({error})") from error
    if parts.scheme not in ("http", "https") or not parts.hostname or "*" in origin:
        raise ValueError(
            f"{origin!r} is not an origin: expected scheme://host[:port], such as https://app.example"
        )
    if parts.path or parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError(f"{origin!r} is not an origin: an origin has no path, query or user")
    return origin.lower()
