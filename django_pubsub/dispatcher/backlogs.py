"""Measuring the backlogs of the topics with a PUBSUB["BACKPRESSURE"] limit, so that
publishers can compare with a recent figure instead of counting per publish."""

from __future__ import annotations

import time
from datetime import datetime

from .. import backpressure


class Backlogs:
    def __init__(self) -> None:
        self._next_look = 0.0

    def look(self, now: datetime) -> None:
        """Measure, at most every backpressure.BACKLOG_INTERVAL seconds."""
        if time.monotonic() < self._next_look:
            return
        self._next_look = time.monotonic() + backpressure.BACKLOG_INTERVAL
        backpressure.measure_limited(now)
