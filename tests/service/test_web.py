"""The web page in a real headless Chromium (Debian's ``chromium``, driven by Playwright)."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn

from service.api import create_app

from .conftest import World, make_engine, make_settings

CHROMIUM = os.environ.get("ALIGNFUSE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]

pytestmark = pytest.mark.browser


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture()
def server(world: World, root: Path) -> Iterator[str]:
    """uvicorn in a thread of this process (the session's models), on a free loopback port."""
    settings = make_settings(root)
    app = create_app(settings, engine=make_engine(world, settings))
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    yield url
    srv.should_exit = True
    t.join(15)


def test_web_page_search_and_upload(server: str, world: World, tmp_path: Path) -> None:
    if not Path(CHROMIUM).exists() and shutil.which("chromium") is None:
        pytest.skip("chromium is not installed (run scripts/install-browser.sh)")
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server + "/")
            page.wait_for_selector("#collection option[value=plain]", state="attached")
            assert page.locator("#collection option[value=foreign]").is_disabled()
            page.select_option("#collection", "plain")
            page.fill("#k", "6")
            page.fill("#query", "a small red circle left of a blue square")
            page.click("#search-btn")
            page.wait_for_function("document.querySelectorAll('#itm-results .hit').length === 6")
            assert page.locator("#itc-results .hit").count() == 6
            # thumbnails really loaded, scores and rank movement shown
            page.wait_for_function(
                "[...document.querySelectorAll('#itm-results img.thumb')].every(i => i.complete && i.naturalWidth > 0)"
            )
            assert page.locator("#itm-results .hit .move").count() == 6
            moves = page.locator("#itm-results .hit .move").all_inner_texts()
            assert all(m == "=" or m[0] in "↑↓" for m in moves)
            assert page.locator("#itm-results .score.itm").count() == 6
            timings = page.inner_text("#timings")
            for stage in ("encode", "ann", "rerank", "total"):
                assert stage in timings
            assert "text→image" in page.inner_text("#summary")
            page.screenshot(path=str(tmp_path / "web-text.png"), full_page=True)
            shot = os.environ.get("ALIGNFUSE_WEB_SCREENSHOT")
            if shot:
                page.screenshot(path=shot, full_page=True)

            # upload an image: image→text, text cards in both columns
            page.set_input_files("#image-input", str(world.data / "images" / "000005.png"))
            page.wait_for_function("document.querySelector('#summary').textContent.includes('image→text')")
            page.wait_for_function("document.querySelectorAll('#itm-results .hit .textcard').length === 6")
            assert page.locator("#itc-results .hit .textcard").count() == 6
            assert page.is_visible("#query-preview")
            assert page.inner_text("#status") == ""
        finally:
            browser.close()
    assert errors == []
