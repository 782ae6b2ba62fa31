"""Headless Chromium for tests: a screenshot of a page of Prefect's UI and the text it rendered.

Why it is built this way:

- The UI is a single-page app that fills the page from API calls after load, and keeps
  polling and a websocket open, so the page never goes idle. Chromium's own command line
  handles that with `--virtual-time-budget`: virtual time stands still while fetches are
  pending and skips over timers, so the run's data is in the page when the budget is spent,
  within a few seconds of wall time, whatever the polling interval. One call writes the
  screenshot and dumps the DOM (`--screenshot` with `--dump-dom`), so the text we check
  is the page in the PNG. No driver, no DevTools client, no new Python dependency.
- A page that lacks a string may only be early (a run that has just finished, a slow
  server): `render` runs it again with a doubled budget until `timeout_s`.
- Each call gets a fresh profile (`--user-data-dir`): parallel calls do not fight over a
  profile lock, and no saved UI preference (V1/V2 cookie) carries over between tests.
- Hosts other than 127.0.0.1/localhost resolve to nothing (`--host-resolver-rules`) and
  background networking is off: no request leaves the machine, and none waits on a timeout.
- `--no-sandbox` because tests run as root; `--disable-dev-shm-usage` because /dev/shm in
  containers is small (Debian's launcher means to add it, but its check breaks when
  findmnt prints more than one line).

Prefect 3.9 serves two UIs. `/runs/flow-run/<id>` is V1 (Vue), and its `?tab=Artifacts`
does NOT open the tab on a fresh load: the tab is hidden until the run is fetched, and the
UI resets the query to the first visible tab ("Logs") before that. The V2 UI (React,
Prefect's default) opens it: `/v2/runs/flow-run/<id>?tab=Artifacts`. Artifact pages work
in both: `/artifacts/artifact/<id>`, `/v2/artifacts/artifact/<id>`.

The text returned is the text of the rendered DOM (head, scripts and styles left out), not
layout-aware: it includes collapsed or hidden elements (it tells what the page holds, the
PNG what it shows), and each element's edge reads as a space except for inline formatting
tags (<strong>, <code>, <a>...). V1's markdown renders **bold** as a <div>, so its
"Some **text**." reads "Some text ." there: pick `wait_for` strings that do not straddle
formatting.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from html.parser import HTMLParser
from pathlib import Path

_FLAGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
    "--hide-scrollbars", "--window-size=1600,1200", "--no-first-run", "--no-default-browser-check",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE localhost",
]


def chromium() -> str | None:
    """The Chromium (or Chrome) binary on PATH, or None."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    return None


class _Text(HTMLParser):
    _SKIP = {"script", "style", "noscript", "template", "head"}
    # Markup inside a sentence ("by <strong>Chromium</strong>."): no space at its edges.
    # Every other tag separates, as the UI's flex rows of <div>s and <span>s do on screen.
    _INLINE = {"a", "abbr", "b", "cite", "code", "em", "i", "kbd", "mark", "q", "s", "small",
               "strong", "sub", "sup", "u", "var"}

    def __init__(self):
        super().__init__()
        self.parts: list[str] = []
        self._skipping = 0

    def handle_starttag(self, tag, attrs):
        if tag in self._SKIP:
            self._skipping += 1
        elif tag not in self._INLINE:
            self.parts.append(" ")

    def handle_endtag(self, tag):
        if tag in self._SKIP:
            self._skipping = max(self._skipping - 1, 0)
        elif tag not in self._INLINE:
            self.parts.append(" ")

    def handle_data(self, data):
        if not self._skipping:
            self.parts.append(data)


def page_text(html: str) -> str:
    """The text of an HTML document, whitespace collapsed to single spaces."""
    parser = _Text()
    parser.feed(html)
    parser.close()
    return " ".join("".join(parser.parts).split())


def _run_once(binary: str, url: str, screenshot: Path, budget_ms: int, timeout_s: float) -> tuple[str, str]:
    """(DOM, stderr) of one headless load of `url` that also writes `screenshot`."""
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        cmd = [binary, *_FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}",
               f"--screenshot={screenshot}", "--dump-dom", url]
        # Its own session, so that a timeout ends the renderer and GPU processes as well.
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            err += f"\n[chromium killed after {timeout_s:.0f}s]"
    return out, err


def _errors(stderr: str) -> str:
    # Without a D-Bus or a GPU, Chromium logs dozens of harmless lines that would bury the one that matters.
    lines = [line for line in stderr.splitlines() if "dbus" not in line and "GL Driver" not in line]
    return "\n".join(lines[-15:])


def render(url: str, screenshot: Path, *, wait_for: list[str], timeout_s: float = 60) -> str:
    """Screenshot `url` into `screenshot` (PNG, 1600x1200) and return the page's text (see `render_page`)."""
    return render_page(url, screenshot, wait_for=wait_for, timeout_s=timeout_s)[0]


def render_page(url: str, screenshot: Path, *, wait_for: list[str], timeout_s: float = 60) -> tuple[str, str]:
    """Screenshot `url` into `screenshot` (PNG, 1600x1200); return the page's text and its DOM.

    Loads again with a longer virtual-time budget until every string of `wait_for` is in the
    text; raises AssertionError naming the missing strings and the URL once `timeout_s` has
    passed (the last screenshot is kept for a look)."""
    binary = chromium()
    if binary is None:
        raise RuntimeError("no chromium on PATH: apt-get install -y chromium (bash .ci/install does)")
    screenshot = Path(screenshot)
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout_s
    budget_ms = 5000
    while True:
        left = deadline - time.monotonic()
        dom, err = _run_once(binary, url, screenshot, budget_ms, max(left, 15))
        text = page_text(dom)
        missing = [s for s in wait_for if " ".join(s.split()) not in text]
        if not missing and screenshot.exists():
            return text, dom
        if time.monotonic() >= deadline:
            break
        budget_ms = min(budget_ms * 2, 60_000)
        time.sleep(1)
    raise AssertionError(
        f"{url} did not show {missing} within {timeout_s:.0f}s (screenshot: {screenshot}, "
        f"exists: {screenshot.exists()}).\nText: {text[:2000]}\nChromium stderr (tail): {_errors(err)}")
