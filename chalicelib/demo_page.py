"""The demo page: one static HTML file, no build step, no external CDN.

It is read on the first ``GET /``, not at import, and told the stage's front
door (chalicelib/front_door.py), so that on a stage that wants an API key it
offers a field for one before the API refuses a request, and on an IAM stage
it says that it cannot sign requests. Its Content-Security-Policy lets it
talk only to this API, while showing a preview from any image URL, and run
only its own inline script and style (``headers``, shared with ``GET /docs``).
"""

from __future__ import annotations

import base64
import hashlib
import re
from functools import cache
from pathlib import Path

from chalicelib import front_door

PAGE = Path(__file__).resolve().parent / "static" / "index.html"
FRONT_DOOR_MARK = "{{API_AUTH}}"
# Each page's own inline <script> and <style> are allowed by their SHA-256 and nothing
# else is: no 'unsafe-inline', so markup injected into a page could not run a script.
POLICY = (
    "default-src 'none'; script-src {scripts}; style-src {styles}; "
    "img-src * data: blob:; connect-src 'self'; form-action 'self'; base-uri 'none'"
)
_HASHES = r"('sha256-[A-Za-z0-9+/]+=*' ?)+"
POLICY_PATTERN = (  # POLICY as a regular expression, for the OpenAPI document
    rf"^default-src 'none'; script-src {_HASHES}; style-src {_HASHES}; "
    r"img-src \* data: blob:; connect-src 'self'; form-action 'self'; base-uri 'none'$"
)
NOSNIFF = "nosniff"


@cache
def page() -> str:
    return PAGE.read_text(encoding="utf-8").replace(FRONT_DOOR_MARK, front_door.AUTH)


@cache
def headers(html: str) -> dict[str, str]:
    """What a page of ours is served with: its type, no sniffing, and a policy naming its own inline code."""
    policy = POLICY.format(
        scripts=_hashes(html, "script") or "'none'", styles=_hashes(html, "style") or "'none'"
    )
    return {
        "Content-Type": "text/html; charset=utf-8",
        "Content-Security-Policy": policy,
        "X-Content-Type-Options": NOSNIFF,
    }


def _hashes(html: str, tag: str) -> str:
    blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.DOTALL)
    return " ".join(
        f"'sha256-{base64.b64encode(hashlib.sha256(block.encode()).digest()).decode()}'" for block in blocks
    )
