"""The built HTML book, opened from disk in headless Chromium, as a reader would see it.

`make browser` runs this after `make book` (`make test` after the strict build). For every
page in _toc.yml it opens _build/html/<page>.html through file://, saves a full-page
screenshot to _build/screenshots/<name>.png, and fails, naming the page, if:
- a notebook cell shows an error: a traceback, or stderr that reads like an error or warning;
- an image did not load; math was not typeset by (the local copy of) MathJax;
- a widget in the page's saved widget state was not rendered by the widget manager;
- the page throws a JavaScript error, a local file it asks for is missing, or it asks for
  anything over the network (the book must work offline);
- a notebook page has no Colab launch link to its own .ipynb.
Chromium is Debian's (`apt-get install chromium`); Playwright never downloads a browser.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml
from playwright.sync_api import TimeoutError as PlaywrightTimeout
from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parents[2]
HTML = ROOT / "_build" / "html"
SHOTS = ROOT / "_build" / "screenshots"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
LOCAL_SCHEMES = {"file", "data", "blob", "about"}
WIDGET_VIEW = 'script[type="application/vnd.jupyter.widget-view+json"]'
# stderr is shown as is (progress bars write there); these words make it an error.
STDERR_ERROR = re.compile(r"Traceback|Error\b|Exception\b|Warning\b")


def toc_pages() -> list[str]:
    """Every file in _toc.yml (jb-book format), root first, without its suffix."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    pages = [toc["root"]]

    def walk(entries: list[dict]) -> None:
        for entry in entries:
            if "file" in entry:
                pages.append(entry["file"])
            for key in ("parts", "chapters", "sections"):
                walk(entry.get(key, []))

    walk([{key: toc[key]} for key in ("parts", "chapters") if key in toc])
    return [str(Path(page).with_suffix("")) for page in pages]


PAGES = toc_pages()


@pytest.fixture(scope="session")
def browser():
    executable = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(executable).exists():
        pytest.fail("Chromium not found: install Debian's `chromium` (apt-get install chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


# Runs in the page: everything a reader would see wrong, as a list of strings.
FIND_PROBLEMS = """
(widgetView) => {
  const problems = [];
  const text = (el) => el.textContent.trim().replace(/\\s+/g, " ").slice(0, 300);
  for (const el of document.querySelectorAll(".cell_output .output.traceback, .cell_output .output.error")) {
    problems.push("error output in a cell: " + text(el));
  }
  for (const el of document.querySelectorAll(".cell_output .output.stderr")) {
    problems.push("STDERR " + text(el));
  }
  for (const el of document.querySelectorAll(
      '.widget-subarea [data-mime-type="application/vnd.jupyter.error"]')) {
    problems.push("error output in a widget: " + text(el));
  }
  for (const el of document.querySelectorAll(
      '.widget-subarea [data-mime-type="application/vnd.jupyter.stderr"]')) {
    problems.push("STDERR " + text(el));
  }
  for (const img of document.images) {
    if (!img.complete || img.naturalWidth === 0) {
      problems.push("image did not load: " + img.getAttribute("src"));
    }
  }
  for (const script of document.querySelectorAll(widgetView)) {
    const area = script.previousElementSibling;
    const rendered = area && area.classList.contains("widget-subarea")
      && area.querySelector(".jupyter-widgets");
    if (!rendered) {
      let id = "?";
      try { id = JSON.parse(script.textContent).model_id; } catch (e) {}
      problems.push("widget not rendered (model " + id + ")");
    }
  }
  for (const el of document.querySelectorAll(".math")) {
    if (!el.querySelector("mjx-container")) problems.push("math not typeset: " + text(el));
  }
  for (const el of document.querySelectorAll("mjx-merror")) {
    problems.push("TeX error: " + el.getAttribute("data-mjx-error"));
  }
  return problems;
}
"""

# True once the widget manager has filled every placeholder.
WIDGETS_RENDERED = """
(widgetView) => Array.from(document.querySelectorAll(widgetView)).every((s) => {
  const area = s.previousElementSibling;
  return area && area.classList.contains("widget-subarea") && area.querySelector(".jupyter-widgets");
})
"""
# Resolves once MathJax (if the page has it) has typeset the page.
MATHJAX_DONE = """
async () => {
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) await MathJax.startup.promise;
}
"""


@pytest.mark.parametrize("page_name", PAGES, ids=[Path(p).name for p in PAGES])
def test_page_renders_offline(browser, page_name: str) -> None:
    path = HTML / f"{page_name}.html"
    if not path.exists():
        pytest.fail(f"{path.relative_to(ROOT)} is missing: run `make book` first", pytrace=False)

    network, missing, js_errors = [], [], []
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.on(
        "request",
        lambda req: (
            network.append(req.url) if urlparse(req.url).scheme not in LOCAL_SCHEMES else None
        ),
    )
    page.on(
        "requestfailed",
        lambda req: (
            missing.append(f"{req.url} ({req.failure})")
            if urlparse(req.url).scheme == "file"
            else None
        ),
    )
    page.on("pageerror", lambda err: js_errors.append(f"{err.name}: {err.message}"))
    try:
        page.goto(path.as_uri(), wait_until="load")
        try:
            page.wait_for_function(WIDGETS_RENDERED, arg=WIDGET_VIEW, timeout=20_000, polling=250)
        except PlaywrightTimeout:  # reported below, with what did not render
            pass
        page.evaluate(MATHJAX_DONE)
        page.wait_for_timeout(500)
        SHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SHOTS / f"{Path(page_name).name}.png"), full_page=True)

        problems = [
            p
            for p in page.evaluate(FIND_PROBLEMS, WIDGET_VIEW)
            if not p.startswith("STDERR ") or STDERR_ERROR.search(p)
        ]
        problems = [p.replace("STDERR ", "error on stderr: ", 1) for p in problems]
        problems += [f"request over the network (the book must work offline): {u}" for u in network]
        problems += [f"local file missing: {m}" for m in missing]
        problems += [f"JavaScript error: {e}" for e in js_errors]

        if (ROOT / f"{page_name}.ipynb").exists():
            hrefs = page.eval_on_selector_all(
                'a[href*="colab.research.google.com"]', "els => els.map(a => a.href)"
            )
            if not any(h.endswith(f"/{page_name}.ipynb") for h in hrefs):
                problems.append(f"no Colab launch link to {page_name}.ipynb (found {hrefs})")
    finally:
        context.close()

    if problems:
        pytest.fail(f"{page_name}.html:\n  " + "\n  ".join(problems), pytrace=False)
