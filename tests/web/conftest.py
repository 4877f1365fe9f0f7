"""Headless Chromium (Debian's, through its chromedriver) against a real server with the embedded model."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service

from tests.app.conftest import Server, start_server, stop_server

ARTIFACTS = Path(__file__).resolve().parents[2] / ".cache" / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# The page server's one sensitive word: a prompt holding it is refused.
BLOCKED_TERM = "zqxjvkpage"


@pytest.fixture(scope="session")
def page_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("page")
    (folder / "words.txt").write_text(f"{BLOCKED_TERM}\n", encoding="utf-8")
    server = start_server(folder, "--sensitive-word-files", str(folder / "words.txt"))
    yield server
    stop_server(server)


def chromium(language: str = "en-US", downloads: Path | None = None) -> webdriver.Chrome:
    assert shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER), (
        "Debian's chromium and chromium-driver are missing: make test-servers installs them"
    )
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,900", f"--lang={language}"):
        options.add_argument(argument)
    prefs: dict[str, object] = {"intl.accept_languages": language}
    if downloads is not None:
        prefs |= {
            "download.default_directory": str(downloads),
            "download.prompt_for_download": False,
            # A second download from the page would otherwise wait for a permission prompt.
            "profile.default_content_setting_values.automatic_downloads": 1,
        }
    options.add_experimental_option("prefs", prefs)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    driver = chromium(downloads=tmp_path)
    yield driver
    driver.quit()
