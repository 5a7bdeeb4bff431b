"""CORS per stage, on every route and on errors, and the x-request-id header."""

from __future__ import annotations

import pytest
from chalice.test import Client

from chalicelib.cors import CorsPolicy
from tests.support.api import JSON, error_of

APP_ORIGIN = "https://app.example"


def test_star_allows_any_origin() -> None:
    assert (
        CorsPolicy.from_setting("*").headers("https://x.example", preflight=False)[
            "Access-Control-Allow-Origin"
        ]
        == "*"
    )


def test_a_listed_origin_is_echoed_and_varies() -> None:
    headers = CorsPolicy.from_setting(f"{APP_ORIGIN}/, https://other.example").headers(
        APP_ORIGIN, preflight=False
    )

    assert headers["Access-Control-Allow-Origin"] == APP_ORIGIN
    assert headers["Vary"] == "Origin"


@pytest.mark.parametrize(
    ("setting", "origin"), [("", APP_ORIGIN), (APP_ORIGIN, "https://evil.example"), (APP_ORIGIN, None)]
)
def test_unlisted_or_unset_gives_no_cors_headers(setting: str, origin: str | None) -> None:
    assert CorsPolicy.from_setting(setting).headers(origin, preflight=True) == {}


def test_preflight_for_an_allowed_origin(client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CORS_ALLOW_ORIGIN", APP_ORIGIN)

    response = client.http.request("OPTIONS", "/invocations", headers={"Origin": APP_ORIGIN})

    assert response.status_code == 204
    assert response.headers["Access-Control-Allow-Origin"] == APP_ORIGIN
    assert "POST" in response.headers["Access-Control-Allow-Methods"]
    allowed = {name.strip().lower() for name in response.headers["Access-Control-Allow-Headers"].split(",")}
    assert {"content-type", "x-api-key", "authorization", "x-amz-date", "x-amz-security-token"} <= allowed


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [("GET", "/ping", None, 200), ("POST", "/invocations", "{", 400), ("POST", "/invocations", "x", 415)],
)
def test_every_response_carries_cors_and_a_request_id(
    client: Client, monkeypatch: pytest.MonkeyPatch, method: str, path: str, body: str | None, status: int
) -> None:
    monkeypatch.setenv("CORS_ALLOW_ORIGIN", APP_ORIGIN)
    headers = {"Origin": APP_ORIGIN, "Content-Type": "text/plain" if status == 415 else JSON["Content-Type"]}

    response = client.http.request(method, path, headers=headers, body=body or b"")

    assert response.status_code == status
    assert response.headers["Access-Control-Allow-Origin"] == APP_ORIGIN
    assert response.headers["Access-Control-Expose-Headers"] == "x-request-id"
    assert len(response.headers["x-request-id"]) >= 32


def test_without_the_setting_there_are_no_cors_headers(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CORS_ALLOW_ORIGIN", raising=False)

    response = client.http.get("/ping", headers={"Origin": APP_ORIGIN})

    assert "Access-Control-Allow-Origin" not in response.headers


@pytest.mark.parametrize(
    ("setting", "fragment"),
    [
        ("*, https://a.example", "only on its own"),
        ("app.example", "expected scheme://host"),
        ("https://app.example/path", "no path"),
        ("https://*.example", "expected scheme://host"),
        ("ftp://app.example", "expected scheme://host"),
        ("https://app.example:99999", "not an origin"),
    ],
)
def test_a_setting_that_would_allow_nothing_is_a_configuration_error(
    client: Client, monkeypatch: pytest.MonkeyPatch, setting: str, fragment: str
) -> None:
    """'*, https://a.example' used to be taken as two origins, neither of which any browser sends."""
    monkeypatch.setenv("CORS_ALLOW_ORIGIN", setting)

    status, code, message = error_of(client.http.get("/ping"))

    assert (status, code) == (503, "ConfigurationError")
    assert "CORS_ALLOW_ORIGIN" in message
    assert fragment in message


def test_origins_compare_as_browsers_send_them() -> None:
    policy = CorsPolicy.from_setting("HTTPS://App.Example:8443/")

    assert policy.headers("https://app.example:8443", preflight=False)["Access-Control-Allow-Origin"]
