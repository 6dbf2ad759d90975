"""Presence stores, chosen by URL (see :func:`realtime.backends.create_presence_store`)."""

from .base import PresenceMember, PresenceStore
from .memory import MemoryPresenceStore

__all__ = ["MemoryPresenceStore", "PresenceMember", "PresenceStore"]
