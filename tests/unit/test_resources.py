"""Where a node finds its pages: the installed package's, a checkout's static/, or --static-dir.

The installed case is tested end to end in tests/integration/test_package.py.
"""

from __future__ import annotations

import pytest

from realtime.app import create_app
from realtime.config import Config
from realtime.resources import CLIENT_BUNDLE, pages_dir
from tests.helpers import REPO


def test_a_source_checkout_serves_the_pages_of_its_static_folder():
    # The checkout has no realtime/static/ (only a wheel has): its static/ is the one.
    assert pages_dir() == REPO / "static"


@pytest.fixture
def pages(tmp_path):
    (tmp_path / "index.html").write_text("<p>my own chat</p>")
    bundle = tmp_path / CLIENT_BUNDLE
    bundle.parent.mkdir(parents=True)
    bundle.write_text("/* my own client */")
    return tmp_path


def test_static_dir_replaces_the_pages_and_the_client_bundle(pages):
    instance = create_app(Config(node_id="unit", static_dir=str(pages)))
    http = instance.app.test_client()
    assert http.get("/").text == "<p>my own chat</p>"
    assert http.get("/vendor/socket.io.min.js").text == "/* my own client */"
    # Pages of the default folder are not served from a folder given instead.
    assert http.get("/notifications.html").status_code == 404
    assert http.get(f"/{CLIENT_BUNDLE.as_posix()}").status_code == 404


def test_the_default_pages_are_served_without_static_dir():
    http = create_app(Config(node_id="unit")).app.test_client()
    assert http.get("/").data == (REPO / "static" / "index.html").read_bytes()
    assert http.get("/vendor/socket.io.min.js").data == (
        REPO / "static" / CLIENT_BUNDLE).read_bytes()


def test_without_installed_pages_outside_a_checkout_the_node_refuses_to_start(monkeypatch,
                                                                              tmp_path):
    from realtime import resources
    from realtime.config import ConfigError

    # As if the package (without realtime/static/) had been installed into tmp_path.
    monkeypatch.setattr(resources, "__file__", str(tmp_path / "realtime" / "resources.py"))
    with pytest.raises(ConfigError, match="--static-dir"):
        create_app(Config(node_id="unit"))
