"""CORS: which web origins may call the API, decided per request.

Chalice's own ``cors=`` is fixed when ``app.py`` is imported, which happens
at packaging time on the developer's machine, before any stage's environment
exists. So the headers are computed per request from ``CORS_ALLOW_ORIGIN``:
``*`` for any origin (the dev stage), a comma-separated list of exact
origins, or unset for no CORS at all (prod, until someone sets it).
"""

from __future__ import annotations

from dataclasses import dataclass

ALLOWED_METHODS = "GET, POST, OPTIONS"
ALLOWED_HEADERS = "Content-Type"
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
        return cls(origins=frozenset(o.strip().rstrip("/") for o in value.split(",") if o.strip()))

    def headers(self, origin: str | None, *, preflight: bool) -> dict[str, str]:
        """The CORS response headers for a request from ``origin``; none if it is not allowed."""
        if self.any_origin:
            headers = {"Access-Control-Allow-Origin": "*"}
        elif origin is not None and origin.rstrip("/") in self.origins:
            headers = {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
        else:
            return {}
        headers["Access-Control-Expose-Headers"] = EXPOSED_HEADERS
        if preflight:
            headers["Access-Control-Allow-Methods"] = ALLOWED_METHODS
            headers["Access-Control-Allow-Headers"] = ALLOWED_HEADERS
            headers["Access-Control-Max-Age"] = PREFLIGHT_MAX_AGE
        return headers
