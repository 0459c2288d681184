"""Test helper: open a local HTML page in headless Chromium, take a screenshot and check its images.

`open_in_chromium(page, screenshot)` runs Debian's `chromium` twice with a fresh profile and
no network (host names resolve to nothing, so a page that links anything external shows it
as a broken image): once with `--dump-dom` on a copy of the page that carries a small probe
script, which writes every `<img>`'s natural and displayed size and every `<figcaption>`'s box
into the DOM once the page has loaded, and once with `--screenshot`. `dump_dom(page)` loads any
page and returns its DOM after its scripts ran. `chromium_or_skip()` fails in CI (CI=true) when
Chromium is missing and skips elsewhere.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
BUDGET = "--virtual-time-budget=10000"  # virtual milliseconds for the page to settle
FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--no-default-browser-check", "--disable-dev-shm-usage", "--hide-scrollbars",
    "--mute-audio", "--host-resolver-rules=MAP * ~NOTFOUND",
)
# Runs after every image has loaded or failed; leaves the results in <pre>s for --dump-dom.
PROBE = """<script>
addEventListener("load", () => {
  const leave = (id, value) => {
    const out = document.createElement("pre");
    out.id = id;
    out.textContent = JSON.stringify(value);
    document.body.appendChild(out);
  };
  const captions = [...document.querySelectorAll("figcaption")];
  leave("museum-img-probe", [...document.images].map((img) => ({alt: img.alt, width: img.naturalWidth,
    height: img.naturalHeight, complete: img.complete, shown_width: img.getBoundingClientRect().width})));
  leave("museum-caption-probe", captions.map((c) => ({text: c.textContent, width: c.getBoundingClientRect().width,
    height: c.getBoundingClientRect().height, line_height: parseFloat(getComputedStyle(c).lineHeight)})));
});
</script>"""


@dataclass
class PageCheck:
    """What Chromium saw: the DOM after load, each image's natural and shown size, each figure
    caption's box (`lines`: its height in lines of text), and the screenshot file."""

    dom: str
    images: list[dict]
    screenshot: Path
    captions: list[dict]

    @property
    def broken_images(self) -> list[dict]:
        return [img for img in self.images if not img["complete"] or img["width"] == 0]


def chromium_or_skip() -> str:
    """Path of a Chromium binary; fail in CI and skip elsewhere when there is none."""
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    message = "chromium not installed (apt-get install chromium)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def _run(args: list[str], timeout: float) -> str:
    """Run Chromium in its own process group, killing the whole group on timeout."""
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        proc = subprocess.Popen([*args[:1], *FLAGS, f"--user-data-dir={profile}", *args[1:]], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise AssertionError(f"chromium did not finish within {timeout:.0f}s: {' '.join(args[1:])}") from None
    if proc.returncode != 0:
        raise AssertionError(f"chromium exited with {proc.returncode}: {err[-2000:]}")
    return out


def open_in_chromium(page: Path, screenshot: Path, width: int = 1280, height: int = 2400,
                     timeout: float = 120.0) -> PageCheck:
    """Load `page` (a local HTML file) headless; return its DOM, image sizes and a PNG screenshot."""
    binary = chromium_or_skip()  # before anything is written beside the page
    page = Path(page).resolve()
    # The probe goes into a copy beside the page, so that relative links resolve the same way.
    probe = page.with_name(f".probe-{page.name}")
    text = page.read_text(encoding="utf-8")
    cut = text.rfind("</body>")
    probe.write_text(text[:cut] + PROBE + text[cut:] if cut >= 0 else text + PROBE, encoding="utf-8")
    try:
        dom = dump_dom(probe, width, height, timeout)
    finally:
        probe.unlink(missing_ok=True)
    found = {name: re.search(rf'<pre id="museum-{name}-probe">(.*?)</pre>', dom, re.S) for name in ("img", "caption")}
    if None in found.values():
        raise AssertionError(f"{page}: the page never finished loading in chromium (no probe output)")
    screenshot = Path(screenshot).resolve()
    _run([binary, BUDGET, f"--window-size={width},{height}", f"--screenshot={screenshot}", page.as_uri()], timeout)
    if not screenshot.is_file() or screenshot.stat().st_size == 0:
        raise AssertionError(f"chromium wrote no screenshot to {screenshot}")
    captions = json.loads(html.unescape(found["caption"].group(1)))
    for caption in captions:
        caption["lines"] = round(caption["height"] / caption["line_height"]) if caption["line_height"] else 0
    return PageCheck(dom=dom, images=json.loads(html.unescape(found["img"].group(1))), screenshot=screenshot,
                     captions=captions)


def dump_dom(page: Path, width: int = 1280, height: int = 2400, timeout: float = 120.0) -> str:
    """The DOM of a local page once it has loaded and its scripts have run, in a window of width × height."""
    binary = chromium_or_skip()
    return _run([binary, BUDGET, f"--window-size={width},{height}", "--dump-dom", Path(page).resolve().as_uri()], timeout)
