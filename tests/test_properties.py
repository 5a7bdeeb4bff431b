"""Property tests: whatever bytes or JSON arrive, the answer is a clear 4xx, never a 5xx.

The only 5xx statuses the service may give are 502, 503 and 504, each for its
stated cause (image host failed, model unavailable, image host too slow);
none of those can come from the request body alone.
"""

from __future__ import annotations

import json

import pytest
from chalice.test import Client
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chalicelib.errors import ImageTooLarge, UnsupportedImage
from chalicelib.imaging import decode_image
from tests.support.api import JSON, classify
from tests.support.http_server import RoutedHTTPServer, serve_bytes

IMAGE_HEADERS = [
    b"\xff\xd8\xff\xe0",
    b"\x89PNG\r\n\x1a\n",
    b"GIF89a",
    b"RIFF\x00\x00\x00\x00WEBPVP8 ",
    b"BM",
    b"II*\x00",
]
image_like_bytes = st.one_of(
    st.binary(max_size=4096),
    st.builds(lambda header, tail: header + tail, st.sampled_from(IMAGE_HEADERS), st.binary(max_size=4096)),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=50),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
bodies = st.one_of(
    json_values.map(json.dumps),
    st.fixed_dictionaries({"url": json_values}).map(json.dumps),
    st.fixed_dictionaries({"url": st.text(max_size=80)}).map(json.dumps),
    st.fixed_dictionaries({"url": st.from_regex(r"\Ahttps?://[a-z0-9.:\[\]@%-]{0,30}/[a-z.]{0,10}\Z")}).map(
        json.dumps
    ),
    st.binary(max_size=200).map(lambda raw: raw.decode("latin-1")),
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
@given(body=bodies)
def test_random_bodies_get_a_4xx_or_a_stated_upstream_status(
    client: Client, monkeypatch: pytest.MonkeyPatch, body: str
) -> None:
    # The production policy, a short deadline: a random URL may name any host.
    monkeypatch.delenv("ALLOW_PRIVATE_URLS", raising=False)
    monkeypatch.delenv("ALLOWED_PORTS", raising=False)
    monkeypatch.setenv("FETCH_DEADLINE", "1")

    response = client.http.post("/invocations", headers=JSON, body=body)

    assert response.status_code in {400, 413, 422, 502, 504}, response.body
    assert set(json.loads(response.body)) == {"Code", "Message"}
