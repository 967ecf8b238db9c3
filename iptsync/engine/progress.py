"""Progress lines for long syncs: how far a sync has got, at most every few seconds.

A first sync at 10,000 services takes tens of seconds; without a word meanwhile, an operator
cannot tell a slow sync from a hung one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

PROGRESS_INTERVAL = 5.0  # seconds between two progress lines of one sync


class Progress:
    """Logs one sync's progress when ``interval`` seconds have passed since the last line."""

    def __init__(self, interval: float = PROGRESS_INTERVAL,
                 clock: Callable[[], float] = time.monotonic,
                 started: float | None = None) -> None:
        self.interval = interval
        self.clock = clock
        self.started = clock() if started is None else started
        self._last = self.started

    def report(self, message: str, *args: object) -> None:
        """Log ``message % args`` and the seconds so far, if a line is due."""
        now = self.clock()
        if now - self._last < self.interval:
            return
        self._last = now
        log.info(f"{message} (%.1fs so far)", *args, now - self.started)
