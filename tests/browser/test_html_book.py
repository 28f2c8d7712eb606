"""The built HTML book, opened from disk in headless Chromium, as a reader would see it.

`make browser` runs this after `make book` (`make test` after the strict build). For every
page in _toc.yml it opens _build/html/<page>.html through file://, saves a full-page
screenshot to _build/screenshots/<name>.png, and fails, naming the page, if:
- a notebook cell shows an error: a traceback, or stderr that reads like an error or warning;
- an image did not load; math was not typeset by (the local copy of) MathJax;
- a widget in the page's saved widget state was not rendered by the widget manager;
- the page throws a JavaScript error, a local file it asks for is missing, or it asks for
  anything over the network (the book must work offline);
- a notebook page has no Colab launch link to its own .ipynb;
- the page weighs 5 MB or more.
Then the reader's test: every widget made with `kvlib.widgets.live` (found from its state
labels, class `kv-live-state`) is moved through every value of every control as a reader
would (keys on a slider, a choice in a dropdown, a click on a toggle button), and the test
fails unless, after each move, the one visible state label (class `kv-live-state`) names
exactly the values the controls show.
And what a page looks like: no output is cut off or needs a scrollbar in the 1,280-pixel
window (code cells and display equations may scroll); nothing but a table, a code block or
an equation, each scrolling inside itself, is wider than a 400-pixel phone screen; no
widget state shows what another state of the same widget shows; every external link in a
chapter is one the bibliography (book/references) lists.
Chromium is Debian's (`make test` installs it with apt when it can); Playwright never
downloads a browser.
"""

from __future__ import annotations

import json
import re
import shutil
from html.parser import HTMLParser
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
MAX_PAGE_BYTES = 5 * 2**20
STATE_SETTLE_MS = 10_000  # how long a move may take to show its state
PHONE_WIDTH = 400
REFERENCES = "book/references"


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

