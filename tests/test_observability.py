"""One JSON log line and EMF metrics per request, under chalice.test and chalice local."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from chalice.test import Client

from tests.conftest import MODEL_BUCKET
from tests.support.api import JSON, classify, error_of
from tests.support.chalice_local import LocalServer, free_port, running_chalice_local
from tests.support.http_server import RoutedHTTPServer, serve_bytes
from tests.support.s3 import MotoS3Server

ROOT = Path(__file__).resolve().parent.parent


def json_lines(text: str) -> list[dict[str, Any]]:
    lines = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                lines.append(json.loads(line))
            except ValueError:
                continue
    return lines


def request_lines(text: str) -> list[dict[str, Any]]:
    return [line for line in json_lines(text) if line.get("message") == "request"]


@pytest.mark.usefixtures("demo_from_s3")
def test_a_request_logs_one_line_with_its_timings(
    client: Client, image_server: RoutedHTTPServer, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    response = classify(client, image_server.url("/coffee.jpg"))

    [line] = request_lines(capsys.readouterr().out)
    assert line["request_id"] == response.headers["x-request-id"]
    assert (line["route"], line["method"], line["status"], line["input_kind"]) == (
        "/invocations",
        "POST",
        200,
        "url",
    )
    assert line["image_bytes"] > 10_000
    assert line["fetch_ms"] > 0
    assert line["decode_ms"] > 0
    assert line["inference_ms"] > 0
    assert line["model_version"]
    assert line["service"] == "chalice-classifier"


@pytest.mark.usefixtures("demo_from_s3")
def test_an_error_is_logged_with_its_code_and_counted_by_code(
    client: Client, image_server: RoutedHTTPServer, capsys: pytest.CaptureFixture[str]
) -> None:
    image_server.routes["/log/text.jpg"] = serve_bytes(b"text", "image/jpeg")
    capsys.readouterr()

    classify(client, image_server.url("/log/text.jpg"))

    out = capsys.readouterr().out
    [line] = request_lines(out)
    assert (line["status"], line["code"]) == (422, "UnsupportedImage")
    metrics = [entry for entry in json_lines(out) if "_aws" in entry]
    errors = [m for m in metrics if "Errors" in m]
    assert errors
    assert errors[0]["Code"] == "UnsupportedImage"
    assert errors[0]["_aws"]["CloudWatchMetrics"][0]["Namespace"] == "ChaliceClassifier"
    assert any("Latency" in m for m in metrics)


@pytest.mark.usefixtures("demo_from_s3")
def test_the_image_and_body_are_never_logged(
    client: Client, photos: dict[str, bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    encoded = base64.b64encode(photos["coffee"]).decode()
    capsys.readouterr()

    client.http.post("/invocations", headers=JSON, body=json.dumps({"image": encoded}))

    out = capsys.readouterr().out
    assert encoded[:64] not in out
    [line] = request_lines(out)
    assert (line["input_kind"], line["image_bytes"]) == ("bytes", len(photos["coffee"]))


@pytest.mark.usefixtures("demo_from_s3")
def test_batch_workers_record_into_the_request(
    client: Client, image_server: RoutedHTTPServer, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    urls = [image_server.url("/coffee.jpg"), image_server.url("/chelsea.jpg")]

    client.http.post("/invocations", headers=JSON, body=json.dumps({"urls": urls}))

    [line] = request_lines(capsys.readouterr().out)
    assert (line["input_kind"], line["items"]) == ("batch of url", 2)
    assert line["fetch_ms"] > 0
    assert line["image_bytes"] > 20_000


def test_log_level_is_honoured_and_checked(
    client: Client, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LOG_LEVEL", "WARNING")
    capsys.readouterr()
    client.http.get("/ping")
    assert request_lines(capsys.readouterr().out) == []

    monkeypatch.setenv("LOG_LEVEL", "chatty")
    status, code, message = error_of(client.http.get("/ping"))
    assert (status, code) == (503, "ConfigurationError")
    assert "LOG_LEVEL" in message


def test_logs_are_json_under_chalice_local(
    chalice_local: LocalServer, image_server: RoutedHTTPServer
) -> None:
    request = urllib.request.Request(
        f"{chalice_local.base}/invocations",
        data=json.dumps({"url": image_server.url("/coffee.jpg")}).encode(),
        headers=JSON,
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        body = json.loads(response.read())
        request_id = response.headers["x-request-id"]
    output = chalice_local.stop()

    assert body["class"] == "espresso"
    lines = [line for line in request_lines(output) if line["route"] == "/invocations"]
    assert [line["request_id"] for line in lines] == [request_id]
    assert lines[0]["status"] == 200


def warning_lines(text: str) -> list[dict[str, Any]]:
    return [line for line in json_lines(text) if line.get("level") == "WARNING"]


@pytest.fixture
def missing_model(s3: object, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """An S3 key with no object: loading it makes chalicelib.model_store log a warning."""
    monkeypatch.setenv("MODEL_BUCKET", MODEL_BUCKET)
    monkeypatch.setenv("MODEL_KEY", "nothing/here.tar.gz")
    monkeypatch.setenv("MODEL_CACHE_DIR", str(tmp_path / "cache"))


@pytest.mark.usefixtures("demo_from_s3")
def test_each_record_is_written_once_as_json(
    client: Client, image_server: RoutedHTTPServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """The app's logger and ours shared one name; every request was logged twice, once as plain text."""
    capsys.readouterr()

    classify(client, image_server.url("/coffee.jpg"))

    out = capsys.readouterr().out
    assert len(request_lines(out)) == 1
    assert "chalice-classifier - INFO" not in out
    assert all(line.startswith("{") for line in out.splitlines() if line.strip())


