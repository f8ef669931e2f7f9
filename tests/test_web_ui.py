"""The chat page at `/`, driven in a real browser (Debian's chromium through playwright) against real servers.

The main server runs the embedded default model; a second one (tiny random model with a long context) has
--api-key and a one-request queue, for the key prompt, a 503 and a 400. Every test's browser context
records its requests and console: a request to anything but the server, or a console error, fails the test.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from typing import Any
from urllib.parse import urlparse

import httpx
import pytest
from server_util import TINY_ARGS, serve, tiny_checkpoint, wait_for

pytestmark = pytest.mark.slow  # drives a browser against servers

CHROMIUM = os.environ.get("MINISGL_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
BROWSER_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
KEY = "sk-web-test"
ANSWER_TIMEOUT_MS = 180_000


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # The default dtype, as a user runs it (float32 decodes far slower on the CPU). Without the prefix cache: the page's
    # request and the API's reference share a prompt, and a cache hit must not be what decides the comparison.
    yield from serve(
        tmp_path_factory, "web-default", ["--device", "cpu", "--max-total-tokens", "4096", "--disable-radix-cache"]
    )


@pytest.fixture(scope="module")
def locked_server(tmp_path_factory):
    """--api-key, one running and one queued request at most; a context long enough for slow requests."""
    ckpt = tiny_checkpoint(tmp_path_factory, long=True)
    args = ["--model", ckpt, *TINY_ARGS, "--max-running-requests", "1", "--max-queued-requests", "1"]
    yield from serve(tmp_path_factory, "web-locked", args, api_key=KEY)


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.skip("chromium is not installed (apt-get install chromium): the web UI tests need a real browser")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        yield b
        b.close()


class Chat:
    """A page on a fresh browser context (empty storage) with every request and console message recorded."""

    def __init__(self, browser: Any, server: Any, width: int = 1100, height: int = 800):
        self.server = server
        self.context = browser.new_context(viewport={"width": width, "height": height})
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.external: list[str] = []
        self.bodies: list[dict] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(f"page error: {e}"))
        self.context.route("**/*", self._guard)
        self.page.on("request", self._record)

    def _guard(self, route: Any) -> None:
        url = urlparse(route.request.url)
        own = url.scheme in ("http", "https") and (url.hostname, url.port) == ("127.0.0.1", self.server.port)
        if own or url.scheme == "data":
            route.continue_()
        else:
            self.external.append(route.request.url)
            route.abort()

    def _record(self, request: Any) -> None:
        if request.method == "POST" and request.url.endswith("/v1/chat/completions"):
            self.bodies.append(json.loads(request.post_data))

    def open(self) -> Chat:
        self.page.goto(self.server.url + "/")
        return self

    def wait_model(self) -> str:
        self.page.wait_for_function("() => document.getElementById('model').textContent !== '…'")
        return self.page.text_content("#model")

    def settings(self, **values: Any) -> None:
        self.page.click("#open-settings")
        for field, value in values.items():
            self.page.fill(f"#{field}", str(value))
        self.page.click("#settings-save")

    def ask(self, text: str) -> None:
        self.page.fill("#input", text)
        self.page.press("#input", "Enter")

    def wait_idle(self) -> None:
        self.page.wait_for_function("() => !document.body.classList.contains('generating')", timeout=ANSWER_TIMEOUT_MS)

    def stored(self) -> list[dict]:
        """The current conversation's messages, as kept in localStorage."""
        return self.page.evaluate("""() => {
            const chats = JSON.parse(localStorage.getItem('minisgl.chats.v1'));
            const id = localStorage.getItem('minisgl.current.v1');
            return chats.find(c => c.id === id).messages;
        }""")

    def seed(self, chats: list[dict]) -> None:
        """Replace the stored conversations and reload (the page reads them at start)."""
        self.page.evaluate(
            "(c) => { localStorage.setItem('minisgl.chats.v1', JSON.stringify(c));"
            " localStorage.setItem('minisgl.current.v1', c[0].id); }",
            chats,
        )
        self.page.reload()

    def check_clean(self) -> None:
        assert not self.external, f"requests outside the server: {self.external}"
        assert not self.errors, f"console errors: {self.errors}"

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def chat(browser, server):
    c = Chat(browser, server)
    yield c
    c.close()


