"""Node configuration: defaults, then a TOML file, then ``REALTIME_*`` variables, then CLI flags.

Each layer overrides the one before it. Every field ``x`` has the environment variable
``REALTIME_X`` and the CLI flag ``--x`` (underscores become dashes), so the three stay in step by
construction rather than by hand.
"""

from __future__ import annotations

import dataclasses
import os
import re
import secrets
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ENV_PREFIX = "REALTIME_"
NODE_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,32}")
FRAME_OVERHEAD = 16 * 1024
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
REPO_ROOT = Path(__file__).resolve().parent.parent


class ConfigError(ValueError):
    """A configuration value is missing, malformed or out of range."""


def _default_node_id() -> str:
    return "node-" + secrets.token_hex(3)


@dataclasses.dataclass
class Config:
    """Everything a node needs to start. Field docs double as ``--help`` text."""

    host: str = dataclasses.field(default="127.0.0.1", metadata={"help": "address to listen on"})
    port: int = dataclasses.field(default=5000, metadata={"help": "TCP port to listen on"})
    broker: str = dataclasses.field(
        default="memory://",
        metadata={"help": "broker URL: memory:// (one node) or redis://host:port/db"},
    )
    presence: str = dataclasses.field(
        default="", metadata={"help": "presence store URL (default: the broker URL)"}
    )
    node_id: str = dataclasses.field(
        default_factory=_default_node_id,
        metadata={"help": "this node's id, [A-Za-z0-9_-]{1,32} (default: random)"},
    )
    history_size: int = dataclasses.field(
        default=100, metadata={"help": "publications kept per channel"}
    )
    history_ttl: float = dataclasses.field(
        default=300.0, metadata={"help": "seconds a channel's publications are kept"}
    )
    max_message_size: int = dataclasses.field(
        default=64 * 1024, metadata={"help": "largest publication data, bytes of JSON"}
    )
    presence_ttl: float = dataclasses.field(
        default=30.0, metadata={"help": "seconds before a dead node's presence entries expire"}
    )
    ping_interval: float = dataclasses.field(
        default=25.0, metadata={"help": "Engine.IO ping interval, seconds"}
    )
    ping_timeout: float = dataclasses.field(
        default=20.0, metadata={"help": "Engine.IO ping timeout, seconds"}
    )
    max_outbound_buffer: int = dataclasses.field(
        default=1024 * 1024,
        metadata={"help": "bytes a WebSocket client may fall behind before it is disconnected "
                  "as slow"},
    )
    allowed_origins: str = dataclasses.field(
        default="",
        metadata={"help": "comma-separated browser origins allowed to connect; '*' for any; "
                  "empty: same origin only"},
    )
    static_dir: str = dataclasses.field(
        default=str(REPO_ROOT / "static"), metadata={"help": "folder with the browser pages"}
    )
    log_level: str = dataclasses.field(default="info", metadata={"help": "logging level"})

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first bad field."""
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be 0..65535, not {self.port}")
        if not NODE_ID_RE.fullmatch(self.node_id):
            raise ConfigError(f"node_id must match [A-Za-z0-9_-]{{1,32}}, not {self.node_id!r}")
        for name in ("history_size", "max_message_size", "max_outbound_buffer"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1")
        for name in ("history_ttl", "presence_ttl", "ping_interval", "ping_timeout"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive")
        if self.log_level.lower() not in LOG_LEVELS:
            raise ConfigError(f"log_level must be one of {', '.join(LOG_LEVELS)}")

    @property
    def frame_overhead(self) -> int:
        """Room for the protocol's envelope around the largest allowed publication."""
        return FRAME_OVERHEAD

    @property
    def presence_url(self) -> str:
        return self.presence or self.broker

    @property
    def cors_allowed_origins(self) -> list[str] | str | None:
        """The value python-socketio expects: None checks same origin, '*' allows any."""
        origins = [o.strip() for o in self.allowed_origins.split(",") if o.strip()]
        if not origins:
            return None
        if "*" in origins:
            return "*"
        return origins

    @classmethod
    def fields(cls) -> tuple[dataclasses.Field, ...]:
        return dataclasses.fields(cls)

    @classmethod
    def load(
        cls,
        overrides: Mapping[str, Any] | None = None,
        environ: Mapping[str, str] | None = None,
        config_file: str | None = None,
    ) -> Config:
        """Build a config from the layers: defaults < file < environment < ``overrides``.

        ``config_file`` defaults to ``REALTIME_CONFIG``. ``overrides`` holds the CLI flags that were
        given (``None`` values are ignored).
        """
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        config_file = config_file or environ.get(ENV_PREFIX + "CONFIG")
        if config_file:
            values.update(_read_file(config_file))
        for field in cls.fields():
            raw = environ.get(ENV_PREFIX + field.name.upper())
            if raw is not None and raw != "":
                values[field.name] = raw
        for name, value in (overrides or {}).items():
            if value is not None:
                values[name] = value
        known = {f.name: f for f in cls.fields()}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(f"unknown configuration keys: {', '.join(unknown)}")
        return cls(**{name: _coerce(known[name], value) for name, value in values.items()})

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)


def _read_file(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    return {key.replace("-", "_"): value for key, value in data.items()}


def _coerce(field: dataclasses.Field, value: Any) -> Any:
    kind = {"int": int, "float": float, "str": str}[str(field.type)]
    if isinstance(value, kind) and not isinstance(value, bool):
        return value
    try:
        return kind(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{field.name} must be {kind.__name__}, not {value!r}") from exc
