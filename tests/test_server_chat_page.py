"""The chat page at / in a real headless Chromium (Debian's chromium + chromium-driver, driven by selenium).

A person's path through the page: type a message, watch the answer stream in (it must equal the API's
greedy answer to the same messages), then start a long answer and stop it mid-way (the server frees the
slot); reload and find the conversation kept; switch conversations; regenerate and edit; read a markdown
answer (code block with a copy button, no HTML from the model); the same page at a phone's width.
Skipped cleanly when selenium, chromium or chromedriver is not installed. Set
LLAMAFORGE_SCREENSHOTS=folder to also save the desktop and phone screenshots there (docs/images/).
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
    assert browser.find_element("id", "context").text.startswith("context ")


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


def test_a_reload_keeps_the_conversation_and_the_list_switches_between_them(server, browser):
    before = [b.text for b in browser.find_elements("css selector", ".msg")]
    browser.refresh()
    wait_until(lambda: "SmolLM2" in browser.find_element("id", "model").text, what="the model name")
    assert [b.text for b in browser.find_elements("css selector", ".msg")] == before
    assert "tokens/s" in browser.find_elements("css selector", ".meta")[-1].text
    browser.find_element("id", "new-chat").click()
    assert not browser.find_elements("css selector", ".msg")
    entries = browser.find_elements("css selector", "#conversations li")  # a new chat is listed once it has a message
    assert len(entries) == 1 and "What is the capital" in entries[0].text and "current" not in entries[0].get_attribute("class")
    entries[0].find_element("css selector", "button.open").click()
    assert [b.text for b in browser.find_elements("css selector", ".msg")] == before


def test_regenerate_and_edit_the_last_message(server, browser):
    set_field(browser, "temperature", 0)
    set_field(browser, "max-tokens", 6)
    answers = browser.find_elements("css selector", ".msg.assistant")
    n = len(answers)
    browser.find_element("css selector", ".actions.assistant button.regenerate").click()
    wait_until(lambda: browser.find_element("id", "send").is_enabled()
               and not browser.find_elements("css selector", ".streaming"), what="the new answer")
    answers = browser.find_elements("css selector", ".msg.assistant")
    assert len(answers) == n and answers[-1].text  # replaced, not added
    user = browser.find_elements("css selector", ".msg.user")[-1].text
    browser.find_element("css selector", ".actions.user button.edit").click()
    assert browser.find_element("id", "prompt").get_attribute("value") == user
    assert len(browser.find_elements("css selector", ".msg.assistant")) == n - 1
    assert browser.find_elements("css selector", ".msg.user")[-1].text != user or n == 1


MARKDOWN = """Here is **bold**, *italic* and `inline code`.

```python
print("<b>hi</b>")
```

- one <img src=x onerror="window.__pwned = 1">
- [a link](https://example.com) and [bad](javascript:window.__pwned=2)

<script>window.__pwned = 3</script>"""


def test_a_markdown_answer_is_rendered_without_any_html_from_the_model(server, browser):
    browser.execute_script("""
        localStorage.setItem("lf.conversations", JSON.stringify([{id: "md", title: "markdown", messages: [
          {role: "user", content: "show me markdown <i>please</i>"},
          {role: "assistant", content: arguments[0], meta: "test"}]}]));
        localStorage.setItem("lf.current", "md");""", MARKDOWN)
    browser.refresh()
    wait_until(lambda: browser.find_elements("css selector", ".msg.assistant"), what="the stored answer")
    answer = browser.find_element("css selector", ".msg.assistant")
    assert answer.find_element("css selector", "strong").text == "bold"
    assert answer.find_element("css selector", "em").text == "italic"
    code = answer.find_element("css selector", ".code pre code")
    assert code.text == 'print("<b>hi</b>")'
    assert "mono" in code.value_of_css_property("font-family").lower()
    assert [a.get_attribute("href") for a in answer.find_elements("css selector", "a")] == ["https://example.com/"]
    assert not answer.find_elements("css selector", "img, script, b, i")
    assert "<script>window.__pwned = 3</script>" in answer.text and "<img src=x" in answer.text
    assert "<i>please</i>" in browser.find_element("css selector", ".msg.user").text
    assert browser.execute_script("return window.__pwned") is None
    copy = answer.find_element("css selector", ".code .copy")
    copy.click()
    wait_until(lambda: copy.text == "Copied", timeout=5, what="the copy button to confirm")
    save_screenshot(browser, "chat-page-desktop.png")


def test_the_page_fits_a_phone(server, browser):
    browser.set_window_size(390, 844)
    try:
        browser.refresh()
        wait_until(lambda: "SmolLM2" in browser.find_element("id", "model").text, what="the model name")
        assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
        assert not browser.find_element("id", "sidebar").is_displayed() or browser.execute_script(
            "return document.getElementById('sidebar').getBoundingClientRect().right <= 0")
        menu = browser.find_element("id", "menu")
        assert menu.is_displayed()
        context = browser.find_element("id", "context")
        line = float(context.value_of_css_property("line-height").removesuffix("px"))
        assert context.size["height"] < 1.5 * line  # "8192" never wraps
        bubble = browser.find_element("css selector", ".msg.assistant")
        assert bubble.rect["x"] >= 0 and bubble.rect["x"] + bubble.rect["width"] <= 390
        save_screenshot(browser, "chat-page-phone.png")
        menu.click()
        wait_until(lambda: browser.execute_script(
            "return document.getElementById('sidebar').getBoundingClientRect().left >= 0"), timeout=5,
            what="the sidebar to slide in")
        assert browser.find_element("id", "new-chat").is_displayed()
    finally:
        browser.set_window_size(1200, 760)


def test_the_favicon_is_served(server):
    resp = httpx.get(server + "/favicon.ico")
    assert resp.status_code == 200 and resp.headers["content-type"] == "image/x-icon"
    assert resp.content[:4] == b"\x00\x00\x01\x00"  # the ICO header


def save_screenshot(browser, name):
    folder = os.environ.get("LLAMAFORGE_SCREENSHOTS")
    if folder:
        browser.save_screenshot(os.path.join(folder, name))
