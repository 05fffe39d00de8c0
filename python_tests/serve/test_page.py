"""The chat page in a real headless Chromium (Debian's, driven by Playwright): attach an image, ask,
watch the answer stream in, press Stop, and the server's generation ends; the API-key flow, drag
and drop, paste and error display. Screenshots go to python_tests/artifacts/.

Skipped only when no chromium is installed and EAGLE_FAST_REQUIRE_BROWSER is unset (CI sets it)."""

import os
import shutil
import time
from pathlib import Path

import httpx
import pytest

from eagle_fast.serve import ServeConfig

from .conftest import png_bytes, serving, wait_idle

REQUIRED = bool(os.environ.get("EAGLE_FAST_REQUIRE_BROWSER"))
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if not CHROMIUM and not REQUIRED:
    pytest.skip("chromium is not installed (apt-get install chromium)", allow_module_level=True)
if not REQUIRED:
    pytest.importorskip("playwright")
from playwright.sync_api import expect, sync_playwright  # noqa: E402

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-quic",
    "--no-first-run",
    "--disable-sync",
    "--disable-dev-shm-usage",
]  # containers often have a small /dev/shm
# records every length the last answer's text takes, as the page renders it
WATCH = """() => {
  window.lengths = [];
  new MutationObserver(() => {
    const answers = document.querySelectorAll('.msg.assistant .content');
    const n = answers.length ? answers[answers.length - 1].textContent.length : 0;
    if (n !== window.lengths[window.lengths.length - 1]) window.lengths.push(n);
  }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
}"""


@pytest.fixture(scope="module")
def browser():
    assert CHROMIUM, "EAGLE_FAST_REQUIRE_BROWSER is set but chromium is not installed"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def slow_tiny(tiny):
    """The tiny model at a pace a person (and this test) can watch: 20 ms per forward pass."""
    handle = tiny[0].register_forward_pre_hook(lambda module, args: time.sleep(0.02))
    yield tiny
    handle.remove()


def _screenshot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")


def test_stream_and_stop(browser, slow_tiny, tmp_path):
    image = tmp_path / "red.png"
    image.write_bytes(png_bytes(64, 48, (220, 40, 40)))
    with serving(ServeConfig(model="eagle-tiny-x5", max_tokens=400), slow_tiny) as (base, _):
        page = browser.new_page()
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(base + "/")
        expect(page.locator("#model")).to_have_text("eagle-tiny-x5")
        page.set_input_files("#file", str(image))
        expect(page.locator("#attachments img")).to_have_count(1)
        page.click("#settings summary")
        page.fill("#temperature", "0")  # greedy: the same answer every run
        page.fill("#prompt", "What colour is this square?")
        page.evaluate(WATCH)
        page.click("#send")
        expect(page.locator("#stop")).to_be_visible()
        expect(page.locator(".msg.user img")).to_have_count(1)
        page.wait_for_function("() => window.lengths.filter(n => n > 0).length >= 4", timeout=60_000)
        assert httpx.get(f"{base}/health").json()["active_generations"] == 1
        _screenshot(page, "serve_page_streaming.png")
        page.click("#stop")
        expect(page.locator(".msg.assistant .note")).to_have_text("(stopped)")
        expect(page.locator("#send")).to_be_visible()
        health = wait_idle(base)
        assert health["cancelled"] == 1 and health["completed"] == 0  # stopped before its 400 tokens
        lengths = page.evaluate("window.lengths")
        answer = page.locator(".msg.assistant .content").text_content()
        assert len(answer) == lengths[-1] > 0 and lengths == sorted(lengths)  # grew, chunk by chunk
        assert page.locator("#error").is_hidden() and not errors
        _screenshot(page, "serve_page_stopped.png")

        page.fill("#prompt", "And now?")  # the stopped answer stays in the history for the next turn
        page.evaluate(WATCH)
        page.click("#send")
        page.wait_for_function("() => window.lengths.filter(n => n > 0).length >= 2", timeout=60_000)
        page.click("#new-chat")
        expect(page.locator(".msg")).to_have_count(0)
        assert wait_idle(base)["cancelled"] == 2
        page.close()


def _drop_and_paste(page, data: bytes) -> None:
    page.evaluate(
        """(bytes) => {
      const file = () => new File([new Uint8Array(bytes)], 'a.png', {type: 'image/png'});
      const drop = new DataTransfer();
      drop.items.add(file());
      document.getElementById('messages').dispatchEvent(new DragEvent('drop', {dataTransfer: drop, bubbles: true}));
      const paste = new DataTransfer();
      paste.items.add(file());
      document.getElementById('prompt').dispatchEvent(
        new ClipboardEvent('paste', {clipboardData: paste, bubbles: true}));
    }""",
        list(data),
    )


def test_api_key_drop_paste_and_errors(browser, tiny):
    config = ServeConfig(model="eagle-tiny-x5", api_key="page-key", max_images=1, max_tokens=4)
    with serving(config, tiny) as (base, _):
        page = browser.new_page()
        page.goto(base + "/")
        expect(page.locator("#key-form")).to_be_visible()  # the page asks for the key
        expect(page.locator("#error")).to_contain_text("API key")
        page.fill("#api-key", "page-key")
        page.click("#key-form button")
        expect(page.locator("#model")).to_have_text("eagle-tiny-x5")
        expect(page.locator("#key-form")).to_be_hidden()
        assert page.evaluate("localStorage.getItem('eagle_fast.apiKey')") == "page-key"

        _drop_and_paste(page, png_bytes(30, 30, (0, 200, 0)))
        expect(page.locator("#attachments img")).to_have_count(2)
        page.fill("#prompt", "Two images?")
        page.press("#prompt", "Enter")
        expect(page.locator("#error")).to_contain_text("at most 1")  # the server's message, shown
        expect(page.locator("#attachments img")).to_have_count(2)  # given back to fix and resend
        assert page.input_value("#prompt") == "Two images?"

        page.locator("#attachments button").first.click()
        page.click("#send")
        expect(page.locator(".msg.assistant")).to_have_count(1)
        expect(page.locator("#send")).to_be_visible()
        expect(page.locator("#error")).to_be_hidden()
        assert page.locator(".msg.assistant .content").text_content()
        _screenshot(page, "serve_page_answered.png")
        page.close()
