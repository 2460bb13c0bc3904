"""SIGINT and SIGTERM for runpubsub: the first stops claiming and drains, a second exits
at once; the handlers that were there before come back when the dispatcher stops."""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

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