def api_answer(server: Any, messages: list[dict], max_tokens: int) -> str:
    client = server.client()
    model = client.models.list().data[0].id
    r = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=max_tokens)
    return r.choices[0].message.content


def status(server: Any) -> dict:
    return httpx.get(f"{server.url}/status", headers={"Authorization": f"Bearer {server.api_key}"}).json()


# ---- the default model ---------------------------------------------------------------------------------------
def test_page_loads_offline_without_console_errors(chat, server):
    r = httpx.get(server.url + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in r.headers["content-security-policy"]
    chat.open()
    assert chat.wait_model() == server.client().models.list().data[0].id
    chat.page.wait_for_function("() => document.getElementById('status').textContent.includes('running')")
    assert "0 running" in chat.page.text_content("#status")
    assert chat.page.evaluate("document.activeElement.id") == "input"
    chat.check_clean()


def test_enter_streams_the_greedy_api_answer(chat, server):
    question, n = "What is the capital of France?", 24
    chat.open().wait_model()
    chat.settings(temperature=0, **{"max-tokens": n})
    chat.page.fill("#input", "draft")
    chat.page.press("#input", "Shift+Enter")
    chat.page.type("#input", "line two")
    assert chat.page.input_value("#input") == "draft\nline two" and not chat.bodies  # Shift+Enter: a new line
    # Every render of the answer, recorded from before the question is sent (polling after it could start
    # late enough to see only the finished answer on a fast machine).
    chat.page.evaluate("""() => {
        window.answerLengths = [];
        new MutationObserver(() => {
            const a = document.querySelector('.msg.assistant .msg-body');
            if (a) window.answerLengths.push(a.textContent.length);
        }).observe(document.body, {subtree: true, childList: true, characterData: true});
    }""")
    chat.ask(question)
    chat.wait_idle()
    lengths = chat.page.evaluate("() => window.answerLengths")
    body = chat.bodies[-1]
    assert body["stream"] is True and body["temperature"] == 0 and body["max_tokens"] == n
    assert body["messages"] == [{"role": "user", "content": question}]
    expected = api_answer(server, body["messages"], n)
    messages = chat.stored()
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert messages[1]["content"] == expected
    shown = chat.page.text_content(".msg.assistant .msg-body")
    assert " ".join(shown.split()) == " ".join(expected.replace("**", "").split())
    partial = {x for x in lengths if 0 < x < len(shown)}
    assert len(partial) >= 2, f"the answer did not stream in: lengths seen {lengths}"
    meta = chat.page.text_content(".msg.assistant .msg-meta")
    assert "TTFT" in meta and "tok/s" in meta and "tokens" in meta
    chat.check_clean()


def test_second_turn_sees_the_first_and_reload_keeps_both(chat, server):
    chat.open().wait_model()
    chat.settings(temperature=0, **{"max-tokens": 12})
    chat.ask("Name a color.")
    chat.wait_idle()
    first = chat.stored()[1]["content"]
    assert first
    chat.ask("Name another one.")
    chat.wait_idle()
    assert chat.bodies[-1]["messages"] == [
        {"role": "user", "content": "Name a color."},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "Name another one."},
    ]
    before = chat.stored()
    chat.page.reload()
    chat.wait_model()
    assert chat.stored() == before
    assert [" ".join(t.split()) for t in chat.page.locator(".msg.user .msg-body").all_text_contents()] == [
        "Name a color.",
        "Name another one.",
    ]
    assert chat.page.locator(".msg.assistant").count() == 2
    assert chat.page.text_content("#conv-title") == "Name a color."
    chat.check_clean()


