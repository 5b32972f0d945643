"""Real-browser check of the built website (run by `make test` after the site build).

Serves ``_build/html`` on 127.0.0.1 and loads every page of the book in headless Chromium with every host
but 127.0.0.1 unresolvable (so a page that needed a CDN would fail here). From the rendered DOM it asserts that
MathJax typeset all math (no raw ``$$`` or ``\\[`` left), that each stored ipywidget rendered, and that the
page has a Colab launch button; it saves a PNG screenshot of each page under ``_build/screenshots/``.
"""
from __future__ import annotations

import functools
import http.server
import json
import re
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest
import yaml
from bs4 import BeautifulSoup

ROOT = Path(__file__).resolve().parents[2]
SITE = ROOT / "_build" / "html"
SHOTS = ROOT / "_build" / "screenshots"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-quic", "--no-first-run",
    # No network at all: every host except the local server fails to resolve.
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    "--virtual-time-budget=30000", "--hide-scrollbars",
]
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def book_pages() -> list[str]:
    """Docnames listed in _toc.yml, in reading order."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    pages = [toc["root"]]

    def walk(entries):
        for entry in entries or []:
            if "file" in entry:
                pages.append(entry["file"])
            walk(entry.get("sections"))

    for part in toc.get("parts", []):
        walk(part.get("chapters"))
    walk(toc.get("chapters"))
    return pages


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.fail("chromium not found: install Debian's package with `apt-get install chromium` (make test does)")
    return exe


def run_chromium(*args: str, timeout: int = 120) -> str:
    with tempfile.TemporaryDirectory(prefix="bnbook-chromium-") as profile:
        proc = subprocess.run(
            [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
            capture_output=True, text=True, timeout=timeout,
        )
    if proc.returncode != 0:
        raise AssertionError(f"chromium exited {proc.returncode}: {proc.stderr[-2000:]}")
    return proc.stdout


@pytest.fixture(scope="module")
def server():
    if not (SITE / "index.html").exists():
        pytest.fail(f"{SITE} has no index.html: build the site first (make book)")
    handler = functools.partial(_QuietHandler, directory=str(SITE))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def visible_text(soup: BeautifulSoup) -> str:
    """Page text outside code, scripts, styles and MathJax's own assistive markup."""
    soup = BeautifulSoup(str(soup), "html.parser")
    for tag in soup(["script", "style", "pre", "code", "mjx-container", "mjx-assistive-mml", "textarea"]):
        tag.decompose()
    return soup.get_text(" ")


def test_toc_pages_are_built():
    missing = [p for p in book_pages() if not (SITE / f"{p}.html").exists()]
    assert not missing, f"pages in _toc.yml without HTML in {SITE}: {missing}"


@pytest.mark.parametrize("page", book_pages())
def test_page_renders_offline(server, page):
    static_html = (SITE / f"{page}.html").read_text(encoding="utf-8")
    static = BeautifulSoup(static_html, "html.parser")

    # Self-contained: every script and stylesheet comes from this site, and no page names a CDN (thebe's bundle
    # on unpkg.com is dropped by tools/sphinx_offline.py).
    for host in ("unpkg.com", "cdn.jsdelivr.net", "cdnjs.cloudflare.com"):
        assert host not in static_html, f"{page}: references the CDN {host}"
    for tag, attr in (("script", "src"), ("link", "href")):
        for el in static.find_all(tag):
            url = el.get(attr)
            if url and (tag == "script" or "stylesheet" in (el.get("rel") or [])):
                assert not re.match(r"^(https?:)?//", url), f"{page}: {tag} loads {url} from the network"

    dom = BeautifulSoup(run_chromium("--dump-dom", f"{server}/{page}.html"), "html.parser")

    # Math: each math element the build produced has been typeset by MathJax, and no raw TeX is left.
    math_nodes = dom.select(".math")
    for node in math_nodes:
        assert node.find("mjx-container") is not None, f"{page}: math not typeset: {node.get_text()[:80]!r}"
    if math_nodes:
        assert dom.find("mjx-container") is not None
    text = visible_text(dom)
    for raw in ("$$", "\\[", "\\(", "\\begin{"):
        assert raw not in text, f"{page}: raw TeX {raw!r} left in the page: ...{text[text.find(raw) - 60:][:140]!r}"

    # Widgets: every stored widget view was rendered by the HTML manager.
    views = static.find_all("script", attrs={"type": WIDGET_VIEW})
    rendered = [el for el in dom.select(".widget-subarea") if el.select_one(".jupyter-widgets")]
    assert len(rendered) >= len(views), f"{page}: {len(views)} widget views stored, {len(rendered)} rendered"
    assert "Error displaying widget" not in dom.get_text(), f"{page}: a widget failed to render"

    # Launch button for Colab on every notebook page (a Markdown page has nothing to run).
    colab = any("colab.research.google.com" in (a.get("href") or "") for a in dom.find_all("a"))
    assert colab or not (ROOT / f"{page}.ipynb").exists(), f"{page}: no Colab launch button"

    SHOTS.mkdir(parents=True, exist_ok=True)
    shot = SHOTS / (page.replace("/", "__") + ".png")
    shot.unlink(missing_ok=True)
    run_chromium("--window-size=1280,1600", f"--screenshot={shot}", f"{server}/{page}.html")
    assert shot.exists() and shot.stat().st_size > 10_000, f"{page}: screenshot {shot} missing or empty"


