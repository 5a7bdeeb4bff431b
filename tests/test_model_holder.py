"""The model per container: one load within a deadline, beside the cold request's own work, reused
across settings it does not depend on, and a refresh that neither retries a broken version nor fills
/tmp."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from chalice.test import Client

from chalicelib.errors import ModelUnavailable
from chalicelib.model_holder import ModelHolder
from chalicelib.settings import Settings
from tests.conftest import DEMO_KEY, MODEL_BUCKET
from tests.support.api import classify, error_of
from tests.support.http_server import RoutedHTTPServer, serve_bytes
from tests.support.s3 import MotoS3Server
from tests.support.slow_network import GatedProxy, SilentServer

REFRESH_KEY = "holder/model.tar.gz"
# The deadline tests allow this much beyond the deadline before they fail: the
# point is 3 s against the 80 s of botocore's retries, not the exact figure.
SLACK_S = 5.0


@pytest.fixture
def silent_s3(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """An S3 endpoint that accepts connections and never answers, and a 3 s load deadline."""
    with SilentServer() as silent:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", silent.endpoint)
        monkeypatch.setenv("MODEL_BUCKET", MODEL_BUCKET)
        monkeypatch.setenv("MODEL_KEY", DEMO_KEY)
        monkeypatch.setenv("MODEL_CACHE_DIR", str(tmp_path / "cache"))
        monkeypatch.setenv("MODEL_LOAD_DEADLINE", "3")
        yield


@pytest.mark.usefixtures("silent_s3")
def test_a_silent_s3_is_a_503_at_the_load_deadline(client: Client) -> None:
    """It held a cold request for 82 s: botocore's 20 s read timeout, three times."""
    started = time.monotonic()

    status, code, message = error_of(client.http.get("/ping?deep=1"))

    assert (status, code) == (503, "ModelUnavailable")
    assert "MODEL_LOAD_DEADLINE" in message
    assert time.monotonic() - started < 3 + SLACK_S


@pytest.mark.usefixtures("silent_s3")
def test_a_request_waiting_behind_a_load_gives_up_at_its_own_deadline() -> None:
    """The second cold request used to wait for the first load, then start one of its own.

    Two threads on the holder itself: chalice.test.Client swaps os.environ per
    request, which concurrent requests through it would scramble.
    """
    holder = ModelHolder(Settings.from_environ(os.environ).model)
    outcomes: list[tuple[str, float]] = []
    started = time.monotonic()

    def cold_request() -> None:
        try:
            holder.model()
            outcomes.append(("loaded", time.monotonic() - started))
        except ModelUnavailable as error:
            outcomes.append((str(error), time.monotonic() - started))

    requests = [threading.Thread(target=cold_request) for _ in range(2)]
    for request in requests:
        request.start()
    for request in requests:
        request.join(60)

    assert len(outcomes) == 2
    assert all("MODEL_LOAD_DEADLINE" in message for message, _ in outcomes), outcomes
    assert max(seconds for _, seconds in outcomes) < 3 + SLACK_S


@pytest.mark.usefixtures("demo_from_s3")
@pytest.mark.parametrize(("name", "value"), [("LOG_LEVEL", "WARNING"), ("CORS_ALLOW_ORIGIN", "*")])
def test_settings_the_model_does_not_depend_on_do_not_load_it_again(
    client: Client,
    image_server: RoutedHTTPServer,
    s3_server: MotoS3Server,
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    value: str,
) -> None:
    """The service cache was keyed on every setting: changing the log level reloaded the model."""
    loaded_at = client.http.get("/model").json_body["loaded_at"]
    downloads = s3_server.log.count("GET", f"/{MODEL_BUCKET}/{DEMO_KEY}")

    monkeypatch.setenv(name, value)
    classify(client, image_server.url("/coffee.jpg"))

    assert client.http.get("/model").json_body["loaded_at"] == loaded_at
    assert s3_server.log.count("GET", f"/{MODEL_BUCKET}/{DEMO_KEY}") == downloads


@pytest.mark.usefixtures("s3", "cache_dir")
def test_a_cold_request_fetches_its_image_while_the_model_downloads(
    client: Client, s3_server: MotoS3Server, photos: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The model used to load first and the image to wait for it; now S3 is held back until the
    image host has been asked, which only a request that overlaps the two gets past in time."""
    image_asked = threading.Event()

    def image(handler: BaseHTTPRequestHandler) -> None:
        image_asked.set()
        serve_bytes(photos["chelsea"])(handler)

    with RoutedHTTPServer() as host, GatedProxy(s3_server.endpoint, image_asked, patience=10) as held_s3:
        host.routes["/cat.jpg"] = image
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", held_s3.endpoint)
        monkeypatch.setenv("MODEL_BUCKET", MODEL_BUCKET)
        monkeypatch.setenv("MODEL_KEY", DEMO_KEY)
        response = classify(client, host.url("/cat.jpg"))

    assert response.status_code == 200, response.body
    assert held_s3.opened == [True]


@pytest.mark.usefixtures("s3", "cache_dir")
def test_a_broken_model_is_reported_before_a_bad_image(
    client: Client, image_server: RoutedHTTPServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MODEL_BUCKET", MODEL_BUCKET)
    monkeypatch.setenv("MODEL_KEY", "no/such/model.tar.gz")

    status, code, message = error_of(classify(client, image_server.url("/no-such-image.jpg")))

    assert (status, code) == (503, "ModelUnavailable")
    assert "NoSuchKey" in message


@pytest.mark.usefixtures("s3", "cache_dir")
def test_a_cold_request_with_a_bad_image_answers_once_the_model_is_loaded(
    client: Client, image_server: RoutedHTTPServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lambda freezes a container once it has answered: a load left running would stall until the
    next request, and could pass its deadline in the meantime."""
    monkeypatch.setenv("MODEL_BUCKET", MODEL_BUCKET)
    monkeypatch.setenv("MODEL_KEY", DEMO_KEY)

    status, _, _ = error_of(classify(client, image_server.url("/no-such-image.jpg")))

    assert status == 502
    assert client.http.get("/ping").json_body["model_loaded"] is True