# Runs in the page: outputs, tables and widgets that do not fit the column (they scroll
# sideways inside themselves or are cut off). Code (cells' source, listings) may scroll; math
# is measured by MathJax's own boxes, whose few pixels of slack are not content.
FIND_CLIPPED = """
() => {
  const describe = (el) => el.tagName.toLowerCase() + "." + String(el.className).split(" ")[0]
    + ' "' + el.textContent.trim().replace(/\\s+/g, " ").slice(0, 60) + '"';
  const found = [];
  for (const el of document.querySelectorAll("article *")) {
    if (!el.checkVisibility() || el.closest(".cell_input, mjx-container, .math")) continue;
    const code = el.closest("div.highlight");  // a code block (a listing) may scroll;
    if (code && !code.closest(".output.stream, .output.text_plain")) continue;  // printed text may not
    const o = getComputedStyle(el).overflowX;
    if (["auto", "scroll", "hidden"].includes(o) && el.scrollWidth > el.clientWidth + 2) {
      found.push(describe(el) + ` (${el.scrollWidth} px in ${el.clientWidth})`);
    }
  }
  for (const el of document.querySelectorAll('article mjx-container[display="true"]')) {
    if (el.checkVisibility() && el.scrollWidth > el.clientWidth + 2) {
      found.push("equation " + describe(el) + ` (${el.scrollWidth} px in ${el.clientWidth})`);
    }
  }
  return found.slice(0, 12);
}
"""
# Runs in the page: what sticks out of a phone's screen without scrolling inside a table, a
# code block or an equation of its own.
FIND_TOO_WIDE = """
() => {
  const vw = document.documentElement.clientWidth;
  const scrolls = (el) => {
    for (let a = el.parentElement; a; a = a.parentElement) {
      if (["auto", "scroll"].includes(getComputedStyle(a).overflowX)) return true;
    }
    return false;
  };
  const found = [];
  for (const el of document.querySelectorAll("article *")) {
    if (!el.checkVisibility()) continue;
    const r = el.getBoundingClientRect();
    if (r.width > 0 && r.right > vw + 1 && !scrolls(el)) {
      found.push(el.tagName.toLowerCase() + "." + String(el.className).split(" ")[0] + ' "'
        + el.textContent.trim().replace(/\\s+/g, " ").slice(0, 60) + `" (to ${Math.round(r.right)} px)`);
    }
  }
  return {page: document.scrollingElement.scrollWidth - vw, found: found.slice(0, 10)};
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
        problems += [f"cut off at 1,280 px: {c}" for c in page.evaluate(FIND_CLIPPED)]
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


@pytest.mark.parametrize("page_name", PAGES, ids=[Path(p).name for p in PAGES])
def test_page_weighs_under_5_mb(page_name: str) -> None:
    path = HTML / f"{page_name}.html"
    if not path.exists():
        pytest.fail(f"{path.relative_to(ROOT)} is missing: run `make book` first", pytrace=False)
    size = path.stat().st_size
    assert size < MAX_PAGE_BYTES, (
        f"{page_name}.html is {size / 2**20:.2f} MiB (limit 5 MiB): shrink widget grids or figures"
    )


# Runs in the page, on one live widget: its controls as the reader sees them, and the text
# of every state label that is visible (a Stack draws only its selected child).
READ_LIVE_WIDGET = """
(w) => {
  const controls = Array.from(w.children[0].children).map((c) => {
    const name = (c.querySelector(".widget-label") || {}).textContent || "?";
    if (c.querySelector("select")) {
      const s = c.querySelector("select");
      return {name, kind: "dropdown", value: s.selectedOptions[0].text,
              options: Array.from(s.options).map((o) => o.text)};
    }
    if (c.querySelector(".widget-toggle-button")) {
      const buttons = Array.from(c.querySelectorAll(".widget-toggle-button"));
      const active = buttons.find((b) => b.classList.contains("mod-active"));
      return {name, kind: "toggle", value: active ? active.textContent.trim() : null,
              options: buttons.map((b) => b.textContent.trim())};
    }
    if (c.querySelector(".noUi-handle")) {
      const readout = c.querySelector(".widget-readout");
      return {name, kind: "slider", value: readout ? readout.textContent.trim() : null,
              options: null};
    }
    return {name, kind: "unknown", value: null, options: null};
  });
  const labels = Array.from(w.querySelectorAll(".kv-live-state"))
    .filter((el) => el.checkVisibility())
    .map((el) => el.textContent.trim());
  return {controls, labels};
}
"""


# Runs in the page: how many live widgets the page's saved widget state holds. Each has one
# outermost Stack (a Stack that is no other Stack's child).
SAVED_LIVE_WIDGETS = """
() => {
  let count = 0;
  for (const s of document.querySelectorAll('script[type="application/vnd.jupyter.widget-state+json"]')) {
    const models = JSON.parse(s.textContent).state || {};
    const stacks = Object.keys(models).filter((id) => models[id].model_name === "StackModel");
    const inner = new Set();
    for (const id of stacks) {
      for (const child of models[id].state.children || []) inner.add(child.replace("IPY_MODEL_", ""));
    }
    count += stacks.filter((id) => !inner.has(id)).length;
  }
  return count;
}
"""
# Runs in the page: marks the root of every live widget on it with data-kv-live="i" and
# returns how many. From each state label (a Stack draws only its selected child, so one per
# widget) up through its state's VBox and the nested Stacks (boxes neither V nor H) to the
# widget's VBox: the controls, then the outermost Stack.
MARK_LIVE_WIDGETS = """
() => {
  const isStack = (e) => e.classList.contains("widget-box")
    && !e.classList.contains("widget-vbox") && !e.classList.contains("widget-hbox");
  const roots = [];
  for (const label of document.querySelectorAll(".kv-live-state")) {
    let e = label.closest(".widget-html");  // the label, or the whole state if it is one HTML
    if (e.parentElement && !isStack(e.parentElement)) e = e.parentElement;  // the state's VBox
    let top = null;
    while (e.parentElement && isStack(e.parentElement)) { e = e.parentElement; top = e; }
    if (top && !roots.includes(top.parentElement)) roots.push(top.parentElement);
  }
  roots.forEach((root, i) => root.setAttribute("data-kv-live", String(i)));
  return roots.length;
}
"""


def _expected_label(controls: list[dict]) -> str:
    """What kvlib.widgets.live.state_label writes for the values the controls show."""
    return " · ".join(f"{c['name']} = {c['value']}" for c in controls)


def _plain(text: str | None) -> str | None:
    """Dropdown options show spaces as no-break spaces; labels do not."""
    return None if text is None else text.replace("\xa0", " ")


def _shows(widget, expected_values: dict[str, str]) -> str | None:
    """None once the controls show `expected_values` and the one visible label names them all;
    otherwise what is wrong."""
    seen = widget.evaluate(READ_LIVE_WIDGET)
    for control in seen["controls"]:
        control["value"] = _plain(control["value"])
    shown = {c["name"]: c["value"] for c in seen["controls"]}
    for name, value in expected_values.items():
        if shown.get(name) != _plain(value):
            return f"control {name!r} shows {shown.get(name)!r}, not {_plain(value)!r}"
    if [_plain(label) for label in seen["labels"]] != [_expected_label(seen["controls"])]:
        return (f"controls show {_expected_label(seen['controls'])!r} but the visible state "
                f"label(s) read {seen['labels']}")
    return None


def _wait_shows(page, widget, expected_values: dict[str, str]) -> str | None:
    deadline = STATE_SETTLE_MS
    problem = _shows(widget, expected_values)
    while problem and deadline > 0:
        page.wait_for_timeout(100)
        deadline -= 100
        problem = _shows(widget, expected_values)
    return problem


def move_every_control(page, widget) -> tuple[list[str], int]:
    """Move each control of one live widget through all its values; (problems, moves)."""
    problems, moves = [], 0
    start = widget.evaluate(READ_LIVE_WIDGET)
    if len(start["labels"]) != 1:
        return [f"{len(start['labels'])} visible state labels before any move, not 1"], 0
    for index, control in enumerate(start["controls"]):
        element = widget.locator(":scope > :first-child > *").nth(index)
        name = control["name"]
        if control["kind"] == "dropdown":
            for option in control["options"]:
                element.locator("select").select_option(label=option)
                moves += 1
                if problem := _wait_shows(page, widget, {name: option}):
                    problems.append(f"dropdown {name!r} -> {option!r}: {problem}")
        elif control["kind"] == "toggle":
            for option in control["options"]:
                element.locator(".widget-toggle-button", has_text=option).first.click()
                moves += 1
                if problem := _wait_shows(page, widget, {name: option}):
                    problems.append(f"toggle {name!r} -> {option!r}: {problem}")
        elif control["kind"] == "slider":
            handle = element.locator(".noUi-handle").first
            handle.focus()
            handle.press("Home")
            if problem := _wait_shows(page, widget, {}):
                problems.append(f"slider {name!r} -> first value: {problem}")
            visited = [widget.evaluate(READ_LIVE_WIDGET)["controls"][index]["value"]]
            while True:  # one key press per value, as a reader steps through them
                handle.press("ArrowRight")
                moves += 1
                page.wait_for_timeout(50)
                value = widget.evaluate(READ_LIVE_WIDGET)["controls"][index]["value"]
                if value == visited[-1] or value in visited:
                    break  # the last value: the key press moved nothing
                visited.append(value)
                if problem := _wait_shows(page, widget, {name: value}):
                    problems.append(f"slider {name!r} -> {value!r}: {problem}")
            if len(visited) < 2:
                problems.append(f"slider {name!r}: the arrow key did not move it from "
                                f"{visited[0]!r}")
        else:
            problems.append(f"control {name!r}: not a slider, dropdown or toggle buttons")
    return problems, moves


@pytest.mark.parametrize("page_name", PAGES, ids=[Path(p).name for p in PAGES])
def test_every_control_of_every_widget_shows_the_state_it_names(browser, page_name: str) -> None:
    path = HTML / f"{page_name}.html"
    if not path.exists():
        pytest.fail(f"{path.relative_to(ROOT)} is missing: run `make book` first", pytrace=False)
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    try:
        page.goto(path.as_uri(), wait_until="load")
        try:
            page.wait_for_function(WIDGETS_RENDERED, arg=WIDGET_VIEW, timeout=20_000, polling=250)
        except PlaywrightTimeout:  # test_page_renders_offline names what did not render
            pass
        problems, moves = [], 0
        saved, found = page.evaluate(SAVED_LIVE_WIDGETS), page.evaluate(MARK_LIVE_WIDGETS)
        if found != saved:  # a widget that is not on the page cannot be moved
            problems.append(f"{saved} live widgets in the saved widget state, {found} on the page")
        for i in range(found):
            widget = page.locator(f'[data-kv-live="{i}"]')
            widget.scroll_into_view_if_needed()
            wrong, n = move_every_control(page, widget)
            moves += n
            problems += [f"widget {i + 1}: {p}" for p in wrong]
        print(f"{page_name}: {found} live widgets, {moves} moves")
    finally:
        context.close()
    if problems:
        pytest.fail(f"{page_name}.html:\n  " + "\n  ".join(problems), pytrace=False)


@pytest.mark.parametrize("page_name", PAGES, ids=[Path(p).name for p in PAGES])
def test_nothing_pushes_a_phone_screen_sideways(browser, page_name: str) -> None:
    path = HTML / f"{page_name}.html"
    if not path.exists():
        pytest.fail(f"{path.relative_to(ROOT)} is missing: run `make book` first", pytrace=False)
    context = browser.new_context(viewport={"width": PHONE_WIDTH, "height": 900})
    page = context.new_page()
    try:
        page.goto(path.as_uri(), wait_until="load")
        try:
            page.wait_for_function(WIDGETS_RENDERED, arg=WIDGET_VIEW, timeout=20_000, polling=250)
        except PlaywrightTimeout:  # test_page_renders_offline names what did not render
            pass
        page.evaluate(MATHJAX_DONE)
        page.wait_for_timeout(300)
        SHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SHOTS / f"{Path(page_name).name}-{PHONE_WIDTH}.png"),
                        full_page=True)
        seen = page.evaluate(FIND_TOO_WIDE)
    finally:
        context.close()
    problems = [f"wider than a {PHONE_WIDTH}-px screen: {f}" for f in seen["found"]]
    if seen["page"] > 1:
        problems.append(f"the page scrolls sideways by {seen['page']} px")
    if problems:
        pytest.fail(f"{page_name}.html:\n  " + "\n  ".join(problems), pytrace=False)


# -- the saved HTML, read without a browser -------------------------------------------------

class _Links(HTMLParser):
    """The external links (http, https) inside a page's <article>."""

    def __init__(self) -> None:
        super().__init__()
        self.depth, self.links = 0, []

    def handle_starttag(self, tag, attrs):
        if tag == "article" or self.depth:
            self.depth += tag == "article"
        href = dict(attrs).get("href") or ""
        if self.depth and tag == "a" and urlparse(href).scheme in ("http", "https"):
            self.links.append(href)

    def handle_endtag(self, tag):
        if tag == "article" and self.depth:
            self.depth -= 1


