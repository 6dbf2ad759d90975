"""Channel names and the default channel permission policy."""

from __future__ import annotations

import re

from .errors import BadRequest, Forbidden

CHANNEL_NAME_RE = re.compile(r"[A-Za-z0-9_.:@-]{1,200}")
USER_CHANNEL_PREFIX = "user:"
MAX_USER_ID_LENGTH = 64


def validate_channel(channel: object) -> str:
    """Return ``channel`` when it is a valid channel name, else raise :class:`BadRequest`."""
    if not isinstance(channel, str) or not CHANNEL_NAME_RE.fullmatch(channel):
        raise BadRequest("channel must be a string matching [A-Za-z0-9_.:@-]{1,200}")
    return channel


def personal_channel_owner(channel: str) -> str | None:
    """The user id that owns ``user:<id>``, or None for any other channel."""
    if channel.startswith(USER_CHANNEL_PREFIX):
        return channel[len(USER_CHANNEL_PREFIX):]
    return None


class ChannelPolicy:
    """Who may subscribe to and publish on which channel.

    The default policy: anyone may subscribe to and publish on any channel, except personal
    ``user:<id>`` channels, which only user ``<id>`` may subscribe to and no client may publish on
    (only the HTTP API and the emitter do). The security work replaces this with token claims and
    per-namespace rules; the edges only ever call these two methods.
    """

    def check_subscribe(self, user: str, channel: str) -> None:
        """Raise :class:`Forbidden` unless ``user`` may subscribe to ``channel``."""
        owner = personal_channel_owner(channel)
        if owner is not None and owner != user:
            raise Forbidden("only the owner may subscribe to a user: channel")

    def check_publish(self, user: str, channel: str) -> None:
        """Raise :class:`Forbidden` unless ``user`` may publish on ``channel``."""
        if personal_channel_owner(channel) is not None:
            raise Forbidden("clients may not publish on user: channels")
