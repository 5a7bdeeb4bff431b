"""End to end through chalice.test.Client: real S3 (moto), real image host, real model."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest
from chalice.test import Client

from chalicelib.settings import DEMO_ARCHIVE
from tests.conftest import DEMO_KEY, MODEL_BUCKET
from tests.support.api import JSON, classify, error_of, label_of
from tests.support.archives import fastai_archive, solid_png
from tests.support.http_server import RoutedHTTPServer, serve_bytes
from tests.support.s3 import MotoS3Server

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.usefixtures("demo_from_s3")
@pytest.mark.parametrize(
    ("photo", "expected"),
    [("chelsea", {"Egyptian cat", "tabby", "tiger cat"}), ("coffee", {"espresso"})],
)
def test_real_photo_is_classified(
    client: Client, image_server: RoutedHTTPServer, photo: str, expected: set[str]
) -> None:
    response = classify(client, image_server.url(f"/{photo}.jpg"))

    assert response.status_code == 200
    body = response.json_body
    assert set(body) == {"class", "confidence"}
    assert body["class"] in expected
    assert 0.3 < body["confidence"] <= 1.0


def test_espresso_confidence_matches_the_model_card(
    client: Client, image_server: RoutedHTTPServer, demo_from_s3: None
) -> None:
    body = classify(client, image_server.url("/coffee.jpg")).json_body

    assert body["confidence"] == pytest.approx(0.94, abs=0.02)


def test_ping_is_cheap_then_reports_the_loaded_model(
    client: Client,
    image_server: RoutedHTTPServer,
    s3: object,
    cache_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MODEL_BUCKET", MODEL_BUCKET)
    monkeypatch.setenv("MODEL_KEY", DEMO_KEY)

    before = client.http.get("/ping")
    classify(client, image_server.url("/coffee.jpg"))
    after = client.http.get("/ping")

    assert (before.status_code, before.json_body) == (200, {"status": "ok", "model_loaded": False})
    assert (after.status_code, after.json_body) == (200, {"status": "ok", "model_loaded": True})


@pytest.mark.usefixtures("cache_dir")
def test_without_model_settings_the_built_in_demo_model_serves(
    client: Client, image_server: RoutedHTTPServer
) -> None:
    response = classify(client, image_server.url("/coffee.jpg"))

    assert (response.status_code, response.json_body["class"]) == (200, "espresso")


@pytest.mark.usefixtures("cache_dir")
def test_fastai_archive_loads_and_answers_plain_text_class_names(
    client: Client, image_server: RoutedHTTPServer, s3: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    s3.put_object(Bucket=MODEL_BUCKET, Key="fastai/model.tar.gz", Body=fastai_archive())  # type: ignore[attr-defined]
    monkeypatch.setenv("MODEL_BUCKET", MODEL_BUCKET)
    monkeypatch.setenv("MODEL_KEY", "fastai/model.tar.gz")
    image_server.routes["/green.png"] = serve_bytes(solid_png((20, 200, 30)), "image/png")

    response = classify(client, image_server.url("/green.png"))

    assert response.status_code == 200
    assert response.json_body["class"] == "green"


@pytest.mark.usefixtures("cache_dir")
def test_two_concurrent_cold_requests_download_the_archive_once(
    image_server: RoutedHTTPServer, s3_server: MotoS3Server, s3: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Straight into the service rather than through chalice.test.Client, whose
    # per-request environment patching is not thread-safe.
    key = "concurrent/model.tar.gz"
    s3.put_object(Bucket=MODEL_BUCKET, Key=key, Body=DEMO_ARCHIVE.read_bytes())  # type: ignore[attr-defined]
    monkeypatch.setenv("MODEL_BUCKET", MODEL_BUCKET)
    monkeypatch.setenv("MODEL_KEY", key)
    start = threading.Barrier(2)
    labels: list[str] = []

    def request() -> None:
        start.wait()
        labels.append(label_of(image_server.url("/coffee.jpg")))

    threads = [threading.Thread(target=request) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert labels == ["espresso", "espresso"]
    assert s3_server.log.count("GET", f"/{MODEL_BUCKET}/{key}") == 1


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ("{not json", "not valid JSON"),
        ("[]", "must be a JSON object"),
        ("{}", "exactly one of 'url', 'image', 'urls' or 'images'"),
        ('{"url": 42}', "'url' must be a string"),
        ('{"url": null}', "'url' must be a string"),
        ('{"url": "ftp://example.com/cat.jpg"}', "http:// or https://"),
        ('{"url": "cat.jpg"}', "http:// or https://"),
        ('{"url": "http://"}', "no host name"),
    ],
)
def test_bad_request_bodies_are_400_with_a_message_that_says_what_to_send(
    client: Client, body: str, fragment: str
) -> None:
    status, code, message = error_of(client.http.post("/invocations", headers=JSON, body=body))

    assert status == 400
    assert code in {"InvalidRequest", "InvalidURL"}
    assert fragment in message


def test_wrong_content_type_is_415(client: Client) -> None:
    response = client.http.post(
        "/invocations", headers={"Content-Type": "text/plain"}, body='{"url": "http://x/"}'
    )

    assert error_of(response)[:2] == (415, "UnsupportedMediaType")


@pytest.mark.usefixtures("demo_from_s3")
def test_bytes_that_are_not_an_image_are_422(client: Client, image_server: RoutedHTTPServer) -> None:
    image_server.routes["/not-an-image.jpg"] = serve_bytes(b"<html>hello</html>", "image/jpeg")

    status, code, message = error_of(classify(client, image_server.url("/not-an-image.jpg")))

    assert (status, code) == (422, "UnsupportedImage")
    assert "JPEG" in message


@pytest.mark.usefixtures("demo_from_s3")
def test_unreachable_host_is_502(client: Client) -> None:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]

    status, code, message = error_of(classify(client, f"http://127.0.0.1:{closed_port}/cat.jpg"))

    assert (status, code) == (502, "UpstreamError")
    assert "Could not connect" in message


@pytest.mark.usefixtures("demo_from_s3")
def test_image_host_error_status_is_502_naming_the_status(
    client: Client, image_server: RoutedHTTPServer
) -> None:
    status, code, message = error_of(classify(client, image_server.url("/missing.jpg")))

    assert (status, code) == (502, "UpstreamError")
    assert "404" in message


def test_half_set_model_pair_is_a_503_at_request_time(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MODEL_BUCKET", MODEL_BUCKET)

    status, code, message = error_of(classify(client, "http://127.0.0.1/cat.jpg"))
    ping_status, _, _ = error_of(client.http.get("/ping"))

    assert (status, code, ping_status) == (503, "ConfigurationError", 503)
    assert "MODEL_KEY" in message


HEAVY_MODULES = ("torch", "onnxruntime", "numpy", "PIL", "urllib3", "boto3", "botocore", "chalicelib.service")


def test_importing_app_with_an_empty_environment_opens_no_socket_and_stays_light() -> None:
    """The request path's libraries wait for the first request, where a cold start overlaps them
    with the model's download; torch must be unpacked from its layer first on Lambda anyway."""
    # An audit hook sees every socket the interpreter creates, whoever creates it.
    probe = (
        "import sys\n"
        "def guard(event, args):\n"
        "    if event in ('socket.__new__', 'socket.connect', 'socket.getaddrinfo'):\n"
        "        raise AssertionError(f'{event} during import')\n"
        "sys.addaudithook(guard)\n"
        "import app\n"
        f"heavy = [name for name in {HEAVY_MODULES!r} if name in sys.modules]\n"
        "print(type(app.app).__name__, heavy)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=ROOT,
        env={},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "Chalice []"
