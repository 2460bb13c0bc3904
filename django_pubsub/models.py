"""Topics, their ordered log of messages, subscriptions, and per-message deliveries.

How a message travels:

1. ``publish()`` inserts a ``Message`` with ``offset`` NULL, inside the caller's transaction.
   Publishers never lock anything shared, so a long transaction does not hold others up.
2. The dispatcher *sequences* committed messages: under the topic's row lock it gives the
   visible unsequenced messages consecutive offsets, in id order. A message that commits later
   is sequenced later and gets a higher offset, so offsets follow commit visibility and a
   cursor over offsets can never pass over a message that is still uncommitted.
3. Each subscription keeps a cursor (``position``) in its topic and *fans out* sequenced
   messages past it into ``Delivery`` rows.
4. Deliveries are claimed (``inflight`` with a lease token), then acked, retried or
   dead-lettered; every transition is one UPDATE that checks the expected state and lease
   token, so a transition that lost a race changes nothing.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Sequence
from contextlib import nullcontext
from datetime import datetime, timedelta
from typing import Any, NamedTuple, cast

from django.conf import settings
from django.db import connections, models, router, transaction
from django.db.models import Case, F, Q, Value, When
from django.utils import timezone

from .conf import START_CHOICES, pubsub_settings
from .exceptions import ActionRefused, InvalidSeek
from .fan_out import FanOut, Lease, fan_out_postgresql
from .retry import Backoff
from .sql import (
    INFLIGHT_SQL,
    LAZY_COMMIT,
    UNFINISHED_SQL,
    bound_cursor,
    lazily,
    lock_row,
    locked_value,
    padded_ids,
    quoted,
)

logger = logging.getLogger("django_pubsub.models")


class Topic(models.Model):
    name = models.CharField(max_length=200, unique=True)
    # The offset the next sequenced message of this topic gets.
    next_offset = models.BigIntegerField(default=0, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    @classmethod
    def sequence_all(cls, *, batch: int, using: str = "default") -> dict[int, int]:
        """Sequence the committed messages of every topic that has some; return how many
        each topic got, for those that got any."""
        connection = connections[using]
        if connection.vendor == "postgresql":
            return _sequence_postgresql(None, batch, using)
        # Plain SQL: this runs every pass, and on the way from a commit to its handler.
        # SQLite, without statistics, would rather scan the whole (topic, offset) index.
        hint = " INDEXED BY pubsub_message_unsequenced" if connection.vendor == "sqlite" else ""
        with connection.cursor() as cursor:
            cursor.execute(
                f"SELECT DISTINCT {quoted(Message, 'topic')} FROM {quoted(Message)}{hint} "
                f"WHERE {quoted(Message, 'offset')} IS NULL"
            )
            topic_ids = sorted(row[0] for row in cursor.fetchall())
        counts = {
            topic_id: cls.sequence(topic_id, batch=batch, using=using) for topic_id in topic_ids
        }
        return {topic_id: count for topic_id, count in counts.items() if count}

    @classmethod
    def sequence(cls, topic_id: int, *, batch: int, using: str = "default") -> int:
        """Give the topic's committed unsequenced messages the next offsets, up to
        ``batch`` of them, in id order; return how many."""
        if connections[using].vendor == "postgresql":
            return _sequence_postgresql(topic_id, batch, using).get(topic_id, 0)
        message, topic = quoted(Message), quoted(Topic)
        offset, topic_col = quoted(Message, "offset"), quoted(Message, "topic")
        with transaction.atomic(using=using), connections[using].cursor() as cursor:
            base = locked_value(cursor, Topic, topic_id, "next_offset", using)
            if base is None:
                return 0  # its topic row is gone: nothing to number its messages from
            # A new statement after the lock: it sees every message committed so far,
            # including the offsets a sequencer that held the lock before us assigned.
            cursor.execute(
                f"UPDATE {message} SET {offset} = %s + s.rn - 1 FROM ("
                f"SELECT id, row_number() OVER (ORDER BY id) AS rn FROM {message} "
                f"WHERE {topic_col} = %s AND {offset} IS NULL ORDER BY id LIMIT %s"
                f") AS s WHERE {message}.id = s.id",
                [base, topic_id, batch],
            )
            count = cursor.rowcount
            if count:
                cursor.execute(
                    f"UPDATE {topic} SET next_offset = %s WHERE id = %s", [base + count, topic_id]
                )
        return int(count)

    @classmethod
    def behind(cls, using: str = "default") -> list[int]:
        """Topics with an active subscription that has sequenced messages not yet fanned
        out."""
        with connections[using].cursor() as cursor:
            cursor.execute(
                f"SELECT DISTINCT s.topic_id FROM {quoted(Subscription)} s "
                f"JOIN {quoted(Topic)} t ON t.id = s.topic_id "
                f"WHERE s.active AND s.position < t.next_offset ORDER BY s.topic_id"
            )
            return [row[0] for row in cursor.fetchall()]

    @staticmethod
    def leases_at_fan_out(using: str = "default") -> bool:
        """Whether fan_out() can lease what it creates here (PostgreSQL)."""
        return connections[using].vendor == "postgresql"

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
        """Fan the topic out to each of its active subscriptions (up to ``batch`` messages
        each).

        On PostgreSQL, ``leases`` lets the same statement lease the first new deliveries of
        some unordered subscriptions to ``dispatcher_id``: on the way from a commit to its
        handler, that is a claim's round trip and its rewrite of each row saved. Elsewhere
        nothing is leased here; a claim takes the deliveries as usual.
        """
        if cls.leases_at_fan_out(using):
            return fan_out_postgresql(
                topic_id,
                None,
                now=now,
                batch=batch,
                using=using,
                leases=leases,
                dispatcher_id=dispatcher_id,
            )[0]
        subs = Subscription.objects.using(using).filter(
            topic_id=topic_id, active=True, position__lt=F("topic__next_offset")
        )
        created = sum(
            sub.fan_out(now=now, batch=batch, using=using)
            for sub in subs.only("pk", "topic_id").order_by("pk")
        )
        return FanOut(created, {})


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

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["topic", "offset"], name="pubsub_message_topic_offset"),
        ]
        indexes = [
            # Finds the messages still to sequence without reading the whole log.
            models.Index(
                fields=["topic", "id"],
                condition=Q(offset__isnull=True),
                name="pubsub_message_unsequenced",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.topic_id}@{self.offset if self.offset is not None else '?'} (#{self.pk})"

    @property
    def body(self) -> Any:
        """The payload as published: bytes for binary payloads, JSON data otherwise."""
        if self.payload_bytes is not None:
            return bytes(self.payload_bytes)
        return self.payload


class Subscription(models.Model):
    name = models.CharField(max_length=200, unique=True)
    topic = models.ForeignKey(Topic, on_delete=models.PROTECT, related_name="subscriptions")
    handler = models.CharField(max_length=300, help_text="Dotted path of the handler function.")
    # The declaration's options; NULL means the PUBSUB setting applies when the dispatcher runs.
    ordered = models.BooleanField(null=True, blank=True)
    max_attempts = models.PositiveIntegerField(null=True, blank=True)
    lease = models.FloatField(null=True, blank=True, help_text="Lease in seconds.")
    timeout = models.FloatField(
        null=True, blank=True, help_text="Seconds a handler may run before its attempt fails."
    )
    max_inflight = models.PositiveIntegerField(null=True, blank=True)
    backoff = models.JSONField(null=True, blank=True)
    start = models.CharField(max_length=10, choices=[(c, c) for c in START_CHOICES])
    # Offset up to which messages of the topic have been fanned out into deliveries.
    position = models.BigIntegerField(default=0, editable=False)
    active = models.BooleanField(
        default=True, help_text="False once the code no longer declares it."
    )
    # Set by an operator: nothing of it is claimed; its deliveries are still created.
    # db_default: rows that code from before this field inserts (during a rolling deploy)
    # are not paused.
    paused = models.BooleanField(default=False, db_default=False)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    @staticmethod
    def not_paused_sql() -> str:
        """SQL, true unless the subscription (a parameter) is paused. Read in each claim and
        fan-out lease statement itself: an operator's pause holds from the next one on, in
        every dispatcher, at no cost of a round trip."""
        return f"NOT (SELECT paused FROM {quoted(Subscription)} WHERE id = %s)"

    @property
    def effective_ordered(self) -> bool:
        return pubsub_settings.ordered if self.ordered is None else self.ordered

    @property
    def effective_max_attempts(self) -> int:
        return self.max_attempts or pubsub_settings.max_attempts

    @property
    def effective_lease(self) -> float:
        return self.lease or pubsub_settings.lease

    @property
    def effective_timeout(self) -> float | None:
        return self.timeout or pubsub_settings.timeout

    @property
    def effective_backoff(self) -> Backoff:
        return Backoff.coerce(self.backoff) or pubsub_settings.backoff

    @property
    def effective_max_inflight(self) -> int | None:
        """Most deliveries in flight at once in one process; None: only the pool bounds it."""
        return self.max_inflight or pubsub_settings.max_inflight

    def pause(self, now: datetime | None = None) -> bool:
        """Stop claiming its deliveries (those running finish); False if already paused."""
        return self._set_paused(True, now or timezone.now())

    def resume(self, now: datetime | None = None) -> bool:
        """Claim its deliveries again; False if it was not paused."""
        return self._set_paused(False, now or timezone.now())

    def _set_paused(self, paused: bool, now: datetime) -> bool:
        from . import signals

        rows = Subscription.objects.filter(pk=self.pk, paused=not paused)
        changed = rows.update(paused=paused, updated_at=now) == 1
        self.paused = paused
        if changed:
            signal = signals.subscription_paused if paused else signals.subscription_resumed
            signals.send(signal, Subscription, subscription=self)
        return changed

    def seek(
        self,
        *,
        offset: int | None = None,
        at: datetime | None = None,
        now: datetime | None = None,
        using: str = "default",
    ) -> Seek:
        """Deliver the topic again from ``offset``, or from its first message published at
        or after ``at``; pass over what comes before.

        From there on, deliveries that ended (acked, dead or discarded) are pending again,
        with fresh attempts; before it, those still waiting (pending or retry) end
        ``discarded``, and messages never fanned out to this subscription are passed over.
        Deliveries running at the time (or claimed, about to start) are left to their
        dispatcher, retried if they fail; dead letters before the point stay dead.
        Seeking to the topic's end (its next offset) skips everything. An ordered
        subscription is refused while any of its deliveries runs (pause it first), or one
        of the two would run beside the other. Bad arguments raise InvalidSeek.
        """
        if (offset is None) == (at is None):
            raise InvalidSeek("seek() takes an offset or a time (at=), one of the two")
        if offset is not None and (isinstance(offset, bool) or not isinstance(offset, int)):
            raise InvalidSeek(f"seek() offset must be an int, not {offset!r}")
        if offset is not None and offset < 0:
            raise InvalidSeek(f"seek() offset must be 0 or more, not {offset}")
        if at is not None and (
            not isinstance(at, datetime) or timezone.is_aware(at) != settings.USE_TZ
        ):
            kind = "an aware" if settings.USE_TZ else "a naive"
            raise InvalidSeek(f"seek() at= must be {kind} datetime (USE_TZ), not {at!r}")
        now = now or timezone.now()
        with transaction.atomic(using=using), connections[using].cursor() as cursor:
            # The fan-out's and the ordered claim's lock: neither runs while we move it. Read
            # after it, the row is the latest committed one.
            lock_row(cursor, Subscription, self.pk, using, "position")
            rows = Subscription.objects.using(using).select_related("topic")
            current = rows.filter(pk=self.pk).first()
            if current is None:
                raise ActionRefused(f"subscription {self.pk} no longer exists")
            position = current.position
            _refuse_while_running([current], using, "seek")
            if at is not None:
                sequenced = Message.objects.using(using).filter(
                    topic_id=self.topic_id, offset__isnull=False, published_at__gte=at
                )
                offset = sequenced.aggregate(first=models.Min("offset"))["first"]
            # Read after the lookup: sequencing may have moved it on meanwhile.
            heads = Topic.objects.using(using).values_list("next_offset", flat=True)
            end: int = heads.get(pk=self.topic_id)
            point: int = end if offset is None else offset
            if point > end:
                raise InvalidSeek(
                    f"seek() offset {point} is past the end of topic {current.topic} "
                    f"(its next message gets offset {end})"
                )
            mine = Delivery.objects.using(using).filter(subscription_id=self.pk)
            waiting = mine.unfinished().filter(offset__lt=point, state__in=Delivery.WAITING)
            skipped = waiting.discard(now)
            replayed = mine.filter(offset__gte=point, state__in=Delivery.ENDED).run_again(now)
            passed_over = 0
            if point < position:
                # Messages it has no delivery of yet (published before it began, or passed
                # over by an earlier seek): created here, so the fan-out need not go back.
                replayed += self._create_deliveries(cursor, point, position, now)
            elif point > position:
                # What the cursor jumps over with no delivery to show for it.
                had = mine.filter(offset__gte=position, offset__lt=point).count()
                passed_over = point - position - had
                Subscription.objects.using(using).filter(pk=self.pk).update(
                    position=point, updated_at=now
                )
                self.position = point
        return Seek(point, replayed, skipped, passed_over)

    def fan_out(self, *, now: datetime, batch: int, using: str = "default") -> int:
        """Create deliveries for sequenced messages past the cursor; return how many."""
        if connections[using].vendor == "postgresql":
            fanned, position = fan_out_postgresql(
                self.topic_id, self.pk, now=now, batch=batch, using=using
            )
            if position is not None:
                self.position = position
            return fanned.created
        topic, subscription = quoted(Topic), quoted(Subscription)
        with transaction.atomic(using=using), connections[using].cursor() as cursor:
            low = locked_value(cursor, Subscription, self.pk, "position", using)
            assert low is not None, "fan-out of a subscription that was deleted"
            cursor.execute(f"SELECT next_offset FROM {topic} WHERE id = %s", [self.topic_id])
            (head,) = cursor.fetchone()
            high = min(head, low + batch)
            if high <= low:
                self.position = low
                return 0
            created = self._create_deliveries(cursor, low, high, now)
            cursor.execute(
                f"UPDATE {subscription} SET position = %s WHERE id = %s", [high, self.pk]
            )
        self.position = high
        return created

    def _create_deliveries(self, cursor: Any, low: int, high: int, now: datetime) -> int:
        """Pending deliveries of the messages at offsets low to high (not included), but
        for those it has already; how many it created."""
        delivery, message, offset = quoted(Delivery), quoted(Message), quoted(Message, "offset")
        cursor.execute(
            f"INSERT INTO {delivery} (subscription_id, message_id, {offset}, state, attempts, "
            f"available_at, errors, last_error, created_at, updated_at) "
            f"SELECT %s, id, {offset}, %s, 0, %s, %s, '', %s, %s FROM {message} "
            f"WHERE topic_id = %s AND {offset} >= %s AND {offset} < %s "
            f"ON CONFLICT DO NOTHING",
            [self.pk, Delivery.State.PENDING, now, "[]", now, now, self.topic_id, low, high],
        )
        return int(cursor.rowcount)


class Seek(NamedTuple):
    """What Subscription.seek() did."""

    offset: int  # where the subscription now starts
    replayed: int  # deliveries from there on that had ended, pending again
    skipped: int  # deliveries before it that still waited, now discarded
    passed_over: int  # messages before it never fanned out to the subscription


def _refuse_while_running(subscriptions: Sequence[Subscription], using: str, action: str) -> None:
    """Take the row lock of each ordered subscription (as its claims do) and raise
    ActionRefused if any has deliveries running. Inside a transaction: the lock holds off
    new claims until the action commits.

    For actions that make earlier messages due again: with part of an ordered run in
    flight, the claim would start them beside it.
    """
    ordered = sorted((sub for sub in subscriptions if sub.effective_ordered), key=lambda s: s.pk)
    with connections[using].cursor() as cursor:
        for sub in ordered:
            lock_row(cursor, Subscription, sub.pk, using, "position")
    running = (
        Delivery.objects.using(using)
        .inflight()
        .filter(subscription__in=[sub.pk for sub in ordered])
        .values_list("subscription__name", flat=True)
        .distinct()
    )
    names = sorted(running) if ordered else []
    if names:
        raise ActionRefused(
            f"cannot {action} now: ordered subscription {', '.join(names)} has deliveries "
            f"running. Pause it, wait until nothing of it is inflight, {action}, then resume."
        )


def _sequence_postgresql(topic_id: int | None, batch: int, using: str) -> dict[int, int]:
    """Sequencing on PostgreSQL: one call of the function that migration 0004 creates, for
    every topic (or the one given); {topic id: messages sequenced} for those that got any.

    One round trip whatever the number of topics, and the server keeps the plans of the
    statements inside it. Its migration says why it cannot skip a message.
    """
    connection = connections[using]
    with connection.wrap_database_errors, bound_cursor(connection) as cursor:
        cursor.execute(
            "SELECT topic_id, sequenced FROM django_pubsub_sequence(%s, %s, %s)",
            [int(batch), lazily(connection), topic_id],
        )
        return {int(topic): int(count) for topic, count in cursor.fetchall()}


class Claimed(NamedTuple):
    """A delivery just leased, with what its handler needs of its message."""

    delivery_id: int
    attempt: int
    message_id: int
    offset: int
    payload: Any
    key: str | None
    headers: dict[str, str]
    published_at: datetime

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> Claimed:
        """From PostgreSQL's columns: delivery id, attempt, message id, offset, payload as
        text, payload bytes, key, headers as text, published at."""
        payload = _body(row[4], row[5])
        return cls(
            row[0], row[1], row[2], row[3], payload, row[6], json.loads(row[7]) or {}, row[8]
        )


def _body(payload: str | None, payload_bytes: bytes | memoryview | None) -> Any:
    if payload_bytes is not None:
        return bytes(payload_bytes)
    return None if payload is None else json.loads(payload)


def _with_messages(rows: list[tuple[int, int, int]], using: str) -> list[Claimed]:
    fields = ("id", "offset", "payload", "payload_bytes", "key", "headers", "published_at")
    messages = {
        row[0]: row
        for row in Message.objects.using(using)
        .filter(id__in=padded_ids(r[2] for r in rows))
        .values_list(*fields)
    }
    claimed = []
    for delivery_id, attempt, message_id in rows:
        _, offset, payload, payload_bytes, key, headers, published_at = messages[message_id]
        body = bytes(payload_bytes) if payload_bytes is not None else payload
        claimed.append(
            Claimed(
                delivery_id, attempt, message_id, offset, body, key, headers or {}, published_at
            )
        )
    return claimed


class DeliveryQuerySet(models.QuerySet["Delivery"]):
    def inflight(self) -> DeliveryQuerySet:
        return cast(
            DeliveryQuerySet, self.filter(state=Delivery.State.INFLIGHT).extra(where=[INFLIGHT_SQL])
        )

    def unfinished(self) -> DeliveryQuerySet:
        """Pending, retry or inflight, through the partial index on exactly those."""
        unfinished = self.filter(state__in=Delivery.UNFINISHED).extra(where=[UNFINISHED_SQL])
        return cast(DeliveryQuerySet, unfinished)

    def claim(
        self,
        subscription: Subscription,
        *,
        limit: int,
        now: datetime,
        token: str,
        dispatcher_id: int | None,
    ) -> list[Claimed]:
        """Lease up to ``limit`` due deliveries; return them with their messages, in offset
        order.

        The attempt counts here because the dispatcher claims no more than its idle workers
        start within moments (a chunk each, of about CHUNK_SECONDS of handler time), and one
        given back unstarted has its attempt returned (``give_back``).
        """
        using = self.db
        table = quoted(Delivery)
        offset = quoted(Delivery, "offset")
        expires = now + timedelta(seconds=subscription.effective_lease)
        pending, retry = Delivery.State.PENDING, Delivery.State.RETRY
        inflight = Delivery.State.INFLIGHT
        not_paused = Subscription.not_paused_sql()
        if subscription.effective_ordered:
            # A run from the head of the log: the lowest unfinished offsets, up to the first
            # one that is inflight or not yet due. While the head is inflight or waiting for
            # a retry, nothing behind it starts; the dispatcher runs the run in order.
            ctes = (
                f"head AS MATERIALIZED (SELECT id, {offset} AS o, state, available_at "
                f"FROM {table} WHERE subscription_id = %s AND {UNFINISHED_SQL} "
                f"AND state IN (%s, %s, %s) ORDER BY {offset} LIMIT %s), "
                f"picked AS MATERIALIZED (SELECT id AS picked_id FROM head WHERE o < COALESCE("
                f"(SELECT MIN(o) FROM head WHERE state = %s OR available_at > %s), o + 1) "
                f"AND {not_paused})"
            )
            cte_params: list[Any] = [subscription.pk, pending, retry, inflight, limit]
            cte_params += [inflight, now, subscription.pk]
        else:
            skip = (
                " FOR UPDATE SKIP LOCKED"
                if connections[using].features.has_select_for_update_skip_locked
                else ""
            )
            # MATERIALIZED: PostgreSQL may otherwise rescan a LIMIT ... SKIP LOCKED subquery
            # as part of a join and lease more rows than asked for.
            ctes = (
                f"picked AS MATERIALIZED (SELECT id AS picked_id FROM {table} "
                f"WHERE subscription_id = %s AND {UNFINISHED_SQL} AND state IN (%s, %s) "
                f"AND available_at <= %s AND {not_paused} "
                f"ORDER BY {offset} LIMIT %s{skip})"
            )
            cte_params = [subscription.pk, pending, retry, now, subscription.pk, limit]
        connection = connections[using]
        postgres = connection.vendor == "postgresql"
        # Each picked row by its primary key. Statistics of a table of acked rows say
        # "about one unfinished row", so a join with the picked rows, or a state test the
        # partial index answers, gets planned as a scan of all unfinished rows compared
        # with each picked one: quadratic, 0.5 s a claim behind a backlog of 20,000. The
        # state is re-checked (a concurrent ack or claim may have changed it) in a form
        # that index cannot answer.
        in_picked = (
            "= ANY(ARRAY(SELECT picked_id FROM picked))"
            if postgres
            else "IN (SELECT picked_id FROM picked)"
        )
        update = (
            f"UPDATE {table} SET state = %s, attempts = attempts + 1, lease_token = %s, "
            f"lease_expires_at = %s, dispatcher_id = %s, updated_at = %s "
            f"WHERE id {in_picked} AND state NOT IN (%s, %s, %s, %s) AND available_at <= %s "
            f"RETURNING id, attempts, message_id"
        )
        # Every state a delivery may have reached since the snapshot that picked it: an
        # operator's discard included, or an ordered claim could run what was discarded.
        done = (inflight, Delivery.State.ACKED, Delivery.State.DEAD, Delivery.State.DISCARDED)
        params = [*cte_params, inflight, token, expires, dispatcher_id, now, *done, now]
        if postgres:
            # The messages come back with the claim: one round trip, no ORM per row.
            m = quoted(Message)
            # Committed lazily where it is its own transaction, like sequencing (see
            # sql.lazily): a claim that a server crash loses returns its deliveries to where
            # they were, which at-least-once delivery allows, and the ack that follows
            # commits synchronously.
            sql = (
                f"WITH {ctes}, claimed AS ({update}) SELECT c.id, c.attempts, m.id, m.{offset}, "
                f"m.payload::text, m.payload_bytes, m.key, m.headers::text, m.published_at, "
                f"{LAZY_COMMIT if lazily(connection) else 'NULL'} "
                f"FROM claimed c JOIN {m} m ON m.id = c.message_id"
            )
        else:
            sql = f"WITH {ctes} {update}"
        # An unordered claim on PostgreSQL is one statement, so its own transaction
        # (outside an atomic block) is enough. An ordered one takes a lock first, and
        # SQLite reads the messages after the claim: those statements share one.
        together = subscription.effective_ordered or not postgres
        with (
            transaction.atomic(using=using) if together else nullcontext(),
            connection.wrap_database_errors,
            bound_cursor(connection) as cursor,
        ):
            if subscription.effective_ordered:
                # Claimers of one subscription take turns on its row lock, and each sees
                # what the one before committed, so two never lease parts of one run.
                lock_row(cursor, Subscription, subscription.pk, using, "position")
            cursor.execute(sql, params)
            rows = cursor.fetchall()
            if not postgres:
                claimed = _with_messages(rows, using)
        if postgres:
            claimed = [Claimed.from_row(row) for row in rows]
        claimed.sort(key=lambda row: row.offset)
        return claimed

    def ack(
        self, ids: Sequence[int], *, token: str, now: datetime, lazy: bool = False
    ) -> list[int]:
        """Mark handled deliveries acked; the lease token fences out late workers. Returns
        the ids it acked: those whose lease was taken back meanwhile are not among them.

        Plain SQL: it runs once per message of an ordered run, where the ORM's cost of
        building the statement would be most of the ack's.

        ``lazy`` (PostgreSQL, outside a transaction): commit without waiting for the WAL
        flush, as sql.lazily explains. The ack is visible to every other session at once and
        survives the dispatcher's crash; only a crash of the database server itself may
        lose it, and the message then runs again (guarantees 3).
        """
        connection = connections[self.db]
        at = connection.ops.adapt_datetimefield_value(now)
        params: list[Any]
        if len(ids) == 1:
            # An ordered run's ack: the plainest statement (no array to build and parse).
            match, params = "id = %s", list(ids)
        elif connection.vendor == "postgresql":
            match, params = "id = ANY(%s)", [list(ids)]
        else:
            params = padded_ids(ids)
            match = f"id IN ({', '.join(['%s'] * len(params))})"
        if lazy and connection.vendor == "postgresql" and lazily(connection):
            # Evaluated for the row the primary key finds, before the transaction commits.
            match += f" AND {LAZY_COMMIT} IS NOT NULL"
        with connection.wrap_database_errors, bound_cursor(connection) as cursor:
            cursor.execute(
                f"UPDATE {quoted(Delivery)} SET state = %s, lease_token = NULL, "
                f"lease_expires_at = NULL, dispatcher_id = NULL, finished_at = %s, "
                f"updated_at = %s WHERE {match} AND state = %s AND lease_token = %s "
                f"RETURNING id",
                [Delivery.State.ACKED, at, at, *params, Delivery.State.INFLIGHT, token],
            )
            return [row[0] for row in cursor.fetchall()]

    def give_back(self, ids: Sequence[int], *, token: str, now: datetime) -> int:
        """Return claimed deliveries whose handler never started, with their attempt."""
        leased = self.filter(id__in=padded_ids(ids), state=Delivery.State.INFLIGHT)
        return leased.filter(lease_token=token).update(
            state=Case(
                When(attempts__gt=1, then=Value(Delivery.State.RETRY)),
                default=Value(Delivery.State.PENDING),
            ),
            attempts=F("attempts") - 1,
            lease_token=None,
            lease_expires_at=None,
            dispatcher=None,
            updated_at=now,
        )

    def fail(
        self,
        delivery_id: int,
        *,
        token: str,
        now: datetime,
        error: str,
        traceback: str,
        max_attempts: int,
        delay: float,
    ) -> str | None:
        """Record a failed attempt; schedule a retry or dead-letter. None if fenced out."""
        fenced = self.filter(id=delivery_id, state=Delivery.State.INFLIGHT, lease_token=token)
        row = fenced.values("attempts", "errors").first()
        if row is None:
            return None
        attempt = row["attempts"]
        errors = list(row["errors"] or [])
        errors.append(
            {"attempt": attempt, "at": now.isoformat(), "error": error, "traceback": traceback}
        )
        dead = attempt >= max_attempts
        state = Delivery.State.DEAD if dead else Delivery.State.RETRY
        updated = fenced.update(
            state=state,
            errors=errors,
            last_error=error,
            available_at=now if dead else now + timedelta(seconds=delay),
            lease_token=None,
            lease_expires_at=None,
            dispatcher=None,
            finished_at=now if dead else None,
            updated_at=now,
        )
        return state if updated else None

    # Operator actions. Each is one UPDATE of the rows still in the state it applies to, so
    # one that races with the dispatcher (a retry that became due and was claimed
    # meanwhile, say) changes nothing of those rows; each returns how many it changed.

    def retry_now(self, now: datetime) -> int:
        """Make deliveries waiting for a retry due at once."""
        return self.filter(state=Delivery.State.RETRY).update(available_at=now, updated_at=now)

    def replay(self, now: datetime) -> int:
        """Dead letters run again, due now, with ``max_attempts`` fresh attempts. Their
        error history stays. Refused (ActionRefused) for an ordered subscription while any
        of its deliveries runs: the replayed one would start beside it."""
        dead = self.filter(state=Delivery.State.DEAD)
        using = self._db or router.db_for_write(Delivery)  # type: ignore[attr-defined]
        with transaction.atomic(using=using):
            subs = Subscription.objects.using(using).filter(pk__in=dead.values("subscription_id"))
            _refuse_while_running(list(subs), using, "replay")
            return dead.run_again(now)

    def run_again(self, now: datetime) -> int:
        """Back to pending, due now, with fresh attempts (the error history stays): what
        replay() does to dead letters and seek() to every delivery that ended. No checks of
        its own: callers choose the rows."""
        return self.update(
            state=Delivery.State.PENDING,
            attempts=0,
            available_at=now,
            finished_at=None,
            updated_at=now,
        )

    def discard(self, now: datetime) -> int:
        """Give up on deliveries that wait (pending, retry) or are dead: they end
        ``discarded`` and do not run (unless a seek goes back before them). Inflight ones
        are left to their handler."""
        waiting_or_dead = (Delivery.State.PENDING, Delivery.State.RETRY, Delivery.State.DEAD)
        return self.filter(state__in=waiting_or_dead).update(
            state=Delivery.State.DISCARDED, finished_at=now, updated_at=now
        )

    def expired(self, now: datetime) -> DeliveryQuerySet:
        return self.inflight().filter(lease_expires_at__lt=now)


class Delivery(models.Model):
    class State(models.TextChoices):
        PENDING = "pending"
        INFLIGHT = "inflight"
        RETRY = "retry"
        ACKED = "acked"
        DEAD = "dead"
        # Given up on by an operator (recorded in the admin log): runs again only after a
        # seek back before it.
        DISCARDED = "discarded"

    WAITING = (State.PENDING, State.RETRY)
    UNFINISHED = (State.PENDING, State.RETRY, State.INFLIGHT)
    ENDED = (State.ACKED, State.DEAD, State.DISCARDED)

    id = models.BigAutoField(primary_key=True)
    # No index of its own: the unique (subscription, message) constraint's serves. Every
    # index on this table is written at each claim and ack, so there are few.
    subscription = models.ForeignKey(
        Subscription, on_delete=models.PROTECT, related_name="deliveries", db_index=False
    )
    message = models.ForeignKey(Message, on_delete=models.PROTECT, related_name="deliveries")
    # The message's offset, copied so the claim reads one table in log order.
    offset = models.BigIntegerField()
    state = models.CharField(max_length=10, choices=State.choices, default=State.PENDING)
    # Handler starts so far.
    attempts = models.PositiveIntegerField(default=0)
    # When a pending or retrying delivery becomes due.
    available_at = models.DateTimeField()
    lease_token = models.CharField(max_length=32, null=True, blank=True)  # noqa: DJ001  (NULL: not leased)
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    # Not indexed: a dead dispatcher's deliveries are found among the inflight ones.
    dispatcher = models.ForeignKey(
        "Dispatcher",
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="+",
        db_index=False,
    )
    last_error = models.TextField(blank=True)
    # One entry per failed attempt: attempt, at, error, traceback.
    errors = models.JSONField(default=list, blank=True)
    created_at = models.DateTimeField()
    updated_at = models.DateTimeField()
    finished_at = models.DateTimeField(null=True, blank=True)

    objects = DeliveryQuerySet.as_manager()

    class Meta:
        verbose_name_plural = "deliveries"
        constraints = [
            models.UniqueConstraint(
                fields=["subscription", "message"], name="pubsub_delivery_subscription_message"
            ),
        ]
        indexes = [
            # The claim and the ordered head: only unfinished rows, so a long acked history
            # does not make it slower.
            models.Index(
                fields=["subscription", "offset"],
                condition=Q(state__in=["pending", "retry", "inflight"]),
                name="pubsub_delivery_unfinished",
            ),
            models.Index(
                fields=["lease_expires_at"],
                condition=Q(state="inflight"),
                name="pubsub_delivery_leases",
            ),
        ]

    def __str__(self) -> str:
        return f"delivery {self.pk} of message {self.message_id} to {self.subscription_id}"

    def why(self, now: datetime) -> str:
        """A sentence for an operator: where this delivery stands and what it waits for."""
        sub = self.subscription
        if self.state == Delivery.State.ACKED:
            return (
                f"Handled at {_local(self.finished_at, '%Y-%m-%d %H:%M:%S %Z')} after "
                f"{self.attempts} attempt(s)."
            )
        if self.state == Delivery.State.DEAD:
            return (
                f"Dead after {self.attempts} failed attempt(s); it runs again only if an "
                f"operator replays it."
            )
        if self.state == Delivery.State.DISCARDED:
            return (
                "Discarded by an operator (a discard, or a seek past it): it runs only if "
                "the subscription is sought back before it."
            )
        if self.state == Delivery.State.INFLIGHT:
            holder = f"dispatcher {self.dispatcher}" if self.dispatcher else "a dispatcher"
            until = f" until {_local(self.lease_expires_at)}" if self.lease_expires_at else ""
            return f"Running: leased by {holder}{until} (attempt {self.attempts})."
        if not sub.active:
            return (
                f"Waiting: subscription {sub.name} is no longer declared in the code, so no "
                f"dispatcher runs it."
            )
        if sub.paused:
            return f"Waiting: subscription {sub.name} is paused."
        if self.state == Delivery.State.RETRY and self.available_at > now:
            return (
                f"Waiting to retry at {_local(self.available_at)} "
                f"(attempt {self.attempts + 1} of {sub.effective_max_attempts})."
            )
        if sub.effective_ordered:
            ahead = (
                Delivery.objects.unfinished()
                .filter(subscription_id=self.subscription_id, offset__lt=self.offset)
                .order_by("offset")
                .first()
            )
            if ahead is not None:
                return (
                    f"Ordered: waits behind message {ahead.message_id} (offset {ahead.offset}, "
                    f"{ahead.state})."
                )
        if not Dispatcher.objects.heartbeating(now).exists():
            return "Due now, but no dispatcher is running."
        return "Due now: the next dispatcher with a free worker takes it."


def _local(moment: datetime | None, style: str = "%H:%M:%S %Z") -> str:
    """A time for an operator: in the project's time zone, which it names."""
    if moment is None:
        return ""
    return format(timezone.localtime(moment) if timezone.is_aware(moment) else moment, style)


