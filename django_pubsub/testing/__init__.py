"""Helpers for your own tests: run deliveries in the test, see what was published, and a
clock that retries and dead letters obey.

    from django_pubsub.testing import Clock, drain, published

``drain()`` runs every due delivery in the calling thread, on the test's own connection,
inside its transaction if there is one (Django's ``TestCase``, pytest-django's ``db``): no
``runpubsub``, no commit, no sleeping. The pytest fixture ``pubsub`` (installed with the
package) and ``PubSubTestMixin`` for ``unittest`` bundle the three.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, connections, transaction
from django.utils import timezone
from django.utils.module_loading import import_string

from ..calling import as_sync
from ..exceptions import BatchFailure
from ..message import Message

if TYPE_CHECKING:
    from ..models import Message as MessageRow
    from ..models import Subscription

# Rounds of sequence, fan out, claim and run before drain() gives up: a handler that
# publishes to its own topic would otherwise keep it busy for ever.
MAX_ROUNDS = 1000


class Clock:
    """A clock a test moves by hand. Pass it to drain() (the ``pubsub`` fixture does): a
    retry is due, a lease runs out, by this clock and not the wall's."""

    def __init__(self, start: datetime | None = None) -> None:
        start = start or datetime(2030, 1, 1, 12, 0)
        if settings.USE_TZ:
            # In UTC, as timezone.now(): the database compares stored times as written.
            aware = start if timezone.is_aware(start) else timezone.make_aware(start, UTC)
            self.now = aware.astimezone(UTC)
        else:
            self.now = timezone.make_naive(start) if timezone.is_aware(start) else start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float = 0, **delta: float) -> datetime:
        """Move on by ``seconds`` (or timedelta's keywords: minutes=5); the new time."""
        self.now += timedelta(seconds=seconds, **delta)
        return self.now

    def __repr__(self) -> str:
        return f"Clock({self.now.isoformat()})"


@dataclass
class Handled:
    """What drain() did for one subscription: the messages it acked, those that failed
    and will be retried, those that failed for the last time (dead)."""

    acked: list[Message] = field(default_factory=list)
    retried: list[Message] = field(default_factory=list)
    dead: list[Message] = field(default_factory=list)
    # Not run: their message expired (expires_at) before they could start.
    expired: list[Message] = field(default_factory=list)

    def __repr__(self) -> str:
        return (
            f"Handled(acked={len(self.acked)}, retried={len(self.retried)}, "
            f"dead={len(self.dead)}, expired={len(self.expired)})"
        )


class Drained(dict[str, Handled]):
    """drain()'s result: a Handled per subscription name (those that ran something)."""

    def __missing__(self, name: str) -> Handled:
        return Handled()  # a subscription that ran nothing

    @property
    def acked(self) -> int:
        return sum(len(handled.acked) for handled in self.values())

    @property
    def retried(self) -> int:
        return sum(len(handled.retried) for handled in self.values())

    @property
    def dead(self) -> int:
        return sum(len(handled.dead) for handled in self.values())

    @property
    def expired(self) -> int:
        return sum(len(handled.expired) for handled in self.values())


def drain(
    subscriptions: Iterable[str] | None = None,
    *,
    clock: Callable[[], datetime] | None = None,
    using: str = DEFAULT_DB_ALIAS,
) -> Drained:
    """Run every delivery that is due, in this thread, until none is: messages published
    meanwhile (by handlers too) included; retries only once due by ``clock``.

    ``subscriptions``: names to run (default: every active one that is not paused).
    Returns what happened per subscription. Inside a transaction each handler runs in a
    savepoint, so one that fails leaves the test's transaction usable, and its writes are
    rolled back. Retries are scheduled without jitter, at exactly the backoff's delay.
    Timeouts are not enforced on def handlers (they run in the test's thread); an async
    handler is cancelled at its timeout, as in runpubsub.
    """
    from ..conf import pubsub_settings
    from ..dispatcher.workers import handler_message
    from ..models import Delivery, Subscription, Topic
    from ..sync import sync_subscriptions

    clock = clock or timezone.now
    sync_subscriptions(using=using)
    Subscription.resume_due(clock(), using=using)  # pauses that ended by the test's clock
    subs = _chosen(subscriptions, using)
    handlers = {sub.pk: as_sync(import_string(sub.handler), sub.effective_timeout) for sub in subs}
    batch = pubsub_settings.batch_size
    done = Drained()
    for _ in range(MAX_ROUNDS):
        now = clock()
        while Topic.sequence_all(batch=batch, now=now, using=using):
            pass
        for topic_id in Topic.behind(using=using):
            while Topic.fan_out(topic_id, now=now, batch=batch, using=using).created:
                pass
        ran = 0
        for sub in subs:
            token = uuid.uuid4().hex
            claimed = Delivery.objects.using(using).claim(
                sub,
                limit=batch,
                now=now,
                token=token,
                dispatcher_id=None,
                gather=False,
            )
            ran += len(claimed)
            handled = done.setdefault(sub.name, Handled())
            handled.dead += (handler_message(sub, row) for row in claimed if row.buried)
            rows = [row for row in claimed if not row.buried]
            expired = [row for row in rows if row.expired_by(now)]
            if expired:
                ids = [row.delivery_id for row in expired]
                Delivery.objects.using(using).expire(ids, token=token, now=now)
                handled.expired += (handler_message(sub, row) for row in expired)
                rows = [row for row in rows if not row.expired_by(now)]
            run = _Run(sub, handlers[sub.pk], token, now, handled, using)
            try:
                run.batch(rows) if sub.batch_size else run.one_by_one(rows)
            except BaseException:  # pytest.fail() in a handler, say: nothing left leased
                _give_back(run.unfinished(rows), token, now, using)
                raise
        if not ran:
            return Drained({name: handled for name, handled in done.items() if _any(handled)})
    raise RuntimeError(
        f"drain() ran {MAX_ROUNDS} rounds and deliveries kept coming: does a handler publish "
        f"to a topic it subscribes to?"
    )


