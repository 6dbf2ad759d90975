"""Browser tests: the pages in Debian's Chromium, driven by Playwright, against real nodes.

Playwright runs the system's ``/usr/bin/chromium`` (``scripts/setup test`` installs it with
apt-get, and the pinned ``playwright`` package with pip); it never downloads a browser of its
own. Each page gets a browser context of its own (its own localStorage and sessionStorage, as a
separate browser would have). When a test fails, every page it opened leaves a screenshot and
its console log in ``test-artifacts/browser/<test>/`` at the top of the checkout (git-ignored).
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, Playwright, sync_playwright

CHROMIUM = Path("/usr/bin/chromium")
REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts" / "browser"
# Playwright's own waits (expect(), wait_for_*) give up after this long, in milliseconds:
# generous for a reconnect through nginx on a busy two-core machine, short of the test timeout.
DEFAULT_TIMEOUT_MS = 15_000
PHONE = {"width": 390, "height": 844}
DESKTOP = {"width": 1280, "height": 800}


@dataclass
class TrackedPage:
    """A page with what it logged and the Engine.IO sessions it used, in order."""

    page: Page
    context: BrowserContext
    name: str
    console: list[str] = field(default_factory=list)
    session_ids: list[str] = field(default_factory=list)

    @property
    def node(self) -> str:
        """The node of the page's newest Engine.IO session: the id before the dot of its sid."""
        assert self.session_ids, f"page {self.name} has no Engine.IO session yet"
        return self.session_ids[-1].split(".", 1)[0]

    def _saw_url(self, url: str) -> None:
        parts = urlsplit(url)
        if "/socket.io/" not in parts.path:
            return
        sid = parse_qs(parts.query).get("sid", [""])[0]
        if sid and (not self.session_ids or self.session_ids[-1] != sid):
            self.session_ids.append(sid)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """Keep each phase's report on the item, so fixtures can tell whether the test failed."""
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


@pytest.fixture(scope="session")
def playwright_driver() -> Iterator[Playwright]:
    with sync_playwright() as driver:
        yield driver


@pytest.fixture(scope="session")
def chromium(playwright_driver: Playwright) -> Iterator[Browser]:
    """Debian's Chromium, headless."""
    assert CHROMIUM.exists(), f"{CHROMIUM} is missing: `scripts/setup test` installs chromium"
    browser = playwright_driver.chromium.launch(executable_path=str(CHROMIUM))
    yield browser
    browser.close()


@pytest.fixture
def open_page(chromium: Browser, request: pytest.FixtureRequest) -> Iterator[
        Callable[..., TrackedPage]]:
    """``open_page(url, name=..., viewport=...)``: a new page in a browser context of its own.

    On failure each page's screenshot and console log go to ``test-artifacts/browser/<test>/``.
    """
    opened: list[TrackedPage] = []

    def open_(url: str, *, name: str = "", viewport: dict[str, int] | None = None) -> TrackedPage:
        context = chromium.new_context(viewport=viewport or DESKTOP)
        context.set_default_timeout(DEFAULT_TIMEOUT_MS)
        page = context.new_page()
        tracked = TrackedPage(page, context, name or f"page{len(opened) + 1}")
        page.on("console", lambda message: tracked.console.append(
            f"{message.type}: {message.text}"))
        page.on("pageerror", lambda error: tracked.console.append(f"pageerror: {error}"))
        page.on("request", lambda req: tracked._saw_url(req.url))
        page.on("websocket", lambda socket: tracked._saw_url(socket.url))
        opened.append(tracked)
        page.goto(url)
        return tracked

    yield open_

    failed = any(getattr(getattr(request.node, f"report_{when}", None), "failed", False)
                 for when in ("setup", "call"))
    if failed:
        _save_artifacts(request.node.nodeid, opened)
    for tracked in opened:
        tracked.context.close()


def _save_artifacts(nodeid: str, pages: list[TrackedPage]) -> None:
    directory = ARTIFACTS / re.sub(r"[^A-Za-z0-9_.-]+", "_", nodeid.split("::", 1)[-1])
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    for tracked in pages:
        lines = [f"url: {tracked.page.url}", f"sessions: {' '.join(tracked.session_ids)}",
                 *tracked.console]
        (directory / f"{tracked.name}.console.log").write_text("\n".join(lines) + "\n")
        try:
            tracked.page.screenshot(path=str(directory / f"{tracked.name}.png"), full_page=True)
        except Exception as exc:  # a crashed page: its log is still worth keeping
            (directory / f"{tracked.name}.screenshot-error.txt").write_text(f"{exc}\n")