def pid_namespace() -> str:
    """Which PID space our pid belongs to: two containers on one host share no pids."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


class DispatcherQuerySet(models.QuerySet["Dispatcher"]):
    def alive(self) -> DispatcherQuerySet:
        return self.filter(stopped_at__isnull=True)

    def heartbeating(self, now: datetime) -> DispatcherQuerySet:
        """Running, and heard from within DISPATCHER_TIMEOUT: those that deliver."""
        recent = now - timedelta(seconds=pubsub_settings.dispatcher_timeout)
        return self.alive().filter(last_seen__gte=recent).order_by("id")

    def presumed_dead(self, now: datetime, *, timeout: float, me: Dispatcher) -> list[Dispatcher]:
        """Running rows whose process is gone: silent too long, or known gone on this host."""
        host, namespace = socket.gethostname(), pid_namespace()
        dead = []
        for row in self.alive().exclude(pk=me.pk):
            if row.last_seen < now - timedelta(seconds=timeout):
                dead.append(row)
            elif row.hostname == host and row.pid_namespace == namespace and namespace:
                # Same pid space: a pid that is ours (reused) or no longer exists is gone.
                if row.pid == me.pid or not _pid_alive(row.pid):
                    dead.append(row)
        return dead


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Dispatcher(models.Model):
    """The heartbeat of one runpubsub process."""

    hostname = models.CharField(max_length=255)
    pid = models.PositiveIntegerField()
    pid_namespace = models.CharField(max_length=64, blank=True)
    started_at = models.DateTimeField()
    last_seen = models.DateTimeField()
    stopped_at = models.DateTimeField(null=True, blank=True)
    inflight = models.PositiveIntegerField(default=0)
    # Handlers that outran their timeout and still hold a thread (Python cannot stop them).
    stuck = models.PositiveIntegerField(default=0)

    objects = DispatcherQuerySet.as_manager()

    class Meta:
        ordering = ["-started_at"]

    def __str__(self) -> str:
        return f"{self.hostname}:{self.pid}"

    @classmethod
    def register(cls, now: datetime) -> Dispatcher:
        return cls.objects.create(
            hostname=socket.gethostname(),
            pid=os.getpid(),
            pid_namespace=pid_namespace(),
            started_at=now,
            last_seen=now,
        )

    def beat(self, now: datetime, *, inflight: int, stuck: int = 0) -> bool:
        """Record that we are alive; False if another dispatcher had presumed us dead."""
        mine = Dispatcher.objects.filter(pk=self.pk)
        fields = {"last_seen": now, "inflight": inflight, "stuck": stuck}
        alive = bool(mine.filter(stopped_at__isnull=True).update(**fields))
        if not alive:
            # Our leases were taken back: results of handlers running now will be fenced out.
            # Count as alive again so nobody takes the leases we claim from here on.
            logger.warning("dispatcher %s was presumed dead by another; carrying on", self)
            mine.update(stopped_at=None, **fields)
        self.last_seen, self.inflight, self.stuck, self.stopped_at = now, inflight, stuck, None
        return alive

    @staticmethod
    def clock_skew(now: datetime, using: str = "default") -> float | None:
        """Seconds by which ``now`` (this host's clock) is ahead of the database server's;
        None where the database runs in this process (SQLite)."""
        connection = connections[using]
        if connection.vendor != "postgresql":
            return None
        with connection.cursor() as cursor:
            cursor.execute("SELECT clock_timestamp()")
            (server_now,) = cursor.fetchone()
        return float((now - server_now).total_seconds())

    def mark_dead(self, now: datetime) -> bool:
        """Mark a presumed-dead dispatcher stopped, unless it beat since we looked."""
        updated = Dispatcher.objects.filter(
            pk=self.pk, stopped_at__isnull=True, last_seen=self.last_seen
        ).update(stopped_at=now)
        return bool(updated)

    def stop(self, now: datetime) -> None:
        self.stopped_at = self.last_seen = now
        self.inflight = self.stuck = 0
        Dispatcher.objects.filter(pk=self.pk).update(
            stopped_at=now, last_seen=now, inflight=0, stuck=0
        )
