"""Keyed subscriptions (ordered="key"): which keys their failing heads hold back, since
when and behind what; read by the admin, the dashboard and the dispatchers' watch."""

from __future__ import annotations

from datetime import datetime
from typing import NamedTuple

from django.db.models import Count, Exists, OuterRef

from .models import Delivery, Subscription

# Blocked keys read at most at once, oldest first.
MAX_LISTED = 1000


class BlockedKey(NamedTuple):
    key: str
    # The head that holds the key back.
    delivery_id: int
    message_id: int
    offset: int
    attempts: int
    # When it first failed, and when it is retried.
    since: datetime
    retry_at: datetime
    # Messages of the key waiting, the head included.
    waiting: int


def blocked_keys(subscription: Subscription, now: datetime) -> list[BlockedKey]:
    """The keys of ``subscription`` whose head failed and waits for its retry, oldest
    first (at most MAX_LISTED)."""
    if not subscription.keyed:
        return []
    mine = Delivery.objects.unfinished().filter(subscription_id=subscription.pk)
    earlier = mine.filter(key=OuterRef("key"), offset__lt=OuterRef("offset"))
    heads = list(
        mine.filter(key__isnull=False, state=Delivery.State.RETRY)
        .exclude(Exists(earlier))
        .order_by("offset")
        .values_list(
            "id", "key", "message_id", "offset", "attempts", "errors", "updated_at", "available_at"
        )[:MAX_LISTED]
    )
    counts = dict(
        mine.filter(key__in=[row[1] for row in heads])
        .values_list("key")
        .annotate(waiting=Count("id"))
        .values_list("key", "waiting")
    )
    found = []
    for delivery_id, key, message_id, offset, attempts, errors, updated, retry_at in heads:
        since = _first_failure(errors) or updated
        assert key is not None  # filtered on
        found.append(
            BlockedKey(
                key, delivery_id, message_id, offset, attempts, since, retry_at, counts.get(key, 1)
            )
        )
    return found


def _first_failure(errors: object) -> datetime | None:
    if not isinstance(errors, list) or not errors or not isinstance(errors[0], dict):
        return None
    try:
        return datetime.fromisoformat(str(errors[0].get("at")))
    except ValueError:
        return None
