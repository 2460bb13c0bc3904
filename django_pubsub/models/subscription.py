"""Subscriptions: one ``@subscriber`` declaration each, with its cursor in its topic.

Each subscription keeps a cursor (``position``) in its topic, and the dispatcher *fans
out* sequenced messages past it into ``Delivery`` rows.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any, NamedTuple

from django.db import models, transaction
from django.db.models import Q
from django.utils import timezone

from .. import backends
from ..backends import padded_ids
from ..backends.base import SUBSCRIPTION
from ..conf import DELIVERY_CHOICES, ON_DEAD_CHOICES, pubsub_settings
from ..exceptions import ActionRefused, InvalidSchedule, InvalidSeek
from ..retry import Backoff
from ..states import ENDED, WAITING
from ..validation import (
    LAST_PREFIX,
    datetime_kind,
    is_stored_datetime,
    parse_rate,
    storable,
)
from .delivery import Delivery
from .log import Message, Topic

logger = logging.getLogger("django_pubsub.models")


class Subscription(models.Model):
    name = models.CharField(max_length=200, unique=True)
    topic = models.ForeignKey(Topic, on_delete=models.PROTECT, related_name="subscriptions")
    handler = models.CharField(max_length=300, help_text="Dotted path of the handler function.")
    # The declaration's options; NULL means the PUBSUB setting applies when the dispatcher runs.
    ordered = models.BooleanField(null=True, blank=True)
    # ordered="key": one order per message key (``ordered`` is then NULL and ignored).
    keyed = models.BooleanField(default=False, db_default=False)
    on_dead = models.CharField(
        max_length=20,
        choices=[(choice, choice) for choice in ON_DEAD_CHOICES],
        default="continue",
        db_default="continue",
        help_text="Keyed: what a dead head does to the rest of its key.",
    )
    delivery = models.CharField(
        max_length=20,
        choices=[(choice, choice) for choice in DELIVERY_CHOICES],
        default="at_least_once",
        db_default="at_least_once",
    )
    batch_size = models.PositiveIntegerField(
        null=True, blank=True, help_text="Set: the handler takes a list of messages."
    )
    batch_wait = models.FloatField(
        null=True, blank=True, help_text="Seconds a batch may gather before it runs."
    )
    max_attempts = models.PositiveIntegerField(null=True, blank=True)
    lease = models.FloatField(null=True, blank=True, help_text="Lease in seconds.")
    timeout = models.FloatField(
        null=True, blank=True, help_text="Seconds a handler may run before its attempt fails."
    )
    max_inflight = models.PositiveIntegerField(null=True, blank=True)
    backoff = models.JSONField(null=True, blank=True)
    # The circuit breaker (@subscriber circuit_breaker=): this many failures in a row with
    # one exception type pause it, for breaker_pause seconds (None: until resumed).
    breaker_failures = models.PositiveIntegerField(null=True, blank=True)
    breaker_pause = models.FloatField(null=True, blank=True)
    # @subscriber filter=: {"headers": {name: value}, "key": key}; messages that do not
    # match all of it get a "filtered" delivery at fan-out, never run. NULL: every one.
    message_filter = models.JSONField(null=True, blank=True)
    # @subscriber rate= ("100/s"; "": none): a token bucket shared by every dispatcher,
    # kept in the row: tokens left as of rate_at.
    rate = models.CharField(max_length=30, blank=True, default="", db_default="")
    rate_tokens = models.FloatField(default=0.0, db_default=0.0, editable=False)
    rate_at = models.DateTimeField(null=True, blank=True, editable=False)
    # Where it began, as declared: "earliest", "latest", "last N", or a time (ISO format).
    start = models.CharField(max_length=40)
    # Offset up to which messages of the topic have been fanned out into deliveries.
    position = models.BigIntegerField(default=0, editable=False)
    active = models.BooleanField(
        default=True, help_text="False once the code no longer declares it."
    )
    # Set by an operator: nothing of it is claimed; its deliveries are still created.
    # db_default: rows that code from before this field inserts (during a rolling deploy)
    # are not paused.
    paused = models.BooleanField(default=False, db_default=False)
    # A pause that ends by itself at this time (a dispatcher resumes it); None: until an
    # operator resumes it. And why it was paused, when something other than an operator
    # did it (the circuit breaker).
    paused_until = models.DateTimeField(null=True, blank=True)
    paused_reason = models.CharField(max_length=500, blank=True, default="", db_default="")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    @classmethod
    def behind(cls, using: str = "default") -> list[int]:
        """Active subscriptions with sequenced messages not yet fanned out to them."""
        return [sub for sub, _ in backends.get(using).subscriptions_behind()]

    @property
    def effective_ordered(self) -> bool:
        """One order for the whole subscription (not per key)."""
        if self.keyed:
            return False
        return pubsub_settings.ordered if self.ordered is None else self.ordered

    @property
    def keeps_order(self) -> bool:
        """Ordered, for the whole subscription or per key: a message may wait behind
        another."""
        return self.keyed or self.effective_ordered

    def order_of(self, key: str | None) -> str | None:
        """The order a message with ``key`` keeps: the subscription's one order (""), its
        key, or None (it waits for nothing)."""
        if self.effective_ordered:
            return ""
        return key if self.keyed else None

    @property
    def ordering(self) -> str:
        """How its messages are ordered: "key", "subscription" or "none"."""
        if self.keyed:
            return "key"
        return "subscription" if self.effective_ordered else "none"

    @property
    def buries_keys(self) -> bool:
        """Keyed, and a dead head dead-letters what follows it in its key."""
        return self.keyed and self.on_dead == "dead_letter_key"

    @property
    def effective_batch_wait(self) -> float:
        return self.batch_wait or 0.0

    @property
    def effective_max_attempts(self) -> int:
        if self.delivery == "at_most_once":
            return 1
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

    def copy_keys(self, *, using: str = "default") -> int:
        """Copy the message keys into its unfinished deliveries once it is ordered by key
        (its backlog then keeps each key's order too), or clear them once it is not; how
        many rows changed."""
        rows = Delivery.objects.using(using).unfinished().filter(subscription_id=self.pk)
        if not self.keyed:
            return rows.filter(key__isnull=False).update(key=None)
        keys = Message.objects.using(using).filter(pk=models.OuterRef("message_id"))
        return rows.update(key=models.Subquery(keys.values("key")[:1]))

    def pause(
        self, now: datetime | None = None, *, until: datetime | None = None, reason: str = ""
    ) -> bool:
        """Stop claiming its deliveries (those running finish); False if already paused
        (then ``until`` and ``reason`` replace what it had). ``until``: a dispatcher
        resumes it at that time (within a second); None: an operator does."""
        _check_until(until)
        return self._set_paused(True, now or timezone.now(), _pause_fields(until, reason))

    def trip(self, now: datetime, *, until: datetime | None, reason: str) -> bool:
        """Pause it for the circuit breaker, unless it is paused already (an operator's
        pause, another dispatcher's trip: that one says when it ends). One conditional
        UPDATE, so no pause set meanwhile is overwritten. False if it was paused."""
        return self._set_paused(True, now, _pause_fields(until, reason), replace=False)

    def resume(self, now: datetime | None = None) -> bool:
        """Claim its deliveries again; False if it was not paused."""
        fields = {"paused_until": None, "paused_reason": ""}
        return self._set_paused(False, now or timezone.now(), fields)

    def take_starts(self, want: int, now: datetime, using: str = "default") -> int:
        """Of ``want`` starts of its handler, how many its rate allows now (all of them
        without a rate). A token bucket in its row, under the row's lock, so every
        dispatcher draws from the same one: it fills at N per period up to N (a period's
        burst). What a claim then does not start goes back (give_back_starts())."""
        if not self.rate or want <= 0:
            return want
        due = Q(state=Delivery.State.PENDING) | Q(available_at__lte=now)
        waiting = Delivery.objects.using(using).unfinished().filter(due, subscription_id=self.pk)
        if not waiting.filter(subscription__paused=False).exists():
            return 0  # nothing to start: one read, where the bucket would take two writes
        count, seconds = parse_rate(self.rate)
        backend = backends.get(using)
        with transaction.atomic(using=using), backend.connection.cursor() as cursor:
            backend.lock_row(cursor, SUBSCRIPTION, self.pk, "rate_tokens")
            tokens, at = (
                Subscription.objects.using(using)
                .values_list("rate_tokens", "rate_at")
                .get(pk=self.pk)
            )
            if at is None:
                tokens, at = float(count), now
            elif now > at:  # never back: a claim with an older clock refills nothing
                tokens = min(float(count), tokens + (now - at).total_seconds() * count / seconds)
                at = now
            granted = min(want, int(tokens))
            Subscription.objects.using(using).filter(pk=self.pk).update(
                rate_tokens=tokens - granted, rate_at=at
            )
        return granted

    def give_back_starts(self, unused: int, using: str = "default") -> None:
        """Starts take_starts() allowed that a claim did not make."""
        if self.rate and unused > 0:
            Subscription.objects.using(using).filter(pk=self.pk).update(
                rate_tokens=models.F("rate_tokens") + unused
            )

    @classmethod
    def resume_due(cls, now: datetime, using: str = "default") -> list[Subscription]:
        """Resume the subscriptions whose pause ends by ``now`` (paused_until); those it
        resumed (one a pause changed meanwhile is left as it is now)."""
        from .. import signals

        resumed: list[Subscription] = []
        for sub in cls.objects.using(using).filter(paused=True, paused_until__lte=now):
            rows = cls.objects.using(using).filter(
                pk=sub.pk, paused=True, paused_until=sub.paused_until
            )
            if rows.update(paused=False, paused_until=None, paused_reason="", updated_at=now):
                sub.paused, sub.paused_until, sub.paused_reason = False, None, ""
                logger.info("subscription %s resumed: its pause ended", sub.name)
                signals.send(signals.subscription_resumed, Subscription, subscription=sub)
                resumed.append(sub)
        return resumed

    def _set_paused(
        self, paused: bool, now: datetime, fields: dict[str, Any], *, replace: bool = True
    ) -> bool:
        """Pause or resume it, with ``fields``; not ``replace``: a pause leaves one that is
        there as it is."""
        from .. import signals

        rows = Subscription.objects.filter(pk=self.pk, paused=not paused)
        changed = rows.update(paused=paused, updated_at=now, **fields) == 1
        if not changed and paused:
            if not replace:
                return False
            # Paused already, maybe held by a seek or replay: the operator's pause is what
            # the row says now, and the hold's end must leave it paused (release()).
            Subscription.objects.filter(pk=self.pk, paused=True).update(updated_at=now, **fields)
        self.paused = paused
        for name, value in fields.items():
            setattr(self, name, value)
        if changed:
            signal = signals.subscription_paused if paused else signals.subscription_resumed
            signals.send(signal, Subscription, subscription=self)
        return changed

    def hold(self, now: datetime, *, using: str = "default") -> bool:
        """Pause it while an operator's action works in batches (a seek, a replay): no
        claim starts part of the action's work before the rest is done. Not an operator's
        pause (no signal), and False, with nothing to release, if it is paused already."""
        rows = Subscription.objects.using(using).filter(pk=self.pk, paused=False)
        return rows.update(paused=True, updated_at=now) == 1

    def release(self, now: datetime, *, using: str = "default") -> bool:
        """End a hold taken at ``now``, unless the row changed since (an operator paused or
        resumed it, a deploy changed its options): then it stays as they left it."""
        from .. import signals

        rows = Subscription.objects.using(using).filter(pk=self.pk, paused=True, updated_at=now)
        released = rows.update(paused=False, updated_at=timezone.now()) == 1
        if not released:
            current = Subscription.objects.using(using).filter(pk=self.pk).first()
            if current is not None and current.paused:
                logger.warning(
                    "subscription %s changed while an operator's action held it: it stays "
                    "paused until an operator resumes it",
                    self.name,
                )
                # Paused from now on by nobody's explicit act: tell who watches pauses.
                signals.send(signals.subscription_paused, Subscription, subscription=current)
        return released

    def seek(
        self,
        *,
        offset: int | None = None,
        at: datetime | None = None,
        last: int | None = None,
        now: datetime | None = None,
        using: str = "default",
    ) -> Seek:
        """Deliver the topic again from ``offset``, from its first message published at or
        after ``at``, or from its ``last`` messages; pass over what comes before.

        From there on, deliveries that ended (acked, dead or discarded) are pending again,
        with fresh attempts; before it, those still waiting (pending or retry) end
        ``discarded``, and messages never fanned out to this subscription are passed over.
        Deliveries running at the time (or claimed, about to start) are left to their
        dispatcher, retried if they fail; dead letters before the point stay dead.
        Seeking to the topic's end (its next offset) skips everything. An ordered
        subscription is refused while any of its deliveries runs (pause it first), or one
        of the two would run beside the other. Bad arguments raise InvalidSeek.

        The cursor moves in one short transaction under the subscription's row lock; the
        deliveries change a batch at a time after it, so that a seek over a long backlog
        holds up no claim or fan-out for more than a batch. The subscription is held
        (paused, see hold()) meanwhile, so no claim that begins after the seek starts any
        of it, and released after; what ended (acked, dead, discarded) after the seek began
        is not run again. Interrupted half way (the process died), it stays paused: the
        same seek again finishes the work; then resume it. Inside a caller's transaction
        it is that transaction's: nothing is held, and the row lock holds up the topic's
        fan-out until the caller commits.
        """
        _check_seek(offset, at, last)
        now = now or timezone.now()
        backend = backends.get(using)
        # Inside a caller's transaction a hold would show only once that commits: the
        # seek is then that transaction's, under the row lock until it commits.
        inside = backend.connection.in_atomic_block
        with transaction.atomic(using=using), backend.connection.cursor() as cursor:
            # The fan-out's and the ordered claim's lock: neither runs while we move it. Read
            # after it, the row is the latest committed one.
            backend.lock_row(cursor, SUBSCRIPTION, self.pk, "position")
            rows = Subscription.objects.using(using).select_related("topic")
            current = rows.filter(pk=self.pk).first()
            if current is None:
                raise ActionRefused(f"subscription {self.pk} no longer exists")
            position = current.position
            Delivery.objects.using(using).refuse_while_running([current], "seek")
            point, end = _seek_point(current.topic, offset, at, last, using)
            held = not inside and current.hold(now, using=using)
            passed_over = 0
            mine = Delivery.objects.using(using).filter(subscription_id=self.pk)
            # Left to their dispatcher: acked meanwhile, they are not run again.
            running = list(mine.inflight().filter(offset__gte=point).values_list("id", flat=True))
            if point > position:
                # What the cursor jumps over with no delivery to show for it.
                had = mine.filter(offset__gte=position, offset__lt=point).count()
                passed_over = point - position - had
                Subscription.objects.using(using).filter(pk=self.pk).update(
                    position=point, updated_at=now
                )
                self.position = point
        try:
            waiting = mine.unfinished().filter(offset__lt=point, state__in=WAITING)
            skipped = waiting.discard(now, by="message_id")
            # What had ended when the seek began: not what a claim under way when the hold
            # began (it read the row before) leased and acked meanwhile.
            ended = mine.filter(offset__gte=point, offset__lt=end, state__in=ENDED)
            ended = ended.filter(Q(finished_at__lte=now) | Q(finished_at__isnull=True))
            ended = ended.exclude(id__in=padded_ids(running))
            # Expired and still so: pending again, it could only expire again.
            ended = ended.exclude(state=Delivery.State.EXPIRED, message__expires_at__lte=now)
            replayed = ended.in_batches(lambda rows: rows.run_again(now), by="message_id")
            # Messages it has no delivery of yet (published before it began, or passed over
            # by an earlier seek): created here, so the fan-out need not go back.
            batch = pubsub_settings.batch_size
            for low in range(point, position, batch):
                high = min(low + batch, position)
                with transaction.atomic(using=using), backend.connection.cursor() as cursor:
                    replayed += backend.create_deliveries(
                        cursor, self.pk, self.topic_id, low, high, now, keyed=self.keyed
                    )
        finally:
            if held:
                current.release(now, using=using)
        return Seek(point, replayed, skipped, passed_over)


def _seek_point(
    topic: Topic, offset: int | None, at: datetime | None, last: int | None, using: str
) -> tuple[int, int]:
    """The offset a seek (or a new subscription's start) goes to: ``offset``, that of the
    first message published at or after ``at`` (the topic's end if none was), or ``last``
    messages before the topic's end; and the topic's end."""
    if at is not None:
        sequenced = Message.objects.using(using).filter(
            topic_id=topic.pk, offset__isnull=False, published_at__gte=at
        )
        offset = sequenced.aggregate(first=models.Min("offset"))["first"]
    # Read after the lookup: sequencing may have moved it on meanwhile.
    end: int = Topic.objects.using(using).values_list("next_offset", flat=True).get(pk=topic.pk)
    if last is not None:
        offset = max(0, end - last)
    point = end if offset is None else offset
    # Below what retention kept there is nothing to run again: start at the first stored.
    point = max(point, min(Topic.first_stored(topic.pk, using=using), end))
    if point > end:
        raise InvalidSeek(
            f"offset {point} is past the end of topic {topic} (its next message gets offset {end})"
        )
    return point, end


def starting_position(topic: Topic, start: str, using: str = "default") -> int:
    """Where a new subscription begins, for its start (a label as @subscriber keeps it:
    "earliest", "latest", "last N" or a time in ISO format): the first stored message, the
    topic's end, N messages before the end, or the first message published at or after
    the time. Messages already due are sequenced first, so "latest" and "last N" count
    every message committed before this call."""
    if start == "earliest":
        return Topic.first_stored(topic.pk, using=using)
    batch, now = pubsub_settings.batch_size, timezone.now()
    while Topic.sequence(topic.pk, batch=batch, now=now, using=using) == batch:
        pass
    if start == "latest":
        return int(
            Topic.objects.using(using).values_list("next_offset", flat=True).get(pk=topic.pk)
        )
    last, at = start_target(start)
    return _seek_point(topic, None, at, last, using)[0]


def start_target(start: str) -> tuple[int | None, datetime | None]:
    """A start label other than "earliest" and "latest" as (last N, time): one is None."""
    if start.startswith(LAST_PREFIX):
        return int(start[len(LAST_PREFIX) :]), None
    return None, datetime.fromisoformat(start)


# What paused_reason keeps of a reason (a breaker's includes an exception's text), its
# cut said so within the column's 500.
REASON_CHARS = 440


def _pause_fields(until: datetime | None, reason: str) -> dict[str, Any]:
    return {"paused_until": until, "paused_reason": storable(reason, REASON_CHARS)}


def _check_until(until: object) -> None:
    if until is not None and not is_stored_datetime(until):
        raise InvalidSchedule(f"pause() until= must be None or {datetime_kind()}, not {until!r}")


def _check_seek(offset: int | None, at: datetime | None, last: int | None = None) -> None:
    if sum(value is not None for value in (offset, at, last)) != 1:
        raise InvalidSeek(
            "seek() takes an offset, a time (at=) or a count of messages (last=), one of them"
        )
    for name, value in (("offset", offset), ("last", last)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise InvalidSeek(f"seek() {name} must be an int, not {value!r}")
        if value is not None and value < 0:
            raise InvalidSeek(f"seek() {name} must be 0 or more, not {value}")
    if at is not None and not is_stored_datetime(at):
        raise InvalidSeek(f"seek() at= must be {datetime_kind()}, not {at!r}")


class Seek(NamedTuple):
    """What Subscription.seek() did."""

    offset: int  # where the subscription now starts
    replayed: int  # deliveries from there on that had ended, pending again
    skipped: int  # deliveries before it that still waited, now discarded
    passed_over: int  # messages before it never fanned out to the subscription
