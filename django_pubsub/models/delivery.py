"""Deliveries: one message for one subscription, and every transition of its state.

Deliveries are claimed (``inflight`` with a lease token), then acked, retried or
dead-lettered; every transition is one UPDATE that checks the expected state and lease
token, so a transition that lost a race changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, cast

from django.db import models, router, transaction
from django.db.models import Case, F, Q, Value, When
from django.utils import timezone

from .. import backends
from ..backends import Claimed, padded_ids
from ..backends.base import INFLIGHT_SQL, SUBSCRIPTION, UNFINISHED_SQL
from ..conf import pubsub_settings
from ..exceptions import ActionRefused
from ..states import ENDED, UNFINISHED, WAITING, DeliveryState
from ..validation import storable
from .dispatcher import Dispatcher

if TYPE_CHECKING:
    from .subscription import Subscription

# Most characters of a failure's error and traceback kept (every attempt keeps its own).
ERROR_CHARS = 4_000
TRACEBACK_CHARS = 20_000


class DeliveryQuerySet(models.QuerySet["Delivery"]):
    def inflight(self) -> DeliveryQuerySet:
        return cast(
            DeliveryQuerySet, self.filter(state=DeliveryState.INFLIGHT).extra(where=[INFLIGHT_SQL])
        )

    def unfinished(self) -> DeliveryQuerySet:
        """Pending, retry or inflight, through the partial index on exactly those."""
        unfinished = self.filter(state__in=UNFINISHED).extra(where=[UNFINISHED_SQL])
        return cast(DeliveryQuerySet, unfinished)

    def heads(self, subscription_id: int) -> DeliveryQuerySet:
        """The subscription's unfinished deliveries from its lowest offset up: the first
        is the head an ordered subscription waits on."""
        return self.unfinished().filter(subscription_id=subscription_id).order_by("offset")

    def expired(self, now: datetime) -> DeliveryQuerySet:
        return self.inflight().filter(lease_expires_at__lt=now)

    # The dispatcher's transitions.

    def claim(
        self,
        subscription: Subscription,
        *,
        limit: int,
        now: datetime,
        token: str,
        dispatcher_id: int | None,
        gather: bool = True,
        hung_keys: Sequence[str] = (),
    ) -> list[Claimed]:
        """Lease up to ``limit`` due deliveries; return them with their messages, in offset
        order (an ordered subscription: a run from its head, under its row lock; a keyed
        one: a run from each key's head). A batch subscription's claim leases nothing
        until a batch is full or has waited its ``batch_wait`` (unless not ``gather``:
        drain() takes what is due). Rows a keyed subscription
        buries (``on_dead="dead_letter_key"``) come back ``buried``: not to run.

        The attempt counts here because the dispatcher claims no more than its idle workers
        start within moments (a chunk each, of about CHUNK_SECONDS of handler time), and one
        given back unstarted has its attempt returned (``give_back``).
        """
        batch = None
        # No wait: whatever is due is a batch, and the claim needs no condition for it.
        if subscription.batch_size and subscription.effective_batch_wait and gather:
            batch = (subscription.batch_size, subscription.effective_batch_wait)
        return backends.get(self.db).claim(
            subscription.pk,
            ordered=subscription.effective_ordered,
            keyed=subscription.keyed,
            hung_keys=hung_keys,
            buries=subscription.buries_keys,
            batch=batch,
            limit=limit,
            now=now,
            lease=subscription.effective_lease,
            token=token,
            dispatcher_id=dispatcher_id,
        )

    def ack(
        self, ids: Sequence[int], *, token: str, now: datetime, lazy: bool = False
    ) -> list[int]:
        """Mark handled deliveries acked; the lease token fences out late workers. Returns
        the ids it acked: those whose lease was taken back meanwhile are not among them.

        ``lazy`` (PostgreSQL, outside a transaction): commit without waiting for the WAL
        flush. The ack is visible to every other session at once and survives the
        dispatcher's crash; only a crash of the database server itself may lose it, and
        the message then runs again (guarantees 3).
        """
        return backends.get(self.db).ack(ids, token=token, now=now, lazy=lazy)

    def extend(self, ids: Sequence[int], *, token: str, until: datetime) -> int:
        """Move the lease of deliveries still leased under ``token`` on to ``until``."""
        leased = self.filter(id__in=padded_ids(ids), state=DeliveryState.INFLIGHT)
        return leased.filter(lease_token=token).update(lease_expires_at=until)

    def give_back(self, ids: Sequence[int], *, token: str, now: datetime) -> int:
        """Return claimed deliveries whose handler never started, with their attempt."""
        leased = self.filter(id__in=padded_ids(ids), state=DeliveryState.INFLIGHT)
        return leased.filter(lease_token=token).update(
            state=Case(
                When(attempts__gt=1, then=Value(DeliveryState.RETRY)),
                default=Value(DeliveryState.PENDING),
            ),
            attempts=F("attempts") - 1,
            lease_token=None,
            lease_expires_at=None,
            dispatcher=None,
            updated_at=now,
        )

    def expire(self, ids: Sequence[int], *, token: str, now: datetime) -> int:
        """End claimed deliveries whose message expired before their handler started:
        "expired", unrun, their attempt returned; how many."""
        leased = self.filter(id__in=padded_ids(ids), state=DeliveryState.INFLIGHT)
        return leased.filter(lease_token=token).update(
            state=DeliveryState.EXPIRED,
            attempts=F("attempts") - 1,
            last_error="expired before it started (the message's expires_at); not run",
            lease_token=None,
            lease_expires_at=None,
            dispatcher=None,
            finished_at=now,
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
        """Record a failed attempt; schedule a retry or dead-letter. None if fenced out.
        Any text is recorded: what a column cannot hold is escaped, what is too long cut."""
        error, traceback = storable(error, ERROR_CHARS), storable(traceback, TRACEBACK_CHARS)
        fenced = self.filter(id=delivery_id, state=DeliveryState.INFLIGHT, lease_token=token)
        row = fenced.values("attempts", "errors").first()
        if row is None:
            return None
        attempt = row["attempts"]
        errors = list(row["errors"] or [])
        errors.append(
            {"attempt": attempt, "at": now.isoformat(), "error": error, "traceback": traceback}
        )
        dead = attempt >= max_attempts
        state = DeliveryState.DEAD if dead else DeliveryState.RETRY
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

    # Operator actions. Each is UPDATEs of the rows still in the state it applies to, so
    # one that races with the dispatcher (a retry that became due and was claimed
    # meanwhile, say) changes nothing of those rows; each returns how many it changed.
    # Replay and discard work a batch at a time (in_batches), so that however many rows
    # they change, no claim, ack or fan-out waits on them for more than one batch; the
    # subscriptions whose claims could otherwise slip in between batches are held.

    def in_batches(self, change: Callable[[DeliveryQuerySet], int], *, by: str = "id") -> int:
        """Apply ``change`` to these rows BATCH_SIZE at a time, in the order of ``by`` (a
        unique column, or message_id within one subscription, whose unique index then
        serves), each batch in a transaction of its own (inside a caller's transaction, in
        that one); how many rows it changed."""
        size, changed = pubsub_settings.batch_size, 0
        rows = self.order_by(by)
        while True:
            keys = list(rows.values_list(by, flat=True)[:size])
            if not keys:
                return changed
            with transaction.atomic(using=self.db):
                changed += change(self.filter(**{f"{by}__in": keys}))
            if len(keys) < size:
                return changed
            rows = self.order_by(by).filter(**{f"{by}__gt": keys[-1]})

    def retry_now(self, now: datetime) -> int:
        """Make deliveries waiting for a retry due at once (in any order: no batches)."""
        return self.filter(state=DeliveryState.RETRY).update(available_at=now, updated_at=now)

    def replay(self, now: datetime) -> int:
        """Dead letters run again, due now, with ``max_attempts`` fresh attempts. Their
        error history stays. Refused (ActionRefused) for an ordered subscription while any
        of its deliveries runs: the replayed one would start beside it; and an ordered
        subscription is held while they are made due, so that they run in offset order."""
        dead = self.filter(state=DeliveryState.DEAD)
        with dead.holding("replay", now):
            return dead.in_batches(lambda rows: rows.run_again(now))

    def run_again(self, now: datetime) -> int:
        """Back to pending, due now, with fresh attempts (the error history stays): what
        replay() does to dead letters and seek() to every delivery that ended. No checks of
        its own: callers choose the rows."""
        return self.update(
            state=DeliveryState.PENDING,
            attempts=0,
            available_at=now,
            finished_at=None,
            updated_at=now,
        )

    def discard(self, now: datetime, *, by: str = "id") -> int:
        """Give up on deliveries that wait (pending, retry) or are dead: they end
        ``discarded`` and do not run (unless a seek goes back before them). Inflight ones
        are left to their handler. The subscriptions of those that wait are held while it
        works, or a claim between two batches would run what was about to be discarded.
        ``by``: as in_batches()."""
        waiting_or_dead = (DeliveryState.PENDING, DeliveryState.RETRY, DeliveryState.DEAD)
        rows = self.filter(state__in=waiting_or_dead)
        claimable = rows.filter(state__in=WAITING)
        with claimable.holding("discard", now, refuse=False, every=True, beside=rows):
            return rows.in_batches(
                lambda batch: batch.update(
                    state=DeliveryState.DISCARDED, finished_at=now, updated_at=now
                ),
                by=by,
            )

    @contextmanager
    def holding(
        self,
        action: str,
        now: datetime,
        *,
        refuse: bool = True,
        every: bool = False,
        beside: DeliveryQuerySet | None = None,
        size: int | None = None,
    ) -> Iterator[None]:
        """Hold the subscriptions of these deliveries (paused, no signal: see
        Subscription.hold) while an operator's action changes rows a batch at a time, so
        that no claim starts part of the action's work before all of it is done: the
        ordered ones, or ``every`` one. ``refuse``: first refuse (ActionRefused) if an
        ordered one has deliveries running.

        When the action's rows (these, or ``beside``) fit one batch (``size``, BATCH_SIZE
        unless given), nothing is held: the block runs inside the transaction that
        refused, under the ordered subscriptions' row locks, and changes them at once.
        Inside a caller's transaction nothing is held either (a hold would show only when
        that commits): the action is that transaction's, as its locks are.
        """
        using = self._db or router.db_for_write(Delivery)  # type: ignore[attr-defined]
        # The model, without importing it: its module imports this one.
        subscription: Any = Delivery._meta.get_field("subscription").related_model
        size = size or pubsub_settings.batch_size
        work = self if beside is None else beside
        inside = transaction.get_connection(using).in_atomic_block
        at_once = inside or not work[size : size + 1]
        with transaction.atomic(using=using):
            ids = self.values("subscription_id")
            subs = list(subscription.objects.using(using).filter(pk__in=ids).order_by("pk"))
            if refuse:
                Delivery.objects.using(using).refuse_while_running(subs, action)
            if at_once:
                yield
                return
            wanted = [sub for sub in subs if every or sub.keeps_order]
            held = [sub for sub in wanted if sub.hold(now, using=using)]
        try:
            yield
        finally:
            for sub in held:
                sub.release(now, using=using)

    def refuse_while_running(self, subscriptions: Sequence[Subscription], action: str) -> None:
        """Take the row lock of each ordered subscription (as its claims do) and raise
        ActionRefused if any has deliveries running. Inside a transaction: the lock holds
        off new claims until the action commits.

        For actions that make earlier messages due again: with part of an ordered run in
        flight, the claim would start them beside it.
        """
        # Keyed ones too: a message made due again would start beside a later one of its key.
        ordered = [sub for sub in subscriptions if sub.keeps_order]
        ordered.sort(key=lambda sub: sub.pk)
        backend = backends.get(self.db)
        with backend.connection.cursor() as cursor:
            for sub in ordered:
                backend.lock_row(cursor, SUBSCRIPTION, sub.pk, "position")
        running = (
            self.inflight()
            .filter(subscription__in=[sub.pk for sub in ordered])
            .values_list("subscription__name", flat=True)
            .distinct()
        )
        names = sorted(running) if ordered else []
        if names:
            raise ActionRefused(
                f"cannot {action} now: ordered subscription {', '.join(names)} has "
                f"deliveries running. Pause it, wait until nothing of it is inflight, "
                f"{action}, then resume."
            )


class Delivery(models.Model):
    State = DeliveryState

    WAITING = WAITING
    UNFINISHED = UNFINISHED
    ENDED = ENDED

    id = models.BigAutoField(primary_key=True)
    # No index of its own: the unique (subscription, message) constraint's serves. Every
    # index on this table is written at each claim and ack, so there are few.
    subscription = models.ForeignKey(
        "Subscription", on_delete=models.PROTECT, related_name="deliveries", db_index=False
    )
    message = models.ForeignKey("Message", on_delete=models.PROTECT, related_name="deliveries")
    # The message's offset, copied so the claim reads one table in log order.
    offset = models.BigIntegerField()
    # The message's key, copied for subscriptions ordered by key only (NULL otherwise), so
    # the claim finds each key's head in one index that other subscriptions never write.
    key = models.CharField(max_length=255, null=True, blank=True, editable=False)  # noqa: DJ001
    state = models.CharField(max_length=10, choices=State.choices, default=State.PENDING)
    # Handler starts so far.
    attempts = models.PositiveIntegerField(default=0)
    # When a pending or retrying delivery becomes due.
    available_at = models.DateTimeField()
    lease_token = models.CharField(max_length=32, null=True, blank=True)  # noqa: DJ001  (NULL: not leased)
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    # Not indexed: a dead dispatcher's deliveries are found among the inflight ones.
    dispatcher = models.ForeignKey(
        Dispatcher,
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
            # A keyed claim's question "does anything earlier of this key hold it back?":
            # only the rows that can (running, retrying, dead: a dead head may dead-letter
            # the rest of its key), so it costs the same however many are pending.
            models.Index(
                fields=["subscription", "key", "offset"],
                condition=Q(key__isnull=False, state__in=["inflight", "retry", "dead"]),
                name="pubsub_delivery_keys",
            ),
        ]

    def __str__(self) -> str:
        # Names, not ids: titles and the admin log show it (select_related subscription
        # and its topic where many are shown).
        sub = self.subscription
        return f"{sub.name}: message #{self.message_id} of {sub.topic.name} (offset {self.offset})"

    def claimed(self) -> Claimed:
        """This delivery as a claim returns it: what its handler gets of its message."""
        m = self.message
        return Claimed(
            self.pk,
            self.attempts,
            m.pk,
            self.offset,
            m.body,
            m.key,
            m.headers or {},
            m.published_at,
            m.expires_at,
        )

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
        if self.state == Delivery.State.FILTERED:
            return (
                "Filtered out: its message does not match the subscription's filter "
                f"({sub.message_filter}); it is never run."
            )
        if self.state == Delivery.State.EXPIRED:
            return (
                f"Expired: not started before its message's expires_at "
                f"({_local(self.message.expires_at, '%Y-%m-%d %H:%M:%S %Z')}); it was not run."
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
        expires_at = self.message.expires_at
        if expires_at is not None and expires_at <= now:
            return (
                f"Expired at {_local(expires_at, '%Y-%m-%d %H:%M:%S %Z')} before it started: "
                f"the next claim of it ends it expired, unrun."
            )
        if sub.paused:
            until = f" until {_local(sub.paused_until)}" if sub.paused_until else ""
            why = f" ({sub.paused_reason})" if sub.paused_reason else ""
            return f"Waiting: subscription {sub.name} is paused{until}{why}."
        if self.state == Delivery.State.RETRY and self.available_at > now:
            return (
                f"Waiting to retry at {_local(self.available_at)} "
                f"(attempt {self.attempts + 1} of {sub.effective_max_attempts})."
            )
        if sub.order_of(self.key) is not None:
            ahead = Delivery.objects.heads(self.subscription_id).filter(offset__lt=self.offset)
            head = ahead.filter(key=self.key).first() if sub.keyed else ahead.first()
            if head is not None:
                retry = ""
                if head.state == Delivery.State.RETRY:
                    retry = f", retrying at {_local(head.available_at)}"
                order = f" of key {self.key!r}" if sub.keyed else ""
                return (
                    f"Ordered: waits behind message {head.message_id}{order} (offset "
                    f"{head.offset}, {head.state}{retry})."
                )
        if not Dispatcher.objects.heartbeating(now).exists():
            return "Due now, but no dispatcher is running."
        return "Due now: the next dispatcher with a free worker takes it."


def _local(moment: datetime | None, style: str = "%H:%M:%S %Z") -> str:
    """A time for an operator: in the project's time zone, which it names."""
    if moment is None:
        return ""
    return format(timezone.localtime(moment) if timezone.is_aware(moment) else moment, style)
