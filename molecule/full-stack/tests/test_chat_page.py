"""The chat page through the gateway over TLS, in Debian's headless Chromium on the controller: nginx's
policy for the page lets its scripts run (a violation would be a console error), the API keeps its own."""

from __future__ import annotations

import base64
import hashlib
import socket
import ssl

import httpx
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait
from stack import KEY, PORT

NAME = "gateway.pli.test"
PAGE_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def served_key_pin(pebble_root: str) -> str:
    """The served certificate's public key, as Chromium pins it (base64 SHA-256 of the SPKI), read over a
    handshake that verifies the chain against Pebble's root."""
    context = ssl.create_default_context(cafile=pebble_root)
    context.check_hostname = False
    with (
        socket.create_connection(("127.0.0.1", PORT), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=NAME) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    spki = (
        x509.load_der_x509_certificate(der).public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    )
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


def test_the_page_and_the_api_each_get_their_own_policy_from_the_gateway(pebble_root):
    context = ssl.create_default_context(cafile=pebble_root)
    context.check_hostname = False
    with httpx.Client(base_url=f"https://127.0.0.1:{PORT}", verify=context, timeout=30) as gateway:
        page = gateway.get("/")
        api = gateway.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.headers.get_list("content-security-policy") == [PAGE_POLICY]
    assert api.headers.get_list("content-security-policy") == ["default-src 'none'; frame-ancestors 'none'"]


def test_a_person_signs_in_and_gets_an_answer_through_the_gateway(pebble_root, tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--lang=en-US",
        f"--user-data-dir={tmp_path / 'profile'}",
        # The name the certificate holds, on the gateway's published port; the certificate pinned by its key.
        f"--host-resolver-rules=MAP {NAME} 127.0.0.1",
        f"--ignore-certificate-errors-spki-list={served_key_pin(pebble_root)}",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))
    try:
        wait = WebDriverWait(driver, 120, poll_frequency=0.2)
        driver.get(f"https://{NAME}:{PORT}/")
        wait.until(lambda d: d.find_element(By.ID, "api-key").is_displayed())
        driver.find_element(By.ID, "api-key").send_keys(KEY, Keys.ENTER)
        wait.until(lambda d: d.find_element(By.ID, "prompt").is_displayed())
        driver.execute_script(
            "const f = document.getElementById('temperature'); f.value = '0'; f.dispatchEvent(new Event('change'));"
        )
        driver.find_element(By.ID, "prompt").send_keys("What is the capital of France?", Keys.ENTER)
        # The page marks the body while a question is on its way (tests/web waits the same way).
        wait.until(lambda d: d.execute_script("return document.body.dataset.state === 'idle'"))
        answers = [node.text for node in driver.find_elements(By.CSS_SELECTOR, ".message.assistant .body")]
        assert answers and "Paris" in answers[-1], (answers, driver.find_element(By.ID, "notice").text)
        # Chromium drops its connections when the machine's network interfaces change (other scenarios create and
        # remove Docker networks beside this one) and says so: that is the machine, never the page.
        errors = [
            entry["message"]
            for entry in driver.get_log("browser")
            if entry["level"] == "SEVERE" and "net::ERR_NETWORK_CHANGED" not in entry["message"]
        ]
        assert errors == [], errors
    finally:
        driver.quit()
