"""A request's pixel allowance and the process's decoding memory budget, end to end and alone."""

from __future__ import annotations

import io
import json
import threading
import time

import pytest
from chalice.test import Client
from PIL import Image

from chalicelib.budgets import MemoryBudget, PixelAllowance
from chalicelib.errors import ImageTooLarge
from tests.support.api import JSON, error_of
from tests.support.archives import solid_png
from tests.support.http_server import RoutedHTTPServer, delayed, serve_bytes

pytestmark = pytest.mark.usefixtures("demo_from_s3")


def png(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buffer, "PNG")
    return buffer.getvalue()


def classify_urls(client: Client, urls: list[str]) -> list[dict[str, object]]:
    response = client.http.post("/invocations", headers=JSON, body=json.dumps({"urls": urls}))
    assert response.status_code == 200, response.body
    return response.json_body["predictions"]


def test_items_past_the_request_pixel_allowance_are_refused_in_input_order(
    client: Client, image_server: RoutedHTTPServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first item arrives last, and is still the one counted first."""
    monkeypatch.setenv("MAX_REQUEST_PIXELS", "25000")
    image_server.routes["/allowance/slow.png"] = delayed(0.5, serve_bytes(png((100, 100)), "image/png"))
    image_server.routes["/allowance/a.png"] = serve_bytes(png((100, 100)), "image/png")
    image_server.routes["/allowance/b.png"] = serve_bytes(png((100, 100)), "image/png")
    urls = [image_server.url(f"/allowance/{name}.png") for name in ("slow", "a", "b")]

    predictions = classify_urls(client, urls)

    assert ["class" in item for item in predictions] == [True, True, False]
    assert predictions[2]["status"] == 413
    assert "MAX_REQUEST_PIXELS" in predictions[2]["error"]["Message"]


def test_an_image_that_needs_more_than_the_decoding_budget_is_413(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MAX_DECODE_BYTES", str(9 * 1024 * 1024))  # a strip and a bit

    response = client.http.post("/invocations", headers={"Content-Type": "image/png"}, body=png((1000, 1000)))

    status, code, message = error_of(response)
    assert (status, code) == (413, "ImageTooLarge")
    assert "MAX_DECODE_BYTES" in message


def test_a_strip_forty_million_pixels_long_in_a_batch_is_classified(
    client: Client, image_server: RoutedHTTPServer
) -> None:
    """Resized whole it overflowed (OverflowError), which took the whole batch down with a 500."""
    image_server.routes["/strip.png"] = serve_bytes(png((40_000_000, 1)), "image/png")
    image_server.routes["/green.png"] = serve_bytes(solid_png((10, 220, 20)), "image/png")

    predictions = classify_urls(client, [image_server.url("/strip.png"), image_server.url("/green.png")])

    assert all("class" in item for item in predictions), predictions


def test_decodes_that_do_not_fit_together_take_turns() -> None:
    budget = MemoryBudget(capacity=100)
    first_in, release_first = threading.Event(), threading.Event()
    order: list[str] = []

    def hold(name: str, amount: int, until: threading.Event | None) -> None:
        with budget.reserve(amount):
            order.append(f"{name} in")
            if name == "first":
                first_in.set()
            if until is not None:
                until.wait(10)
            order.append(f"{name} out")

    first = threading.Thread(target=hold, args=("first", 60, release_first))
    first.start()
    first_in.wait(10)
    second = threading.Thread(target=hold, args=("second", 60, None))
    second.start()
    time.sleep(0.2)  # long enough for the second to have got in, were it let in
    assert budget.in_use == 60
    release_first.set()
    first.join(10)
    second.join(10)

    assert order == ["first in", "first out", "second in", "second out"]
    assert budget.in_use == 0


def test_small_decodes_share_the_budget() -> None:
    budget = MemoryBudget(capacity=100)

    with budget.reserve(40), budget.reserve(40):
        assert budget.in_use == 80


def test_the_allowance_counts_what_was_spent() -> None:
    allowance = PixelAllowance(limit=100)
    allowance.spend(60)

    with pytest.raises(ImageTooLarge, match="60 are taken by the images before it"):
        allowance.spend(41)
    allowance.spend(40)
