"""The chat page in a real browser against the real server: sign in, a streamed answer, Stop freeing the
server's slot, an expired token, hostile Markdown, input methods, both languages, and the page's headers."""

from __future__ import annotations

import base64
import dataclasses
import json
import re
import time
from pathlib import Path

import httpx
import jwt
import pytest
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

from app.web import PAGE_CSP
from tests.app.conftest import Server, run_cli
from tests.web.conftest import ARTIFACTS, BLOCKED_TERM, chromium

# Generous: the browser and the model share two cores with whatever else CI runs.
WAIT_S = 120


def wait(driver: webdriver.Chrome, condition, timeout: float = WAIT_S):  # type: ignore[no-untyped-def]
    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(lambda _: condition())


def element(driver: webdriver.Chrome, id_: str) -> WebElement:
    return driver.find_element(By.ID, id_)


def sign_in(driver: webdriver.Chrome, server: Server) -> None:
    driver.get(server.url + "/")
    wait(driver, lambda: element(driver, "api-key").is_displayed())
    element(driver, "api-key").send_keys(server.key)
    element(driver, "sign-in").click()
    wait(driver, lambda: element(driver, "prompt").is_displayed())


def set_field(driver: webdriver.Chrome, id_: str, value: str) -> None:
    """A chat setting, as a person changes it (the field, then its change event)."""
    driver.execute_script(
        "const f = document.getElementById(arguments[0]); f.value = arguments[1];f.dispatchEvent(new Event('change'));",
        id_,
        value,
    )


def answers(driver: webdriver.Chrome) -> list[str]:
    return [node.text for node in driver.find_elements(By.CSS_SELECTOR, ".message.assistant .body")]


def ask(driver: webdriver.Chrome, question: str) -> None:
    element(driver, "prompt").send_keys(question, Keys.ENTER)


def idle(driver: webdriver.Chrome) -> bool:
    """No question on its way (the page sets this before its first await, so at once on Enter)."""
    return bool(driver.execute_script("return document.body.dataset.state !== 'asking'"))


def answered(driver: webdriver.Chrome) -> bool:
    return idle(driver) and bool(answers(driver))


# Chromium drops its connections when the machine's network interfaces change, and says so on the console. In
# `make test` other scenarios create and remove Docker networks beside this one: that is the machine, never the
# page (no page or server can cause it), so it is no error of the page's.
MACHINE_NETWORK_CHANGED = "net::ERR_NETWORK_CHANGED"


def console_errors(driver: webdriver.Chrome) -> list[str]:
    return [
        entry["message"]
        for entry in driver.get_log("browser")
        if entry["level"] == "SEVERE" and MACHINE_NETWORK_CHANGED not in entry["message"]
    ]


def test_a_signed_in_person_gets_a_streamed_answer_that_survives_a_reload(page_server: Server, browser) -> None:
    sign_in(browser, page_server)
    stored = browser.execute_script("return sessionStorage.getItem('pli.session')")
    assert page_server.key not in stored and json.loads(stored)["token"].count(".") == 2, "a JWT, not the key"
    assert page_server.key not in json.dumps(browser.execute_script("return {...localStorage}"))
    set_field(browser, "temperature", "0")
    ask(browser, "What is the capital of France?")
    wait(browser, lambda: answered(browser))
    assert "Paris" in answers(browser)[-1]
    assert element(browser, "regenerate").is_displayed()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "chat-desktop.png"))
    browser.set_window_size(390, 844)
    browser.save_screenshot(str(ARTIFACTS / "chat-narrow.png"))
    assert element(browser, "prompt").is_displayed() and element(browser, "new-chat").is_displayed()

    browser.refresh()
    wait(browser, lambda: bool(answers(browser)))
    assert "Paris" in answers(browser)[-1], "the conversation is kept in the browser"
    assert element(browser, "prompt").is_displayed(), "the token outlives a reload of the tab"
    assert console_errors(browser) == []


def test_regenerate_asks_again_in_place_and_a_lost_network_is_said_in_words(page_server: Server, browser) -> None:
    sign_in(browser, page_server)
    set_field(browser, "temperature", "0")
    set_field(browser, "max-tokens", "12")
    ask(browser, "Name a colour.")
    wait(browser, lambda: answered(browser))
    first = answers(browser)
    asked = page_server.metric("vllm:request_success_total")
    element(browser, "regenerate").click()
    wait(browser, lambda: answered(browser) and page_server.metric("vllm:request_success_total") > asked)
    assert answers(browser) == first, "greedy: the same answer again, in place of the first"
    assert len(browser.find_elements(By.CSS_SELECTOR, ".message.user")) == 1

    browser.set_network_conditions(offline=True, latency=0, download_throughput=0, upload_throughput=0)
    ask(browser, "Are you there?")
    wait(browser, lambda: idle(browser))
    assert element(browser, "notice").text == "The server cannot be reached. Check the network and try again."
    assert element(browser, "send").is_displayed() and not element(browser, "send").get_attribute("disabled")