def test_settings_reach_the_request_body(chat, server):
    chat.open().wait_model()
    chat.settings(**{"system-prompt": "You answer in one word.", "temperature": 0.3, "top-p": 0.8, "max-tokens": 4})
    chat.ask("Sky color?")
    chat.wait_idle()
    body = chat.bodies[-1]
    assert body["messages"] == [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Sky color?"},
    ]
    assert (body["temperature"], body["top_p"], body["max_tokens"]) == (0.3, 0.8, 4)
    assert body["model"] == chat.page.text_content("#model")
    assert body["stream_options"] == {"include_usage": True}
    chat.page.reload()  # settings are kept too
    chat.page.click("#open-settings")
    assert chat.page.input_value("#system-prompt") == "You answer in one word."
    assert chat.page.input_value("#max-tokens") == "4"
    chat.page.keyboard.press("Escape")
    chat.ask("Regenerate me")
    chat.wait_idle()
    chat.page.click(".regenerate")  # regenerate resends the same conversation
    chat.wait_idle()
    assert chat.bodies[-1]["messages"] == chat.bodies[-2]["messages"]
    assert [m["role"] for m in chat.stored()] == ["user", "assistant", "user", "assistant"]
    chat.check_clean()


def test_stop_mid_answer_leaves_no_running_request(chat, server):
    chat.open().wait_model()
    chat.settings(temperature=0, **{"max-tokens": 3000})
    chat.ask("Count from 1 to 1000, one number per line.")
    chat.page.wait_for_function(
        "() => (document.querySelector('.msg.assistant .msg-body') || {}).textContent?.length > 3",
        timeout=ANSWER_TIMEOUT_MS,
    )
    assert wait_for(lambda: status(server)["num_running_reqs"] == 1, 10), status(server)
    chat.page.click("#stop")
    chat.wait_idle()
    assert wait_for(lambda: status(server)["num_running_reqs"] == 0, 10), status(server)
    answer = chat.stored()[-1]
    assert answer["role"] == "assistant" and answer.get("stopped") and "finish" not in answer["stats"]
    assert "stopped" in chat.page.text_content(".msg.assistant .msg-meta")
    assert chat.page.is_visible("#send") and not chat.page.is_visible("#stop")
    chat.check_clean()


# ---- no generation needed ------------------------------------------------------------------------------------
def _chats() -> list[dict]:
    return [
        {
            "id": "a",
            "title": "First",
            "updated": 2,
            "messages": [
                {"role": "user", "content": "hi"},
                {
                    "role": "assistant",
                    "content": 'Hello! <img src=x onerror="window.pwned=1"> **bold** and `x<y`\n\n'
                    "```python\nprint('<b>not bold</b>')\n```\n- one\n- two\n\n[link](javascript:alert(1)) *it* "
                    "[docs](https://example.com/a)",
                    "stats": {"ttft": 0.1, "tps": 20, "tokens": 9, "finish": "stop"},
                },
            ],
        },
        {"id": "b", "title": "Second", "updated": 1, "messages": [{"role": "user", "content": "second chat"}]},
    ]


def test_markdown_is_rendered_without_raw_html(chat):
    chat.open()
    chat.seed(_chats())
    body = chat.page.locator(".msg.assistant .msg-body")
    assert body.locator("img").count() == 0 and body.locator("b").count() == 0
    links = body.locator("a")  # only an http(s) link becomes one, never javascript:
    assert links.count() == 1 and links.get_attribute("href") == "https://example.com/a"
    assert links.text_content() == "docs" and "[link](javascript:alert(1))" in body.text_content()
    assert body.locator("em").text_content() == "it"
    assert '<img src=x onerror="window.pwned=1">' in body.text_content()
    assert body.locator("strong").text_content() == "bold"
    assert body.locator("p code").text_content() == "x<y"
    assert body.locator(".code-block pre code").text_content() == "print('<b>not bold</b>')"
    assert body.locator(".code-lang").text_content() == "python"
    assert body.locator("li").all_text_contents() == ["one", "two"]
    assert chat.page.evaluate("window.pwned") is None
    chat.check_clean()


