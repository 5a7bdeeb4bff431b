"""Schemathesis against a real `chalice local` (dev stage, loopback only), from the OpenAPI document.

Each operation gets up to ``EXAMPLES_PER_OPERATION`` generated requests
(valid and invalid ones: Schemathesis's "all" mode), plus its explicit
examples and coverage cases, and every answer must pass Schemathesis's
checks for server errors, status codes, content types, headers and
response schemas. 502 and 504 are the image host's failures, which the
document promises for URLs that cannot be fetched (here: every host but
loopback), so they are not server errors; 500 and 503 are. The server is
reached through tests/support/chalice_local.py's proxy, so our own checker
sees every answer too.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import schemathesis

from tests.support.chalice_local import LocalServer, free_port, running_chalice_local

EXAMPLES_PER_OPERATION = 500
CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
)
UPSTREAM_FAILURES = ["502", "504"]  # the image host's, not ours: see the module docstring
# Methods `chalice local` hands to the app; its http.server answers others (TRACE) with an HTML 501
# of its own, which neither Chalice nor API Gateway would give.
DEV_SERVER_METHODS = ("GET", "PUT", "POST", "DELETE", "PATCH", "OPTIONS")


@pytest.fixture(scope="module")
def server() -> Iterator[LocalServer]:
    # Generated URLs name hosts that do not resolve or do not answer here: keep each fetch short.
    with running_chalice_local(free_port(), environment={"FETCH_DEADLINE": "1"}) as running:
        yield running


@dataclass
class Tally:
    operations: Counter[str] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)


@pytest.fixture(scope="module")
def tally() -> Iterator[Tally]:
    seen = Tally()
    yield seen
    print(
        f"\nSchemathesis examples against chalice local: {seen.operations.total()}; "
        f"by operation {dict(seen.operations)}; by status {dict(sorted(seen.statuses.items()))}"
    )


def api_schema() -> schemathesis.BaseSchema:
    """The app's document, with the checks and the bounds above; the server's address comes per call."""
    from app import app
    from chalicelib.openapi import document

    checks: dict[str, object] = {"enabled": False, **{name: {"enabled": True} for name in CHECKS}}
    checks["not_a_server_error"] = {"enabled": True, "expected-statuses": ["2xx", "4xx", *UPSTREAM_FAILURES]}
    config = schemathesis.Config.from_dict(
        {
            "generation": {"max-examples": EXAMPLES_PER_OPERATION, "mode": "all"},
            "phases": {
                "stateful": {"enabled": False},
                "coverage": {"unexpected-methods": list(DEV_SERVER_METHODS)},
            },
            "checks": checks,
            "request-timeout": 30,
        }
    )
    return schemathesis.openapi.from_dict(document(app.routes), config=config)


schema = api_schema()


@pytest.mark.usefixtures("isolated_network")
@schema.parametrize()
def test_the_running_service_keeps_its_contract(
    case: schemathesis.Case, server: LocalServer, tally: Tally
) -> None:
    tally.operations[case.operation.label] += 1
    tally.statuses[case.call_and_validate(base_url=server.base).status_code] += 1
