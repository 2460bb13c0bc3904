"""Stopping: SIGINT and SIGTERM for runpubsub (the first stops claiming and drains, a
second exits at once; the handlers that were there before come back when the dispatcher
stops), and the drain itself."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from types import FrameType

from django.db import Error, connections

from .claimer import Claimer
from .outcomes import OutcomeRecorder
from .workers import WorkerPool

logger = logging.getLogger("django_pubsub.dispatcher")

SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def on_stop(stop: Callable[[], None]) -> Iterator[None]:
    """Call ``stop`` at the first SIGINT or SIGTERM inside the block; exit the process at
    the second. Only in the main thread, where Python delivers signals; elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    seen = 0

    def handle(signum: int, frame: FrameType | None) -> None:
        nonlocal seen
        seen += 1
        if seen > 1:
            logger.warning("second signal, exiting at once signal=%s", signum)
            os._exit(128 + signum)
        logger.info("signal received, draining signal=%s", signum)
        stop()

    previous = {signum: signal.signal(signum, handle) for signum in SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def drain(
    pool: WorkerPool,
    claimer: Claimer,
    outcomes: OutcomeRecorder,
    *,
    grace: float,
    pause: Callable[[], None],
    clock: Callable[[], datetime],
) -> None:
    """Give back unstarted work, attempt and all; let running handlers finish within
    ``grace`` seconds, recording what they do (``pause`` waits a moment, less if one
    finishes); then fail the attempts of those still running. Their leases are kept
    meanwhile by the lease keeper, or another dispatcher would start them a second time
    while they finish here."""
    claimer.give_back(pool.take_unstarted())
    deadline = time.monotonic() + grace
    while (pool.busy_chunks or claimer.orphans) and time.monotonic() < deadline:
        if claimer.orphans:
            claimer.give_back_orphans(quietly=True)  # a failed claim's, if the database is back
        if not (pool.busy_chunks or claimer.orphans):
            break
        pause()
        try:
            outcomes.time_out()
            outcomes.record_finished(clock())
        except Error as exc:
            logger.error("database error while draining, retrying: %s", " ".join(str(exc).split()))
            logger.debug("the database error's traceback", exc_info=True)
            try:
                connections["default"].close()
            except Error:
                pass
    finished, still_running = pool.close()
    outcomes.record(finished, clock())
    outcomes.abandon(still_running)
