"""The Flask app example's page (examples/flask_app/) in Chromium, against a real node.

The page logs in to the app, loads the socket.io client from the node and connects with the
app's session cookie, which the node checks through the app's connect proxy; a notification
one user sends through the app (and the node's HTTP API) shows on the other's page.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import expect

from realtime_dev.processes import (
    ManagedProcess,
    NodeProcess,
    free_port,
    http_ok,
    node_environment,
    wait_for,
)
from tests.browser.conftest import REPO, TrackedPage

API_KEY = "page-" + uuid.uuid4().hex


@pytest.fixture(scope="module")
def app_url(tmp_path_factory) -> Iterator[str]:
    """The example app (its demo users) and its node, both on free loopback ports."""
    logs: Path = tmp_path_factory.mktemp("flask-page")
    app_port = free_port()
    url = f"http://127.0.0.1:{app_port}"
    node = NodeProcess(logs, "flask-page", "--api-key", API_KEY, "--allowed-origins", url,
                       "--proxy-connect-url", url + "/realtime/connect",
                       "--proxy-headers", "Cookie")
    env = node_environment()
    env.update(REALTIME_URL=node.url, REALTIME_API_KEY=API_KEY,
               APP_SECRET_KEY=uuid.uuid4().hex)
    app = ManagedProcess("flask-app", [sys.executable, "-m", "flask", "--app", "app", "run",
                                       "--port", str(app_port)],
                         logs / "flask-app.log", env=env, cwd=REPO / "examples" / "flask_app")
    try:
        node.wait_ready()
        wait_for(lambda: (app.alive() or pytest.fail(app.log())) and http_ok(url + "/me"), 20,
                 "the Flask app")
        yield url
    finally:
        app.stop()
        node.stop()


def _log_in(open_page, url: str, user: str, password: str) -> TrackedPage:
    tracked = open_page(url + "/", name=user)
    tracked.page.fill("input[name=user]", user)
    tracked.page.fill("input[name=password]", password)
    tracked.page.click("#login button")
    expect(tracked.page.locator("#status")).to_have_text("online")
    return tracked


def test_example_flask_page_logs_in_connects_with_its_cookie_and_shows_a_notification(
        app_url: str, open_page) -> None:
    alice = _log_in(open_page, app_url, "alice", "wonderland")
    bob = _log_in(open_page, app_url, "bob", "builder")

    bob.page.fill("input[name=to]", "alice")
    bob.page.fill("input[name=text]", "lunch?")
    bob.page.click("#notify button")

    expect(alice.page.locator("#inbox li")).to_have_text(["bob: lunch?"])
    # A reload keeps the session: the page connects again without logging in.
    alice.page.reload()
    expect(alice.page.locator("#status")).to_have_text("online")
    expect(alice.page.locator("#me")).to_have_text("alice")
