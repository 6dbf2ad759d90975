"""The JSON log format and the log settings of the configuration."""

from __future__ import annotations

import datetime
import io
import json
import logging
import sys

import pytest

from realtime.cli import build_parser
from realtime.config import Config, ConfigError
from realtime.logs import JsonFormatter
from realtime_dev.command import node_log_flags


def record(message: str, *args, level=logging.INFO, exc_info=None, **extra) -> logging.LogRecord:
    return logging.getLogger("realtime.test").makeRecord(
        "realtime.test", level, __file__, 1, message, args, exc_info, extra=extra)


def test_a_json_line_has_the_fixed_fields_and_the_events_fields():
    line = JsonFormatter("n1").format(record("closed %s: %s", "s1", "slow", sid="s1",
                                             user="alice", reason="slow", code=None))
    entry = json.loads(line)
    assert entry["level"] == "info" and entry["logger"] == "realtime.test"
    assert entry["node"] == "n1" and entry["message"] == "closed s1: slow"
    assert entry["sid"] == "s1" and entry["user"] == "alice" and entry["reason"] == "slow"
    assert "code" not in entry and "channel" not in entry  # absent fields are left out
    when = datetime.datetime.fromisoformat(entry["time"])
    assert entry["time"].endswith("Z") and when.utcoffset() == datetime.timedelta(0)


def test_a_json_line_stays_one_line_with_newlines_and_tracebacks():
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        made = record("failed\nhere", level=logging.ERROR, exc_info=sys.exc_info())
    line = JsonFormatter("n1").format(made)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["message"] == "failed\nhere" and "ValueError: boom" in entry["exception"]


def test_log_format_comes_from_flags_environment_and_toml(tmp_path):
    assert Config().log_format == "text" and Config().log_connections is False
    args = build_parser().parse_args(["serve", "--log-format", "json", "--log-connections"])
    assert (args.log_format, args.log_connections) == ("json", True)
    assert Config.load(environ={"REALTIME_LOG_FORMAT": "json"}).log_format == "json"
    config_file = tmp_path / "realtime.toml"
    config_file.write_text('log_format = "json"\nlog_connections = true\n')
    loaded = Config.load(environ={}, config_file=str(config_file))
    assert loaded.log_format == "json" and loaded.log_connections is True
    with pytest.raises(ConfigError, match="log_format"):
        Config(log_format="xml")


def test_the_cluster_passes_its_log_flags_to_every_node():
    args = build_parser().parse_args(["cluster", "--log-format", "json", "--log-connections"])
    assert node_log_flags(args) == ["--log-format", "json", "--log-connections"]
    assert node_log_flags(build_parser().parse_args(["cluster"])) == []


def test_configure_logging_writes_json_lines(monkeypatch):
    from realtime import logs

    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])
    monkeypatch.setattr(root, "level", root.level)
    stream = io.StringIO()
    logs.configure_logging("info", "json", "n7", stream=stream)
    logging.getLogger("realtime.x").info("hello", extra={"channel": "room"})
    entry = json.loads(stream.getvalue().splitlines()[-1])
    assert entry["node"] == "n7" and entry["channel"] == "room" and entry["message"] == "hello"
