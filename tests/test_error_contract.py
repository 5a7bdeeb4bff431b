"""DESIGN.md's error contract, one row at a time, through chalice.test.Client."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from chalice.test import Client

from tests.support.api import JSON, classify, error_of
from tests.support.http_server import RoutedHTTPServer, drip, serve_bytes

Call = Callable[[Client, RoutedHTTPServer], object]

ROWS: dict[str, tuple[Call, int, str, str]] = {
    "400 malformed JSON": (
        lambda c, s: c.http.post("/invocations", headers=JSON, body='{"url": '),
        400,
        "InvalidRequest",
        'expected {"url"',
    ),
    "400 missing field": (
        lambda c, s: c.http.post("/invocations", headers=JSON, body='{"link": "x"}'),
        400,
        "InvalidRequest",
        "exactly one of 'url'",
    ),
    "400 wrongly typed field": (
        lambda c, s: c.http.post("/invocations", headers=JSON, body='{"url": ["a"]}'),
        400,
        "InvalidRequest",
        "must be a string, got an array",
    ),
    "400 not http(s)": (
        lambda c, s: classify(c, "ftp://x/cat.jpg"),
        400,
        "InvalidURL",
        "http:// or https://",
    ),
    "400 refused by policy": (lambda c, s: classify(c, "http://localhost/"), 400, "InvalidURL", "loopback"),
    "413 over the byte cap": (
        lambda c, s: classify(c, s.url("/contract/big")),
        413,
        "ImageTooLarge",
        "MAX_IMAGE_BYTES",
    ),
    "413 over the pixel cap": (
        lambda c, s: classify(c, s.url("/contract/wide")),
        413,
        "ImageTooLarge",
        "MAX_IMAGE_PIXELS",
    ),
    "415 content type": (
        lambda c, s: c.http.post("/invocations", headers={"Content-Type": "text/plain"}, body="x"),
        415,
        "UnsupportedMediaType",
        "text/plain",
    ),
    "422 not an image": (
        lambda c, s: classify(c, s.url("/contract/text")),
        422,
        "UnsupportedImage",
        "expected JPEG",
    ),
    "502 host error": (lambda c, s: classify(c, s.url("/contract/none")), 502, "UpstreamError", "HTTP 404"),
    "504 host too slow": (
        lambda c, s: classify(c, s.url("/contract/slow")),
        504,
        "UpstreamTimeout",
        "within 1 s",
    ),
}


@pytest.mark.usefixtures("demo_from_s3")
@pytest.mark.parametrize("row", list(ROWS))
def test_error_contract_row(
    client: Client, image_server: RoutedHTTPServer, monkeypatch: pytest.MonkeyPatch, row: str
) -> None:
    call, status, code, fragment = ROWS[row]
    monkeypatch.setenv("MAX_IMAGE_BYTES", "1000")
    monkeypatch.setenv("MAX_IMAGE_PIXELS", "10000")
    monkeypatch.setenv("FETCH_DEADLINE", "1")
    if row == "400 refused by policy":
        monkeypatch.setenv("ALLOW_PRIVATE_URLS", "false")
    image_server.routes["/contract/big"] = serve_bytes(b"\xff" * 2000)
    image_server.routes["/contract/wide"] = serve_bytes(_png(200, 100), "image/png")
    image_server.routes["/contract/text"] = serve_bytes(b"hello", "image/jpeg")
    image_server.routes["/contract/slow"] = drip(byte_every=0.3, total=20)

    actual_status, actual_code, message = error_of(call(client, image_server))

    assert (actual_status, actual_code) == (status, code), message
    assert fragment in message


def _png(width: int, height: int) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (width, height)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.usefixtures("cache_dir")
def test_error_contract_503_model_unavailable(
    client: Client, image_server: RoutedHTTPServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = tmp_path / "model.tar.gz"
    broken.write_bytes(b"not a tarball")
    monkeypatch.setenv("MODEL_PATH", str(broken))

    status, code, message = error_of(classify(client, image_server.url("/coffee.jpg")))

    assert (status, code) == (503, "ModelUnavailable")
    assert "corrupt" in message
