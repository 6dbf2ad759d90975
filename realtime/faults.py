"""Logging a fault that lasts: one line when it starts, one when it ends.

A background loop that retries (the broker's pub/sub reader, the node's heartbeat) would write a
line per attempt while Redis is down: a warning, or a traceback, every half second per node. An
operator wants to know that the outage began, and when it ended and how long it lasted.
"""

from __future__ import annotations

import logging
import random
import time


class FaultLog:
    """Reports a recurring failure of ``subject`` once when it starts and once when it ends.

    Call :meth:`failed` on every failed attempt and :meth:`recovered` after every successful
    one; only the first failure of a run and the first success after it are logged. An
    expected failure (``unexpected=False``: Redis unreachable) is a warning without traceback;
    an unexpected one (a bug) is logged with its traceback, still once per run.
    """

    def __init__(self, logger: logging.Logger, subject: str) -> None:
        self._logger = logger
        self.subject = subject
        self.failing_since: float | None = None  # monotonic time of the run's first failure
        self.failures = 0

    @property
    def failing(self) -> bool:
        return self.failing_since is not None

    def failed(self, error: BaseException, *, unexpected: bool = False) -> None:
        self.failures += 1
        if self.failing_since is not None:
            return
        self.failing_since = time.monotonic()
        if unexpected:
            self._logger.error("%s failed; retrying until it works", self.subject,
                               exc_info=error)
        else:
            self._logger.warning("%s failed: %s; retrying until it works", self.subject, error)

    def recovered(self) -> None:
        if self.failing_since is None:
            return
        lasted = time.monotonic() - self.failing_since
        self._logger.warning("%s works again after %.1f s (%d failed attempts)", self.subject,
                             lasted, self.failures)
        self.failing_since, self.failures = None, 0


class Backoff:
    """Jittered exponential delays between attempts: ``first`` doubling up to ``ceiling``.

    The jitter (±50 %) keeps the nodes of a deployment from retrying in step after an outage
    they all saw at once.
    """

    def __init__(self, first: float, ceiling: float) -> None:
        self.first = first
        self.ceiling = ceiling
        self._next = first

    def next_delay(self) -> float:
        delay = self._next * random.uniform(0.5, 1.5)
        self._next = min(self._next * 2, self.ceiling)
        return min(delay, self.ceiling)

    def reset(self) -> None:
        self._next = self.first
