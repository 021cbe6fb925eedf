"""The chat page at / in a real headless Chromium (Debian's chromium + chromium-driver, driven by selenium).

A person's path through the page: type a message, watch the answer stream in (it must equal the API's
greedy answer to the same messages), then start a long answer and stop it mid-way (the server frees the
slot). Skipped cleanly when selenium, chromium or chromedriver is not installed. Set
LLAMAFORGE_SCREENSHOT=path.png to also save the page's screenshot there (docs/images/chat-page.png).
"""

from __future__ import annotations

import os
import shutil
import time

import pytest

webdriver = pytest.importorskip("selenium.webdriver")
httpx = pytest.importorskip("httpx")
from tests.test_server import start_server, stop_server  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="needs chromium and chromedriver "
                                "(apt-get install chromium chromium-driver)")


@pytest.fixture(scope="module")
def server():
    proc, base = start_server()
    yield base
    stop_server(proc)


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1200,760", "--force-color-profile=srgb"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=opts)
    yield driver
    driver.quit()


def wait_until(predicate, timeout=90.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def set_field(driver, element_id, value):
    driver.execute_script(
        "const e = document.getElementById(arguments[0]); e.value = arguments[1];"
        "e.dispatchEvent(new Event('input')); e.dispatchEvent(new Event('change'));", element_id, str(value))


def record_bubble_updates(driver):
    """Count the text lengths the newest assistant bubble goes through (a MutationObserver)."""
    driver.execute_script("""
        window.__lengths = [];
        new MutationObserver(() => {
          const b = [...document.querySelectorAll('.msg.assistant')].pop();
          if (b) window.__lengths.push(b.textContent.length);
        }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
    """)


def last_answer(driver):
    bubbles = driver.find_elements("css selector", ".msg.assistant")
    return bubbles[-1] if bubbles else None


def test_chat_streams_an_answer_equal_to_the_api(server, browser, tmp_path):
    browser.get(server + "/")
    wait_until(lambda: "SmolLM2" in browser.find_element("id", "model").text, what="the model name")
    set_field(browser, "temperature", 0)
    set_field(browser, "max-tokens", 16)
    record_bubble_updates(browser)
    question = "What is the capital of France?"
    browser.find_element("id", "prompt").send_keys(question + "\n")
    wait_until(lambda: browser.find_elements("css selector", ".meta"), what="the answer to finish")
    answer = last_answer(browser).text
    assert "streaming" not in last_answer(browser).get_attribute("class")
    api = httpx.post(server + "/v1/chat/completions", timeout=120, json={
        "messages": [{"role": "user", "content": question}], "temperature": 0, "max_tokens": 16}).json()
    assert answer == api["choices"][0]["message"]["content"].strip()
    lengths = browser.execute_script("return window.__lengths")
    assert len({n for n in lengths if n > 0}) >= 2  # the text arrived in pieces, not at once
    assert "tokens" in browser.find_elements("css selector", ".meta")[-1].text
    shot = os.environ.get("LLAMAFORGE_SCREENSHOT") or str(tmp_path / "chat-page.png")
    browser.save_screenshot(shot)
    assert os.path.getsize(shot) > 10_000


def test_stop_ends_a_generation_and_frees_the_slot(server, browser):
    before = httpx.get(server + "/health").json()["generated_tokens"]
    set_field(browser, "temperature", 0)
    set_field(browser, "max-tokens", 200)
    browser.find_element("id", "prompt").send_keys("Write a long story about a dragon.\n")
    wait_until(lambda: browser.find_element("id", "stop").is_displayed(), what="the stop button")
    wait_until(lambda: len(last_answer(browser).text) > 10, what="some streamed text")
    browser.find_element("id", "stop").click()
    wait_until(lambda: not browser.find_element("id", "stop").is_displayed(), what="the page to leave busy state")
    assert browser.find_element("id", "send").is_enabled()
    assert browser.find_elements("css selector", ".meta")[-1].text == "stopped"

    def idle():
        h = httpx.get(server + "/health").json()
        return h if h["running"] == 0 and h["slots_free"] == h["slots"] and h["waiting"] == 0 else None

    after = wait_until(idle, what="the server to free the slot")["generated_tokens"]
    assert after - before < 200
    # the conversation goes on after a stop
    set_field(browser, "max-tokens", 4)
    n = len(browser.find_elements("css selector", ".msg.assistant"))
    browser.find_element("id", "prompt").send_keys("Thanks!\n")
    wait_until(lambda: len(browser.find_elements("css selector", ".meta")) >= 3, what="the next answer")
    assert len(browser.find_elements("css selector", ".msg.assistant")) == n + 1
