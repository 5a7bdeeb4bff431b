"""MODEL_REFRESH_SECONDS: a new archive in S3 is picked up; a broken one never replaces a good one."""

from __future__ import annotations

import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from chalice.test import Client

from chalicelib.current import get_holder
from tests.conftest import MODEL_BUCKET
from tests.support.api import classify
from tests.support.archives import fastai_archive, solid_png
from tests.support.faulty_disk import Tmpfs, run_python
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
    client: Client, refreshing: object, green_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """And says so in the log at the default level (chalicelib's warnings were once hidden at ERROR)."""
    assert classify(client, green_url).json_body["class"] == "green"
    version = client.http.get("/model").json_body["version"]

    refreshing.put_object(Bucket=MODEL_BUCKET, Key=KEY, Body=b"not an archive")  # type: ignore[attr-defined]
    printed: list[str] = []

    def refresh_failed() -> bool:
        classify(client, green_url)
        printed.extend(capsys.readouterr().out.splitlines())
        return any('"level":"WARNING"' in line and "model refresh failed" in line for line in printed)

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


def test_a_version_that_fails_to_load_is_fetched_once_and_its_files_removed(
    client: Client, refreshing: object, green_url: str, s3_server: MotoS3Server, tmp_path: Path
) -> None:
    """It was downloaded again at every refresh interval, and its extraction stayed on /tmp."""
    assert classify(client, green_url).json_body["class"] == "green"
    # Extracts fine, then fails to load: two classes for a three-output model.
    refreshing.put_object(  # type: ignore[attr-defined]
        Bucket=MODEL_BUCKET, Key=KEY, Body=fastai_archive(classes=("red", "green"))
    )
    downloads_before = s3_server.log.count("GET", f"/{MODEL_BUCKET}/{KEY}")

    for _ in range(15):  # three seconds: about fifteen refresh intervals
        assert classify(client, green_url).json_body["class"] == "green"
        time.sleep(0.2)

    assert s3_server.log.count("GET", f"/{MODEL_BUCKET}/{KEY}") == downloads_before + 1
    assert len(list((tmp_path / "cache" / "models").iterdir())) == 1  # only the model being served


REFRESH_WITHOUT_ROOM = textwrap.dedent(
    """
    import json, logging, sys, time
    import boto3
    from chalicelib.model_holder import ModelHolder
    from chalicelib.settings import Settings
    from tests.support.archives import fastai_archive

    cache, bucket, key = sys.argv[1:]
    warnings = []
    handler = logging.Handler()
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("chalicelib").addHandler(handler)
    s3 = boto3.client("s3")
    s3.put_object(Bucket=bucket, Key=key, Body=fastai_archive())
    environ = {"MODEL_BUCKET": bucket, "MODEL_KEY": key, "MODEL_CACHE_DIR": cache,
               "MODEL_REFRESH_SECONDS": "0.1"}
    holder = ModelHolder(Settings.from_environ(environ).model)
    first = holder.model().files.version
    # A new version the cache has no room for beside the one being served (4 MiB of tmpfs).
    s3.put_object(Bucket=bucket, Key=key, Body=b"x" * 3 * 1024 * 1024)
    time.sleep(0.2)
    holder.model()  # starts the refresh
    time.sleep(2)
    print(json.dumps({"first": first, "serving": holder.model().files.version, "warnings": warnings}))
    """
)


@pytest.mark.usefixtures("s3")
def test_a_refresh_without_room_for_the_new_version_keeps_the_old_one(
    tmp_path: Path, s3_server: MotoS3Server
) -> None:
    cache = tmp_path / "small-cache"
    cache.mkdir()

    result = run_python(REFRESH_WITHOUT_ROOM, str(cache), MODEL_BUCKET, "roomless/model.tar.gz",
                        mounts=[Tmpfs(cache, 4 * 1024 * 1024)])  # fmt: skip

    assert result["serving"] == result["first"]
    assert any("MODEL_CACHE_DIR" in warning and "free" in warning for warning in result["warnings"]), result
    assert s3_server.log.count("GET", f"/{MODEL_BUCKET}/roomless/model.tar.gz") == 1  # never the new one


def test_a_holder_told_to_check_on_the_next_request_does_so_before_the_interval(
    client: Client,
    refreshing: object,
    green_url: str,
    s3_server: MotoS3Server,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What a SnapStart copy's after-restore hook asks: its snapshot may be older than the interval."""
    monkeypatch.setenv("MODEL_REFRESH_SECONDS", "3600")
    classify(client, green_url)
    checks = s3_server.log.count("HEAD", f"/{MODEL_BUCKET}/{KEY}")
    classify(client, green_url)
    assert s3_server.log.count("HEAD", f"/{MODEL_BUCKET}/{KEY}") == checks  # not due yet

    get_holder().check_on_next_request()  # the test stage adds no variables: the same holder
    classify(client, green_url)

    assert until(lambda: s3_server.log.count("HEAD", f"/{MODEL_BUCKET}/{KEY}") == checks + 1)
