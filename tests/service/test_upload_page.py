"""The upload page at ``/`` (and the API doc pages) in a real headless Chromium, against
``python -m service`` on loopback.

The service runs with an API key, so the page's key field is exercised too. Images are the tiny
bundle's anchors (tests/service/helpers.py): ``accepted`` passes every operating point,
``borderline`` only 0.95 and 0.99, ``rejected`` none. What the page shows is compared with what
``/predict`` answers for the same files, so the page can only pass by showing the server's verdict.

Set ``UPLOAD_PAGE_SCREENSHOT`` to a file name to save the page showing two verdicts there (the
picture in docs/serving.md).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.select import Select
from selenium.webdriver.support.ui import WebDriverWait

from service.local import LocalServer, start_local_server
from tests.service.helpers import TinyModel, role_files

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
API_KEY = "upload-page-key"
WAIT_S = 90  # an upper bound for a loaded machine; each wait ends as soon as its condition holds
NOT_AN_IMAGE = b"these are notes, not an image\n"

pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver; .ci/run does)",
)


@pytest.fixture(scope="module")
def server(tiny: TinyModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    settings = {"model_repository": str(tiny.repository), "device": "cpu", "decode_workers": "1", "api_keys": API_KEY}
    running = start_local_server(settings, tmp_path_factory.mktemp("page") / "server.log", timeout_s=120)
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    options = Options()
    options.binary_location = CHROMIUM or ""
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=960,900"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER or ""))
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def files(tiny: TinyModel, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The anchors as ``<role>.png`` files, and a text file, for the file picker."""
    folder = tmp_path_factory.mktemp("uploads")
    paths = {role: folder / f"{role}.png" for role in tiny.images}
    for role, path in paths.items():
        path.write_bytes(tiny.images[role])
    paths["text"] = folder / "notes.txt"
    paths["text"].write_bytes(NOT_AN_IMAGE)
    return paths


@pytest.fixture()
def page(browser: WebDriver, server: LocalServer) -> WebDriver:
    """The page, opened afresh, once its model menu has been filled from the service."""
    browser.get(f"{server.url}/")
    WebDriverWait(browser, WAIT_S).until(lambda driver: _selected(driver, "operating-point"))
    return browser


def _selected(driver: WebDriver, element_id: str) -> str:
    options = Select(driver.find_element(By.ID, element_id)).all_selected_options
    return options[0].text if options else ""


def _answers(driver: WebDriver) -> int:
    return int(driver.find_element(By.TAG_NAME, "body").get_attribute("data-answers") or 0)


def _submit(driver: WebDriver, action: Any) -> None:
    """Do ``action`` (which sends one request from the page) and wait until the page shows its answer."""
    before = _answers(driver)
    action()
    WebDriverWait(driver, WAIT_S).until(lambda d: _answers(d) > before)


def _upload(driver: WebDriver, *paths: Path, key: str = API_KEY) -> None:
    field = driver.find_element(By.ID, "api-key")
    field.clear()
    field.send_keys(key)
    _submit(driver, lambda: driver.find_element(By.ID, "files").send_keys("\n".join(str(path) for path in paths)))


def _cards(driver: WebDriver) -> dict[str, dict[str, str]]:
    """Per file name: the verdict and the label the page shows."""
    return {
        card.get_attribute("data-filename"): {
            "verdict": card.find_element(By.CLASS_NAME, "verdict").text,
            "label": card.find_element(By.CLASS_NAME, "class-name").text,
        }
        for card in driver.find_elements(By.CSS_SELECTOR, "#results .result")
    }


def _error(driver: WebDriver) -> str:
    element = driver.find_element(By.ID, "error")
    return element.text if element.is_displayed() else ""


def _server_answer(server: LocalServer, files: list[Any], **query: Any) -> httpx.Response:
    return httpx.post(f"{server.url}/predict", files=files, params=query, headers={"X-API-Key": API_KEY}, timeout=60)


def test_the_page_shows_each_images_verdict_and_label(page: WebDriver, server: LocalServer, tiny: TinyModel, files: dict[str, Path]) -> None:
    assert _selected(page, "model") == "tiny:1"
    assert _selected(page, "operating-point").startswith("95% ID accepted")
    _upload(page, files["accepted"], files["rejected"])
    drift = httpx.get(f"{server.url}/v2/models/tiny/versions/1", timeout=30).json()["drift"]
    assert drift["images"] >= 2  # the page's two images, at least, were bet on
    assert page.find_element(By.ID, "drift").text == (
        f"Drift alarm: quiet (log10 martingale {drift['log10_martingale']:.2f}, alarm at "
        f"{drift['alarm_log10_level']:.2f}; {drift['images']} images since the last reset)"
    )
    expected = _server_answer(server, role_files(tiny, "accepted", "rejected")).json()["predictions"]
    assert _error(page) == ""
    assert _cards(page) == {
        "accepted.png": {"verdict": "ACCEPTED", "label": expected[0]["label"]},
        "rejected.png": {"verdict": "REJECTED", "label": expected[1]["label"]},
    }
    assert [p["accepted"] for p in expected] == [True, False]
    if destination := os.environ.get("UPLOAD_PAGE_SCREENSHOT"):
        page.save_screenshot(destination)


def test_a_stricter_operating_point_rejects_the_borderline_image(page: WebDriver, files: dict[str, Path]) -> None:
    _upload(page, files["borderline"])
    assert _cards(page)["borderline.png"]["verdict"] == "ACCEPTED"  # at the default, 0.95
    menu = Select(page.find_element(By.ID, "operating-point"))
    _submit(page, lambda: menu.select_by_value("0.9"))  # the page asks again with the last files
    assert _cards(page)["borderline.png"]["verdict"] == "REJECTED"


def test_the_page_shows_the_servers_error_for_a_file_that_is_no_image(page: WebDriver, server: LocalServer, files: dict[str, Path]) -> None:
    answer = _server_answer(server, [("files", ("notes.txt", NOT_AN_IMAGE, "text/plain"))])
    assert answer.status_code == 400
    _upload(page, files["text"])
    assert _error(page) == answer.json()["error"]
    assert _cards(page) == {}


def test_without_the_key_the_page_shows_the_refusal(page: WebDriver, server: LocalServer, tiny: TinyModel, files: dict[str, Path]) -> None:
    refusal = httpx.post(f"{server.url}/predict", files=role_files(tiny, "accepted"), timeout=60)
    assert refusal.status_code == 401
    _upload(page, files["accepted"], key="")
    assert _error(page) == refusal.json()["error"]
    assert _cards(page) == {}


@pytest.mark.parametrize(("path", "operation"), [("/docs", ".opblock-summary-path"), ("/redoc", "[data-section-id]")])
def test_the_api_docs_render_without_internet(browser: WebDriver, server: LocalServer, path: str, operation: str) -> None:
    """Operations appear once the page's scripts have loaded and read the schema (test_docs_pages
    shows that every asset they load is the service's own; CI's browser cannot reach a CDN anyway)."""
    browser.get(f"{server.url}{path}")
    WebDriverWait(browser, WAIT_S).until(lambda d: d.find_elements(By.CSS_SELECTOR, operation))
    assert "/predict" in browser.find_element(By.TAG_NAME, "body").text
