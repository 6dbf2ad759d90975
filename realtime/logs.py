"""How a node logs: plain text (the default) or one JSON object per line (``--log-format json``).

A JSON line holds ``time`` (ISO 8601, UTC, milliseconds), ``level``, ``logger``, ``node``,
``message``, and the event's fields when the call passed them with ``extra=`` (the names in
:data:`EVENT_FIELDS`), plus ``exception`` (the traceback) when there is one. Log aggregators
read it without a parsing rule of their own.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from typing import Any, TextIO

from .config import LOG_FORMATS

# Fields of an event that a log call may pass with extra= (see connection_extra).
EVENT_FIELDS = ("sid", "user", "channel", "transport", "peer", "reason", "code")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Connection lifecycle lines (--log-connections) go to this logger, at info.
CONNECTIONS_LOGGER = "realtime.connections"


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines inside values are escaped)."""

    def __init__(self, node_id: str | None = None) -> None:
        super().__init__()
        self.node_id = node_id

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC)
            .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "node": self.node_id,
            "message": record.getMessage(),
        }
        for name in EVENT_FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.stack_info:
            entry["exception"] = self.formatStack(record.stack_info)
        # default=str: an extra that is not JSON (an object passed by mistake) still logs.
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure_logging(level: str, log_format: str = "text", node_id: str | None = None,
                      stream: TextIO | None = None) -> None:
    """Send the process's logs to ``stream`` (stderr) at ``level``, in ``log_format``.

    Like :func:`logging.basicConfig`, it does nothing to a root logger that already has
    handlers (a test runner's).
    """
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter(node_id) if log_format == "json"
                         else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler])
