"""The demo page: one static HTML file, no build step, no external CDN.

It is read on the first ``GET /``, not at import. Its Content-Security-Policy
lets it talk only to this API, while showing a preview from any image URL.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

PAGE = Path(__file__).resolve().parent / "static" / "index.html"
HEADERS = {
    "Content-Type": "text/html; charset=utf-8",
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
        "img-src * data: blob:; connect-src 'self'; form-action 'self'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
}


@cache
def page() -> str:
    return PAGE.read_text(encoding="utf-8")
