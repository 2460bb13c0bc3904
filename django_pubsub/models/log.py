"""Topics and their ordered log of messages.

``publish()`` inserts a ``Message`` with ``offset`` NULL, inside the caller's transaction:
publishers never lock anything shared, so a long transaction does not hold others up. The
dispatcher then *sequences* committed messages: under the topic's row lock it gives the
visible unsequenced messages consecutive offsets, in id order. A message that commits later
is sequenced later and gets a higher offset, so offsets follow commit visibility and a
cursor over offsets can never pass over a message that is still uncommitted.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from django.db import models
from django.db.models import Q
from django.utils import timezone

from .. import backends
from ..backends import FanOut, Lease


class Topic(models.Model):
    name = models.CharField(max_length=200, unique=True)
    # The offset the next sequenced message of this topic gets.
    next_offset = models.BigIntegerField(default=0, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    # Topics with a PUBSUB["BACKPRESSURE"] limit: the messages its slowest active
    # subscription has not finished (backlog_of), as measured at backlog_at by a
    # dispatcher (every BACKLOG_INTERVAL) or by a publisher that found it stale.
    backlog = models.BigIntegerField(null=True, blank=True, editable=False)
    backlog_of = models.CharField(max_length=200, blank=True, default="", db_default="")
    backlog_at = models.DateTimeField(null=True, blank=True, editable=False)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    @classmethod
    def sequence_all(
        cls, *, batch: int, now: datetime | None = None, using: str = "default"
    ) -> dict[int, int]:
        """Sequence the committed messages of every topic that has some due by ``now``
        (default: the current time); return how many each topic got, for those that got
        any."""
        return backends.get(using).sequence(batch=batch, now=now or timezone.now())

    @classmethod
    def sequence(
        cls, topic_id: int, *, batch: int, now: datetime | None = None, using: str = "default"
    ) -> int:
        """Give the topic's committed unsequenced messages due by ``now`` (published
        without a deliver_at, or whose deliver_at has come) the next offsets, up to
        ``batch`` of them, in id order; return how many. The topic's row is locked even
        when there is nothing to sequence, so its ``next_offset`` read afterwards is not
        half way through another sequencer's work."""
        at = now or timezone.now()
        return backends.get(using).sequence(batch=batch, topic_id=topic_id, now=at).get(topic_id, 0)

    @classmethod
    def first_stored(cls, topic_id: int, using: str = "default") -> int:
        """The lowest offset of the topic still stored (retention prunes from the low end);
        the topic's end when none is. Where a subscription that starts at the beginning,
        or seeks back, begins: below it there is nothing to deliver any more."""
        messages = Message.objects.using(using).filter(topic_id=topic_id, offset__isnull=False)
        lowest = messages.aggregate(lowest=models.Min("offset"))["lowest"]
        if lowest is not None:
            return int(lowest)
        return int(cls.objects.using(using).values_list("next_offset", flat=True).get(pk=topic_id))

    @classmethod
    def behind(cls, using: str = "default") -> list[int]:
        """Topics with an active subscription that has sequenced messages not yet fanned
        out."""
        return sorted({topic for _, topic in backends.get(using).subscriptions_behind()})

    @staticmethod
    def leases_at_fan_out(using: str = "default") -> bool:
        """Whether fan_out() can lease what it creates here."""
        return backends.get(using).leases_at_fan_out

    @classmethod
    def fan_out(
        cls,
        topic_id: int,
        *,
        now: datetime,
        batch: int,
        using: str = "default",
        leases: Sequence[Lease] = (),
        dispatcher_id: int | None = None,
    ) -> FanOut:
        """Fan the topic out to each of its active subscriptions: move each past up to
        ``batch`` sequenced messages and create their pending deliveries.

        Where ``leases_at_fan_out()`` (PostgreSQL), ``leases`` lets the same statement
        lease the first new deliveries of some unordered subscriptions to
        ``dispatcher_id``: on the way from a commit to its handler, that is a claim's
        round trip and its rewrite of each row saved. Elsewhere nothing is leased here; a
        claim takes the deliveries as usual.
        """
        return backends.get(using).fan_out(
            topic_id, now=now, batch=batch, leases=leases, dispatcher_id=dispatcher_id
        )


