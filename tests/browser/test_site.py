"""Real-browser check of the built website (run by `make test` after the site build).

Serves ``_build/html`` on 127.0.0.1 and loads every page of the book in headless Chromium with every host
but 127.0.0.1 unresolvable (so a page that needed a CDN would fail here). From the rendered DOM it asserts that
MathJax typeset all math (no raw ``$$`` or ``\\[`` left), that each stored ipywidget rendered, and that the
page has a Colab launch button; it saves a PNG screenshot of each page under ``_build/screenshots/``.
"""
from __future__ import annotations

import functools
import http.server
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

    # Self-contained: every script and stylesheet comes from this site.
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

    # Launch button for Colab on every page.
    assert any("colab.research.google.com" in (a.get("href") or "") for a in dom.find_all("a")), (
        f"{page}: no Colab launch button"
    )

    SHOTS.mkdir(parents=True, exist_ok=True)
    shot = SHOTS / (page.replace("/", "__") + ".png")
    shot.unlink(missing_ok=True)
    run_chromium("--window-size=1280,1600", f"--screenshot={shot}", f"{server}/{page}.html")
    assert shot.exists() and shot.stat().st_size > 10_000, f"{page}: screenshot {shot} missing or empty"