def _chosen(names: Iterable[str] | None, using: str) -> list[Subscription]:
    from ..models import Subscription

    active = Subscription.objects.using(using).filter(active=True).select_related("topic")
    if names is None:
        return list(active.filter(paused=False).order_by("pk"))
    wanted = [names] if isinstance(names, str) else list(names)
    found = {sub.name: sub for sub in active.filter(name__in=wanted)}
    unknown = [name for name in wanted if name not in found]
    if unknown:
        raise ValueError(f"drain(): unknown or inactive subscriptions: {', '.join(unknown)}.")
    return [found[name] for name in wanted]


@dataclass
class _Run:
    """drain()'s run of one claim of one subscription, as a dispatcher's worker runs it:
    in order per order (the subscription's, or each key's), a batch in one call, a
    transactional handler's ack in its transaction."""

    sub: Subscription
    handler: Callable[[Any], Any]
    token: str
    now: datetime
    handled: Handled
    using: str
    finished: set[int] = field(default_factory=set)
    # Orders with a failure in this claim: what follows waits.
    stopped: set[object] = field(default_factory=set)

    def unfinished(self, rows: list[Any]) -> list[Any]:
        return [row for row in rows if row.delivery_id not in self.finished]

    def order(self, row: Any) -> object:
        return self.sub.order_of(row.key)

    def atomic(self) -> Any:
        """Each handler in a transaction when it is transactional, or in a savepoint when
        drain() runs inside the test's transaction (a failure leaves that one usable)."""
        inside = connections[self.using].in_atomic_block
        wanted = inside or self.sub.delivery == "transactional"
        return transaction.atomic(using=self.using) if wanted else nullcontext()

    def one_by_one(self, rows: list[Any]) -> None:
        from ..dispatcher.workers import describe, formatted_traceback, handler_message

        stopped = self.stopped
        for row in rows:
            order = self.order(row)
            if order is not None and order in stopped:  # waits behind a failed one
                _give_back([row], self.token, self.now, self.using)
                self.finished.add(row.delivery_id)
                continue
            message = handler_message(self.sub, row)
            try:
                with self.atomic():
                    self.handler(message)
                    self._ack_if_transactional([row])
            except Exception as exc:
                self.finished.add(row.delivery_id)
                self._fail(row, message, describe(exc), formatted_traceback())
                if order is not None:
                    stopped.add(order)
                continue
            self._ack([row], [message])

    def batch(self, rows: list[Any]) -> None:
        """The claim's rows a batch of batch_size at a time, in offset order; what follows
        a failure of its order in a later batch waits (given back)."""
        size = self.sub.batch_size or len(rows) or 1
        for start in range(0, len(rows), size):
            part = []
            for row in rows[start : start + size]:
                if self.order(row) is not None and self.order(row) in self.stopped:
                    _give_back([row], self.token, self.now, self.using)
                    self.finished.add(row.delivery_id)
                else:
                    part.append(row)
            self._one_batch(part)

    def _one_batch(self, rows: list[Any]) -> None:
        from ..dispatcher.workers import describe, formatted_traceback, handler_message

        if not rows:
            return
        messages = [handler_message(self.sub, row) for row in rows]
        failed: dict[int, str] = {}
        trace = ""
        try:
            with self.atomic():
                try:
                    self.handler(messages)
                except BatchFailure as exc:
                    if self.sub.delivery == "transactional":
                        raise  # rolled back: all of it failed
                    trace = formatted_traceback()
                    failed = {
                        key: why if isinstance(why, str) else describe(why or exc)  # type: ignore[arg-type]
                        for key, why in exc.failed.items()
                    }
                self._ack_if_transactional(rows)
        except Exception as exc:
            failed = {message.id: describe(exc) for message in messages}
            trace = formatted_traceback()
        behind: dict[object, int] = {}
        done = []
        for row, message in zip(rows, messages, strict=True):
            order = self.order(row)
            error = failed.get(message.id)
            if error is None and order is not None and order in behind:
                error = f"BatchFailure: behind failed message {behind[order]} of its batch"
            if error is None:
                done.append((row, message))
                continue
            if order is not None:
                behind.setdefault(order, message.id)
                self.stopped.add(order)
            self.finished.add(row.delivery_id)
            self._fail(row, message, error, trace)
        if done:
            self._ack([row for row, _ in done], [message for _, message in done])

    def _ack_if_transactional(self, rows: list[Any]) -> None:
        from ..models import Delivery

        if self.sub.delivery != "transactional":
            return
        ids = [row.delivery_id for row in rows]
        Delivery.objects.using(self.using).ack(ids, token=self.token, now=self.now)

    def _ack(self, rows: list[Any], messages: list[Message]) -> None:
        from ..models import Delivery

        ids = [row.delivery_id for row in rows]
        self.finished.update(ids)
        if self.sub.delivery != "transactional":  # acked in its transaction already
            Delivery.objects.using(self.using).ack(ids, token=self.token, now=self.now)
        self.handled.acked += messages

    def _fail(self, row: Any, message: Message, error: str, trace: str) -> None:
        from ..models import Delivery

        delay = self.sub.effective_backoff.delay(message.attempt, lambda: 0.5)  # no jitter
        state = Delivery.objects.using(self.using).fail(
            row.delivery_id,
            token=self.token,
            now=self.now,
            error=error,
            traceback=trace,
            max_attempts=self.sub.effective_max_attempts,
            delay=delay,
        )
        dead = state == Delivery.State.DEAD
        (self.handled.dead if dead else self.handled.retried).append(message)


