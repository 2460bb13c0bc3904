"""Keep Subscription rows in step with the code's @subscriber declarations."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from django.db import transaction

from . import registry
from .conf import pubsub_settings
from .exceptions import InvalidSubscriber
from .models import Subscription, Topic

logger = logging.getLogger("django_pubsub.sync")


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
    batch = pubsub_settings.batch_size
    for spec in specs.values():
        with transaction.atomic(using=using):
            topic, _ = Topic.objects.using(using).get_or_create(name=spec.topic)
            existing = Subscription.objects.using(using).filter(name=spec.name).first()
            fields = {
                "handler": spec.handler,
                "ordered": spec.ordered,
                "max_attempts": spec.max_attempts,
                "lease": spec.lease,
                "max_inflight": spec.max_inflight,
                "backoff": spec.backoff.as_dict() if spec.backoff else None,
                "active": True,
            }
            if existing is None:
                start = spec.start or pubsub_settings.start
                position = 0
                if start == "latest":
                    while Topic.sequence(topic.pk, batch=batch, using=using) == batch:
                        pass
                    position = Topic.objects.using(using).get(pk=topic.pk).next_offset
                Subscription.objects.using(using).create(
                    name=spec.name, topic=topic, start=start, position=position, **fields
                )
                result.created.append(spec.name)
                continue
            if existing.topic_id != topic.pk:
                raise InvalidSubscriber(
                    f"Subscription {spec.name!r} exists on topic {existing.topic.name!r} but the "
                    f"code now declares it on {spec.topic!r}. A subscription's cursor belongs to "
                    f"its topic: declare a new name for the new topic."
                )
            changed = [name for name, value in fields.items() if getattr(existing, name) != value]
            if changed:
                for name in changed:
                    setattr(existing, name, fields[name])
                existing.save(using=using, update_fields=[*changed, "updated_at"])
                result.updated.append(spec.name)
    gone = Subscription.objects.using(using).filter(active=True).exclude(name__in=list(specs))
    result.deactivated = list(gone.values_list("name", flat=True))
    if result.deactivated:
        gone.update(active=False)
        logger.warning(
            "subscriptions no longer declared, marked inactive names=%s",
            ",".join(result.deactivated),
        )
    return result