def external_links(path: Path) -> list[str]:
    parser = _Links()
    parser.feed(path.read_text())
    return parser.links


@pytest.mark.parametrize("page_name", [p for p in PAGES if p != REFERENCES],
                         ids=[Path(p).name for p in PAGES if p != REFERENCES])
def test_every_external_link_is_a_reference(page_name: str) -> None:
    references = HTML / f"{REFERENCES}.html"
    path = HTML / f"{page_name}.html"
    for p in (references, path):
        if not p.exists():
            pytest.fail(f"{p.relative_to(ROOT)} is missing: run `make book` first",
                        pytrace=False)
    listed = set(external_links(references))
    assert listed, "the bibliography page lists no links"
    stray = sorted(set(external_links(path)) - listed)
    assert not stray, (f"{page_name}.html links outside the bibliography (add the source to "
                       f"references.bib and cite it): {stray[:8]}")


def _widget_models(path: Path) -> dict[str, dict]:
    """Every model of the page's saved widget state, by id. A script's text is raw (the
    browser does not decode entities in it), so it is parsed as it stands: a widget's HTML
    that spells a quote `&quot;` keeps it so."""
    text = path.read_text()
    models = {}
    for block in re.findall(r'<script type="application/vnd.jupyter.widget-state\+json">'
                            r"(.*?)</script>", text, re.DOTALL):
        models.update(json.loads(block).get("state", {}))
    return models


