"""Shared fixtures: real S3 (moto server), a real image host, real photos.

Everything listens on 127.0.0.1. AWS settings are pinned to fakes before any
boto3 client exists, and the instance-metadata lookup is disabled, so no test
can reach AWS or 169.254.169.254 even by mistake.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
import skimage.data
from chalice.test import Client
from PIL import Image

from chalicelib.settings import DEMO_ARCHIVE
from tests.support.http_server import RoutedHTTPServer, serve_bytes
from tests.support.network import require_isolated_network
from tests.support.s3 import MotoS3Server

for _name in ("MODEL_BUCKET", "MODEL_KEY", "MODEL_PATH", "MODEL_CACHE_DIR", "AWS_PROFILE"):
    os.environ.pop(_name, None)
os.environ.update(
    {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        # Like the dev stage: tests fetch from servers on loopback. The URL
        # policy tests switch both back to the production defaults.
        "ALLOW_PRIVATE_URLS": "true",
        "ALLOWED_PORTS": "*",
    }
)

# openapi_check: every response a test gets is checked against the OpenAPI document;
# browser: headless Chromium for the pages.
pytest_plugins = ["tests.support.openapi_check", "tests.support.chalice_local", "tests.support.browser"]

MODEL_BUCKET = "models"
DEMO_KEY = "demo/model.tar.gz"


def jpeg(pixels: object, quality: int = 92) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=quality)  # type: ignore[arg-type]
    return buffer.getvalue()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[MotoS3Server]:
    with MotoS3Server() as server, pytest.MonkeyPatch.context() as patch:
        patch.setenv("AWS_ENDPOINT_URL_S3", server.endpoint)
        yield server


@pytest.fixture(scope="session")
def s3(s3_server: MotoS3Server) -> object:
    client = boto3.client("s3", endpoint_url=s3_server.endpoint)
    client.create_bucket(Bucket=MODEL_BUCKET)
    if not DEMO_ARCHIVE.is_file():
        pytest.fail(f"{DEMO_ARCHIVE} is missing: run `make model` (make test does it for you).")
    client.upload_file(str(DEMO_ARCHIVE), MODEL_BUCKET, DEMO_KEY)
    return client


@pytest.fixture(scope="session")
def photos() -> dict[str, bytes]:
    return {name: jpeg(getattr(skimage.data, name)()) for name in ("chelsea", "coffee", "astronaut")}


@pytest.fixture(scope="session")
def image_server(photos: dict[str, bytes]) -> Iterator[RoutedHTTPServer]:
    with RoutedHTTPServer() as server:
        for name, data in photos.items():
            server.routes[f"/{name}.jpg"] = serve_bytes(data)
        yield server


@pytest.fixture(scope="session")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Client]:
    """The app under a stage with no variables of its own.

    chalice.test.Client lays a stage's environment_variables over the process
    environment for each request, so under ``dev`` a test could not switch
    the URL policy back on. Here each test's own environment is the whole
    configuration; tests/test_config.py checks the real stages. Every
    response is checked against the OpenAPI document (CheckedClient).
    """
    from app import app
    from tests.support.openapi_check import CheckedClient

    project = tmp_path_factory.mktemp("project")
    (project / ".chalice").mkdir()
    (project / ".chalice" / "config.json").write_text(
        json.dumps({"version": "2.0", "app_name": "chalice-classifier", "stages": {"test": {}}})
    )
    with CheckedClient(app, stage_name="test", project_dir=str(project)) as test_client:
        yield test_client


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("shared-model-cache")


@pytest.fixture
def demo_from_s3(s3: object, shared_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Serve the demo archive from moto S3; the same settings each time, so one load serves all."""
    monkeypatch.setenv("MODEL_BUCKET", MODEL_BUCKET)
    monkeypatch.setenv("MODEL_KEY", DEMO_KEY)
    monkeypatch.setenv("MODEL_CACHE_DIR", str(shared_cache))


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache of this test's own, so the service starts cold."""
    path = tmp_path / "cache"
    monkeypatch.setenv("MODEL_CACHE_DIR", str(path))
    return path


@pytest.fixture
def isolated_network() -> None:
    """For tests that name non-loopback addresses: fail unless no packet can leave."""
    require_isolated_network()
