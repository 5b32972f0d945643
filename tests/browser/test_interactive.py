"""The website driven like a reader: every explorer's controls moved in headless Chromium (Playwright).

For each page of the book (served from ``_build/html`` on 127.0.0.1, every other host unresolvable):

- every explorer (:mod:`bnlib.lab.explorer`) has each control set to at least two values, and what the page
  shows becomes the frame stored for that combination: the image (byte for byte) and the numbers under it;
  a screenshot of the explorer per moved control is saved under ``_build/screenshots/``;
- no request leaves the local server;
- no progress bar, Python traceback or ``interact_manual`` panel is left on the page;
- weight and speed: the page with everything it loads is at most ``MAX_PAGE_BYTES``; its first figure is
  visible, and its first control has responded, within ``MAX_SECONDS`` of navigation. Both are recorded per
  page in ``_build/browser_metrics.json``.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.browser.test_site import ROOT, SHOTS, book_pages, chromium, server  # noqa: F401 (fixture)

MAX_PAGE_BYTES = 6_000_000
MAX_SECONDS = 3.0
METRICS = ROOT / "_build" / "browser_metrics.json"
CHAPTER_PREFIX = "chapters/"


@pytest.fixture(scope="module")
def browser():
    from playwright import sync_api  # in requirements.txt; drives Debian's chromium (no browser download)

    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium(), args=[
            "--no-sandbox", "--disable-gpu", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"])
        yield b
        b.close()


def _record(page: str, **values) -> None:
    METRICS.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(METRICS.read_text()) if METRICS.exists() else {}
    data.setdefault(page, {}).update(values)
    METRICS.write_text(json.dumps(data, indent=1, sort_keys=True))


def _page_bytes(pg) -> int:
    return int(pg.evaluate("""() => {
        const nav = performance.getEntriesByType('navigation')[0];
        let total = nav ? (nav.encodedBodySize || nav.transferSize || 0) : 0;
        for (const r of performance.getEntriesByType('resource')) total += (r.encodedBodySize || r.transferSize || 0);
        return total; }"""))


def _expected(data, pos):
    return "-".join(str(i) for i in pos), data["frames"]["-".join(str(i) for i in pos)]


def _set_control(root, c: int, i: int) -> None:
    el = root.locator(f'[data-control="{c}"]').first
    tag = el.evaluate("e => e.tagName")
    if tag == "INPUT":
        el.fill(str(i))
    elif tag == "SELECT":
        el.select_option(str(i))
    else:
        root.locator(f'button[data-control="{c}"][value="{i}"]').click()


def _check_frame(root, data, pos, where: str) -> None:
    key, frame = _expected(data, pos)
    assert root.get_attribute("data-key") == key, f"{where}: the explorer shows {root.get_attribute('data-key')}"
    src = root.locator("img.bnx-frame").get_attribute("src")
    assert src == "data:image/png;base64," + frame["img"], f"{where}: the image is not the stored frame {key}"
    shown = {el.get_attribute("data-label"): el.locator("b").inner_text()
             for el in root.locator(".bnx-num").all()}
    assert shown == frame["summary"], f"{where}: numbers shown {shown}, stored {frame['summary']}"


@pytest.mark.parametrize("page", book_pages())
def test_page_explorers_respond_offline(server, browser, page):  # noqa: F811 (server is a fixture)
    context = browser.new_context(viewport={"width": 1280, "height": 1600})
    requests = []
    context.on("request", lambda r: requests.append(r.url))
    pg = context.new_page()
    start = time.perf_counter()
    pg.goto(f"{server}/{page}.html", wait_until="load")
    figures = pg.locator(".bd-article .cell_output img")
    first_figure = None
    if figures.count():
        figures.first.wait_for(state="visible", timeout=int(MAX_SECONDS * 1000))
        first_figure = time.perf_counter() - start

    explorers = pg.locator(".bnlib-explorer")
    first_response = None
    moved = 0
    for e in range(explorers.count()):
        root = explorers.nth(e)
        root.scroll_into_view_if_needed()
        data = json.loads(root.locator("script.bnx-data").text_content())
        pos = [int(v) for v in root.get_attribute("data-key").split("-")]
        _check_frame(root, data, pos, f"{page} explorer {e} as loaded")
        for c, control in enumerate(data["controls"]):
            n = len(control["labels"])
            targets = [i for i in (n - 1, 0, n // 2) if i != pos[c]][:2] if n > 1 else []
            for i in targets:
                _set_control(root, c, i)
                pos[c] = i
                _check_frame(root, data, pos, f"{page} explorer {e} control {control['name']!r} = "
                                              f"{control['labels'][i]!r}")
                if first_response is None:
                    first_response = time.perf_counter() - start
                moved += 1
                SHOTS.mkdir(parents=True, exist_ok=True)
                root.screenshot(path=str(SHOTS / f"{page.replace('/', '__')}__explorer{e}__{control['name']}-{i}.png"))

    dom_text = pg.locator("body").inner_text()
    assert pg.locator(".widget-hprogress, .cell_output progress, .output progress").count() == 0, (
        f"{page}: a progress bar is stored on the page")
    assert "Traceback (most recent call last)" not in dom_text, f"{page}: a Python traceback is on the page"
    assert pg.get_by_role("button", name="Run Interact").count() == 0, f"{page}: an interact_manual panel"
    outside = [u for u in requests if not u.startswith(server) and not u.startswith(("data:", "blob:"))]
    assert not outside, f"{page}: requests left the local server: {outside[:5]}"
    weight = _page_bytes(pg)
    n_explorers = explorers.count()
    context.close()
    _record(page, bytes=weight, first_figure_s=first_figure, first_response_s=first_response,
            explorers=n_explorers, controls_moved=moved)
    assert weight <= MAX_PAGE_BYTES, f"{page}: {weight / 1e6:.1f} MB with what it loads, over 6 MB"
    for what, seconds in (("first figure visible", first_figure), ("first control responded", first_response)):
        assert seconds is None or seconds <= MAX_SECONDS, f"{page}: {what} after {seconds:.1f} s"


def test_every_chapter_has_an_explorer():
    from bs4 import BeautifulSoup

    site = ROOT / "_build" / "html"
    missing = []
    for page in book_pages():
        if page.startswith(CHAPTER_PREFIX) and Path(page).name[:2].isdigit():
            soup = BeautifulSoup((site / f"{page}.html").read_text(encoding="utf-8"), "html.parser")
            if not soup.select(".bnlib-explorer"):
                missing.append(page)
    assert not missing, f"chapters without an explorer: {missing}"
