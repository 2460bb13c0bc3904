"""The watch on keyed subscriptions: a key held back by its failing head for longer than
KEY_BLOCKED_AFTER is logged and signalled (key_blocked), so that a stall is never
silent. Looked at every few seconds, never on the way from a commit to its handler."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import datetime

from .. import signals
from ..keys import blocked_keys
from ..models import Subscription
from .subscriptions import Subscriptions

logger = logging.getLogger("django_pubsub.dispatcher")

# Seconds between two looks, at most (less when the threshold is shorter).
LOOK_EVERY = 10.0
# Heads told about, remembered at most (then forgotten, and told again if still blocked).
MAX_TOLD = 10_000


class KeyWatch:
    def __init__(
        self,
        subscriptions: Subscriptions,
        after: float | None,
        clock: Callable[[], datetime],
    ) -> None:
        self.subscriptions = subscriptions
        self.after = after
        self.clock = clock
        self._next = 0.0
        # (delivery id, attempts) of the heads already told about.
        self._told: set[tuple[int, int]] = set()

    def look(self) -> int:
        """Tell about keys blocked past the threshold, once per failed attempt of their
        head; how many it told about."""
        keyed = [sub for sub in self.subscriptions if sub.keyed]
        if self.after is None or not keyed or time.monotonic() < self._next:
            return 0
        self._next = time.monotonic() + min(LOOK_EVERY, self.after / 2)
        if len(self._told) > MAX_TOLD:
            self._told.clear()
        now, told = self.clock(), 0
        for sub in keyed:
            for blocked in blocked_keys(sub, now):
                blocked_for = (now - blocked.since).total_seconds()
                mark = (blocked.delivery_id, blocked.attempts)
                if blocked_for < self.after or mark in self._told:
                    continue
                self._told.add(mark)
                told += 1
                logger.warning(
                    "key blocked subscription=%s key=%s behind message=%s offset=%s for=%.0fs "
                    "waiting=%s retry_at=%s",
                    sub.name,
                    blocked.key,
                    blocked.message_id,
                    blocked.offset,
                    blocked_for,
                    blocked.waiting,
                    blocked.retry_at.isoformat(timespec="seconds"),
                )
                signals.send(
                    signals.key_blocked,
                    Subscription,
                    subscription=sub,
                    key=blocked.key,
                    message_id=blocked.message_id,
                    offset=blocked.offset,
                    blocked_for=blocked_for,
                    waiting=blocked.waiting,
                    retry_at=blocked.retry_at,
                )
        return told