def _content(models: dict[str, dict], ref: str, seen=()) -> str:
    """What a widget (by IPY_MODEL reference) shows: its kind, its own values and buffers,
    and its children's, without ids, layouts or styles (which differ between equal states)."""
    model_id = ref.replace("IPY_MODEL_", "")
    model = models.get(model_id)
    if model is None or model_id in seen:
        return ref
    state = {k: v for k, v in model["state"].items()
             if k not in ("layout", "style", "_dom_classes", "tabbable", "tooltip")}

    def resolve(value):
        if isinstance(value, str) and value.startswith("IPY_MODEL_"):
            return _content(models, value, (*seen, model_id))
        if isinstance(value, list):
            return [resolve(v) for v in value]
        return value

    buffers = [b.get("data", "") for b in model.get("buffers", [])]
    return json.dumps([model["model_name"], {k: resolve(v) for k, v in state.items()},
                       buffers], sort_keys=True)


def live_widget_states(models: dict[str, dict]) -> list[list[tuple[str, str]]]:
    """Per live widget (an outermost Stack), its states as (label, what it shows)."""
    stacks = {i for i, m in models.items() if m["model_name"] == "StackModel"}
    inner = {c.replace("IPY_MODEL_", "") for i in stacks
             for c in models[i]["state"].get("children", [])}
    widgets = []
    for top in sorted(stacks - inner):
        states, todo = [], [top]
        while todo:
            node = todo.pop()
            if node in stacks:
                todo += [c.replace("IPY_MODEL_", "") for c in models[node]["state"]["children"]]
                continue
            label, shown = models[node]["state"]["children"][:2]
            label_text = models[label.replace("IPY_MODEL_", "")]["state"].get("value", "")
            states.append((re.sub(r"<[^>]+>", "", label_text), _content(models, shown)))
        widgets.append(states)
    return widgets


@pytest.mark.parametrize("page_name", PAGES, ids=[Path(p).name for p in PAGES])
def test_no_widget_state_repeats_another(page_name: str) -> None:
    path = HTML / f"{page_name}.html"
    if not path.exists():
        pytest.fail(f"{path.relative_to(ROOT)} is missing: run `make book` first", pytrace=False)
    problems = []
    for i, states in enumerate(live_widget_states(_widget_models(path)), start=1):
        first: dict[str, str] = {}
        for label, shown in states:
            if shown in first:
                problems.append(f"widget {i}: '{label}' shows what '{first[shown]}' shows")
            first.setdefault(shown, label)
    if problems:
        pytest.fail(f"{page_name}.html: states that show nothing new (drop them from the "
                    f"grid):\n  " + "\n  ".join(problems[:12]), pytrace=False)