def _give_back(rows: list[Any], token: str, now: datetime, using: str) -> None:
    from ..models import Delivery

    ids = [row.delivery_id for row in rows]
    Delivery.objects.using(using).give_back(ids, token=token, now=now)


def _any(handled: Handled) -> bool:
    return bool(handled.acked or handled.retried or handled.dead or handled.expired)


_since = {"id": 0}


def mark() -> None:
    """From now on, published() shows only what is published after this call (the
    ``pubsub`` fixture and PubSubTestMixin call it as a test begins)."""
    from ..models import Message as MessageRow

    last = MessageRow.objects.order_by("-id").values_list("id", flat=True).first()
    _since["id"] = last or 0


def forget_mark() -> None:
    """From now on, published() shows every message (until the next mark())."""
    _since["id"] = 0


def published(topic: str | None = None) -> list[MessageRow]:
    """The messages published since the test began (or mark()), oldest first, as rows of
    django_pubsub.models.Message: ``.topic.name``, ``.payload`` (JSON data; ``.body`` is
    the payload as published, bytes included), ``.key``, ``.headers``. ``topic``: only
    that topic's."""
    from ..models import Message as MessageRow

    rows = MessageRow.objects.filter(id__gt=_since["id"]).select_related("topic")
    if topic is not None:
        rows = rows.filter(topic__name=topic)
    return list(rows.order_by("id"))


class PubSub:
    """The three together, sharing one clock: what the ``pubsub`` fixture and
    PubSubTestMixin give a test."""

    def __init__(self, clock: Clock | None = None) -> None:
        self.clock = clock or Clock(timezone.now())

    def drain(self, subscriptions: Iterable[str] | None = None) -> Drained:
        return drain(subscriptions, clock=self.clock)

    def published(self, topic: str | None = None) -> list[MessageRow]:
        return published(topic)

    def advance(self, seconds: float = 0, **delta: float) -> datetime:
        return self.clock.advance(seconds, **delta)


class PubSubTestMixin:
    """For Django's TestCase and TransactionTestCase: ``self.pubsub``, a PubSub whose
    clock starts at the test's start, and published() counted from then."""

    pubsub: PubSub

    def setUp(self) -> None:
        super().setUp()  # type: ignore[misc]
        mark()
        self.pubsub = PubSub()


__all__ = [
    "Clock",
    "Drained",
    "Handled",
    "PubSub",
    "PubSubTestMixin",
    "drain",
    "forget_mark",
    "mark",
    "published",
]
