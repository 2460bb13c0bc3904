"""Wake-ups on PostgreSQL: publish() sends NOTIFY, the dispatcher LISTENs.

PostgreSQL delivers a NOTIFY only when the publishing transaction commits, and drops it if
that rolls back, so a wake-up never runs ahead of the data. Polling stays the safety net: a
missed notification only costs one poll interval.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from django.db import connections

from ..retry import ErrorBackoff

logger = logging.getLogger("django_pubsub.backends.listen")

CHANNEL = "django_pubsub"
# Longest wait between attempts to re-establish LISTEN after losing the connection.
MAX_RECONNECT_WAIT = 5.0


class Listener:
    """A thread holding its own connection in LISTEN; calls ``wake`` on every notification."""

    def __init__(self, wake: Callable[[], None], using: str = "default") -> None:
        self._wake = wake
        self._using = using
        self._stop = threading.Event()
        # Set while it listens.
        self.ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pubsub-listener", daemon=True)

    @classmethod
    def start(cls, wake: Callable[[], None], using: str = "default") -> Listener:
        listener = cls(wake, using)
        listener._thread.start()
        return listener

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        backoff = ErrorBackoff(maximum=MAX_RECONNECT_WAIT)
        while not self._stop.is_set():
            wait = 0.0
            try:
                self._listen(reconnect=backoff.failures > 0)
                backoff.succeeded()
            except Exception:  # any failure: reconnect after a bounded wait
                wait = backoff.failed()
                logger.warning("LISTEN connection lost, reconnecting in %.1fs", wait, exc_info=True)
            finally:
                self.ready.clear()
            # A wake-up after a reconnect: notifications sent meanwhile were lost.
            self._wake()
            self._stop.wait(wait)

    def _listen(self, *, reconnect: bool) -> None:
        wrapper = connections[self._using]
        raw: Any = wrapper.get_new_connection(wrapper.get_connection_params())
        try:
            raw.autocommit = True
            raw.execute(f"LISTEN {CHANNEL}")
            self.ready.set()
            if reconnect:
                logger.info("listening again channel=%s", CHANNEL)
            while not self._stop.is_set():
                # Short timeout: stop() is answered within it; waiting costs no query.
                for _ in raw.notifies(timeout=0.1):
                    self._wake()
        finally:
            raw.close()
