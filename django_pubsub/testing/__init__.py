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

    def __repr__(self) -> str:
        return (
            f"Handled(acked={len(self.acked)}, retried={len(self.retried)}, dead={len(self.dead)})"
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
    Timeouts are not enforced: the handler runs in the test's thread.
    """
    from ..conf import pubsub_settings
    from ..models import Delivery, Topic
    from ..sync import sync_subscriptions

    clock = clock or timezone.now
    sync_subscriptions(using=using)
    subs = _chosen(subscriptions, using)
    handlers = {sub.pk: import_string(sub.handler) for sub in subs}
    batch = pubsub_settings.batch_size
    done = Drained()
    for _ in range(MAX_ROUNDS):
        now = clock()
        while Topic.sequence_all(batch=batch, using=using):
            pass
        for topic_id in Topic.behind(using=using):
            while Topic.fan_out(topic_id, now=now, batch=batch, using=using).created:
                pass
        ran = 0
        for sub in subs:
            token = uuid.uuid4().hex
            claimed = Delivery.objects.using(using).claim(
                sub, limit=batch, now=now, token=token, dispatcher_id=None
            )
            ran += len(claimed)
            handled = done.setdefault(sub.name, Handled())
            for index, row in enumerate(claimed):
                try:
                    succeeded = _run(sub, handlers[sub.pk], row, token, now, handled, using)
                except BaseException:  # pytest.fail() in a handler, say: nothing left leased
                    _give_back(claimed[index:], token, now, using)
                    raise
                if not succeeded and sub.effective_ordered:  # the rest waits behind it
                    _give_back(claimed[index + 1 :], token, now, using)
                    break
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


def _run(
    sub: Subscription,
    handler: Callable[[Message], Any],
    row: Any,
    token: str,
    now: datetime,
    handled: Handled,
    using: str,
) -> bool:
    """Run one claimed delivery's handler and record its outcome; whether it succeeded."""
    from ..dispatcher.workers import describe, formatted_traceback, handler_message
    from ..models import Delivery

    message = handler_message(sub, row)
    inside = connections[using].in_atomic_block
    try:
        with transaction.atomic(using=using) if inside else nullcontext():
            handler(message)
    except Exception as exc:
        delay = sub.effective_backoff.delay(message.attempt, lambda: 0.5)  # no jitter
        state = Delivery.objects.using(using).fail(
            row.delivery_id,
            token=token,
            now=now,
            error=describe(exc),
            traceback=formatted_traceback(),
            max_attempts=sub.effective_max_attempts,
            delay=delay,
        )
        (handled.dead if state == Delivery.State.DEAD else handled.retried).append(message)
        return False
    Delivery.objects.using(using).ack([row.delivery_id], token=token, now=now)
    handled.acked.append(message)
    return True


def _give_back(rows: list[Any], token: str, now: datetime, using: str) -> None:
    from ..models import Delivery

    ids = [row.delivery_id for row in rows]
    Delivery.objects.using(using).give_back(ids, token=token, now=now)


def _any(handled: Handled) -> bool:
    return bool(handled.acked or handled.retried or handled.dead)


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
