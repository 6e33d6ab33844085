"""The web chat page (glm_kernels/serve/static/index.html) in a real browser against a served tiny model.

Playwright drives Debian's system chromium (`apt-get install chromium`; `make test` installs it when run as root),
not a browser Playwright downloads. Missing, the test fails instead of skipping. A screenshot of the conversation
is saved to tests/artifacts/web_chat.png.
"""
import shutil
import struct
from contextlib import contextmanager
from pathlib import Path

import pytest
from playwright.sync_api import expect, sync_playwright

ARTIFACTS = Path(__file__).parent / "artifacts"
SCREENSHOT = ARTIFACTS / "web_chat.png"
TIMEOUT_MS = 60_000
MAX_TOKENS = 8
DONE = ".message.assistant[data-done='true']"

# Counts, from inside the page, the DOM updates of assistant messages (one mutation record per change, even when
# several deltas land in one network read), records each distinct text the latest one is rendered with, and every
# enabled/disabled state of the send and stop buttons.
OBSERVE = """() => {
  window.__updates = 0; window.__seen = []; window.__buttons = [];
  const transcript = document.getElementById('transcript');
  const send = document.getElementById('send'), stop = document.getElementById('stop');
  new MutationObserver((records) => {
    for (const r of records) {
      const el = r.target.nodeType === Node.ELEMENT_NODE ? r.target : r.target.parentElement;
      if (el.closest('.message.assistant')) window.__updates++;
    }
    const bots = transcript.querySelectorAll('.message.assistant');
    const text = bots.length ? bots[bots.length - 1].textContent : '';
    if (text && text !== window.__seen[window.__seen.length - 1]) window.__seen.push(text);
  }).observe(transcript, {childList: true, subtree: true, characterData: true});
  new MutationObserver(() => window.__buttons.push([send.disabled, stop.disabled]))
    .observe(document.body, {attributes: true, subtree: true, attributeFilter: ['disabled']});
}"""


def chromium_executable():
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail("the web chat test needs the system chromium: install it with `apt-get install chromium` "
                "(as root, `make test` does it)", pytrace=False)


@contextmanager
def browser_page():
    executable = chromium_executable()
    with sync_playwright() as p:
        # --no-sandbox: chromium refuses to start as root with its sandbox, and containers often lack the user
        # namespaces it needs; the browser only visits the local test server. --disable-dev-shm-usage: a small
        # /dev/shm in containers crashes renderers.
        browser = p.chromium.launch(executable_path=executable, headless=True,
                                    args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"])
        try:
            page = browser.new_context(viewport={"width": 1000, "height": 760}).new_page()
            page.set_default_timeout(TIMEOUT_MS)
            page.errors = []
            page.on("pageerror", lambda error: page.errors.append(error))
            yield page
        finally:
            browser.close()


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24]), len(data)


def send_and_wait(page, text, done_count, click=True):
    page.fill("#prompt", text)
    if click:
        page.click("#send")
    else:
        page.press("#prompt", "Enter")
    expect(page.locator(DONE)).to_have_count(done_count, timeout=TIMEOUT_MS)
    return page.locator(DONE).nth(done_count - 1).text_content()


def test_web_chat_streams_a_greedy_reply_with_history(served_tiny):
    with browser_page() as page:
        chat_in_browser(served_tiny, page)


def chat_in_browser(served_tiny, page):
    requests = []
    page.on("request", lambda r: requests.append(r) if r.url.endswith("/v1/chat/completions") else None)
    try:
        page.goto(served_tiny.url + "/")

        # The selector lists the base model then the prefixes, as /v1/models does.
        options = page.locator("#model option")
        expect(options).to_have_count(len(served_tiny.models))
        assert options.evaluate_all("os => os.map(o => o.value)") == served_tiny.models
        assert page.input_value("#temperature") == "0.95" and page.input_value("#top-p") == "0.7"

        model = served_tiny.models[1]
        page.select_option("#model", model)
        page.fill("#temperature", "0")  # greedy: the server's output is deterministic
        page.fill("#max-tokens", str(MAX_TOKENS))
        assert page.input_value("#temperature") == "0"
        page.evaluate(OBSERVE)

        # Turn 1, sent with Enter: streamed, and equal to the server's own greedy completion.
        first = [{"role": "user", "content": "Hello! Who are you?"}]
        expected = served_tiny.chat(model, first, MAX_TOKENS)
        assert expected, "the tiny model's greedy reply is empty: nothing to stream"
        reply = send_and_wait(page, first[0]["content"], 1, click=False)
        assert reply == expected
        assert requests[0].method == "POST"
        assert requests[0].post_data_json == {"model": model, "messages": first, "stream": True,
                                              "max_tokens": MAX_TOKENS, "temperature": 0, "top_p": 0.7}
        # Streaming really happened: several deltas (the page's count), each a DOM update of the message, and the
        # text grew by appending (every rendered state a prefix of the reply). A fast server may deliver a whole
        # reply in one network read, so how many states were painted is not asserted.
        chunks, updates = page.evaluate("window.__chunks"), page.evaluate("window.__updates")
        assert chunks > 1, f"only {chunks} delta(s) arrived"
        assert updates == chunks, (updates, chunks)
        seen = page.evaluate("window.__seen")
        assert seen[-1] == reply and all(reply.startswith(s) for s in seen), seen
        # Send is disabled (and stop enabled) while the reply streams, and restored after.
        buttons = page.evaluate("window.__buttons")
        assert [True, False] in buttons, buttons
        assert page.is_enabled("#send") and page.is_disabled("#stop")
        assert page.locator(".message.user").text_content() == first[0]["content"]

        # Turn 2, sent with the button: the request carries the history.
        second = first + [{"role": "assistant", "content": reply}, {"role": "user", "content": "Tell me more."}]
        reply2 = send_and_wait(page, second[-1]["content"], 2)
        assert requests[1].post_data_json["messages"] == second
        assert reply2 == served_tiny.chat(model, second, MAX_TOKENS)
        assert page.locator(".message.user").count() == 2 and page.locator(".error").count() == 0

        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(SCREENSHOT))
        (width, height), size = png_size(SCREENSHOT)
        assert (width, height) == (1000, 760) and size > 5_000, (width, height, size)

        # Clear history empties the transcript; the next request starts afresh.
        page.click("#clear")
        expect(page.locator("#transcript > *")).to_have_count(0)

        # Too many tokens for the context: the server's 400 message is shown, and the failed turn stays out of
        # the history.
        page.fill("#max-tokens", "100000")
        page.fill("#prompt", "This will not fit.")
        page.click("#send")
        error = page.locator("#transcript .error")
        expect(error).to_have_count(1)
        assert "max_tokens" in error.text_content(), error.text_content()
        assert requests[2].post_data_json["messages"] == [{"role": "user", "content": "This will not fit."}]
        assert page.locator(".message.assistant").count() == 0 and page.is_enabled("#send")

        page.fill("#max-tokens", str(MAX_TOKENS))
        send_and_wait(page, "Again.", 1)
        assert requests[3].post_data_json["messages"] == [{"role": "user", "content": "Again."}]

        # Changing the prefix starts a new conversation.
        page.select_option("#model", served_tiny.models[0])
        expect(page.locator("#transcript > *")).to_have_count(0)
        assert not page.errors, page.errors
    except BaseException:
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "web_chat_failure.png"))
        raise
