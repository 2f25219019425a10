"""The web page in a real headless Chromium (Debian's ``chromium``, driven by Playwright)."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from alignfuse.service.api import create_app
from alignfuse.service.engine import SearchEngine

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


@contextmanager
def _serve(world: World, root: Path, *, both_encoders: bool = False, **overrides: Any) -> Iterator[str]:
    """uvicorn in a thread of this process (the session's models), on a free loopback port.
    ``both_encoders``: the engine also holds the dual encoder that built "foreign" (two pipelines)."""
    settings = make_settings(root, **overrides)
    if both_encoders:
        engine = SearchEngine(
            settings, dual_encoder=world.dual, cross_encoder=world.cross, dual_encoders=[world.other_dual]
        )
    else:
        engine = make_engine(world, settings)
    app = create_app(settings, engine=engine)
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200 and app.state.engine.ready:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    try:
        yield url
    finally:
        srv.should_exit = True
        t.join(15)


@pytest.fixture()
def server(world: World, root: Path) -> Iterator[str]:
    with _serve(world, root) as url:
        yield url


def _browser(p: Any) -> Any:
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium is not installed (run scripts/install-browser.sh)")
    return p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


def test_web_page_search_and_upload(server: str, world: World, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    with sync_playwright() as p:
        browser = _browser(p)
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
            # the reranked column shows the key it is sorted by, in descending order
            keys = [float(t.split()[1]) for t in page.locator("#itm-results .score.sort").all_inner_texts()]
            assert len(keys) == 6 and keys == sorted(keys, reverse=True)
            assert page.locator("#itc-results .score.sort").count() == 0
            timings = page.inner_text("#timings")
            for stage in ("encode", "ann", "rerank", "total"):
                assert stage in timings
            assert "text→image" in page.inner_text("#summary")
            page.screenshot(path=str(tmp_path / "web-text.png"), full_page=True)
            shot = os.environ.get("ALIGNFUSE_WEB_SCREENSHOT")
            if shot:
                page.screenshot(path=shot, full_page=True)

            # text→text: dual encoder only, the rerank column says so
            page.select_option("#target", "text")
            page.click("#search-btn")
            page.wait_for_function("document.querySelector('#summary').textContent.includes('text→text')")
            assert page.locator("#itc-results .hit .textcard").count() == 6
            assert "dual encoder only" in page.inner_text("#itm-results .note")
            page.select_option("#target", "")

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


def test_web_page_with_api_key_for_reads(world: World, root: Path) -> None:
    from playwright.sync_api import sync_playwright

    with _serve(world, root, api_key="page-key", require_key_for_reads=True) as url, sync_playwright() as p:
        browser = _browser(p)
        try:
            page = browser.new_page()
            page.goto(url + "/")
            page.wait_for_selector("#api-key", state="visible")  # the 401 opens the key field
            assert "API key" in page.inner_text("#status")
            page.fill("#api-key", "page-key")
            page.press("#api-key", "Enter")
            page.wait_for_selector("#collection option[value=plain]", state="attached")
            page.select_option("#collection", "plain")
            page.fill("#query", "a green triangle")
            page.click("#search-btn")
            page.wait_for_function("document.querySelectorAll('#itm-results .hit').length > 0")
            # thumbnails need the key too: fetched with the header, shown from blob: URLs
            page.wait_for_function(
                "[...document.querySelectorAll('#itm-results img.thumb')]"
                ".every(i => i.src.startsWith('blob:') && i.complete && i.naturalWidth > 0)"
            )
        finally:
            browser.close()


#: the alpha channel of the heatmap overlay canvas (one value per patch cell)
ALPHAS_JS = (
    "c => [...c.getContext('2d').getImageData(0, 0, c.width, c.height).data].filter((_, i) => i % 4 === 3)"
)


def test_web_page_explain_heatmaps(server: str, tmp_path: Path) -> None:
    """A reranked image card opens the grounding panel; the word under the pointer lights its region."""
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    with sync_playwright() as p:
        browser = _browser(p)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server + "/")
            page.wait_for_selector("#collection option[value=plain]", state="attached")
            page.select_option("#collection", "plain")
            page.fill("#query", "a red circle left of a blue square")
            page.click("#search-btn")
            page.wait_for_function("document.querySelectorAll('#itm-results .hit.explainable').length > 0")
            assert page.locator("#itc-results .hit.explainable").count() == 0  # only reranked cards explain
            assert page.is_hidden("#explain")
            page.click("#itm-results .hit.explainable >> nth=1")
            page.wait_for_selector("#explain-words .word")
            words = page.locator("#explain-words .word").all_inner_texts()
            assert words == ["a", "red", "circle", "left", "of", "a", "blue", "square"]
            assert "fusion layer 0" in page.inner_text("#explain-info")
            page.wait_for_function(
                "(() => { const i = document.querySelector('#explain-img'); return i.complete && i.naturalWidth > 0; })()"
            )
            # the overlay is the grid of heatmap cells (4x4 for albef:tiny), stretched over the image
            assert page.eval_on_selector("#explain-heat", "c => [c.width, c.height]") == [4, 4]
            alphas_all = page.eval_on_selector("#explain-heat", ALPHAS_JS)
            assert page.eval_on_selector("#explain-heat", "c => c.dataset.words") == " ".join(words)
            page.hover("#explain-words .word >> nth=2")  # "circle"
            assert page.eval_on_selector("#explain-heat", "c => c.dataset.words") == "circle"
            assert page.locator("#explain-words .word.on").all_inner_texts() == ["circle"]
            alphas_word = page.eval_on_selector("#explain-heat", ALPHAS_JS)
            assert len(set(alphas_word)) > 1  # a region stands out: not a uniform veil
            assert alphas_word != alphas_all or len(set(alphas_all)) > 1
            page.mouse.move(5, 5)  # pointer leaves the word: back to all words
            assert page.eval_on_selector("#explain-heat", "c => c.dataset.words") == " ".join(words)
            page.screenshot(path=str(tmp_path / "explain.png"), full_page=True)
            page.click("#explain-close")
            assert page.is_hidden("#explain")
        finally:
            browser.close()
    assert errors == []


def test_web_page_fits_a_phone(server: str, tmp_path: Path) -> None:
    """At 390 px nothing runs off the screen: header, query row, Search button, results."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = _browser(p)
        try:
            page = browser.new_page(viewport={"width": 390, "height": 844}, device_scale_factor=2)
            page.goto(server + "/")
            page.wait_for_selector("#collection option[value=plain]", state="attached")
            page.select_option("#collection", "plain")
            page.fill("#query", "a red circle")
            page.click("#search-btn")
            page.wait_for_function("document.querySelectorAll('#itm-results .hit').length > 0")
            assert page.evaluate("document.documentElement.scrollWidth") <= 390
            for sel in (".topbar", "#collection", "#key-toggle", "#search-btn", ".query-box", ".hit"):
                box = page.locator(sel).first.bounding_box()
                assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 390, (sel, box)
            page.click("#itm-results .hit.explainable >> nth=0")
            page.wait_for_selector("#explain-words .word")
            box = page.locator(".heat-frame").bounding_box()
            assert box is not None and box["x"] + box["width"] <= 390
            assert page.evaluate("document.documentElement.scrollWidth") <= 390
            page.screenshot(path=str(tmp_path / "phone.png"), full_page=True)
        finally:
            browser.close()


def _write_suggestions(world: World, root: Path, name: str, queries: list[str]) -> list[str]:
    """A ``suggestions.json`` as ``alignfuse demo`` writes it, for queries true of some image of the test
    scenes (checked against their drawn objects; those true of none are left out, as the demo does)."""
    import json

    from alignfuse.data.scenes import caption_matches

    scenes = json.loads((world.data / "scenes.json").read_text())
    rows: list[dict[str, Any]] = []
    for q in queries:
        n_true = sum(caption_matches(q, e["objects"]) for e in scenes)
        if n_true:
            rows.append(
                {
                    "text": q,
                    "kind": "colour_shape",
                    "n_true": n_true,
                    "k": 5,
                    "precision_dual": 0.2,
                    "precision_rerank": 0.6,
                    "first_true_dual": 3,
                    "first_true_rerank": 1,
                }
            )
    body = {
        "pipeline": {"dual_encoder": "alignfuse:random-tiny", "reranker": "albef:tiny"},
        "suggestions": rows,
    }
    (root / name / "suggestions.json").write_text(json.dumps(body))
    return [r["text"] for r in rows]


def _colour_shape_queries(world: World) -> list[str]:
    """Every "a {colour} {shape}" the test scenes draw (each is true of at least one of them)."""
    import json

    scenes = json.loads((world.data / "scenes.json").read_text())
    pairs = sorted({(o["colour"], o["shape"]) for e in scenes for o in e["objects"]})
    return [f"a {c} {s}" for c, s in pairs]


def test_web_page_pipelines_and_suggestions(world: World, root: Path) -> None:
    """Two pipelines (collections built by two dual encoders, one reranker) chosen on the page; the
    suggested queries of the chosen collection are offered, and a click searches one."""
    from playwright.sync_api import sync_playwright

    suggested = _write_suggestions(world, root, "plain", _colour_shape_queries(world)[:3] + ["a gold moon"])
    assert len(suggested) == 3  # "a gold moon" is true of no image: never offered
    errors: list[str] = []
    with _serve(world, root, both_encoders=True) as url, sync_playwright() as p:
        browser = _browser(p)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url + "/")
            page.wait_for_selector("#collection option[value=foreign]", state="attached")
            # every collection is served now, each named with its pipeline; the default is the default
            # dual encoder's ("plain"), not the first in the list ("foreign")
            assert not page.locator("#collection option[value=foreign]").is_disabled()
            options = dict(
                zip(
                    page.eval_on_selector_all("#collection option", "os => os.map(o => o.value)"),
                    page.locator("#collection option").all_inner_texts(),
                    strict=True,
                )
            )
            assert "albef:tiny → albef:tiny" in options["foreign"]
            assert "random-tiny → albef:tiny" in options["plain"]
            assert page.eval_on_selector("#collection", "s => s.value") == "plain"
            models = page.inner_text("#models")
            assert "pipeline alignfuse:random-tiny → albef:tiny" in models and "precision fp32" in models
            # the suggestions of "plain", in the file's order; a click searches the query
            page.wait_for_selector("#suggestions .suggestion")
            chips = page.eval_on_selector_all(
                "#suggestions .suggestion", "bs => bs.map(b => b.dataset.query)"
            )
            assert chips == suggested
            # each chip shows how many more true images the rerank put in the top k (+2 of 5 here)
            assert page.locator("#suggestions .suggestion .gain").all_inner_texts() == ["+2"] * 3
            assert "true of" in (page.get_attribute("#suggestions .suggestion >> nth=0", "title") or "")
            page.click("#suggestions .suggestion >> nth=1")
            page.wait_for_function("document.querySelectorAll('#itm-results .hit').length > 0")
            assert page.input_value("#query") == suggested[1]
            assert "random-tiny → albef:tiny" in page.inner_text("#summary")
            plain_itc = page.locator("#itc-results .score.itc").all_inner_texts()
            # the other pipeline: "foreign" has no suggestions; the same query runs on its own encoder
            page.select_option("#collection", "foreign")
            page.wait_for_function(
                "document.querySelector('#summary').textContent.includes('albef:tiny → albef:tiny')"
            )
            assert page.is_hidden("#suggestions")
            assert "pipeline albef:tiny → albef:tiny" in page.inner_text("#models")
            page.wait_for_function("document.querySelectorAll('#itm-results .hit').length > 0")
            assert page.locator("#itc-results .score.itc").all_inner_texts() != plain_itc
            assert page.inner_text("#status") == ""
            # back to "plain": its suggestions come back
            page.select_option("#collection", "plain")
            page.wait_for_selector("#suggestions .suggestion")
        finally:
            browser.close()
    assert errors == []
