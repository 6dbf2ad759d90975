"""Helpers shared by every test layer: waiting on conditions, recording broker events."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import gevent

from realtime_dev.processes import ProcessError, wait_for

# The source checkout the tests run from.
REPO = Path(__file__).resolve().parents[1]


def wait_until(predicate: Callable[[], Any], timeout: float = 5.0, interval: float = 0.01,
               message: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds.

    Sleeps with gevent so that greenlets of the code under test (deferred sends, broker
    readers) get to run in unit tests; outside gevent code it is an ordinary sleep.
    """
    try:
        return wait_for(predicate, timeout, message, interval, sleep=gevent.sleep)
    except ProcessError as exc:  # a test's wait that times out is a failed assertion
        raise AssertionError(str(exc)) from None


class RecordingHandler:
    """A BrokerEventHandler that remembers what it was given."""

    def __init__(self) -> None:
        self.publications: list = []
        self.joins: list[tuple[str, str]] = []
        self.leaves: list[tuple[str, str]] = []
        self.controls: list[bytes] = []
        self.resumptions = 0

    def on_publications(self, publications) -> None:
        self.publications.extend(publications)

    def on_delivery_resumed(self) -> None:
        self.resumptions += 1

    def on_join(self, channel: str, user: str) -> None:
        self.joins.append((channel, user))

    def on_leave(self, channel: str, user: str) -> None:
        self.leaves.append((channel, user))

    def on_control(self, payload: bytes) -> None:
        self.controls.append(payload)

    def offsets(self, channel: str) -> list[int]:
        return [p.offset for p in self.publications if p.channel == channel]
