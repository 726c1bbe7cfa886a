"""The built book in a real browser: widgets render offline, and no page needs a CDN.

Runs after ``make book`` (it reads ``_build/html``; set ``BOOK_HTML`` to test
another build) with headless Chromium (``apt-get install chromium``; set
``CHROMIUM`` to use another binary), and skips with the reason if either is
missing. The book is served on 127.0.0.1 and Chromium resolves every other host to
nothing, so a page that fetched anything from the internet would break here.

    .venv/bin/python -m pytest -m browser tests/test_browser.py
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser
bs4 = pytest.importorskip("bs4", reason="beautifulsoup4 comes with jupyter-book")

ROOT = Path(__file__).resolve().parents[1]
BOOK = Path(os.environ.get("BOOK_HTML", ROOT / "_build" / "html"))
STATE = "application/vnd.jupyter.widget-state+json"
VIEW = "application/vnd.jupyter.widget-view+json"
CDN = re.compile(r"https?://[^\s\"'<>]*(cdn|unpkg|jsdelivr)[^\s\"'<>]*", re.I)
# sphinx-thebe (which Jupyter Book always loads) writes this URL into every page as
# a constant; thebe is fetched only when a reader starts live code, which our
# _config.yml turns off (launch_buttons.thebe: false). Nothing else may name a CDN.
ALLOWED_CDN = {"https://unpkg.com/thebe@0.8.2/lib/index.js"}
# sphinx-thebe also declares that constant twice per page, a known console error
# of Jupyter Book 1 that no widget depends on.
ALLOWED_CONSOLE = ("Identifier 'THEBE_JS_URL' has already been declared",)


def chromium() -> str | None:
    names = [os.environ.get("CHROMIUM", ""), "chromium", "chromium-browser"]
    names += ["google-chrome", "google-chrome-stable"]
    return next((shutil.which(n) for n in names if n and shutil.which(n)), None)


def chapter_pages() -> list[Path]:
    """The built page of every page _toc.yml lists: the intro, the chapters, the
    instructors' pages (missing ones included), or none at all when the book has
    not been built."""
    if not (BOOK / "index.html").exists():
        return []
    from tests.test_chapters import toc_files  # one reader of _toc.yml's parts

    return [BOOK / f"{f}.html" for f in toc_files()]


def book_pages() -> list[Path]:
    """Every page the build wrote (chapters, the intro, the instructors' pages,
    search and index), without the theme's and the sources' folders."""
    skip = ("_static", "_sources", "_images")
    return sorted(
        p for p in BOOK.rglob("*.html")
        if not any(part in skip for part in p.relative_to(BOOK).parts)
    )  # fmt: skip


def phone_pages() -> list[Path]:
    """The pages _toc.yml lists (a missing one fails), then every other page the
    build wrote (search, index)."""
    listed = chapter_pages()
    return listed + [p for p in (book_pages() if listed else []) if p not in listed]


def skip_or_fail(reason: str):
    """Skip, or fail where the environment requires the browser test (CI sets
    COURSE_REQUIRE_BROWSER=1, so a missing Chromium or book cannot pass silently)."""
    if os.environ.get("COURSE_REQUIRE_BROWSER") == "1":
        pytest.fail(f"browser test required but cannot run: {reason}")
    pytest.skip(reason)


def soup(html: str) -> bs4.BeautifulSoup:
    return bs4.BeautifulSoup(html, "html.parser")


def widget_state(page: Path) -> dict:
    """The page's saved widget models, ``{model_id: {"model_name", "state"}}``."""
    tags = soup(page.read_text()).find_all("script", type=STATE)
    return {k: v for t in tags for k, v in json.loads(t.string)["state"].items()}


def reachable(state: dict, model_id: str) -> set[str]:
    """Model ids reachable from one view's model through "IPY_MODEL_..." refs."""
    seen, todo = set(), [model_id]
    while todo:
        mid = todo.pop()
        if mid in seen or mid not in state:
            continue
        seen.add(mid)
        todo += re.findall(r"IPY_MODEL_([0-9a-f]+)", json.dumps(state[mid]["state"]))
    return seen


