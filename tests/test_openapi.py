"""The OpenAPI document: valid, complete, served, readable, and enforced on every response.

Every response the suite receives is checked against it by the hooks in
tests/support/openapi_check.py; the tests at the end show those hooks fail
a test on drift, in process and over HTTP.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from chalice.test import Client
from openapi_spec_validator import OpenAPIV31SpecValidator, validate
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from app import app
from chalicelib import demo_page, front_door
from chalicelib.errors import ClassifierError
from chalicelib.openapi import BULK_ONLY_ERRORS, METHOD_NOT_ALLOWED, UNKNOWN_ROUTE, codes_by_status, document
from tests.support.chalice_local import LocalServer
from tests.support.openapi_check import CheckedClient, ContractChecker, Exchange, contract

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
OPERATION_METHODS = ("get", "put", "post", "delete", "patch", "options", "head", "trace")


def operations(spec: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {
        (path, method.upper()): operation
        for path, item in spec["paths"].items()
        for method, operation in item.items()
        if method in OPERATION_METHODS
    }


def codes_of(response: dict[str, Any]) -> list[str]:
    """The Codes an error response lists (in the error shape, or beside the gateway's own)."""
    schema = response.get("content", {}).get("application/json", {}).get("schema", {})
    for shape in schema.get("oneOf", [schema]):
        if "Code" in shape.get("properties", {}):
            return shape["properties"]["Code"]["enum"]
    return []


def documented_codes(spec: dict[str, Any]) -> dict[int, set[str]]:
    """Every Code the document lists, by status, over all operations."""
    codes: dict[int, set[str]] = {}
    for operation in operations(spec).values():
        for status, response in operation["responses"].items():
            codes.setdefault(int(status), set()).update(codes_of(response))
    return codes


def document_under(api_auth: str) -> dict[str, Any]:
    """The document of the app as a stage with this API_AUTH imports it (a fresh interpreter)."""
    script = (
        "import json; from app import app; from chalicelib.openapi import document; "
        "print(json.dumps(document(app.routes)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env={**os.environ, "API_AUTH": api_auth},
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return json.loads(result.stdout)


def test_the_document_is_valid_openapi_3_1() -> None:
    validate(document(app.routes), cls=OpenAPIV31SpecValidator)


def test_get_openapi_json_serves_the_document(client: Client) -> None:
    response = client.http.get("/openapi.json")

    assert response.status_code == 200
    assert json.loads(response.body) == json.loads(json.dumps(document(app.routes)))


def test_every_route_is_an_operation_and_every_operation_a_route() -> None:
    routes = {(path, method) for path, methods in app.routes.items() for method in methods}

    assert set(operations(document(app.routes))) == routes


def test_every_error_of_the_tree_is_listed_at_its_status() -> None:
    listed = documented_codes(document(app.routes))
    bulk_only = {error.__name__ for error in BULK_ONLY_ERRORS}

    for status, codes in codes_by_status([ClassifierError]).items():
        assert set(codes) - bulk_only - {ClassifierError.__name__} <= listed.get(status, set()), status


def test_each_status_lists_only_codes_that_have_it() -> None:
    tree = codes_by_status([ClassifierError])
    ours = {code for codes in tree.values() for code in codes}

    for status, codes in documented_codes(document(app.routes)).items():
        assert codes & ours <= set(tree.get(status, ())), status


def test_a_new_subclass_is_listed_under_its_own_status() -> None:
    class Family(Exception):
        STATUS_CODE = 400

    class Member(Family):
        STATUS_CODE = 400

    class Cousin(Family):
        STATUS_CODE = 413

    assert codes_by_status([Family]) == {400: ["Family", "Member"], 413: ["Cousin"]}  # type: ignore[list-item]


def test_without_the_front_door_no_operation_asks_for_credentials() -> None:
    spec = document(app.routes)

    assert [key for key, operation in operations(spec).items() if "security" in operation] == []
    assert all("403" not in operation["responses"] for operation in operations(spec).values())


@pytest.mark.parametrize(
    ("api_auth", "scheme", "codes_429"),
    [("api_key", "api_key", ["TooManyRequests", "QuotaExceeded"]), ("iam", "sigv4", ["TooManyRequests"])],
)
def test_the_front_door_protects_exactly_the_protected_operations(
    api_auth: str, scheme: str, codes_429: list[str]
) -> None:
    spec = document_under(api_auth)
    validate(spec, cls=OpenAPIV31SpecValidator)

    protected = {key: operation for key, operation in operations(spec).items() if "security" in operation}
    assert {(method, path) for path, method in protected} == set(front_door.PROTECTED_ROUTES)
    for operation in protected.values():
        assert operation["security"] == [{scheme: []}]
        assert codes_of(operation["responses"]["403"]) == ["Forbidden"]
        assert codes_of(operation["responses"]["429"]) == codes_429
    assert scheme in spec["components"]["securitySchemes"]


@pytest.mark.parametrize(
    ("method", "path", "headers", "status"),
    [
        ("PUT", "/ping", {}, 405),
        ("DELETE", "/invocations", {}, 405),
        ("GET", "/no-such-route", {}, 403),
        ("GET", "/no-such-route", {"Authorization": "x"}, 403),
        ("POST", "/invocations", {"Content-Type": "text/plain"}, 415),
        ("GET", "/ping", {"Content-Type": "text/plain"}, 415),
        ("OPTIONS", "/docs", {"Origin": "https://app.example"}, 204),
    ],
)
def test_what_chalice_and_the_gateway_answer_themselves_is_documented(
    client: Client, method: str, path: str, headers: dict[str, str], status: int
) -> None:
    # The client fixture checks the answer against the document; here, that it is the one expected.
    assert client.http.request(method, path, headers=headers, body=b"x").status_code == status


def test_the_docs_page_needs_no_cdn_and_keeps_the_demo_pages_policy(client: Client) -> None:
    response = client.http.get("/docs")

    assert response.status_code == 200
    assert response.headers["Content-Type"] == "text/html; charset=utf-8"
    policy = response.headers["Content-Security-Policy"]
    assert policy == demo_page.headers(response.body.decode())["Content-Security-Policy"]
    assert "unsafe-inline" not in policy  # its own script runs by its hash, and nothing else would
    page = response.body.decode()
    assert "http://" not in page
    assert "https://" not in page
    assert 'fetch("openapi.json")' in page  # relative: the stage's prefix (/api/) comes along


@pytest.mark.usefixtures("isolated_network")
def test_the_docs_page_renders_every_operation_in_a_browser(
    chalice_local: LocalServer, browser: webdriver.Chrome
) -> None:
    expected = [operation["operationId"] for operation in operations(document(app.routes)).values()]

    browser.get(f"{chalice_local.base}/docs")
    WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#operations section"))

    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "docs-page.png"))
    assert browser.find_element(By.ID, "error").text == ""
    shown = [
        section.get_attribute("id")
        for section in browser.find_elements(By.CSS_SELECTOR, "#operations section")
    ]
    assert shown == expected
    assert browser.find_element(By.ID, "components-schemas-Prediction").is_displayed()