def test_stop_ends_the_answer_and_the_server_frees_its_slot(page_server: Server, browser) -> None:
    aborted_before = page_server.metric("vllm:request_success_total", finished_reason="abort")
    sign_in(browser, page_server)
    # Greedy counting goes on to max_tokens: the answer is still streaming when Stop is pressed.
    set_field(browser, "temperature", "0")
    set_field(browser, "max-tokens", "2000")
    ask(browser, "Count from 1 to 1000, one number per line.")
    wait(browser, lambda: len(answers(browser)) == 1 and len(answers(browser)[0]) > 10)
    assert page_server.metric("vllm:num_requests_running") == 1
    element(browser, "stop").click()
    wait(browser, lambda: idle(browser))
    assert element(browser, "notice").text == "Stopped."
    wait(browser, lambda: page_server.metric("vllm:num_requests_running") == 0)
    wait(
        browser, lambda: page_server.metric("vllm:request_success_total", finished_reason="abort") == aborted_before + 1
    )
    assert console_errors(browser) == []


def expired_copy(token: str, keyring: Path) -> str:
    """The same token signed again by the server's own key, with an expiry in the past."""
    key = json.loads(keyring.read_text())["keys"][0]
    secret = base64.urlsafe_b64decode(key["secret"] + "=" * (-len(key["secret"]) % 4))
    claims = jwt.decode(token, options={"verify_signature": False})
    claims |= {"iat": int(time.time()) - 3600, "exp": int(time.time()) - 60}
    return jwt.encode(claims, secret, algorithm="HS256", headers={"kid": key["kid"]})


def test_an_expired_token_returns_to_sign_in(page_server: Server, browser) -> None:
    sign_in(browser, page_server)
    session = json.loads(browser.execute_script("return sessionStorage.getItem('pli.session')"))
    # The page believes the token is good (its own clock says so); the server says it has expired.
    session["token"] = expired_copy(session["token"], page_server.keyring)
    browser.execute_script("sessionStorage.setItem('pli.session', arguments[0])", json.dumps(session))
    browser.refresh()
    wait(browser, lambda: element(browser, "prompt").is_displayed())
    ask(browser, "Hi")
    wait(browser, lambda: element(browser, "api-key").is_displayed())
    assert "Sign in again" in element(browser, "sign-in-error").text
    assert browser.execute_script("return sessionStorage.getItem('pli.session')") is None


def test_a_wrong_key_is_refused_in_words(page_server: Server, browser) -> None:
    browser.get(page_server.url + "/")
    element(browser, "api-key").send_keys("sk-pli-wrong_0123456789abcdefghijklmnopqrstuvwxyzABCDEFG", Keys.ENTER)
    wait(browser, lambda: bool(element(browser, "sign-in-error").text))
    assert "API key" in element(browser, "sign-in-error").text
    assert element(browser, "api-key").is_displayed()


def test_a_refused_prompt_and_a_rate_limit_are_said_in_words(page_server: Server, browser) -> None:
    created = run_cli(
        "keys",
        "create",
        "--name",
        "page-limited",
        "--tenant",
        "page",
        "--rpm",
        "3",
        "--keys-db",
        str(page_server.keys_db),
    )
    assert created.returncode == 0, created.stderr
    sign_in(browser, dataclasses.replace(page_server, key=created.stdout.strip()))
    set_field(browser, "max-tokens", "2")
    ask(browser, f"Tell me about {BLOCKED_TERM}.")
    wait(browser, lambda: element(browser, "notice").text == "The content filter refused this message.")
    assert answers(browser) == []
    wait(browser, lambda: idle(browser))
    for _ in range(5):
        ask(browser, "Hi")
        wait(browser, lambda: idle(browser))
        if element(browser, "send").get_attribute("disabled"):
            break
    said = re.fullmatch(r"Too many requests\. You can send again in (\d+) s\.", element(browser, "notice").text)
    assert said is not None, element(browser, "notice").text
    assert element(browser, "send").get_attribute("disabled") == "true"
    # The countdown counts: a second later it says less.
    wait(
        browser,
        lambda: (
            (m := re.search(r"(\d+) s", element(browser, "notice").text)) is None
            or int(m.group(1)) < int(said.group(1))
        ),
    )


HOSTILE = (
    "Before <img src=x onerror=\"window.pwned='img'\"> and <script>window.pwned='script'</script>.\n\n"
    "[a link](javascript:window.pwned='link') and ![a picture](https://example.invalid/x.png)\n\n"
    "<iframe src=\"javascript:window.pwned='frame'\"></iframe>\n\n"
    "```python\nprint('<b>bold</b>')\n```\n"
)


