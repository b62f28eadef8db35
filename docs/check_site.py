"""Builds the documentation site and checks three of its pages in headless Chromium.

    python docs/check_site.py --out build/screenshots

The site is built with ``mkdocs build --strict`` and served on 127.0.0.1 (a free port) by Python's
http.server. The landing page, one user-guide page and one API page are opened in headless Chromium: the
DOM after the page's scripts have run (``--dump-dom``) must hold the navigation, the search box and
highlighted code, and every ``<img>`` must have loaded (the server adds a small script that records the
images whose ``naturalWidth`` is 0; each image is also fetched and checked to be a PNG or an SVG). A
screenshot of each page is written to ``--out``. Exits with status 1 on any failure.
"""

from __future__ import annotations

import argparse
import functools
import html.parser
import http.server
import pathlib
import shutil
import subprocess
import sys
import tempfile
import threading
import urllib.parse
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = {"landing": "", "guide": "guide/family/", "api": "api/focal_jax/"}
PROBE = (b"<script>addEventListener('load', () => { const broken = [...document.images]"
         b".filter(i => !i.complete || i.naturalWidth === 0).map(i => i.getAttribute('src'));"
         b" document.body.setAttribute('data-images', document.images.length);"
         b" document.body.setAttribute('data-broken-images', broken.join(' ') || 'none'); });</script>")


class Handler(http.server.SimpleHTTPRequestHandler):
    """Serves the built site; adds the image probe to every HTML page."""

    def log_message(self, *args):  # quiet
        pass

    def send_head(self):
        path = pathlib.Path(self.translate_path(self.path))
        if path.is_dir():
            path = path / "index.html"
        if path.suffix != ".html" or not path.is_file():
            return super().send_head()
        body = path.read_bytes().replace(b"</body>", PROBE + b"</body>", 1)
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        import io

        return io.BytesIO(body)


class Page(html.parser.HTMLParser):
    """What the checks need from a dumped DOM."""

    def __init__(self) -> None:
        super().__init__()
        self.classes: list[str] = []
        self.images: list[str] = []
        self.body: dict[str, str | None] = {}
        self.search_inputs = 0
        self.code_depth = 0
        self.highlighted_tokens = 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        cls = a.get("class") or ""
        self.classes.extend(cls.split())
        if tag == "body":
            self.body = a
        if tag == "img":
            self.images.append(a.get("src") or "")
        if tag == "input" and "md-search__input" in cls:
            self.search_inputs += 1
        if tag == "code":
            self.code_depth += 1
        if tag == "span" and self.code_depth and cls:
            self.highlighted_tokens += 1

    def handle_endtag(self, tag):
        if tag == "code" and self.code_depth:
            self.code_depth -= 1


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    sys.exit("check_site: no Chromium found (Debian: apt-get install -y chromium)")


def browse(url: str, *args: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as profile:
        cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--hide-scrollbars", "--no-first-run", f"--user-data-dir={profile}", "--window-size=1280,900",
               "--virtual-time-budget=10000", *args, url]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def image_ok(url: str) -> str | None:
    """None when ``url`` answers 200 with a PNG or SVG body, else what is wrong."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            data = response.read()
    except Exception as error:  # any failure to load is the finding
        return f"{url}: {error}"
    if data[:8] == b"\x89PNG\r\n\x1a\n" or b"<svg" in data[:512]:
        return None
    return f"{url}: not a PNG or SVG ({data[:16]!r})"


def check_page(name: str, base: str, path: str, out: pathlib.Path) -> list[str]:
    url = base + path
    problems = []
    dom = browse(url, "--dump-dom")
    if dom.returncode != 0 or "<html" not in dom.stdout:
        return [f"{name}: chromium --dump-dom failed ({dom.returncode}): {dom.stderr[-500:]}"]
    page = Page()
    page.feed(dom.stdout)
    if "md-nav" not in page.classes or "md-sidebar--primary" not in page.classes:
        problems.append(f"{name}: no navigation")
    if not page.search_inputs:
        problems.append(f"{name}: no search box")
    if "highlight" not in page.classes or page.highlighted_tokens < 3:
        problems.append(f"{name}: no highlighted code ({page.highlighted_tokens} tokens)")
    if "data-broken-images" not in page.body:
        problems.append(f"{name}: the image probe did not run")
    elif page.body["data-broken-images"] != "none":
        problems.append(f"{name}: images that did not load: {page.body['data-broken-images']}")
    for src in page.images:
        problem = image_ok(urllib.parse.urljoin(url, src))
        if problem:
            problems.append(f"{name}: {problem}")
    shot = out / f"{name}.png"
    result = browse(url, f"--screenshot={shot}")
    if result.returncode != 0 or not shot.is_file() or shot.read_bytes()[:4] != b"\x89PNG":
        problems.append(f"{name}: no screenshot ({result.returncode}): {result.stderr[-500:]}")
    print(f"{name}: {url} images={page.body.get('data-images')} highlighted tokens={page.highlighted_tokens}"
          f" -> {shot}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "build" / "screenshots",
                        help="folder for the screenshots")
    parser.add_argument("--site", type=pathlib.Path, default=ROOT / "build" / "site", help="where to build")
    parser.add_argument("--no-build", action="store_true", help="check an already built --site")
    args = parser.parse_args(argv)
    if not args.no_build:
        subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(args.site)],
                       cwd=ROOT, check=True)
    args.out.mkdir(parents=True, exist_ok=True)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(Handler, directory=str(args.site)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}/"
    try:
        problems = [p for name, path in PAGES.items() for p in check_page(name, base, path, args.out)]
    finally:
        server.shutdown()
    for problem in problems:
        print("FAIL", problem, file=sys.stderr)
    print("check_site: " + ("failed" if problems else f"{len(PAGES)} pages OK"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