def has_png(model: dict) -> bool:
    outputs = model["state"].get("outputs", [])
    return model["model_name"] == "OutputModel" and any(
        "image/png" in o.get("data", {}) for o in outputs
    )


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves the book, records every request, and serves the harness pages."""

    requests: list[tuple[str, int]]
    extra: dict[str, str]

    def do_GET(self):
        body = self.extra.get(self.path.split("?")[0])
        if body is None:
            return super().do_GET()
        data = body.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_request(self, code="-", size="-"):
        self.requests.append((self.path, int(code) if str(code).isdigit() else 0))

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def browser():
    """``open(path, *flags) -> (stdout, console lines)`` over a served book."""
    exe = chromium()
    if exe is None:
        skip_or_fail("no Chromium: apt-get install chromium (or set CHROMIUM)")
    if not chapter_pages():
        skip_or_fail(f"no book in {BOOK}: run `make book` first")
    handler = type("Handler", (_Handler,), {"requests": [], "extra": {}})
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(handler, directory=str(BOOK))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_port}"

    def open_page(path: str, *flags: str, budget_ms: int = 20000):
        with tempfile.TemporaryDirectory() as profile:
            cmd = [
                exe,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={profile}",
                # every host but ours resolves to nothing: the page must be offline
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
                "--enable-logging=stderr",
                "--v=0",
                f"--virtual-time-budget={budget_ms}",
                *flags,
                f"{base}/{path}",
            ]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
        console = [ln for ln in done.stderr.splitlines() if ":CONSOLE" in ln]
        return done.stdout, console

    open_page.requests = handler.requests
    open_page.extra = handler.extra
    try:
        yield open_page
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_no_page_references_a_cdn():
    pages = sorted(BOOK.rglob("*.html"))
    if not chapter_pages():
        skip_or_fail(f"no book in {BOOK}: run `make book` first")
    found = {
        f"{page.relative_to(BOOK)}: {url}"
        for page in pages
        for url in (m.group(0) for m in CDN.finditer(page.read_text()))
        if url not in ALLOWED_CDN
    }
    assert not found, "pages reference a CDN:\n" + "\n".join(sorted(found))
    for page in pages:
        if widget_state(page):
            srcs = [
                s["src"] for s in soup(page.read_text()).find_all("script", src=True)
            ]
            assert any("_vendor/widgets/embed-amd.js" in s for s in srcs), page


# [None] when there is no build: the browser fixture then skips with the reason
@pytest.mark.parametrize(
    "page", chapter_pages() or [None], ids=lambda p: getattr(p, "stem", "none")
)
def test_chapter_renders_its_widgets_and_figures_offline(browser, page):
    assert page.exists(), f"_toc.yml lists a chapter the build has no page for: {page}"
    rel = page.relative_to(BOOK).as_posix()
    source = soup(page.read_text())
    views = [
        json.loads(t.string)["model_id"] for t in source.find_all("script", type=VIEW)
    ]
    state = widget_state(page)
    static_imgs = [
        img["src"]
        for img in source.select(".cell_output img")
        if not img["src"].startswith("data:")
    ]
    del browser.requests[:]
    dom, console = browser(rel, "--dump-dom")
    rendered = soup(dom)

    # each view script became a rendered widget, and each widget whose saved state
    # holds a figure shows it as an image
    for model_id in views:
        tag = next(
            t
            for t in rendered.find_all("script", type=VIEW)
            if json.loads(t.string)["model_id"] == model_id
        )
        area = tag.find_previous_sibling("div", class_="widget-subarea")
        assert area is not None and area.select(".jupyter-widgets"), (
            f"{rel}: widget {model_id} was not rendered"
        )
        if any(has_png(state[m]) for m in reachable(state, model_id)):
            imgs = area.select(".widget-output img")
            assert imgs and imgs[0]["src"].startswith("data:image/png;base64,"), (
                f"{rel}: widget {model_id} shows no figure"
            )

    # static figures are in the page and were served
    for src in static_imgs:
        assert rendered.find("img", src=src) is not None, f"{rel}: lost image {src}"
    failed = [(p, c) for p, c in browser.requests if c >= 400 and "favicon" not in p]
    assert not failed, f"{rel}: requests failed: {failed}"
    errors = [
        line
        for line in console
        if ("Uncaught" in line or "Error" in line)
        and not any(a in line for a in ALLOWED_CONSOLE)
    ]
    assert not errors, f"{rel}: console errors:\n" + "\n".join(errors)


HARNESS = """<!doctype html><html><body>
<iframe id="page" src="{page}" width="1200" height="3000"></iframe>
<pre id="result">pending</pre>
<script>
const frame = document.getElementById("page");
const shown = doc => [...doc.querySelectorAll(".widget-output img")]
  .filter(img => img.offsetParent !== null).map(img => img.src);
