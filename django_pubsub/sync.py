"""Keep Subscription rows in step with the code's @subscriber declarations."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

from django.db import transaction

from . import backends, registry
from .conf import pubsub_settings
from .exceptions import InvalidSubscriber
from .models import Subscription, Topic, starting_position
from .registry import SubscriberSpec

logger = logging.getLogger("django_pubsub.sync")

SYNC_LOCK_KEY = 0x70756273  # an arbitrary constant shared by every django-pubsub process


@dataclass
class SyncResult:
    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    deactivated: list[str] = field(default_factory=list)


def sync_subscriptions(using: str = "default") -> SyncResult:
    """Create, update and deactivate Subscription rows to match the registry.

    A new subscription starting at "latest" gets the messages committed after this call;
    the topic's already committed messages are sequenced first, under the topic lock, so the
    line between "before" and "after" is exact. Removed subscriptions are marked inactive,
    never deleted: their deliveries and backlog stay.
    """
    result = SyncResult()
    specs = registry.get_specs()
    # One sync at a time: dispatchers starting together would otherwise both create a new
    # subscription, and the second would fail on the unique name.
    with transaction.atomic(using=using):
        _lock(using)
        # Fan-out locks a topic's subscription rows in id order (backends.postgresql);
        # taking them all first, in that order, keeps this transaction from deadlocking
        # with one while it updates rows in declaration order.
        subscriptions = Subscription.objects.using(using).select_for_update(no_key=True)
        list(subscriptions.order_by("pk").values_list("pk", flat=True))
        for spec in specs.values():
            _sync_one(spec, using, result)
        gone = Subscription.objects.using(using).filter(active=True).exclude(name__in=list(specs))
        if not specs and gone.exists():
            # Not one declaration: far likelier a wrong AUTODISCOVER_MODULE or a broken
            # deploy than every subscription retired at once. Keep them as they are.
            logger.error(
                "no @subscriber declaration was found (PUBSUB['AUTODISCOVER_MODULE'] is %r); "
                "the subscriptions in the database are kept active as they are",
                pubsub_settings.autodiscover_module,
            )
            return result
        result.deactivated = list(gone.values_list("name", flat=True))
        if result.deactivated:
            gone.update(active=False)
            logger.warning(
                "subscriptions no longer declared, marked inactive names=%s",
                ",".join(result.deactivated),
            )
    return result


def _sync_one(spec: SubscriberSpec, using: str, result: SyncResult) -> None:
    topic, _ = Topic.objects.using(using).get_or_create(name=spec.topic)
    existing = Subscription.objects.using(using).filter(name=spec.name).first()
    fields = {
        "handler": spec.handler,
        "ordered": spec.ordered if isinstance(spec.ordered, bool) else None,
        "keyed": spec.ordered == "key",
        "on_dead": spec.on_dead or "continue",
        "delivery": spec.delivery or "at_least_once",
        "batch_size": spec.batch_size,
        "batch_wait": spec.batch_wait,
        "breaker_failures": spec.breaker_failures,
        "breaker_pause": spec.breaker_pause,
        "message_filter": json.loads(spec.message_filter) if spec.message_filter else None,
        "rate": spec.rate or "",
        "max_attempts": spec.max_attempts,
        "lease": spec.lease,
        "timeout": spec.timeout,
        "max_inflight": spec.max_inflight,
        "backoff": spec.backoff.as_dict() if spec.backoff else None,
        "active": True,
    }
    if existing is None:
        start = spec.start or pubsub_settings.start
        position = starting_position(topic, start, using=using)
        Subscription.objects.using(using).create(
            name=spec.name, topic=topic, start=start, position=position, **fields
        )
        result.created.append(spec.name)
        return
    if existing.topic_id != topic.pk:
        raise InvalidSubscriber(
            f"Subscription {spec.name!r} exists on topic {existing.topic.name!r} but the code "
            f"now declares it on {spec.topic!r}. A subscription's cursor belongs to its "
            f"topic: declare a new name for the new topic."
        )
    changed = [name for name, value in fields.items() if getattr(existing, name) != value]
    if changed:
        for name in changed:
            setattr(existing, name, fields[name])
        existing.save(using=using, update_fields=[*changed, "updated_at"])
        result.updated.append(spec.name)
        if "keyed" in changed:
            existing.copy_keys(using=using)


def _lock(using: str) -> None:
    backend = backends.get(using)
    with backend.connection.cursor() as cursor:
        backend.lock_exclusive(cursor, SYNC_LOCK_KEY)