def test_hostile_markdown_in_an_answer_is_shown_as_text_and_runs_nothing(page_server: Server, browser) -> None:
    sign_in(browser, page_server)
    chat = {
        "id": "hostile",
        "title": "hostile",
        "created": "2026-12-01T00:00:00Z",
        "system": "",
        "temperature": 0,
        "maxTokens": 16,
        "messages": [{"role": "user", "content": "Show me."}, {"role": "assistant", "content": HOSTILE}],
    }
    browser.execute_script("localStorage.setItem('pli.chats', arguments[0])", json.dumps([chat]))
    browser.refresh()
    wait(browser, lambda: bool(answers(browser)))
    body = browser.find_element(By.CSS_SELECTOR, ".message.assistant .body")
    time.sleep(0.5)  # an onerror or a script would have run by now
    assert browser.execute_script("return window.pwned === undefined")
    assert body.find_elements(By.CSS_SELECTOR, "img, script, iframe") == []
    assert '<img src=x onerror="window.pwned=' in body.text and "<script>" in body.text
    link = body.find_element(By.LINK_TEXT, "a link") if body.find_elements(By.TAG_NAME, "a") else None
    assert link is None or not (link.get_attribute("href") or "").startswith("javascript:")
    assert "a picture" in body.text, "an image is named, never fetched"
    code = body.find_element(By.CSS_SELECTOR, "pre code")
    assert code.text == "print('<b>bold</b>')"
    assert body.find_element(By.CSS_SELECTOR, "pre button.copy").is_displayed()
    assert [m for m in console_errors(browser) if "example.invalid" in m or "/x" in m] == []


def test_enter_while_an_input_method_composes_does_not_send(page_server: Server, browser) -> None:
    sign_in(browser, page_server)
    element(browser, "prompt").send_keys("ni hao")
    browser.execute_script(
        "document.getElementById('prompt').dispatchEvent(new KeyboardEvent('keydown',"
        " {key: 'Enter', keyCode: 229, isComposing: true, bubbles: true, cancelable: true}))"
    )
    time.sleep(0.3)
    assert browser.find_elements(By.CSS_SELECTOR, ".message.user") == []
    assert element(browser, "prompt").get_attribute("value") == "ni hao"


def test_a_chinese_browser_gets_the_chinese_page_and_can_switch(page_server: Server) -> None:
    driver = chromium(language="zh-CN")
    try:
        driver.get(page_server.url + "/")
        wait(driver, lambda: element(driver, "sign-in").is_displayed())
        assert driver.execute_script("return document.documentElement.lang") == "zh-CN"
        assert element(driver, "sign-in").text == "登录"
        element(driver, "language").click()
        assert element(driver, "sign-in").text == "Sign in"
        driver.refresh()
        wait(driver, lambda: element(driver, "sign-in").is_displayed())
        assert element(driver, "sign-in").text == "Sign in", "the choice is kept"
    finally:
        driver.quit()


def test_a_conversation_exports_to_markdown_and_json_and_is_deleted(
    page_server: Server, browser, tmp_path: Path
) -> None:
    """Exports are downloads (the browser fixture points Chromium's at this test's tmp_path)."""
    sign_in(browser, page_server)
    chat = {
        "id": "kept",
        "title": "Rivers of Europe",
        "created": "2026-12-01T00:00:00Z",
        "system": "Be brief.",
        "temperature": 0,
        "maxTokens": 16,
        "messages": [{"role": "user", "content": "Name a river."}, {"role": "assistant", "content": "The Rhine."}],
    }
    browser.execute_script("localStorage.setItem('pli.chats', arguments[0])", json.dumps([chat]))
    browser.refresh()
    wait(browser, lambda: bool(answers(browser)))
    element(browser, "new-chat").click()
    rows = browser.find_elements(By.CSS_SELECTOR, "#chat-list li")
    assert [row.find_element(By.CSS_SELECTOR, ".open").text for row in rows] == ["New chat", "Rivers of Europe"]
    markdown, as_json, delete = rows[1].find_elements(By.CSS_SELECTOR, "button.small")
    markdown.click()
    as_json.click()
    wait(browser, lambda: {p.name for p in tmp_path.iterdir()} >= {"Rivers-of-Europe.md", "Rivers-of-Europe.json"})
    assert json.loads((tmp_path / "Rivers-of-Europe.json").read_text(encoding="utf-8")) == chat
    exported = (tmp_path / "Rivers-of-Europe.md").read_text(encoding="utf-8")
    assert exported.startswith("# Rivers of Europe") and "**You:**\n\nName a river." in exported
    assert "**Assistant:**\n\nThe Rhine." in exported
    delete.click()
    browser.switch_to.alert.accept()
    assert [row.text for row in browser.find_elements(By.CSS_SELECTOR, "#chat-list li .open")] == ["New chat"]
    kept = json.loads(browser.execute_script("return localStorage.getItem('pli.chats')"))
    assert "kept" not in [c["id"] for c in kept]


@pytest.mark.parametrize("path", ["/", "/chat/chat.js", "/chat/chat.css", "/chat/vendor/purify.min.js"])
def test_the_page_and_its_assets_carry_the_pages_policy(page_server: Server, path: str) -> None:
    response = httpx.get(page_server.url + path)
    assert response.status_code == 200
    assert response.headers["content-security-policy"] == PAGE_CSP
    assert "'unsafe-inline'" not in PAGE_CSP and "script-src 'self'" in PAGE_CSP
    assert response.headers["x-content-type-options"] == "nosniff"


def test_an_unknown_asset_is_an_openai_shaped_404(page_server: Server) -> None:
    response = httpx.get(page_server.url + "/chat/../app/settings.py")
    assert response.status_code == 404
    assert response.json()["error"]["code"] in {"not_found", None}
