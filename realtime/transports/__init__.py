"""Transports: they move a session's bytes, nothing else (see :class:`.base.Transport`)."""
