"""Signals for a message's life, for metrics, audit trails and alerts.

Every signal is sent with ``send_robust()``: a receiver that raises is logged and skipped,
and never breaks publishing or delivery. Receivers of the delivery signals run in the
``runpubsub`` process (the dispatcher's thread, or for ``delivery_started`` the worker's),
so keep them quick. With no receiver connected, sending costs next to nothing.
"""

from __future__ import annotations

import logging
from contextlib import suppress
from typing import Any

from django.db import transaction
from django.dispatch import Signal

logger = logging.getLogger("django_pubsub.signals")

# publish()/publish_many() wrote messages, inside the caller's transaction (connect with
# transaction.on_commit in the receiver to act only once they are committed). Receivers
# run in a savepoint: if one raises, their writes are rolled back and the caller's
# transaction goes on. sender: Message; topic: str; ids: list[int], in publish order.
message_published = Signal()

# The delivery signals' sender is the Subscription model; ``message`` is the
# django_pubsub.Message the handler gets (its subscription, delivery_id and attempt).

# A handler is about to run (sent from the worker thread that runs it).
delivery_started = Signal()

# A handler returned and its ack was written. duration: seconds the handler ran. (Not sent
# if its lease had been taken back meanwhile: the ack then changes nothing, "ack rejected"
# is logged and the delivery runs again.)
delivery_succeeded = Signal()

# A failed attempt was recorded: the handler raised or timed out, or the process that
# ran it died. error: str; traceback: str; state: "retry" or "dead".
delivery_failed = Signal()

# After delivery_failed, when another attempt follows. available_at: datetime.
retry_scheduled = Signal()

# After delivery_failed, when it was the last attempt. error: str.
dead_lettered = Signal()

# A key of a keyed subscription (ordered="key") has been held back by its failing head
# for longer than PUBSUB["KEY_BLOCKED_AFTER"] seconds; sent once per failed attempt of
# that head, by each dispatcher running the subscription. sender: Subscription;
# subscription; key: str; message_id, offset: the head's; blocked_for: seconds since the
# head first failed; waiting: messages of the key behind it; retry_at: datetime.
key_blocked = Signal()

# A subscription was paused or resumed: by an operator, by its circuit breaker, or at
# the end of a pause with an end (paused_until). sender: Subscription; subscription: it.
subscription_paused = Signal()
subscription_resumed = Signal()

# A subscription's circuit breaker paused it (after subscription_paused): its handler
# failed ``failures`` times in a row with one exception type in one dispatcher. sender:
# Subscription; subscription; error: the last failure's "Type: text"; failures: int;
# until: when it resumes by itself, or None.
breaker_tripped = Signal()


# publish() to a topic whose backlog is at or past its PUBSUB["BACKPRESSURE"] limit, with
# the policy "warn" (the message is published) or "reject" (it is not). sender: Topic;
# topic: name; backlog, limit: ints; subscription: the slowest one's name; policy.
backlog_exceeded = Signal()


class _ReceiverFailed(Exception):
    """Rolls the receivers' savepoint back."""


def send(signal: Signal, sender: Any, *, savepoint: bool = False, **kwargs: Any) -> None:
    """Send ``signal``; log the receivers that raised instead of raising.

    ``savepoint``: the receivers run in a savepoint of the caller's transaction, rolled
    back if any of them raised. On PostgreSQL a receiver's failed query would otherwise
    abort the caller's whole transaction; this way only the receivers' writes are lost.
    (It costs two round trips, only when a receiver is connected.)
    """
    # Django's own send() tests .receivers first too: a publish with no receiver connected
    # skips has_listeners()'s lock and walk.
    if not signal.receivers or not signal.has_listeners(sender):
        return
    if not savepoint:
        _log_failures(signal.send_robust(sender, **kwargs))
        return
    with suppress(_ReceiverFailed), transaction.atomic():
        if _log_failures(signal.send_robust(sender, **kwargs)):
            raise _ReceiverFailed


def _log_failures(results: list[tuple[Any, Any]]) -> bool:
    """Log the receivers that raised; whether any did."""
    failed = False
    for receiver, result in results:
        if isinstance(result, Exception):
            failed = True
            logger.error(
                "signal receiver %s raised; delivery goes on",
                getattr(receiver, "__qualname__", receiver),
                exc_info=(type(result), result, result.__traceback__),
            )
    return failed
