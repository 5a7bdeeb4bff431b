"""Property tests: whatever arrives, the answer is a clear JSON error or an answer, never a 500.

The only 5xx statuses the service may give are 502, 503 and 504, each for its
stated cause (image host failed, model unavailable, image host too slow);
none of those can come from the request alone. Requests are drawn across
every route, body key, query parameter and content type
(tests/support/random_requests.py), in-process here and, many more of them,
against a real `chalice local` (tests/test_random_requests_live.py).
"""

from __future__ import annotations

import json
from urllib.parse import urlencode

import pytest
from chalice.test import Client
from hypothesis import HealthCheck, given, settings

from chalicelib.decoding import decode_image
from chalicelib.errors import ImageTooLarge, UnsupportedImage
from tests.support.api import JSON, classify
from tests.support.http_server import RoutedHTTPServer, serve_bytes
from tests.support.random_requests import (
    EXPECTED_STATUSES,
    RandomRequest,
    image_like_bytes,
    json_bodies,
    requests,
)


@settings(max_examples=400, deadline=None)
@given(data=image_like_bytes)
def test_random_bytes_decode_or_fail_cleanly(data: bytes) -> None:
    try:
        image = decode_image(data, max_pixels=40_000_000)
    except (UnsupportedImage, ImageTooLarge):
        return
    assert image.mode == "RGB"


@pytest.mark.usefixtures("demo_from_s3")
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=image_like_bytes)
def test_random_bytes_as_an_image_are_never_a_server_error(
    client: Client, image_server: RoutedHTTPServer, data: bytes
) -> None:
    image_server.routes["/random.bin"] = serve_bytes(data)

    response = classify(client, image_server.url("/random.bin"))

    assert response.status_code in {200, 413, 422}, response.body


@pytest.mark.usefixtures("demo_from_s3", "isolated_network")
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=json_bodies)
def test_random_bodies_get_a_4xx_or_a_stated_upstream_status(
    client: Client, monkeypatch: pytest.MonkeyPatch, body: bytes
) -> None:
    # The production policy, a short deadline: a random URL may name any host.
    monkeypatch.delenv("ALLOW_PRIVATE_URLS", raising=False)
    monkeypatch.delenv("ALLOWED_PORTS", raising=False)
    monkeypatch.setenv("FETCH_DEADLINE", "1")

    response = client.http.post("/invocations", headers=JSON, body=body)

    assert response.status_code in EXPECTED_STATUSES, response.body
    if response.status_code >= 400:
        assert set(json.loads(response.body)) == {"Code", "Message"}


@pytest.mark.usefixtures("demo_from_s3", "isolated_network")
@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(request=requests)
def test_random_requests_on_every_route_are_never_a_500(
    client: Client, monkeypatch: pytest.MonkeyPatch, request: RandomRequest
) -> None:
    monkeypatch.setenv("FETCH_DEADLINE", "1")
    path = request.path + (f"?{urlencode(request.query)}" if request.query else "")

    response = client.http.request(request.method, path, headers=request.headers, body=request.body)

    assert response.status_code in EXPECTED_STATUSES, response.body
    if response.status_code >= 400:
        assert set(json.loads(response.body)) == {"Code", "Message"}
