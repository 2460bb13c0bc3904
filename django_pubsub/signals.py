"""Signals for a message's life, for metrics, audit trails and alerts.

Every signal is sent with ``send_robust()``: a receiver that raises is logged and skipped,
and never breaks publishing or delivery. Receivers of the delivery signals run in the
``runpubsub`` process (the dispatcher's thread, or for ``delivery_started`` the worker's),
so keep them quick. With no receiver connected, sending costs next to nothing.
"""

from __future__ import annotations

import logging
from typing import Any

from django.dispatch import Signal

logger = logging.getLogger("django_pubsub.signals")

# publish()/publish_many() wrote messages, inside the caller's transaction (connect with
# transaction.on_commit in the receiver to act only once they are committed).
# sender: Message; topic: str; ids: list[int], in publish order.
message_published = Signal()

# The delivery signals' sender is the Subscription model; ``message`` is the
# django_pubsub.Message the handler gets (its subscription, delivery_id and attempt).

# A handler is about to run (sent from the worker thread that runs it).
delivery_started = Signal()

# A handler returned and its ack was written. duration: seconds the handler ran. (If its
# lease had been taken back meanwhile, the ack changed nothing, "ack rejected" is logged
# and the delivery runs again.)
delivery_succeeded = Signal()

# A failed attempt was recorded: the handler raised or timed out, or the process that
# ran it died. error: str; traceback: str; state: "retry" or "dead".
delivery_failed = Signal()

# After delivery_failed, when another attempt follows. available_at: datetime.
retry_scheduled = Signal()

# After delivery_failed, when it was the last attempt. error: str.
dead_lettered = Signal()

# An operator paused or resumed a subscription. sender: Subscription; subscription: it.
subscription_paused = Signal()
subscription_resumed = Signal()


def send(signal: Signal, sender: Any, **kwargs: Any) -> None:
    """Send ``signal``; log the receivers that raised instead of raising."""
    if not signal.has_listeners(sender):
        return
    for receiver, result in signal.send_robust(sender, **kwargs):
        if isinstance(result, Exception):
            logger.error(
                "signal receiver %s raised; delivery goes on",
                getattr(receiver, "__qualname__", receiver),
                exc_info=(type(result), result, result.__traceback__),
            )
