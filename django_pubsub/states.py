"""A delivery's states, apart from the models so that the backends' SQL can name them."""

from __future__ import annotations

from django.db import models


class DeliveryState(models.TextChoices):
    PENDING = "pending"
    INFLIGHT = "inflight"
    RETRY = "retry"
    ACKED = "acked"
    DEAD = "dead"
    # Given up on by an operator (recorded in the admin log): runs again only after a
    # seek back before it.
    DISCARDED = "discarded"
    # Not started before its message's expires_at: ended unrun.
    EXPIRED = "expired"
    # Its message did not match the subscription's filter: never to run. (Not "ended":
    # a seek back leaves it as it is.)
    FILTERED = "filtered"


WAITING = (DeliveryState.PENDING, DeliveryState.RETRY)
UNFINISHED = (DeliveryState.PENDING, DeliveryState.RETRY, DeliveryState.INFLIGHT)
ENDED = (DeliveryState.ACKED, DeliveryState.DEAD, DeliveryState.DISCARDED, DeliveryState.EXPIRED)