frame.addEventListener("load", () => setTimeout(() => {{
  const doc = frame.contentDocument, before = shown(doc), changed = [];
  doc.querySelectorAll(".widget-dropdown select").forEach((select, i) => {{
    select.selectedIndex = (select.selectedIndex + 1) % select.options.length;
    select.dispatchEvent(new Event("change", {{bubbles: true}}));
  }});
  doc.querySelectorAll(".widget-toggle-buttons").forEach(group => {{
    const other = group.querySelector(".widget-toggle-button:not(.mod-active)");
    if (other) other.click();
  }});
  setTimeout(() => {{
    const after = shown(doc);
    document.getElementById("result").textContent = JSON.stringify(
      {{before: before.length, after: after.length,
        changed: before.filter((src, i) => src !== after[i]).length}});
  }}, 3000);
}}, 8000));
</script></body></html>"""


def test_prerendered_widgets_switch_figures_without_a_kernel(browser):
    pages = [
        p
        for p in chapter_pages()
        if p.exists()
        and any(m["model_name"] == "StackModel" for m in widget_state(p).values())
    ]
    if not pages:
        skip_or_fail(
            "no chapter has a prerendered widget (interactive_figure(prerender=True))"
        )
    for page in pages:
        browser.extra["/harness.html"] = HARNESS.format(
            page=page.relative_to(BOOK).as_posix()
        )
        dom, _ = browser("harness.html", "--dump-dom", budget_ms=40000)
        result = json.loads(soup(dom).find("pre", id="result").string)
        assert result["before"] > 0, f"{page.name}: no figure shown: {result}"
        assert result["changed"] > 0, f"{page.name}: no figure followed its control"


def test_screenshot_shows_a_rendered_page(browser, tmp_path):
    from matplotlib.image import imread

    pages = [p for p in chapter_pages() if widget_state(p)] or chapter_pages()
    shot = tmp_path / "page.png"
    rel = pages[0].relative_to(BOOK).as_posix()
    browser(rel, f"--screenshot={shot}", "--window-size=1200,3000")
    assert shot.exists() and shot.stat().st_size > 20_000, "screenshot is empty"
    pixels = imread(shot)
    assert pixels.shape[0] >= 1000 and pixels.shape[1] >= 1000
    assert pixels[..., :3].std() > 0.05, "screenshot is a blank page"


PHONE_WIDTH = 390
"""A phone's viewport, in CSS pixels (iPhone 12-15: 390 x 844)."""

LEGIBLE_FIGURE = 300
"""The narrowest (CSS px) a figure may be drawn; narrower, its box must scroll."""

PHONE_HARNESS = """<!doctype html><html><body style="margin:0">
<iframe id="page" src="{page}" width="{width}" height="844" style="border:0">
</iframe>
<pre id="result">pending</pre>
<script>
const frame = document.getElementById("page");
frame.addEventListener("load", () => setTimeout(() => {{
  const win = frame.contentWindow, doc = frame.contentDocument, vw = win.innerWidth;
  const style = el => win.getComputedStyle(el);
  const shown = el => el.getClientRects().length > 0
    && style(el).visibility !== "hidden";
  // the nearest ancestor that scrolls sideways (overflow-x auto or scroll)
  const scroller = el => {{
    for (let a = el.parentElement; a && a !== doc.body; a = a.parentElement)
      if (["auto", "scroll"].includes(style(a).overflowX)) return a;
    return null;
  }};
  const name = el => el.tagName.toLowerCase()
    + (typeof el.className === "string" && el.className.trim()
       ? "." + el.className.trim().split(/\\s+/).join(".") : "");
  // what sticks out to the right of the screen, not in a box that scrolls
  const offscreen = [...doc.querySelectorAll("article.bd-article *")]
    .filter(el => shown(el) && el.getBoundingClientRect().right > vw + 1
                  && !scroller(el))
    .map(el => name(el) + " right=" + Math.round(el.getBoundingClientRect().right));
  const figures = [...doc.querySelectorAll(".cell_output img, .widget-output img")]
    .filter(shown).map(img => {{
      const box = scroller(img);
      return {{width: img.getBoundingClientRect().width, natural: img.naturalWidth,
               scrolls: !!box && box.scrollWidth > box.clientWidth + 1,
               src: img.src.slice(0, 40)}};
    }});
  const tables = [...doc.querySelectorAll("article.bd-article table")]
    .filter(shown).map(t => {{
      const box = scroller(t);
      return {{width: t.getBoundingClientRect().width,
               box: box ? box.clientWidth : null}};
    }});
  document.getElementById("result").textContent = JSON.stringify({{
    innerWidth: vw, scrollWidth: doc.documentElement.scrollWidth,
    offscreen: offscreen.slice(0, 20), figures, tables}});
}}, 8000));
</script></body></html>"""