@pytest.mark.usefixtures("missing_model")
def test_a_chalicelib_warning_reaches_the_log_at_the_default_level(
    client: Client, capsys: pytest.CaptureFixture[str]
) -> None:
    """chalicelib's loggers used to be left at Chalice's ERROR level: their warnings never appeared."""
    capsys.readouterr()

    response = client.http.get("/ping?deep=1")

    [warning] = warning_lines(capsys.readouterr().out)
    assert response.status_code == 503
    assert warning["location"].startswith("_s3_error")
    assert "s3://models/nothing/here.tar.gz" in warning["message"]
    assert warning["request_id"] == response.headers["x-request-id"]


@pytest.mark.usefixtures("missing_model")
@pytest.mark.parametrize(
    ("level", "warnings", "requests"), [("ERROR", 0, 0), ("WARNING", 1, 0), ("DEBUG", 1, 1)]
)
def test_log_level_is_honoured_by_every_logger_of_ours(
    client: Client,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    level: str,
    warnings: int,
    requests: int,
) -> None:
    monkeypatch.setenv("LOG_LEVEL", level)
    capsys.readouterr()

    client.http.get("/ping?deep=1")

    out = capsys.readouterr().out
    assert (len(warning_lines(out)), len(request_lines(out))) == (warnings, requests)


def test_a_wrong_log_level_does_not_stop_the_app_from_importing() -> None:
    """A bad LOG_LEVEL read while app.py is imported would be an init failure on Lambda: no answer."""
    result = subprocess.run(
        [sys.executable, "-c", "import app"],
        cwd=ROOT, env={**os.environ, "LOG_LEVEL": "verbose"}, capture_output=True, text=True, check=False,
    )  # fmt: skip

    assert result.returncode == 0, result.stderr


def test_chalice_local_logs_each_record_once_with_warnings_visible(s3_server: MotoS3Server) -> None:
    """A real process, as `make serve` runs it: one JSON line per record; LOG_LEVEL=verbose is a 503."""
    missing = {"MODEL_BUCKET": MODEL_BUCKET, "MODEL_KEY": "nothing/here.tar.gz"}
    with running_chalice_local(free_port(), environment=missing) as server:
        deep = urllib.request.Request(f"{server.base}/ping?deep=1")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(deep, timeout=60)
        output = server.stop()

    records = [line for line in output.splitlines() if line.startswith("{") and '"level"' in line]
    assert refused.value.code == 503
    assert [json.loads(line)["level"] for line in records].count("WARNING") == 1
    assert "chalice-classifier - " not in output
    assert all(json.loads(line)["request_id"] for line in records)

    with running_chalice_local(free_port(), environment={"LOG_LEVEL": "verbose"}) as server:
        with pytest.raises(urllib.error.HTTPError) as broken:
            urllib.request.urlopen(f"{server.base}/ping", timeout=60)
        body = json.loads(broken.value.read())
    assert (broken.value.code, body["Code"]) == (503, "ConfigurationError")
    assert "LOG_LEVEL" in body["Message"]
