"""The demo page, in a real headless Chromium against `chalice local`.

Chromium and chromedriver come from Debian (`make test` installs them);
selenium is told exactly where both are, so it never tries to download one.
A screenshot is saved to test-artifacts/ for a person to look at.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from chalice.test import Client
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

from tests.support.chalice_local import LocalServer
from tests.support.http_server import RoutedHTTPServer

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--no-first-run",
    "--window-size=900,1300",
)


@pytest.fixture
def browser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[webdriver.Chrome]:
    monkeypatch.setenv("SE_OFFLINE", "true")  # selenium must not look for drivers online
    options = Options()
    options.binary_location = "/usr/bin/chromium"
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def test_the_page_is_served_with_a_strict_content_security_policy(client: Client) -> None:
    response = client.http.get("/")

    assert response.status_code == 200
    assert response.headers["Content-Type"] == "text/html; charset=utf-8"
    assert "connect-src 'self'" in response.headers["Content-Security-Policy"]
    page = response.body.decode()
    assert 'id="file"' in page
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
