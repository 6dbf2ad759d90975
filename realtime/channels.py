"""Channel names, namespaces, and who may subscribe to and publish on which channel.

A channel's namespace is the part of its name before the first ``:`` (``chat:lobby`` is in
``chat``; ``lobby`` is in the default namespace). Each namespace has rules
(:class:`~realtime.config.NamespaceConfig`): built in for ``user:``, ``private:`` and ``chat:``,
configured in ``[namespaces.<name>]`` tables, the default namespace's for the rest.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from .config import Config, NamespaceConfig
from .errors import BadRequest, Forbidden

if TYPE_CHECKING:
    from .auth import Identity

CHANNEL_NAME_RE = re.compile(r"[A-Za-z0-9_.:@-]{1,200}")
PRIVATE_NAMESPACE = "private"


def validate_channel(channel: object) -> str:
    """Return ``channel`` when it is a valid channel name, else raise :class:`BadRequest`."""
    if not isinstance(channel, str) or not CHANNEL_NAME_RE.fullmatch(channel):
        raise BadRequest("channel must be a string matching [A-Za-z0-9_.:@-]{1,200}")
    return channel


def namespace_of(channel: str) -> str:
    """The namespace of ``channel``: the part before its first ``:`` ("" without one)."""
    namespace, colon, _ = channel.partition(":")
    return namespace if colon else ""


class ChannelPolicy:
    """The rules of every namespace, and the checks the edges make with them.

    Clients: :meth:`check_subscribe` (which also guards history and presence reads) and
    :meth:`check_publish`. Backends (HTTP API, emitter) are not subject to the client rules,
    only to the namespace's data limits (:meth:`rules`). Refusals raise
    :class:`~realtime.errors.Forbidden`.
    """

    def __init__(self, config: Config | None = None) -> None:
        self.config = config or Config()
        self._cache: dict[str, NamespaceConfig] = {}

    def rules(self, channel: str) -> NamespaceConfig:
        """The rules of the namespace ``channel`` is in."""
        namespace = namespace_of(channel)
        rules = self._cache.get(namespace)
        if rules is None:
            rules = self._cache[namespace] = self.config.namespace(namespace)
        return rules

    def check_subscribe(self, user: str, identity: Identity | None, channel: str) -> None:
        """Raise Forbidden unless the connection (``user``, its token's ``identity``, None when
        anonymous) may subscribe to ``channel``, read its history and presence."""
        namespace = namespace_of(channel)
        authenticated = identity is not None and identity.authenticated
        if namespace == PRIVATE_NAMESPACE and not authenticated:
            # Whatever the configuration says: anonymous connections never reach private:.
            raise Forbidden("private: channels need a token that grants them")
        if identity is not None and identity.grants_channel(channel):
            return
        rule = self.rules(channel).subscribe
        if rule == "anyone":
            return
        if rule == "authenticated" and authenticated:
            return
        if rule == "owner" and channel[len(namespace) + 1:] == user:
            return
        raise Forbidden(_REFUSALS[rule].format(namespace=namespace or "default"))

    def check_publish(self, user: str, identity: Identity | None, channel: str,
                      subscribed: bool) -> None:
        """Raise Forbidden unless the connection may publish on ``channel`` from a client
        (``subscribed``: it is subscribed to it)."""
        authenticated = identity is not None and identity.authenticated
        if namespace_of(channel) == PRIVATE_NAMESPACE and not authenticated:
            raise Forbidden("private: channels need a token that grants them")
        rule = self.rules(channel).publish
        if rule == "anyone" or (rule == "subscribers" and subscribed) or (
                rule == "authenticated" and authenticated):
            return
        raise Forbidden({
            "subscribers": "only subscribers of the channel may publish on it",
            "authenticated": "only connections with a token may publish on this channel",
            "server": "clients may not publish on this channel; only the server does",
        }[rule])


_REFUSALS = {
    "authenticated": "only connections with a token may subscribe to {namespace}: channels",
    "granted": "{namespace}: channels need a token that grants them",
    "owner": "only the owner may subscribe to a {namespace}: channel",
}
