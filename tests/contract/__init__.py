"""Behaviour every Broker and PresenceStore must show; each implementation's tests reuse it."""
