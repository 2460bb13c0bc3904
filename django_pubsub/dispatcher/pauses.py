"""Pauses that end or begin by themselves: a dispatcher resumes the subscriptions whose
pause has an end that came (an operator's "pause for an hour", a circuit breaker's
pause), and trips a subscription's circuit breaker when its handler keeps failing the
same way."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import datetime, timedelta

from .. import signals
from ..models import Subscription
from .subscriptions import Subscriptions

logger = logging.getLogger("django_pubsub.dispatcher")

Clock = Callable[[], datetime]
# Seconds between two looks for pauses that have ended: one small UPDATE's worth.
RESUME_CHECK = 1.0


class Pauses:
    def __init__(self, subscriptions: Subscriptions) -> None:
        self.subscriptions = subscriptions
        self._next_look = 0.0
        # Per subscription: the exception type of its last failures here, how many handler
        # calls in a row, and the last call counted (a batch's failures are one call).
        self._streaks: dict[int, tuple[str, int, object]] = {}

    def look(self, now: datetime) -> None:
        """Resume what should be, at most every RESUME_CHECK seconds."""
        if time.monotonic() < self._next_look:
            return
        self._next_look = time.monotonic() + RESUME_CHECK
        Subscription.resume_due(now)

    def succeeded(self, sub_id: int) -> None:
        """A handler of the subscription returned here: its failures are no longer in a
        row."""
        self._streaks.pop(sub_id, None)

    def failed(self, sub_id: int, error: str, now: datetime, call: object = None) -> None:
        """A failure of the subscription was recorded (``error``: "Type: text"; ``call``:
        what tells one handler call from another, for a batch's messages): count it per
        call; pause the subscription when its circuit breaker says so."""
        sub = self.subscriptions[sub_id]
        if not sub.breaker_failures:
            return
        kind = error.split(":", 1)[0]
        last, count, last_call = self._streaks.get(sub_id, ("", 0, None))
        if call is not None and call == last_call and kind == last:
            return  # another message of the same failed batch call
        count = count + 1 if kind == last else 1
        if count < sub.breaker_failures:
            self._streaks[sub_id] = (kind, count, call)
            return
        self._streaks.pop(sub_id, None)
        self._trip(sub_id, kind, count, error, now)

    def _trip(self, sub_id: int, kind: str, count: int, error: str, now: datetime) -> None:
        sub = self.subscriptions[sub_id]
        until = None if sub.breaker_pause is None else now + timedelta(seconds=sub.breaker_pause)
        reason = f"circuit breaker: {count} failures in a row with {kind} (the last: {error})"
        row = Subscription.objects.filter(pk=sub_id).first()
        if row is None or not row.trip(now, until=until, reason=reason):
            return
        logger.error(
            "subscription %s paused by its circuit breaker %s: %s failures in a row with %s; "
            "last error: %s",
            sub.name,
            f"until {until.isoformat(timespec='seconds')}" if until else "until resumed",
            count,
            kind,
            error,
        )
        signals.send(
            signals.breaker_tripped,
            Subscription,
            subscription=row,
            error=error,
            failures=count,
            until=until,
        )