# ---------------------------------------------------------------------------------------------------------
# Exercises: solutions and answers stay hidden until the reader asks for them
# ---------------------------------------------------------------------------------------------------------

EXERCISE_PAGE = "chapters/07_train_vs_eval"   # a chapter page with all three kinds of exercise
HARNESS_PATH = "/__toggle_harness__.html"
# Loads the chapter in a same-origin iframe, then, for every toggle of the exercises, records whether its content
# is visible, clicks the toggle (its <summary>) and records again; --dump-dom returns the record as JSON.
TOGGLE_HARNESS = """<!doctype html>
<html><body><pre id="result">pending</pre>
<iframe id="page" src="/PAGE.html" style="width: 1280px; height: 2400px"></iframe>
<script>
document.getElementById("page").addEventListener("load", () => {
  const doc = document.getElementById("page").contentDocument;
  const shown = (el) => !!el && el.getClientRects().length > 0 && el.offsetHeight > 0 && el.checkVisibility();
  const found = [];
  const toggle = (kind, details, content) => {
    const before = shown(content);
    details.querySelector(":scope > summary").click();
    found.push({kind, text: content.textContent.trim().slice(0, 60), before, after: shown(content)});
  };
  for (const details of doc.querySelectorAll("div.cell.tag_hide-input > details.above-input")) {
    const code = details.querySelector(".cell_input pre");
    if (code && code.textContent.includes("@title Solution")) toggle("solution", details, code);
  }
  for (const details of doc.querySelectorAll("div.cell.tag_hide-output details.below-input")) {
    const output = details.querySelector(".cell_output pre");
    if (output && output.textContent.includes("result")) toggle("prediction result", details, output);
  }
  for (const details of doc.querySelectorAll("details")) {
    const summary = details.querySelector(":scope > summary");
    if (summary && summary.textContent.trim() === "Answer") {
      toggle("answer", details, details.querySelector(":scope > p"));
    }
  }
  for (const pre of doc.querySelectorAll("div.cell:not(.tag_hide-input) .cell_input pre")) {
    if (pre.textContent.includes("raise NotImplementedError")) {
      found.push({kind: "exercise", text: pre.textContent.trim().slice(0, 60), before: shown(pre), after: shown(pre)});
    }
  }
  document.getElementById("result").textContent = JSON.stringify(found);
});
</script></body></html>
"""


class _HarnessHandler(_QuietHandler):
    def do_GET(self):
        if self.path.split("?", 1)[0] != HARNESS_PATH:
            return super().do_GET()
        body = TOGGLE_HARNESS.replace("PAGE", EXERCISE_PAGE).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_exercise_solutions_are_hidden_until_toggled():
    """On a chapter page, every exercise's solution cell (tag hide-input), the result of every predict-then-run
    cell (hide-output) and every model answer (a <details> block) is not visible before its toggle is clicked, and
    visible after; the cells the reader edits are visible from the start."""
    if not (SITE / f"{EXERCISE_PAGE}.html").exists():
        pytest.fail(f"{SITE / EXERCISE_PAGE}.html missing: build the site first (make book)")
    static = BeautifulSoup((SITE / f"{EXERCISE_PAGE}.html").read_text(encoding="utf-8"), "html.parser")
    expected = {
        "solution": sum("@title Solution" in d.get_text() for d in static.select("div.tag_hide-input details")),
        "prediction result": len(static.select("div.tag_hide-output")),
        "answer": sum(s.get_text(strip=True) == "Answer" for s in static.select("details > summary")),
    }
    assert all(expected.values()), f"{EXERCISE_PAGE}: no exercises of some kind on the page: {expected}"

    handler = functools.partial(_HarnessHandler, directory=str(SITE))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        dom = BeautifulSoup(run_chromium("--dump-dom", f"http://127.0.0.1:{httpd.server_address[1]}{HARNESS_PATH}"),
                            "html.parser")
    finally:
        httpd.shutdown()
        httpd.server_close()
    record = json.loads(dom.find(id="result").get_text())
    for kind, count in expected.items():
        found = [r for r in record if r["kind"] == kind]
        assert len(found) == count, f"{EXERCISE_PAGE}: {count} {kind} toggles in the page, {len(found)} checked"
    for r in record:
        if r["kind"] == "exercise":
            assert r["before"], f"{EXERCISE_PAGE}: the exercise cell {r['text']!r} is not visible"
        else:
            assert not r["before"], f"{EXERCISE_PAGE}: the {r['kind']} {r['text']!r} is visible before its toggle"
            assert r["after"], f"{EXERCISE_PAGE}: the {r['kind']} {r['text']!r} is still hidden after its toggle"
    assert any(r["kind"] == "exercise" for r in record), f"{EXERCISE_PAGE}: no exercise cell found"