# --- the hooks catch drift ---------------------------------------------------------------------


def answer(
    method: str, target: str, status: int, body: bytes, content_type: str | None = "application/json"
) -> Exchange:
    """An answer as the service would send it: x-request-id set, and the given Content-Type if any."""
    headers = {"x-request-id": "f00", **({"Content-Type": content_type} if content_type else {})}
    return Exchange(method, target, status, headers, body)


PING = b'{"status": "ok", "model_loaded": true}'
ITEM_WITH_ANOTHER_STATUS = (
    b'{"predictions": [{"error": {"Code": "InvalidURL", "Message": "x"}, "status": 502}]}'
)
DRIFT = {
    "body": (answer("GET", "/ping", 200, PING.replace(b'"ok"', b'"fine"')), "'ok' was expected"),
    "header": (
        Exchange("GET", "/ping", 200, {"Content-Type": "application/json"}, PING),
        "x-request-id is missing",
    ),
    "status": (answer("GET", "/ping", 418, b"{}"), "status 418 is not documented"),
    "media-type": (answer("GET", "/ping", 200, PING, "text/plain"), "Content-Type text/plain is not one of"),
    "code-at-status": (
        answer("GET", "/ping", 503, b'{"Code": "UpstreamError", "Message": "x"}'),
        "is not one of",
    ),
    "batch-item": (answer("POST", "/invocations", 200, ITEM_WITH_ANOTHER_STATUS), "is not valid"),
    "not-json": (answer("GET", "/model", 200, b"not json"), "the body is not JSON"),
    "no-body": (answer("OPTIONS", "/ping", 204, b"{}", None), "where none is documented"),
    "unknown-route": (Exchange("GET", "/no-such-route", 200, {}, b"{}"), f"expected {UNKNOWN_ROUTE} (403)"),
    "method": (answer("PUT", "/ping", 404, b"{}"), f"expected {METHOD_NOT_ALLOWED} (405)"),
    "allow": (
        answer("PUT", "/ping", 405, b'{"Code": "MethodNotAllowedError", "Message": "x"}'),
        "Allow is missing",
    ),
}


@pytest.mark.parametrize(("exchange", "problem"), DRIFT.values(), ids=DRIFT.keys())
def test_the_checker_finds_each_kind_of_drift(exchange: Exchange, problem: str) -> None:
    problems = contract().problems(exchange)

    assert any(problem in found for found in problems), problems


def test_the_test_client_hook_fails_on_drift(tmp_path: Path) -> None:
    """The app answers /ping as always; a document that lost /ping's 200 must fail the call."""
    drifted = document(app.routes)
    del drifted["paths"]["/ping"]["get"]["responses"]["200"]
    (tmp_path / ".chalice").mkdir()
    (tmp_path / ".chalice" / "config.json").write_text(
        json.dumps({"version": "2.0", "app_name": "chalice-classifier", "stages": {"test": {}}})
    )

    with CheckedClient(
        app, stage_name="test", project_dir=str(tmp_path), checker=ContractChecker(drifted)
    ) as checked:
        with pytest.raises(AssertionError, match="status 200 is not documented for GET /ping"):
            checked.http.get("/ping")
        assert checked.http.get("/openapi.json").status_code == 200  # what still matches passes


DRIFTING_SERVICE = """
import urllib.request

from tests.support.http_server import RoutedHTTPServer, serve_bytes
from tests.support.openapi_check import ContractProxy


def test_gets_an_answer_the_document_does_not_allow():
    with RoutedHTTPServer() as upstream, ContractProxy(upstream.port) as proxy:
        upstream.routes["/ping"] = serve_bytes(b'{"status": "fine"}', "application/json")
        answer = urllib.request.urlopen(proxy.base + "/ping", timeout=30).read()
    assert answer == b'{"status": "fine"}'  # relayed untouched: only the hook can fail this test
"""


def test_a_drifting_live_answer_fails_the_test_that_got_it(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_drift=DRIFTING_SERVICE)

    result = pytester.runpytest_inprocess("-p", "tests.support.openapi_check", "-p", "no:cacheprovider")

    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*Responses that do not match the OpenAPI document:*",
            "*GET /ping -> 200*the required header x-request-id is missing*",
            "*GET /ping -> 200*'ok' was expected at $.status*",
        ]
    )
