"""The demo page, in a real headless Chromium against `chalice local`.

Chromium is tests/support/browser.py's. Screenshots are saved to test-artifacts/ for a person to look at.

`chalice local` never asks for an API key, so for the page's side of the
front door a proxy on loopback stands in for API Gateway, which cannot run
here: it refuses the protected routes without the key with the refusal the
prod template gives, and forwards everything else to `chalice local`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from chalice.test import Client
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

from chalicelib.front_door import PROTECTED_ROUTES
from tests.support.chalice_local import LocalServer, free_port, running_chalice_local
from tests.support.http_server import RoutedHTTPServer
from tests.support.moto_proxy import MotoProxy, Reply
from tools.merge_templates import front_door_template

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
CONFIG = json.loads((ROOT / ".chalice" / "config.json").read_text())
KEY = "k3y-0f-th3-t3st-0nly"


def test_the_page_is_served_with_a_strict_content_security_policy(client: Client) -> None:
    response = client.http.get("/")

    assert response.status_code == 200
    assert response.headers["Content-Type"] == "text/html; charset=utf-8"
    assert "connect-src 'self'" in response.headers["Content-Security-Policy"]
    assert "unsafe-inline" not in response.headers["Content-Security-Policy"]
    page = response.body.decode()
    assert 'id="file"' in page
    assert '<html lang="en" data-api-auth="none">' in page  # told the stage's front door
    assert "http://" not in page.replace("https://example.com", "")  # no external scripts or styles


def results(driver: webdriver.Chrome) -> list[str]:
    return [item.text for item in driver.find_elements(By.CSS_SELECTOR, "#results li")]


@pytest.mark.usefixtures("isolated_network")
def test_uploading_a_photo_shows_its_top_classes(
    chalice_local: LocalServer,
    browser: webdriver.Chrome,
    photos: dict[str, bytes],
    tmp_path: Path,
) -> None:
    base = chalice_local.base
    photo = tmp_path / "coffee.jpg"
    photo.write_bytes(photos["coffee"])

    browser.get(f"{base}/")
    browser.find_element(By.ID, "file").send_keys(str(photo))
    WebDriverWait(browser, 60).until(lambda d: len(results(d)) == 5)

    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "demo-page.png"))
    assert results(browser)[0].startswith("espresso")
    assert browser.find_element(By.ID, "preview").get_attribute("src").startswith("blob:")


@pytest.mark.usefixtures("isolated_network")
def test_a_url_is_classified_and_an_error_is_shown(
    chalice_local: LocalServer,
    browser: webdriver.Chrome,
    image_server: RoutedHTTPServer,
) -> None:
    base = chalice_local.base
    browser.get(f"{base}/")
    field = browser.find_element(By.ID, "url")

    field.send_keys(image_server.url("/chelsea.jpg"))
    browser.find_element(By.CSS_SELECTOR, "#by-url button").click()
    WebDriverWait(browser, 60).until(lambda d: len(results(d)) == 5)
    assert results(browser)[0].split("\n")[0] in {"Egyptian cat", "tabby", "tiger cat"}

    field.clear()
    field.send_keys(image_server.url("/missing.jpg"))
    browser.find_element(By.CSS_SELECTOR, "#by-url button").click()
    WebDriverWait(browser, 60).until(
        expected_conditions.text_to_be_present_in_element((By.ID, "error"), "404")
    )
    assert results(browser) == []
    assert os.environ.get("SE_OFFLINE") == "true"


class KeyCheckingGateway(MotoProxy):
    """API Gateway's part in front of `chalice local`: a protected route without this key gets the
    INVALID_API_KEY refusal of prod's template, as tools/merge_templates.py renders it."""

    def __init__(self, upstream: str, key: str) -> None:
        super().__init__(upstream)
        definition = front_door_template(CONFIG, "prod")["Resources"]["RestAPI"]["Properties"][
            "DefinitionBody"
        ]
        refusal = definition["x-amazon-apigateway-gateway-responses"]["INVALID_API_KEY"]
        headers = [
            (name.removeprefix("gatewayresponse.header."), value.strip("'"))
            for name, value in refusal.get("responseParameters", {}).items()
        ]
        self.refusal = Reply(
            refusal["statusCode"],
            [("Content-Type", "application/json"), *headers],
            refusal["responseTemplates"]["application/json"].encode(),
        )
        self.keys_sent: list[str | None] = []
        self._key = key

    def answer(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Reply | None:
        if (method, path.split("?", 1)[0]) not in PROTECTED_ROUTES:
            return None
        sent = next((value for name, value in headers.items() if name.lower() == "x-api-key"), None)
        self.keys_sent.append(sent)
        return None if sent == self._key else self.refusal


def classify_url(driver: webdriver.Chrome, url: str) -> None:
    field = driver.find_element(By.ID, "url")
    field.clear()
    field.send_keys(url)
    driver.find_element(By.CSS_SELECTOR, "#by-url button").click()


def error_says(driver: webdriver.Chrome, text: str) -> None:
    WebDriverWait(driver, 60).until(expected_conditions.text_to_be_present_in_element((By.ID, "error"), text))


@pytest.mark.usefixtures("isolated_network")
def test_when_the_api_wants_a_key_the_page_asks_for_it_and_keeps_it_in_the_tab_only(
    browser: webdriver.Chrome, image_server: RoutedHTTPServer
) -> None:
    """The dev page does not offer a key field up front; a 403 Forbidden makes it ask for one."""
    with running_chalice_local(free_port()) as server, KeyCheckingGateway(server.base, KEY) as gateway:
        browser.get(f"{gateway.endpoint}/")
        key_form, key_field = browser.find_element(By.ID, "key-form"), browser.find_element(By.ID, "api-key")
        assert not key_form.is_displayed()

        classify_url(browser, image_server.url("/chelsea.jpg"))
        error_says(browser, "This API needs a key. Paste it in the API key field above and classify again")
        assert key_form.is_displayed()
        assert browser.switch_to.active_element == key_field
        assert results(browser) == []
        ARTIFACTS.mkdir(exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "demo-page-key-wanted.png"))

        key_field.send_keys("not-the-key")
        classify_url(browser, image_server.url("/chelsea.jpg"))
        error_says(browser, "The API did not accept this key.")

        key_field.clear()
        key_field.send_keys(KEY)
        classify_url(browser, image_server.url("/chelsea.jpg"))
        WebDriverWait(browser, 60).until(lambda d: len(results(d)) == 5)
        browser.save_screenshot(str(ARTIFACTS / "demo-page-with-key.png"))

        assert gateway.keys_sent == [None, "not-the-key", KEY]
        assert browser.find_element(By.ID, "error").text == ""
        assert browser.execute_script("return sessionStorage.getItem('chalice-classifier.api-key')") == KEY
        assert browser.execute_script("return localStorage.length") == 0
        assert browser.get_cookies() == []
        browser.refresh()  # the same tab keeps it
        assert browser.find_element(By.ID, "api-key").get_attribute("value") == KEY
        assert browser.find_element(By.ID, "key-form").is_displayed()


@pytest.mark.parametrize(
    ("auth", "offers_a_key_field", "notice"),
    [
        ("api_key", True, ""),
        (
            "iam",
            False,
            "This API takes only requests signed with AWS credentials (IAM), which this page cannot",
        ),
    ],
)
@pytest.mark.usefixtures("isolated_network")
def test_the_page_says_up_front_what_the_stages_front_door_wants(
    browser: webdriver.Chrome, auth: str, offers_a_key_field: bool, notice: str
) -> None:
    with running_chalice_local(free_port(), environment={"API_AUTH": auth}) as server:
        browser.get(f"{server.base}/")

        assert browser.find_element(By.ID, "key-form").is_displayed() is offers_a_key_field
        assert browser.find_element(By.ID, "notice").text.startswith(notice)
        assert browser.find_element(By.ID, "notice").is_displayed() is bool(notice)