def test_conversations_switch_rename_delete_new(chat):
    chat.open()
    chat.seed(_chats())

    def titles() -> list[str]:
        return chat.page.locator(".conv-open").all_text_contents()

    assert titles() == ["First", "Second"]
    chat.page.click("text=Second")
    assert chat.page.text_content("#conv-title") == "Second"
    assert chat.page.text_content(".msg.user .msg-body") == "second chat"
    chat.page.click("[aria-label='Rename “Second”']")
    chat.page.fill(".conv-rename", "Renamed")
    chat.page.keyboard.press("Enter")
    assert titles() == ["First", "Renamed"] and chat.page.text_content("#conv-title") == "Renamed"
    chat.page.click("[aria-label='Delete “First”']")
    assert titles() == ["Renamed"]
    chat.page.click("#new-chat")
    assert titles() == ["New chat", "Renamed"] and chat.page.locator(".msg").count() == 0
    chat.page.reload()
    stored = chat.page.evaluate("JSON.parse(localStorage.getItem('minisgl.chats.v1')).map(c => c.title)")
    assert stored == ["New chat", "Renamed"]
    chat.check_clean()


def test_dropped_connection_shows_a_message(chat, server):
    chat.open().wait_model()
    chunk = {
        "id": "x",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "m",
        "choices": [{"index": 0, "delta": {"content": "Half an ans"}, "finish_reason": None}],
    }
    # A stream that ends without [DONE] (the server went away mid-answer), then a refused connection.
    chat.page.route(
        "**/v1/chat/completions",
        lambda r: r.fulfill(status=200, content_type="text/event-stream", body=f"data: {json.dumps(chunk)}\n\n"),
        times=1,
    )
    chat.ask("hello")
    chat.wait_idle()
    alert = chat.page.locator(".msg.error")
    assert "connection to the server dropped" in alert.text_content()
    assert chat.stored()[1]["content"] == "Half an ans"
    chat.page.route("**/v1/chat/completions", lambda r: r.abort("connectionrefused"), times=1)
    chat.ask("again")
    chat.wait_idle()
    assert alert.count() == 2 and "Could not reach the server" in alert.nth(1).text_content()
    assert chat.page.is_enabled("#input")
    assert not chat.external
    assert all("ERR_CONNECTION_REFUSED" in e for e in chat.errors)  # chromium logs the refused fetch


def test_phone_width_has_no_horizontal_scroll_and_keyboard_works(browser, server):
    chat = Chat(browser, server, width=390, height=844)
    try:
        chat.open()
        chats = _chats()
        chats[0]["messages"][1]["content"] += (
            "\n\n" + "averyveryverylongwordwithoutanyspaces" * 8 + "\n\n```\n" + "x = " + "1 + " * 80 + "1\n```"
        )
        chat.seed(chats)
        chat.wait_model()
        width = "Math.max(document.documentElement.scrollWidth, document.body.scrollWidth)"
        assert chat.page.evaluate(width) <= 390
        assert not chat.page.is_visible("#sidebar .conv-open")
        chat.page.focus("#menu")  # keyboard only: open the drawer, pick a conversation
        chat.page.keyboard.press("Enter")
        assert chat.page.evaluate("document.activeElement.id") == "new-chat"
        assert chat.page.evaluate(width) <= 390
        chat.page.keyboard.press("Tab")
        chat.page.keyboard.press("Tab")
        chat.page.keyboard.press("Tab")
        chat.page.keyboard.press("Tab")
        assert chat.page.evaluate("document.activeElement.textContent") == "Second"
        chat.page.keyboard.press("Enter")
        assert chat.page.text_content("#conv-title") == "Second"
        assert chat.page.evaluate("document.activeElement.id") == "input"
        assert chat.page.evaluate(width) <= 390
        unnamed = chat.page.evaluate("""() => [...document.querySelectorAll('button, input, textarea')]
            .filter(e => !(e.getAttribute('aria-label') || e.textContent.trim() || e.labels?.length))
            .map(e => e.outerHTML)""")
        assert not unnamed
        chat.check_clean()
    finally:
        chat.close()


