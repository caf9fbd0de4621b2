"""The web chat page at GET / in a real headless browser (Debian's chromium driven by Playwright):
type a message, watch the reply stream in, stop it mid-stream, start a new chat."""

from __future__ import annotations

import os
import shutil
import time

import httpx
import pytest

from lmforge.infer.generate import generate_ids
from lmforge.infer.scheduler import Scheduler
from lmforge.serve.app import create_app
from lmforge.serve.config import ServerConfig
from lmforge.serve.engine import Engine
from serve_fixtures import NAME, ServerThread, make_llm, slow_down

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# .ci/run installs chromium and sets LMFORGE_REQUIRE_BROWSER=1, so CI never skips this silently
needs_browser = pytest.mark.skipif(not os.path.exists(CHROMIUM) and os.environ.get("LMFORGE_REQUIRE_BROWSER") != "1",
                                   reason="Debian's chromium is not installed (apt-get install chromium)")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
        "--disable-extensions", "--no-first-run", "--disable-sync"]


def test_page_is_self_contained():
    llm = make_llm()
    srv = ServerThread(create_app(ServerConfig(served_model_name=NAME),
                                  engine=Engine(Scheduler(llm.model, llm.tokenizer, max_batch=2), llm.tokenizer)))
    try:
        page = httpx.get(srv.url + "/").text
    finally:
        srv.stop()
    assert page.startswith("<!doctype html>") and NAME in page
    assert "http://" not in page and "https://" not in page and "//cdn" not in page  # nothing from elsewhere
    for element in ('id="system"', 'id="temperature"', 'id="stop"', 'id="new-chat"', 'id="input"'):
        assert element in page


@needs_browser
def test_chat_page_streams_and_stops():
    from playwright import sync_api
    llm = make_llm(block_size=256)
    # no stop ids: the random model would otherwise often end its reply at once
    sched = Scheduler(llm.model, llm.tokenizer, max_batch=4, stop_ids=set())
    engine = Engine(sched.start(), llm.tokenizer)
    slow_down(engine, 0.03)
    srv = ServerThread(create_app(ServerConfig(served_model_name=NAME), engine=engine))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there"}]
    ids = llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    full = llm.tokenizer.decode(generate_ids(llm.model, [ids], max_new_tokens=256 - len(ids), temperature=0)[0],
                                skip_special=True)
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
            try:
                page = browser.new_page()
                page.goto(srv.url + "/")
                page.wait_for_function("document.getElementById('mode').textContent.startsWith('chat mode')")
                page.fill("#system", "Be brief.")
                page.fill("#temperature", "0")
                page.fill("#input", "hello there")
                page.press("#input", "Enter")
                assert page.locator(".msg.user .text").inner_text() == "hello there"
                reply = page.locator(".msg.assistant").last
                page.wait_for_function(
                    "() => { const r = document.querySelector('.msg.assistant .text'); "
                    "return r && r.textContent.length >= 8; }", timeout=20000)
                assert reply.get_attribute("data-state") == "streaming"
                assert page.locator("#stop").is_enabled() and not page.locator("#send").is_enabled()
                first = reply.locator(".text").text_content()
                page.wait_for_function(
                    f"document.querySelector('.msg.assistant .text').textContent.length > {len(first)}",
                    timeout=20000)  # it keeps growing: streamed, not delivered at the end
                page.click("#stop")
                page.wait_for_function("document.querySelector('.msg.assistant').dataset.state === 'stopped'",
                                       timeout=10000)
                stopped = reply.locator(".text").text_content()
                assert "(stopped)" in reply.inner_text()
                # the greedy reply so far is the start of the offline greedy reply, and it is cut short
                assert full.startswith(stopped) and 8 <= len(stopped) < len(full)
                deadline = time.monotonic() + 5
                while sched.num_running and time.monotonic() < deadline:
                    time.sleep(0.02)
                assert sched.num_running == 0  # the server freed the slot when the page aborted
                time.sleep(0.2)
                assert reply.locator(".text").text_content() == stopped
                assert page.locator("#send").is_enabled()
                page.click("#new-chat")
                assert page.locator(".msg").count() == 0
            finally:
                browser.close()
    finally:
        sched.stop()
        srv.stop()
