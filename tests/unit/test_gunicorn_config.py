"""realtime.gunicorn_config takes gunicorn's settings from the node's own configuration."""

from __future__ import annotations

import importlib
import os

import pytest

import realtime.gunicorn_config


@pytest.fixture
def load_settings(monkeypatch):
    """``load_settings(**env)``: the settings module as gunicorn reads it under ``env``."""
    def load(**env: str):
        for name in list(os.environ):
            if name.startswith("REALTIME_"):
                monkeypatch.delenv(name)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        return importlib.reload(realtime.gunicorn_config)

    yield load
    monkeypatch.undo()
    importlib.reload(realtime.gunicorn_config)


def test_gunicorn_binds_where_the_node_is_configured_and_waits_out_its_drain(load_settings):
    settings = load_settings(REALTIME_HOST="0.0.0.0", REALTIME_PORT="5123",
                             REALTIME_DRAIN_TIMEOUT="12.5")
    assert settings.bind == ["0.0.0.0:5123"]
    assert settings.graceful_timeout == 18  # whole seconds, longer than the drain
    assert settings.workers == 1 and not settings.preload_app
    assert settings.worker_class == "realtime.gunicorn_worker.RealtimeWorker"
    assert settings.wsgi_app == "realtime.gunicorn_worker:create_node()"


def test_gunicorn_reads_the_nodes_toml_file_too(load_settings, tmp_path):
    config_file = tmp_path / "node.toml"
    config_file.write_text('host = "::1"\nport = 6001\ndrain_timeout = 3\n')
    settings = load_settings(REALTIME_CONFIG=str(config_file))
    assert settings.bind == ["[::1]:6001"]
    assert settings.graceful_timeout == 8


def test_the_defaults_are_run_py_serves(load_settings):
    settings = load_settings()
    assert settings.bind == ["127.0.0.1:5000"]
    assert settings.graceful_timeout == 15