# [None] when there is no build: the browser fixture then skips with the reason
@pytest.mark.parametrize(
    "page", phone_pages() or [None], ids=lambda p: getattr(p, "stem", "none")
)
def test_chapter_fits_a_phone_screen(browser, page):
    """At 390 px the page never scrolls sideways (wide tables, figures and
    equations scroll in their own box), and figures stay legible: at least
    LEGIBLE_FIGURE px wide (or their natural width, if smaller), or in a box that
    scrolls sideways."""
    assert page.exists(), f"_toc.yml lists a chapter the build has no page for: {page}"
    rel = page.relative_to(BOOK).as_posix()
    browser.extra["/phone.html"] = PHONE_HARNESS.format(page=rel, width=PHONE_WIDTH)
    dom, _ = browser("phone.html", "--dump-dom", budget_ms=40000)
    result = json.loads(soup(dom).find("pre", id="result").string)
    assert result["innerWidth"] == PHONE_WIDTH, result
    assert result["scrollWidth"] <= result["innerWidth"], (
        f"{rel} scrolls sideways at {PHONE_WIDTH} px: {result['scrollWidth']} px "
        f"wide; sticking out: {result['offscreen']}"
    )
    assert not result["offscreen"], (
        f"{rel}: cut off at the right edge at {PHONE_WIDTH} px: {result['offscreen']}"
    )
    source = soup(page.read_text())
    if source.select(".cell_output img") or widget_state(page):
        assert result["figures"], f"{rel}: no figure shown at {PHONE_WIDTH} px"
    small = [
        f
        for f in result["figures"]
        if f["width"] < min(LEGIBLE_FIGURE, f["natural"]) - 1 and not f["scrolls"]
    ]
    assert not small, f"{rel}: figures shrunk below {LEGIBLE_FIGURE} px: {small}"
    for table in result["tables"]:
        if table["width"] > PHONE_WIDTH:
            assert table["box"] is not None, f"{rel}: a wide table has no scroll box"


# ------------------------------------------------ every page: links, search, explorers


def _ids(page: Path, cache: dict) -> set[str]:
    if page not in cache:
        cache[page] = {t["id"] for t in soup(page.read_text()).find_all(id=True)}
    return cache[page]


def test_every_internal_link_and_image_resolves():
    """No broken link or image on any page: each relative ``href`` names a file of
    the build (and its ``#fragment`` an id there), each ``img src`` a file."""
    if not chapter_pages():
        skip_or_fail(f"no book in {BOOK}: run `make book` first")
    broken, ids = [], {}
    for page in book_pages():
        html = soup(page.read_text())
        refs = [("a", a["href"]) for a in html.find_all("a", href=True)]
        refs += [("img", i["src"]) for i in html.find_all("img", src=True)]
        for kind, ref in refs:
            if re.match(r"^[a-z][a-z0-9+.-]*:", ref, re.I) or ref.startswith("//"):
                continue  # http(s), mailto, data: the link check covers those
            path, _, fragment = ref.partition("#")
            target = (page.parent / path).resolve() if path else page
            if target.is_dir():
                target = target / "index.html"
            where = f"{page.relative_to(BOOK)}: {kind} {ref}"
            if not target.exists():
                broken.append(where)
            elif kind == "a" and fragment and target.suffix == ".html":
                if fragment not in _ids(target, ids):
                    broken.append(where + " (no such id)")
    assert not broken, "broken links or images:\n" + "\n".join(broken[:40])


