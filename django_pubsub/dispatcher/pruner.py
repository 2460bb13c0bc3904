"""The pruner: a thread of its own, with its own connection, that runs retention's prune
every PRUNE_INTERVAL, when no other process is pruning. Its statements are short, so no
claim, ack or publish waits on it for long, and it never holds up the loop."""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable
from datetime import datetime

from django.db import Error, connections

from .. import retention
from ..conf import pubsub_settings
from ..retry import ErrorBackoff

logger = logging.getLogger("django_pubsub.retention")

# The first prune comes after at most this many seconds (or PRUNE_INTERVAL, if shorter):
# soon after a deploy, but not in the same moment as every other dispatcher's.
FIRST_PRUNE = 60.0


class Pruner:
    def __init__(self, clock: Callable[[], datetime]) -> None:
        self.clock = clock
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pubsub-pruner", daemon=True)

    def start(self) -> None:
        if pubsub_settings.prune_interval is not None:
            self._thread.start()

    def stop(self) -> None:
        """Stop between two statements; the thread closes its connection."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def _run(self) -> None:
        errors = ErrorBackoff(base=1.0, maximum=60.0)
        wait = random.uniform(0.5, 1.0) * min(FIRST_PRUNE, self._interval())
        try:
            while not self._stop.wait(wait):
                wait = self._interval()
                try:
                    self.prune_once()
                    errors.succeeded()
                except Error as exc:
                    wait = min(wait, errors.failed())
                    logger.warning("prune failed, again in %.0fs: %s", wait, exc)
                    connections["default"].close()
                except Exception:  # a lock file it may not open, say: never end the thread
                    wait = min(wait, errors.failed())
                    logger.exception("prune failed, again in %.0fs", wait)
        finally:
            connections["default"].close()

    def prune_once(self) -> retention.Pruned | None:
        """One prune, if no other process is pruning; what it removed."""
        with retention.exclusive() as held:
            if not held:
                logger.debug("another process is pruning; not this time")
                return None
            pruned = retention.prune(self.clock(), should_stop=self._stop.is_set)
        if pruned.total:
            kinds = ", ".join(f"{kind}={count}" for kind, count in sorted(pruned.by_kind().items()))
            logger.info("pruned %s rows %s", pruned.total, kinds)
        return pruned

    @staticmethod
    def _interval() -> float:
        interval = pubsub_settings.prune_interval
        return 3600.0 if interval is None else interval
