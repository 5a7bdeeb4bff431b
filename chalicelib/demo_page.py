"""The demo page: one static HTML file, no build step, no external CDN.

It is read on the first ``GET /``, not at import, and told the stage's front
door (chalicelib/front_door.py), so that on a stage that wants an API key it
offers a field for one before the API refuses a request, and on an IAM stage
it says that it cannot sign requests. Its Content-Security-Policy lets it
talk only to this API, while showing a preview from any image URL.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from chalicelib import front_door

PAGE = Path(__file__).resolve().parent / "static" / "index.html"
FRONT_DOOR_MARK = "{{API_AUTH}}"
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
    return PAGE.read_text(encoding="utf-8").replace(FRONT_DOOR_MARK, front_door.AUTH)
