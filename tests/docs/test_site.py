"""The built documentation site and a lab report, opened in headless Chromium.

Each page must render its main content, load every image and log no console error; the
lab report must also fit a 420 px wide viewport without horizontal overflow. The browser
is Debian's chromium, driven over the DevTools protocol by playwright (its Python
package talks to an installed browser through executable_path and downloads none;
unlike Selenium it needs no chromedriver matched to the browser's version, and it
reports console messages and page errors as events).

Needs: the site built by ``mkdocs build --strict`` (./site), /usr/bin/chromium and the
``docs`` extra; skipped with the reason otherwise.
"""

from __future__ import annotations

import functools
import http.server
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
SITE = ROOT / "site"
LAB = ROOT / "bnkit-lab"
CHROMIUM = Path("/usr/bin/chromium")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def _pages() -> list[str]:
    if not (SITE / "index.html").is_file():
        return []
    pages = sorted(p.relative_to(SITE).as_posix() for p in SITE.rglob("index.html"))
    return [p for p in pages if not p.startswith(("assets/", "lab-report/"))]


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    if not CHROMIUM.is_file():
        pytest.skip(f"no browser: {CHROMIUM} is missing (apt-get install chromium)")
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is missing: pip install -e '.[docs]'"
    )
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")),  # a fresh --user-data-dir
            executable_path=str(CHROMIUM),
            headless=True,
            args=FLAGS,
        )
        yield context
        context.close()


@pytest.fixture(scope="module")
def site_url() -> Iterator[str]:
    if not _pages():
        pytest.skip(f"the docs site is not built: run mkdocs build --strict (no {SITE})")
    # Over HTTP, as the site is served: the search index loads in a worker, which a
    # file:// page may not start.
    handler = functools.partial(QuietHandler, directory=str(SITE))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def open_page(context: Any, url: str, width: int = 1280) -> tuple[Any, list[str]]:
    """The page at url, fully loaded, and the errors it logged (console, uncaught, failed
    requests)."""
    page = context.new_page()
    page.set_viewport_size({"width": width, "height": 900})
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(f"uncaught: {e}"))
    page.on("requestfailed", lambda r: errors.append(f"request failed: {r.url}"))
    response = page.goto(url, wait_until="load")
    assert response is not None, url
    assert response.ok, f"{url}: HTTP {response.status}"
    page.wait_for_load_state("networkidle")
    return page, errors


def broken_images(page: Any) -> list[str]:
    return list(
        page.evaluate(
            "Array.from(document.images)"
            ".filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src.slice(0, 80))"
        )
    )


@pytest.mark.parametrize("path", _pages() or ["index.html"])
def test_docs_page_renders(browser: Any, site_url: str, path: str) -> None:
    page, errors = open_page(browser, site_url + path)
    try:
        article = page.locator("article")
        assert article.count() == 1, f"{path}: no main content"
        assert page.locator("article h1").count() == 1, f"{path}: no title"
        assert len(article.inner_text().split()) >= 20, f"{path}: almost empty"
        assert broken_images(page) == [], path
        assert errors == [], path
    finally:
        page.close()


def test_docs_site_has_the_pages_and_the_api_reference() -> None:
    pages = set(_pages())
    if not pages:
        pytest.skip(f"the docs site is not built: run mkdocs build --strict (no {SITE})")
    assert {"getting-started/index.html", "tutorial/index.html", "architecture/index.html"} <= pages
    api = (SITE / "api" / "nn" / "index.html").read_text()
    assert "bnkit.nn.BatchNorm2d" in api  # generated from the docstrings
    assert (SITE / "lab-report" / "index.html").is_file()


@pytest.fixture(scope="module")
def lab_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A report rendered by bnkit report: from the results of the lab run in ./bnkit-lab
    when there is one (CI runs bnkit lab first), else from a short run of one experiment."""
    out = tmp_path_factory.mktemp("lab")
    results = sorted(LAB.glob("*.json")) if LAB.is_dir() else []
    if results:
        for path in LAB.iterdir():
            if path.suffix in (".json", ".png"):
                shutil.copy(path, out / path.name)
    else:
        pytest.importorskip("sklearn", reason="the lab extra is missing: pip install '.[lab]'")
        lab = [sys.executable, "-m", "bnkit", "lab", "test-process", "--dataset", "digits"]
        lab += ["--steps-scale", "0.05", "--no-progress", "--out", str(out)]
        subprocess.run(lab, check=True, capture_output=True, timeout=600)
        (out / "index.html").unlink()
    subprocess.run(
        [sys.executable, "-m", "bnkit", "report", str(out)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    assert (out / "index.html").is_file()
    return out / "index.html"


def test_lab_report_renders_and_fits_a_narrow_screen(browser: Any, lab_report: Path) -> None:
    for width in (1280, 420):
        page, errors = open_page(browser, lab_report.as_uri(), width=width)
        try:
            assert len(page.locator("body").inner_text().split()) >= 100, "almost empty"
            assert page.locator("img").count() > 0, "no figures"
            assert broken_images(page) == []
            assert errors == []
            body, viewport = page.evaluate(
                "[document.body.scrollWidth, document.documentElement.clientWidth]"
            )
            assert body <= viewport, f"{width} px: the body is {body} px wide"
        finally:
            page.close()
