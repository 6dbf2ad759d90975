"""Node configuration: defaults, then a TOML file, then ``REALTIME_*`` variables, then CLI flags.

Each layer overrides the one before it. Every field ``x`` has the environment variable
``REALTIME_X`` and the CLI flag ``--x`` (underscores become dashes), so the three stay in step by
construction rather than by hand. In the TOML file, fields of the ``auth`` and ``limits``
sections go in ``[auth]`` and ``[limits]`` tables (or at the top level, like every other
field; ``webhooks`` and ``proxy`` too), and channel namespaces in ``[namespaces.<name>]``
tables (file only).

Secrets (the JWT secrets, the API keys) can also come from a file, so that they stay off the
command line: ``--jwt-secret-file``, ``REALTIME_JWT_SECRET_FILE``, ``jwt_secret_file = ...``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import secrets
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ENV_PREFIX = "REALTIME_"
NODE_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,32}")
NAMESPACE_RE = re.compile(r"[A-Za-z0-9_.@-]{1,100}")
FRAME_OVERHEAD = 16 * 1024
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
LOG_FORMATS = ("text", "json")
SECTIONS = ("auth", "limits", "webhooks", "proxy")
MIN_HMAC_SECRET = 32
SUBSCRIBE_RULES = ("anyone", "authenticated", "granted", "owner")
PUBLISH_RULES = ("anyone", "subscribers", "authenticated", "server")


class ConfigError(ValueError):
    """A configuration value is missing, malformed or out of range."""


def _default_node_id() -> str:
    return "node-" + secrets.token_hex(3)


def _field(default: Any = dataclasses.MISSING, *, help: str, section: str = "",
           secret: bool = False, flag: str | None = None, **kwargs: Any) -> Any:
    """A config field; ``metadata`` drives the flag, the environment and the TOML layout."""
    metadata = {"help": help, "section": section, "secret": secret, "flag": flag}
    if default is not dataclasses.MISSING:
        kwargs["default"] = default
    return dataclasses.field(metadata=metadata, repr=not secret, **kwargs)


@dataclasses.dataclass
class NamespaceConfig:
    """Rules for the channels of one namespace: the part of a channel's name before its ``:``.

    ``subscribe``: who may subscribe (and read history and presence): ``anyone``,
    ``authenticated`` (a connection with a valid token), ``granted`` (the token's ``channels``
    claim names it), ``owner`` (the rest of the name is the user's id: ``user:<id>``).
    ``publish``: who may publish from a client: ``anyone``, ``subscribers`` (connections
    subscribed to the channel), ``authenticated``, ``server`` (only the HTTP API and the
    emitter). ``None`` sizes and TTLs take the node's ``--history-size``, ``--history-ttl`` and
    ``--max-message-size``. ``proxy_subscribe_url`` and ``proxy_publish_url``: the backend
    that decides this namespace's client subscribes and publishes (:mod:`realtime.proxy`);
    ``None`` takes the node's ``--proxy-subscribe-url``/``--proxy-publish-url``, ``""`` asks
    no backend for this namespace.
    """

    subscribe: str = "anyone"
    publish: str = "anyone"
    presence: bool = True
    join_leave: bool = False
    history_size: int | None = None
    history_ttl: float | None = None
    recovery: bool = True
    max_message_size: int | None = None
    proxy_subscribe_url: str | None = None
    proxy_publish_url: str | None = None

    def validate(self, name: str) -> None:
        where = f"namespace {name!r}" if name else "the default namespace"
        if self.subscribe not in SUBSCRIBE_RULES:
            raise ConfigError(f"{where}: subscribe must be one of {', '.join(SUBSCRIBE_RULES)}")
        if self.publish not in PUBLISH_RULES:
            raise ConfigError(f"{where}: publish must be one of {', '.join(PUBLISH_RULES)}")
        for option in ("presence", "join_leave", "recovery"):
            if not isinstance(getattr(self, option), bool):
                raise ConfigError(f"{where}: {option} must be true or false")
        for option in ("history_size", "max_message_size"):
            value = getattr(self, option)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                      or value < 1):
                raise ConfigError(f"{where}: {option} must be a whole number of at least 1")
        if self.history_ttl is not None and (not isinstance(self.history_ttl, int | float)
                                             or isinstance(self.history_ttl, bool)
                                             or self.history_ttl <= 0):
            raise ConfigError(f"{where}: history_ttl must be a positive number of seconds")
        for option in ("proxy_subscribe_url", "proxy_publish_url"):
            value = getattr(self, option)
            if value is not None and (not isinstance(value, str) or not _is_proxy_url(value)):
                raise ConfigError(f"{where}: {option} must be an http:// or https:// URL, or "
                                  f"\"\" for none")


def _is_proxy_url(url: str) -> bool:
    """An empty string (no backend) or an http(s) URL."""
    return not url or url.startswith(("http://", "https://"))


# Namespaces that exist without configuration (a [namespaces.<name>] table changes any option
# of them). "" is the default namespace: channels without a namespace, or with one that is not
# configured.
BUILTIN_NAMESPACES: Mapping[str, NamespaceConfig] = {
    "": NamespaceConfig(),
    "user": NamespaceConfig(subscribe="owner", publish="server"),
    "private": NamespaceConfig(subscribe="granted", publish="subscribers"),
    "chat": NamespaceConfig(join_leave=True),
}


@dataclasses.dataclass
class Config:
    """Everything a node needs to start. Field docs double as ``--help`` text."""

    host: str = _field("127.0.0.1", help="address to listen on")
    port: int = _field(5000, help="TCP port to listen on")
    broker: str = _field("memory://",
                         help="broker URL: memory:// (one node) or redis://host:port/db")
    presence: str = _field("", help="presence store URL (default: the broker URL)")
    node_id: str = _field(default_factory=_default_node_id,
                          help="this node's id, [A-Za-z0-9_-]{1,32} (default: random)")
    history_size: int = _field(100, help="publications kept per channel (namespaces may "
                                         "override it)")
    history_ttl: float = _field(300.0, help="seconds a channel's publications are kept")
    max_message_size: int = _field(64 * 1024, help="largest publication data, bytes of JSON")
    presence_ttl: float = _field(30.0,
                                 help="seconds before a dead node's presence entries expire")
    idempotency_ttl: float = _field(300.0, help="seconds a publish's idempotency_key is "
                                                "remembered: a repeat publishes nothing")
    drain_timeout: float = _field(10.0, help="seconds a node takes on SIGTERM to close its "
                                             "clients gradually before it exits")
    ping_interval: float = _field(25.0, help="Engine.IO ping interval, seconds")
    ping_timeout: float = _field(20.0, help="Engine.IO ping timeout, seconds")
    allowed_origins: str = _field("", help="comma-separated browser origins allowed to "
                                           "connect; '*' for any; empty: same origin only")
    allowed_hosts: str = _field("", help="comma-separated Host header values the node answers "
                                         "(empty: any)")
    trusted_proxies: str = _field("127.0.0.0/8,::1", help="comma-separated addresses or "
                                  "networks of proxies whose X-Forwarded-For is believed")
    static_dir: str = _field("", help="folder with the browser pages (default: those installed "
                                      "with realtime, or static/ of a source checkout)")
    log_level: str = _field("info", help="logging level")
    log_format: str = _field("text", help="log lines as plain text, or json: one JSON object "
                                          "per line (time, level, logger, node, message, and "
                                          "the event's sid, user, channel, reason, code)")
    log_connections: bool = _field(False, help="log one info line per connection lifecycle "
                                               "event (connected, upgraded, disconnected)")

    jwt_secret: str = _field("", section="auth", secret=True,
                             help="HS256 secret that connection tokens are signed with")
    jwt_previous_secret: str = _field("", section="auth", secret=True,
                                      help="the previous HS256 secret, still accepted while "
                                           "tokens signed with it are out there")
    jwt_public_key: str = _field("", section="auth", help="PEM file with the public key "
                                 "(RSA, EC or Ed25519) that tokens are signed with")
    jwt_jwks_url: str = _field("", section="auth",
                               help="JWKS URL with the keys tokens are signed with")
    jwt_audience: str = _field("", section="auth", help="required token audience (aud)")
    jwt_issuer: str = _field("", section="auth", help="required token issuer (iss)")
    allow_anonymous: bool = _field(False, section="auth",
                                   help="with a JWT key, let clients without a token connect "
                                        "as anonymous users")
    api_keys: list[str] = _field(  # noqa: RUF009 - _field returns a dataclasses.Field
                                 default_factory=list, section="auth", secret=True,
                                 flag="--api-key",
                                 help="an HTTP API key (repeatable; REALTIME_API_KEYS: "
                                      "comma-separated); none: the API answers loopback only")

    max_outbound_buffer: int = _field(1024 * 1024, section="limits",
                                      help="bytes a client may fall behind before it is "
                                           "disconnected as slow")
    events_per_second: float = _field(100.0, section="limits",
                                      help="client events a connection may send per second, "
                                           "sustained")
    events_burst: int = _field(200, section="limits",
                               help="client events a connection may send at once")
    max_subscriptions: int = _field(128, section="limits",
                                    help="channels one connection may subscribe to")
    max_connections_per_user: int = _field(100, section="limits",
                                           help="connections one user may hold on a node")
    max_connections: int = _field(0, section="limits", help="connections (HTTP and "
                                  "WebSocket) a node holds at once; 0: what its open-file "
                                  "limit allows")
    header_timeout: float = _field(10.0, section="limits",
                                   help="seconds a client has to send a request's headers")
    idle_timeout: float = _field(60.0, section="limits",
                                 help="seconds an idle keep-alive HTTP connection is kept")

    proxy_connect_url: str = _field(
        "", section="proxy",
        help="backend URL that decides who a connecting client is (a JSON POST; see the "
             "README's Backend proxy)")
    proxy_subscribe_url: str = _field(
        "", section="proxy",
        help="backend URL that decides client subscribes (namespaces may override it)")
    proxy_publish_url: str = _field(
        "", section="proxy",
        help="backend URL that decides, and may rewrite, client publishes (namespaces may "
             "override it)")
    proxy_headers: str = _field(
        "", section="proxy",
        help="comma-separated request headers forwarded to the backend proxy, e.g. "
             "Cookie,Authorization")
    proxy_timeout: float = _field(
        3.0, section="proxy",
        help="seconds a backend proxy call may take before the client is answered unavailable")

    webhook_urls: list[str] = _field(  # noqa: RUF009 - _field returns a dataclasses.Field
        default_factory=list, section="webhooks", flag="--webhook-url",
        help="URL that webhook events are POSTed to (repeatable; REALTIME_WEBHOOK_URLS: "
             "comma-separated); none: no webhooks")
    webhook_secret: str = _field("", section="webhooks", secret=True,
                                 help="secret the X-Realtime-Signature HMAC-SHA256 of every "
                                      "webhook body is made with (needed with a webhook URL)")
    offline_grace: float = _field(5.0, section="webhooks",
                                  help="seconds a user has no connection before user_offline "
                                       "is sent (a page reload is not an offline)")

    namespaces: dict[str, NamespaceConfig] = dataclasses.field(
        default_factory=dict, metadata={"file_only": True})

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first bad field."""
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be 0..65535, not {self.port}")
        if not NODE_ID_RE.fullmatch(self.node_id):
            raise ConfigError(f"node_id must match [A-Za-z0-9_-]{{1,32}}, not {self.node_id!r}")
        for name in ("history_size", "max_message_size", "max_outbound_buffer", "events_burst",
                     "max_subscriptions", "max_connections_per_user"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1")
        if self.max_connections < 0:
            raise ConfigError("max_connections must be 0 (no cap of its own) or more")
        for name in ("history_ttl", "presence_ttl", "idempotency_ttl", "drain_timeout",
                     "ping_interval", "ping_timeout", "events_per_second", "header_timeout",
                     "idle_timeout", "proxy_timeout"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive")
        if self.log_level.lower() not in LOG_LEVELS:
            raise ConfigError(f"log_level must be one of {', '.join(LOG_LEVELS)}")
        if self.log_format not in LOG_FORMATS:
            raise ConfigError(f"log_format must be one of {', '.join(LOG_FORMATS)}")
        keys = [name for name in ("jwt_secret", "jwt_public_key", "jwt_jwks_url")
                if getattr(self, name)]
        if len(keys) > 1:
            raise ConfigError(f"give one of jwt_secret, jwt_public_key, jwt_jwks_url, not "
                              f"{' and '.join(keys)}")
        if self.jwt_previous_secret and not self.jwt_secret:
            raise ConfigError("jwt_previous_secret needs jwt_secret")
        for name in ("jwt_secret", "jwt_previous_secret"):
            value = getattr(self, name)
            if value and len(value.encode()) < MIN_HMAC_SECRET:
                # RFC 7518 3.2: an HS256 key is at least as long as the hash (256 bits).
                raise ConfigError(f"{name} must be at least {MIN_HMAC_SECRET} bytes")
        if self.jwt_public_key and not Path(self.jwt_public_key).is_file():
            raise ConfigError(f"jwt_public_key: no such file {self.jwt_public_key!r}")
        if self.jwt_jwks_url and not self.jwt_jwks_url.startswith(("http://", "https://")):
            raise ConfigError("jwt_jwks_url must be an http:// or https:// URL")
        if any(not key or key != key.strip() for key in self.api_keys):
            raise ConfigError("api_keys must be non-empty, without surrounding spaces")
        for name in ("proxy_connect_url", "proxy_subscribe_url", "proxy_publish_url"):
            if not _is_proxy_url(getattr(self, name)):
                raise ConfigError(f"{name} must be an http:// or https:// URL")
        self._validate_webhooks()
        try:
            self.trusted_proxy_networks  # noqa: B018 - parsing is the check
        except ValueError as exc:
            raise ConfigError(f"trusted_proxies: {exc}") from None
        for name, namespace in self.namespaces.items():
            if name and not NAMESPACE_RE.fullmatch(name):
                raise ConfigError(f"namespace name {name!r} must match [A-Za-z0-9_.@-]{{1,100}}")
            namespace.validate(name)

    def _validate_webhooks(self) -> None:
        for url in self.webhook_urls:
            if not url.startswith(("http://", "https://")):
                raise ConfigError(f"webhook_urls: {url!r} is not an http:// or https:// URL")
        if self.webhook_urls and not self.webhook_secret:
            # An unsigned webhook could be forged by anyone who can reach the receiver.
            raise ConfigError("webhook_urls need webhook_secret (webhook_secret_file)")
        if self.offline_grace < 0:
            raise ConfigError("offline_grace must be 0 or more seconds")

    @property
    def frame_overhead(self) -> int:
        """Room for the protocol's envelope around the largest allowed publication."""
        return FRAME_OVERHEAD

    @property
    def presence_url(self) -> str:
        return self.presence or self.broker

    @property
    def jwt_configured(self) -> bool:
        """True when connections are verified with a JWT key."""
        return bool(self.jwt_secret or self.jwt_public_key or self.jwt_jwks_url)

    @property
    def cors_allowed_origins(self) -> list[str] | str | None:
        """The allowed origins: None checks same origin, '*' allows any."""
        origins = _split(self.allowed_origins)
        if not origins:
            return None
        if "*" in origins:
            return "*"
        return origins

    @property
    def allowed_host_names(self) -> frozenset[str]:
        """Host header values (without port) the node answers; empty: any."""
        return frozenset(host.lower() for host in _split(self.allowed_hosts))

    @property
    def proxy_header_names(self) -> tuple[str, ...]:
        """The request headers forwarded to the backend proxy, lower-case."""
        return tuple(dict.fromkeys(name.lower() for name in _split(self.proxy_headers)))

    @property
    def trusted_proxy_networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        return tuple(ipaddress.ip_network(item, strict=False)
                     for item in _split(self.trusted_proxies))

    def namespace(self, name: str) -> NamespaceConfig:
        """The rules of namespace ``name``: configured, built in, or the default namespace's."""
        found = self.namespaces.get(name)
        if found is not None:
            return found
        builtin = BUILTIN_NAMESPACES.get(name)
        if builtin is not None:
            return builtin
        return self.namespaces.get("") or BUILTIN_NAMESPACES[""]

    @classmethod
    def fields(cls) -> tuple[dataclasses.Field, ...]:
        """The fields that are flags and environment variables (not the namespaces)."""
        return tuple(f for f in dataclasses.fields(cls) if not f.metadata.get("file_only"))

    @classmethod
    def load(
        cls,
        overrides: Mapping[str, Any] | None = None,
        environ: Mapping[str, str] | None = None,
        config_file: str | None = None,
    ) -> Config:
        """Build a config from the layers: defaults < file < environment < ``overrides``.

        ``config_file`` defaults to ``REALTIME_CONFIG``. ``overrides`` holds the CLI flags that were
        given (``None`` values are ignored), secret files under ``<field>_file``.
        """
        environ = os.environ if environ is None else environ
        known = {f.name: f for f in cls.fields()}
        values: dict[str, Any] = {}
        namespaces: dict[str, NamespaceConfig] = {}
        config_file = config_file or environ.get(ENV_PREFIX + "CONFIG")
        if config_file:
            flat, namespaces = _read_file(config_file, known)
            _merge(values, flat, known, "the config file")
        layer = {}
        for field in cls.fields():
            for name in (field.name, field.name + "_file") if field.metadata["secret"] \
                    else (field.name,):
                raw = environ.get(ENV_PREFIX + name.upper())
                if raw is not None and raw != "":
                    layer[name] = raw
        _merge(values, layer, known, "the environment")
        _merge(values, {k: v for k, v in (overrides or {}).items() if v is not None}, known,
               "the command line")
        config = cls(**{name: _coerce(known[name], value) for name, value in values.items()},
                     namespaces=namespaces)
        return config

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)


def _split(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _merge(values: dict[str, Any], layer: Mapping[str, Any], known: Mapping[str, Any],
           where: str) -> None:
    """Put ``layer`` over ``values``, reading secret files; a later layer wins."""
    for name, value in layer.items():
        target = name[:-len("_file")] if name.endswith("_file") else name
        if target not in known or (name != target and not known[target].metadata["secret"]):
            raise ConfigError(f"unknown configuration key {name!r} in {where}")
        if name != target:
            if target in layer:
                raise ConfigError(f"give {target} or {name} in {where}, not both")
            value = _read_secret_file(str(value), known[target])
        values[target] = value


def _read_secret_file(path: str, field: dataclasses.Field) -> Any:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read {field.name}_file {path}: {exc.strerror}") from exc
    if str(field.type).startswith("list"):
        return [line.strip() for line in text.splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    return text.strip()


def _read_file(path: str, known: Mapping[str, Any],
               ) -> tuple[dict[str, Any], dict[str, NamespaceConfig]]:
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    flat: dict[str, Any] = {}
    namespaces: dict[str, NamespaceConfig] = {}
    for key, value in data.items():
        key = key.replace("-", "_")
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"[{key}] must be a table")
            for name, item in value.items():
                name = name.replace("-", "_")
                field = known.get(name.removesuffix("_file"))
                if field is None or field.metadata["section"] != key:
                    raise ConfigError(f"unknown configuration key {name!r} in [{key}]")
                flat[name] = item
        elif key == "namespaces":
            if not isinstance(value, dict):
                raise ConfigError("[namespaces] must hold one table per namespace")
            for name, options in value.items():
                namespaces[name] = _namespace_from_file(name, options)
        else:
            flat[key] = value
    return flat, namespaces


def _namespace_from_file(name: str, options: Any) -> NamespaceConfig:
    if not isinstance(options, dict):
        raise ConfigError(f"[namespaces.{name}] must be a table")
    options = {key.replace("-", "_"): value for key, value in options.items()}
    allowed = {f.name for f in dataclasses.fields(NamespaceConfig)}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ConfigError(f"[namespaces.{name}]: unknown options {', '.join(unknown)}")
    # Unset options keep what the namespace has built in (user:, private:, chat:).
    base = BUILTIN_NAMESPACES.get(name, BUILTIN_NAMESPACES[""])
    return dataclasses.replace(base, **options)


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _coerce(field: dataclasses.Field, value: Any) -> Any:
    kind = str(field.type)
    if kind.startswith("list"):
        if isinstance(value, str):
            return _split(value)
        if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
            return [v.strip() for v in value]
        raise ConfigError(f"{field.name} must be a list of strings")
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise ConfigError(f"{field.name} must be true or false, not {value!r}")
    converter = {"int": int, "float": float, "str": str}[kind]
    if isinstance(value, converter) and not isinstance(value, bool):
        return value
    if kind == "float" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    try:
        return converter(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{field.name} must be {converter.__name__}, not {value!r}") from exc