def test_search_finds_a_chapter(browser):
    """The built-in search (Sphinx's searchtools over searchindex.js) answers
    offline: a query lists the chapter that treats it."""
    dom, console = browser("search.html?q=micro-batches", "--dump-dom")
    hits = [a["href"] for a in soup(dom).select("ul.search li a[href]")]
    assert hits, "the search listed nothing for 'micro-batches'"
    assert any("05-pipeline-parallel" in h for h in hits), hits[:10]


EXPLORER_HARNESS = """<!doctype html><html><body>
<iframe id="page" src="{page}" width="1200" height="3000"></iframe>
<pre id="result">pending</pre>
<script>
const frame = document.getElementById("page");
frame.addEventListener("load", () => setTimeout(() => {{
  const doc = frame.contentDocument, changes = [];
  const roots = [...doc.querySelectorAll(".course-explorer")];
  for (const root of roots) {{
    const out = root.querySelector(".plx-output");
    const fire = input => {{
      input.dispatchEvent(new Event("input", {{bubbles: true}}));
      input.dispatchEvent(new Event("change", {{bubbles: true}}));
    }};
    // each control alone, from the page's starting layout: change it, compare,
    // put it back (a changed model could make every later layout one error)
    for (const input of root.querySelectorAll("[data-control]")) {{
      const before = out ? out.innerHTML : "";
      const old = input.type === "checkbox" ? input.checked : input.value;
      if (input.type === "checkbox") input.checked = !input.checked;
      else if (input.tagName === "SELECT")
        input.selectedIndex = (input.selectedIndex + 1) % input.options.length;
      else input.value = String(Number(input.value) + 1);
      fire(input);
      changes.push({{explorer: root.id, control: input.dataset.control,
                     changed: (out ? out.innerHTML : "") !== before}});
      if (input.type === "checkbox") input.checked = old; else input.value = old;
      fire(input);
    }}
  }}
  document.getElementById("result").textContent = JSON.stringify(
    {{explorers: roots.length, changes}});
}}, 4000));
</script></body></html>"""


def test_explorers_on_book_pages_answer_every_control(browser):
    """Every live explorer the book shows (``utils.explorer``) answers each of its
    controls in the static page: its output changes."""
    pages = [p for p in book_pages() if "course-explorer" in p.read_text()]
    if not pages:
        skip_or_fail("no page shows a live explorer (utils.explorer)")
    for page in pages:
        rel = page.relative_to(BOOK).as_posix()
        browser.extra["/harness.html"] = EXPLORER_HARNESS.format(page=rel)
        dom, _ = browser("harness.html", "--dump-dom", budget_ms=30000)
        result = json.loads(soup(dom).find("pre", id="result").string)
        assert result["explorers"] > 0, f"{rel}: no explorer started"
        dead = [c for c in result["changes"] if not c["changed"]]
        assert result["changes"] and not dead, f"{rel}: controls with no effect: {dead}"


CONTROLS = {
    "DropdownModel", "ToggleButtonsModel", "SelectionSliderModel", "IntSliderModel",
    "FloatSliderModel", "FloatLogSliderModel", "CheckboxModel", "IntTextModel",
    "FloatTextModel", "BoundedIntTextModel", "BoundedFloatTextModel",
}  # fmt: skip


def test_no_widget_control_is_dead_in_the_static_page():
    """A control the static page shows must do something there: every control in
    a page's saved widget state is linked in the browser (``jslink`` to a Stack of
    prerendered figures); Python callbacks cannot run without a kernel."""
    if not chapter_pages():
        skip_or_fail(f"no book in {BOOK}: run `make book` first")
    dead = []
    for page in book_pages():
        state = widget_state(page)
        linked = {
            end[0].removeprefix("IPY_MODEL_")
            for m in state.values()
            if m["model_name"] in ("LinkModel", "DirectionalLinkModel")
            for end in (m["state"].get("source"), m["state"].get("target"))
            if end
        }
        dead += [
            f"{page.relative_to(BOOK)}: {m['model_name']} "
            f"{m['state'].get('description')!r}"
            for key, m in state.items()
            if m["model_name"] in CONTROLS and key not in linked
        ]
    assert not dead, "controls that do nothing without a kernel:\n" + "\n".join(dead)
