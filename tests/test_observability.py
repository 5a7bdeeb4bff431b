"""One JSON log line and EMF metrics per request, under chalice.test and chalice local."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from chalice.test import Client

from tests.support.api import JSON, classify, error_of
from tests.support.http_server import RoutedHTTPServer, serve_bytes

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
    chalice_local: tuple[str, subprocess.Popen[str]], image_server: RoutedHTTPServer
) -> None:
    base, server = chalice_local
    request = urllib.request.Request(
        f"{base}/invocations",
        data=json.dumps({"url": image_server.url("/coffee.jpg")}).encode(),
        headers=JSON,
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        body = json.loads(response.read())
        request_id = response.headers["x-request-id"]
    os.killpg(server.pid, signal.SIGTERM)
    output = server.communicate(timeout=30)[0]

    assert body["class"] == "espresso"
    lines = [line for line in request_lines(output) if line["route"] == "/invocations"]
    assert [line["request_id"] for line in lines] == [request_id]
    assert lines[0]["status"] == 200
