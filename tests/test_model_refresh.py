"""MODEL_REFRESH_SECONDS: a new archive in S3 is picked up; a broken one never replaces a good one."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from chalice.test import Client

from tests.conftest import MODEL_BUCKET
from tests.support.api import classify
from tests.support.archives import fastai_archive, solid_png
from tests.support.http_server import RoutedHTTPServer, serve_bytes
from tests.support.s3 import MotoS3Server

KEY = "refresh/model.tar.gz"


@pytest.fixture
def green_url(image_server: RoutedHTTPServer) -> str:
    image_server.routes["/refresh/green.png"] = serve_bytes(solid_png((10, 220, 20)), "image/png")
    return image_server.url("/refresh/green.png")


@pytest.fixture
def refreshing(s3: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> object:
    s3.put_object(Bucket=MODEL_BUCKET, Key=KEY, Body=fastai_archive())  # type: ignore[attr-defined]
    monkeypatch.setenv("MODEL_BUCKET", MODEL_BUCKET)
    monkeypatch.setenv("MODEL_KEY", KEY)
    monkeypatch.setenv("MODEL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("MODEL_REFRESH_SECONDS", "0.2")
    return s3


def until(condition: Callable[[], bool], seconds: float = 30.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


def test_a_new_archive_is_swapped_in(
    client: Client, refreshing: object, green_url: str, tmp_path: Path
) -> None:
    assert classify(client, green_url).json_body["class"] == "green"
    first_version = client.http.get("/model").json_body["version"]

    refreshing.put_object(  # type: ignore[attr-defined]
        Bucket=MODEL_BUCKET, Key=KEY, Body=fastai_archive(classes=("rouge", "vert", "bleu"))
    )

    assert until(lambda: classify(client, green_url).json_body["class"] == "vert")
    assert client.http.get("/model").json_body["version"] != first_version
    # The old extraction is gone: /tmp keeps one model beside the PyTorch layer.
    assert until(lambda: len(list((tmp_path / "cache" / "models").iterdir())) == 1)


def test_a_broken_archive_keeps_the_old_model_serving(
    client: Client, refreshing: object, green_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    assert classify(client, green_url).json_body["class"] == "green"
    version = client.http.get("/model").json_body["version"]
    caplog.set_level(logging.WARNING, logger="chalicelib.model_holder")

    refreshing.put_object(Bucket=MODEL_BUCKET, Key=KEY, Body=b"not an archive")  # type: ignore[attr-defined]

    def refresh_failed() -> bool:
        classify(client, green_url)
        return any("model refresh failed" in r.getMessage() for r in caplog.records)

    assert until(refresh_failed)
    assert classify(client, green_url).json_body["class"] == "green"
    assert client.http.get("/model").json_body["version"] == version


@pytest.mark.usefixtures("demo_from_s3")
def test_refresh_is_off_by_default(
    client: Client, image_server: RoutedHTTPServer, s3_server: MotoS3Server
) -> None:
    heads_before = sum(1 for method, _ in s3_server.log.requests if method == "HEAD")

    for _ in range(3):
        classify(client, image_server.url("/coffee.jpg"))
        time.sleep(0.3)

    assert sum(1 for method, _ in s3_server.log.requests if method == "HEAD") == heads_before