class MessageQuerySet(models.QuerySet["Message"]):
    def unsequenced(self, now: datetime | None = None) -> MessageQuerySet:
        """Committed messages the dispatcher has not given an offset yet (through the
        partial index on exactly those); with ``now``, only those due by then (not
        scheduled for later)."""
        waiting = self.filter(offset__isnull=True)
        if now is None:
            return waiting
        return waiting.filter(Q(deliver_at__isnull=True) | Q(deliver_at__lte=now))

    def scheduled(self, now: datetime) -> MessageQuerySet:
        """Messages published with a deliver_at still to come: not in their topic's log
        yet."""
        return self.filter(offset__isnull=True, deliver_at__gt=now)


class Message(models.Model):
    id = models.BigAutoField(primary_key=True)
    # No constraint in the database: publish() reads the topic's id in its own INSERT, and
    # topics are never deleted (PROTECT). The constraint's check would lock the topic row
    # at every publisher's commit, about 5% of a publish. No index of its own either: the
    # unique (topic, offset) index starts with the topic, and one index fewer is less for
    # every publish and every sequencing to write.
    topic = models.ForeignKey(
        Topic,
        on_delete=models.PROTECT,
        related_name="messages",
        db_constraint=False,
        db_index=False,
    )
    # NULL until the dispatcher sequences it; then unique and increasing within the topic.
    offset = models.BigIntegerField(null=True, editable=False)
    payload = models.JSONField(null=True, blank=True)
    payload_bytes = models.BinaryField(null=True, blank=True)
    # NULL: no key (a later ordering-key feature tells "no key" from any string).
    key = models.CharField(max_length=255, null=True, blank=True)  # noqa: DJ001
    headers = models.JSONField(default=dict, blank=True)
    published_at = models.DateTimeField()
    # publish(deliver_at=, delay=): the message joins its topic's log (gets its offset)
    # only once this time has come. NULL: at once.
    deliver_at = models.DateTimeField(null=True, blank=True)
    # publish(expires_at=, ttl=): a delivery of it not started by then ends "expired",
    # unrun. NULL: never.
    expires_at = models.DateTimeField(null=True, blank=True)
    # publish(dedup_key=): unique within the topic while set. Cleared once older than
    # PUBSUB["DEDUP_WINDOW"], when a publish of the same key finds it.
    dedup_key = models.CharField(max_length=255, null=True, blank=True, editable=False)  # noqa: DJ001

    objects = MessageQuerySet.as_manager()

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["topic", "offset"], name="pubsub_message_topic_offset"),
            # One message per dedup key and topic; a publish that finds the key writes
            # nothing (ON CONFLICT DO NOTHING) and returns the first one's id.
            models.UniqueConstraint(
                fields=["topic", "dedup_key"],
                condition=Q(dedup_key__isnull=False),
                name="pubsub_message_dedup",
            ),
        ]
        indexes = [
            # Finds the messages still to sequence without reading the whole log, nor the
            # messages published for later (a reminder a month ahead is read once, when due).
            models.Index(
                fields=["topic", "id"],
                condition=Q(offset__isnull=True, deliver_at__isnull=True),
                name="pubsub_message_unsequenced",
            ),
            # Messages published for later, by when they are due.
            models.Index(
                fields=["deliver_at"],
                condition=Q(offset__isnull=True, deliver_at__isnull=False),
                name="pubsub_message_scheduled",
            ),
        ]

    def __str__(self) -> str:
        where = "not sequenced yet" if self.offset is None else f"offset {self.offset}"
        return f"message #{self.pk} of {self.topic.name} ({where})"

    @property
    def body(self) -> Any:
        """The payload as published: bytes for binary payloads, JSON data otherwise."""
        if self.payload_bytes is not None:
            return bytes(self.payload_bytes)
        return self.payload
