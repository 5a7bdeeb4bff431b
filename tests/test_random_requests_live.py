"""Thousands of random requests against a real `chalice local`: not one 500.

The in-process property tests go through ``chalice.test.Client``; this sends
the same kind of requests (tests/support/random_requests.py) over HTTP to the
dev server `make serve` runs, where Chalice's own request parsing, the local
gateway and the thread per connection are real too. Every answer must be an
expected status, and every error the JSON contract's shape.
"""

from __future__ import annotations

import http.client
import json
from collections import Counter
from collections.abc import Iterator
from urllib.parse import urlencode, urlsplit

import pytest
from hypothesis import HealthCheck, given, settings

from tests.support.chalice_local import LocalServer, free_port, running_chalice_local
from tests.support.random_requests import EXPECTED_STATUSES, RandomRequest, requests

EXAMPLES = 5000


@pytest.fixture(scope="module")
def server() -> Iterator[LocalServer]:
    # A random URL may name a host that never answers: keep each fetch short.
    with running_chalice_local(free_port(), environment={"FETCH_DEADLINE": "1"}) as running:
        yield running


@pytest.fixture(scope="module")
def statuses() -> Iterator[Counter[int]]:
    seen: Counter[int] = Counter()
    yield seen
    print(f"\n{sum(seen.values())} requests to chalice local, by status: {dict(sorted(seen.items()))}")


@pytest.mark.usefixtures("isolated_network")
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(request=requests)
def test_random_requests_to_chalice_local_are_never_a_500(
    server: LocalServer, statuses: Counter[int], request: RandomRequest
) -> None:
    target = request.path + (f"?{urlencode(request.query)}" if request.query else "")
    connection = http.client.HTTPConnection(urlsplit(server.base).netloc, timeout=60)
    try:
        connection.request(request.method, target, body=request.body, headers=request.headers)
        response = connection.getresponse()
        status, body = response.status, response.read()
    finally:
        connection.close()
    statuses[status] += 1

    assert status in EXPECTED_STATUSES, body[:500]
    if status >= 400:
        assert set(json.loads(body)) == {"Code", "Message"}, body[:500]
