"""``make serve``: ``chalice local --no-autoreload --stage dev`` with Nagle's algorithm off.

Chalice's local server answers in two writes, the status line and headers
(http.server's ``end_headers``), then the body. On a kept-alive connection,
which browsers, ``requests.Session`` and the demo page use, Nagle's
algorithm holds the body back until the client acknowledges the headers,
and the client, waiting for the rest of the response, delays that
acknowledgement (40 ms on Linux): every request after a connection's first
stalls. A new connection escapes it only because Linux acknowledges at once
early in a connection.

socketserver's own switch, ``disable_nagle_algorithm``, sets TCP_NODELAY on
each connection the server accepts, so both writes leave at once. Joining
them into one write instead (a buffered ``wfile``) would also hold back the
interim ``100 Continue`` that http.server sends to a client that asks for
it, as curl does for large uploads, until the client gives up waiting.
Chalice builds its server with its own handler class and its command line
offers no way to pass another, so the switch is set on that class, in this
process only, before handing over to Chalice's command line: the server is
otherwise exactly ``chalice local``. Nothing under tools/ is deployed.

Usage: ``python -m tools.dev_server --host 127.0.0.1 --port 8000`` (any
further ``chalice local`` option is passed on).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from chalice import local
from chalice.cli import main as chalice_main

CHALICE_LOCAL = ("local", "--no-autoreload", "--stage", "dev")


def disable_nagle() -> None:
    """Have every connection the local server accepts send each write at once (TCP_NODELAY)."""
    local.ChaliceRequestHandler.disable_nagle_algorithm = True


def main(arguments: Sequence[str]) -> int:
    """Run ``chalice local`` on the dev stage, as Chalice's own ``chalice`` command does."""
    disable_nagle()
    sys.argv = ["chalice", *CHALICE_LOCAL, *arguments]  # what Chalice's command line reads
    return chalice_main()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