# ---- a server with --api-key and a one-request queue ---------------------------------------------------------
def test_api_key_is_asked_once_and_kept_for_the_tab(browser, locked_server):
    assert httpx.get(f"{locked_server.url}/v1/models").status_code == 401  # the API stays locked
    assert httpx.get(f"{locked_server.url}/status").status_code == 401
    assert httpx.get(f"{locked_server.url}/").status_code == 200  # the page is not
    chat = Chat(browser, locked_server)
    try:
        chat.open()
        chat.page.wait_for_selector("#key-dialog[open]")
        chat.page.fill("#api-key", KEY)
        chat.page.keyboard.press("Enter")
        assert chat.wait_model() == locked_server.client().models.list().data[0].id
        chat.settings(**{"max-tokens": 6})
        chat.ask("hello")
        chat.wait_idle()
        messages = chat.stored()
        assert [m["role"] for m in messages] == ["user", "assistant"] and messages[1]["content"]
        chat.page.reload()
        chat.wait_model()
        assert not chat.page.is_visible("#key-dialog")
        assert chat.page.evaluate("sessionStorage.getItem('minisgl.apiKey')") == KEY
        assert all("401" in e for e in chat.errors)  # chromium logs the first, refused /v1/models
        assert not chat.external
    finally:
        chat.close()


def _hold(server: Any, started: threading.Event, stop: threading.Event) -> None:
    body = {
        "messages": [{"role": "user", "content": "go on"}],
        "max_tokens": 16000,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
    }
    with httpx.stream(
        "POST", f"{server.url}/v1/chat/completions", json=body, timeout=120, headers={"Authorization": f"Bearer {KEY}"}
    ) as r:
        started.set()
        for _ in r.iter_lines():
            if stop.is_set():
                return


def test_errors_show_in_the_conversation(browser, locked_server):
    """503 when the queue is full, 400 for a prompt that does not fit: a message, never a blank."""
    chat = Chat(browser, locked_server)
    stop = threading.Event()
    holders = []
    try:
        chat.context.add_init_script(f"sessionStorage.setItem('minisgl.apiKey', '{KEY}')")
        chat.open().wait_model()
        started = threading.Event()  # set once the first runs: the second only gets its headers when it runs
        for _ in range(2):  # one running, one queued
            t = threading.Thread(target=_hold, args=(locked_server, started, stop), daemon=True)
            t.start()
            holders.append(t)
            assert started.wait(30)
        assert wait_for(lambda: status(locked_server)["num_queue_reqs"] == 1, 10), status(locked_server)
        chat.ask("Are you busy?")
        chat.wait_idle()
        alert = chat.page.locator(".msg.error")
        assert "HTTP 503" in alert.text_content() and "Server busy" in alert.text_content()
        stop.set()
        for t in holders:
            t.join(30)
        assert wait_for(lambda: status(locked_server)["num_running_reqs"] == 0, 10)
        chat.page.fill("#input", "word " * 20000)
        chat.page.press("#input", "Enter")
        chat.wait_idle()
        assert alert.count() == 2 and "HTTP 400" in alert.nth(1).text_content()
        assert "context" in alert.nth(1).text_content()
        assert all("503" in e or "400" in e for e in chat.errors)  # chromium logs the failed fetches
        assert not chat.external
    finally:
        stop.set()
        chat.close()


def test_disable_web_ui_leaves_root_a_404(tmp_path):
    """The route table alone (no engine behind it): / and the assets exist unless --disable-web-ui."""
    from fastapi.testclient import TestClient

    from minisgl.message import IpcPaths
    from minisgl.server.api_server import create_app
    from minisgl.server.args import parse_args

    paths = IpcPaths.create()
    try:
        on = TestClient(create_app(parse_args(["--api-key", "k"]), "m", paths))
        assert on.get("/").status_code == 200 and on.get("/web/app.js").status_code == 200
        assert on.get("/status").status_code == 401 and on.get("/v1/models").status_code == 401
        off = TestClient(create_app(parse_args(["--disable-web-ui"]), "m", paths))
        assert off.get("/").status_code == 404 and off.get("/web/app.js").status_code == 404
    finally:
        shutil.rmtree(paths.dir, ignore_errors=True)
