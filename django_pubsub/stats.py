"""Figures per topic and subscription, and the dispatchers' health: what pubsub_stats
prints and the stats, health and metrics views serve.

Counting deliveries by state reads the whole deliveries table (acked ones included), so a
call costs time in proportion to the history kept: fine for a command or a scrape every
few seconds of a modest table, not for every request of a busy site.
"""

from __future__ import annotations

from collections import Counter
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db.models import Count, Min, Q
from django.db.models.functions import Coalesce, Greatest, TruncMinute
from django.utils import timezone

from . import backends
from .models import Delivery, Dispatcher, Message, Subscription, Topic

STATES = [state.value for state in Delivery.State]


@dataclass
class SubscriptionFigures:
    id: int
    name: str
    topic: str
    active: bool
    paused: bool
    ordered: bool
    # Deliveries by state.
    states: dict[str, int]
    # Deliveries that failed at least once.
    failed: int
    # Messages of the topic it has not finished: not yet sequenced or fanned out to it, or
    # delivered and pending, retrying or running.
    lag: int
    # Seconds since the oldest of those was published (None: nothing waits).
    oldest_age: float | None
    # A pause that ends by itself, and why it was paused (the circuit breaker's words).
    paused_until: datetime | None = None
    paused_reason: str = ""

    @property
    def queue(self) -> int:
        """Deliveries waiting to run: pending and retrying."""
        return self.states["pending"] + self.states["retry"]


@dataclass
class TopicFigures:
    name: str
    published: int
    subscribers: int
    delivered: int = 0
    failed: int = 0
    dead: int = 0
    queue: int = 0
    # Messages published for later (deliver_at) that have not joined the log yet: not in
    # any lag until then.
    scheduled: int = 0
    # The largest lag and age among its active subscriptions.
    lag: int = 0
    oldest_age: float | None = None


@dataclass
class DispatcherFigures:
    id: int
    hostname: str
    pid: int
    started_at: datetime
    last_seen: datetime
    inflight: int
    stuck: int


@dataclass
class Figures:
    at: datetime
    topics: list[TopicFigures] = field(default_factory=list)
    subscriptions: list[SubscriptionFigures] = field(default_factory=list)
    dispatchers: list[DispatcherFigures] = field(default_factory=list)

    @property
    def oldest_age(self) -> float | None:
        """Of the subscriptions that are active and not paused: what waits on an operator
        does not count."""
        ages = [
            sub.oldest_age
            for sub in self.subscriptions
            if sub.oldest_age is not None and sub.active and not sub.paused
        ]
        return max(ages) if ages else None

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        for sub, figures in zip(data["subscriptions"], self.subscriptions, strict=True):
            sub["queue"] = figures.queue
        data["oldest_age"] = self.oldest_age
        return data


def _snapshot() -> AbstractContextManager[None]:
    """Where the database can (PostgreSQL, outside a caller's transaction), one snapshot
    for all of the figures' statements, so they agree with each other. Elsewhere each
    statement reads what is committed when it runs; the reads are ordered so that a lag
    can come out too high or too low by what moved meanwhile, but never below zero (a
    subscription's position before its topic's head)."""
    return backends.get().consistent_reads()


def collect(now: datetime | None = None) -> Figures:
    now = now or timezone.now()
    with _snapshot():
        return _collect(now)


def _collect(now: datetime) -> Figures:
    figures = Figures(at=now)
    # Subscriptions before topics: a position never passes its topic's head.
    subscriptions = list(Subscription.objects.order_by("name"))
    topics = {topic.pk: topic for topic in Topic.objects.all()}
    unsequenced, first_unsequenced = _unsequenced(now)
    scheduled = _scheduled(now)
    by_state: dict[int, dict[str, int]] = {}
    failed: dict[int, int] = {}
    rows = Delivery.objects.values_list("subscription_id", "state").annotate(
        n=Count("id"), failed=Count("id", filter=~Q(last_error=""))
    )
    for sub_id, state, n, failures in rows:
        by_state.setdefault(sub_id, dict.fromkeys(STATES, 0))[state] = n
        failed[sub_id] = failed.get(sub_id, 0) + failures
    topic_figures = {
        pk: TopicFigures(
            name=topic.name,
            published=topic.next_offset + unsequenced.get(pk, 0) + scheduled.get(pk, 0),
            subscribers=0,
            scheduled=scheduled.get(pk, 0),
        )
        for pk, topic in topics.items()
    }
    for sub in subscriptions:
        topic = topics[sub.topic_id]
        states = by_state.get(sub.pk, dict.fromkeys(STATES, 0))
        unfinished = states["pending"] + states["retry"] + states["inflight"]
        lag = unsequenced.get(sub.topic_id, 0) + (topic.next_offset - sub.position) + unfinished
        oldest = _oldest_unhandled(sub, topic, first_unsequenced)
        figures.subscriptions.append(
            SubscriptionFigures(
                id=sub.pk,
                name=sub.name,
                topic=topic.name,
                active=sub.active,
                paused=sub.paused,
                paused_until=sub.paused_until,
                paused_reason=sub.paused_reason,
                ordered=sub.effective_ordered,
                states=states,
                failed=failed.get(sub.pk, 0),
                lag=lag,
                oldest_age=_age(now, oldest),
            )
        )
        if sub.active:
            totals = topic_figures[sub.topic_id]
            totals.subscribers += 1
            totals.delivered += states["acked"]
            totals.failed += failed.get(sub.pk, 0)
            totals.dead += states["dead"]
            totals.queue += states["pending"] + states["retry"]
            totals.lag = max(totals.lag, lag)
            ages = [
                a
                for a in (totals.oldest_age, figures.subscriptions[-1].oldest_age)
                if a is not None
            ]
            totals.oldest_age = max(ages) if ages else None
    figures.topics = sorted(topic_figures.values(), key=lambda topic: topic.name)
    figures.dispatchers = alive_dispatchers(now)
    return figures


@dataclass
class Health:
    dispatchers: list[DispatcherFigures]
    # Seconds the oldest message any active, unpaused subscription has not finished has
    # waited (None: none waits).
    oldest_age: float | None


def health(now: datetime) -> Health:
    """What the health view needs, without counting the whole history."""
    with _snapshot():
        subscriptions = list(Subscription.objects.filter(active=True, paused=False))
        topics = {topic.pk: topic for topic in Topic.objects.all()}
        first_unsequenced = _unsequenced(now)[1]
        ages = [
            _age(now, _oldest_unhandled(sub, topics[sub.topic_id], first_unsequenced))
            for sub in subscriptions
        ]
        known = [age for age in ages if age is not None]
        return Health(alive_dispatchers(now), max(known) if known else None)


def _unsequenced(now: datetime) -> tuple[dict[int, int], dict[int, datetime]]:
    """Per topic, the messages due by ``now`` not yet sequenced: how many, and since when
    the first has waited (published, or due later; through the partial index on the
    unsequenced)."""
    counts: dict[int, int] = {}
    firsts: dict[int, datetime] = {}
    waiting = Message.objects.unsequenced(now).values("topic_id")
    for row in waiting.annotate(n=Count("id"), first=Min(_since())):
        counts[row["topic_id"]] = row["n"]
        firsts[row["topic_id"]] = row["first"]
    return counts, firsts


def _since(prefix: str = "") -> Coalesce:
    """A message's waiting time counts from when it was published, or, for one published
    for later, from when its time came. (Greatest is NULL with a NULL on SQLite.)"""
    published, due = f"{prefix}published_at", f"{prefix}deliver_at"
    return Coalesce(Greatest(due, published), published)


def _scheduled(now: datetime) -> dict[int, int]:
    """Per topic, the messages published for later whose time has not come."""
    rows = Message.objects.scheduled(now).values("topic_id").annotate(n=Count("id"))
    return {row["topic_id"]: row["n"] for row in rows}


def alive_dispatchers(now: datetime) -> list[DispatcherFigures]:
    """Running dispatchers that heartbeated within DISPATCHER_TIMEOUT."""
    return [
        DispatcherFigures(
            id=row.pk,
            hostname=row.hostname,
            pid=row.pid,
            started_at=row.started_at,
            last_seen=row.last_seen,
            inflight=row.inflight,
            stuck=row.stuck,
        )
        for row in Dispatcher.objects.heartbeating(now)
    ]


def _age(now: datetime, published_at: datetime | None) -> float | None:
    return None if published_at is None else (now - published_at).total_seconds()


def _oldest_unhandled(
    sub: Subscription, topic: Topic, first_unsequenced: dict[int, datetime]
) -> datetime | None:
    """Since when the oldest message this subscription has not finished has waited
    (published, or due if published for later)."""
    unsequenced = first_unsequenced.get(topic.pk)
    candidates = [unsequenced] if unsequenced else []
    head = (
        Delivery.objects.unfinished()
        .filter(subscription=sub)
        .order_by("offset")
        .annotate(since=_since("message__"))
        .values_list("since", flat=True)
        .first()
    )
    if head is not None:
        candidates.append(head)
    if sub.position < topic.next_offset:
        next_up = (
            Message.objects.filter(topic_id=topic.pk, offset=sub.position)
            .annotate(since=_since())
            .values_list("since", flat=True)
            .first()
        )
        if next_up is not None:
            candidates.append(next_up)
    return min(candidates) if candidates else None


def as_table(figures: Figures) -> str:
    """The figures as plain-text tables, for a terminal."""

    def age(seconds: float | None) -> str:
        return "-" if seconds is None else f"{seconds:.0f}s"

    topic_rows: list[list[Any]] = [
        [
            "topic",
            "published",
            "subscribers",
            "delivered",
            "failed",
            "dead",
            "queue",
            "scheduled",
            "lag",
            "oldest",
        ],
        *(
            [
                t.name,
                t.published,
                t.subscribers,
                t.delivered,
                t.failed,
                t.dead,
                t.queue,
                t.scheduled,
                t.lag,
                age(t.oldest_age),
            ]
            for t in figures.topics
        ),
    ]
    sub_rows: list[list[Any]] = [
        [
            "subscription",
            "topic",
            "state",
            "pending",
            "inflight",
            "retry",
            "acked",
            "dead",
            "discarded",
            "expired",
            "filtered",
            "failed",
            "lag",
            "oldest",
        ],
        *(
            [
                s.name,
                s.topic,
                status(s),
                s.states["pending"],
                s.states["inflight"],
                s.states["retry"],
                s.states["acked"],
                s.states["dead"],
                s.states["discarded"],
                s.states["expired"],
                s.states["filtered"],
                s.failed,
                s.lag,
                age(s.oldest_age),
            ]
            for s in figures.subscriptions
        ),
    ]
    alive = len(figures.dispatchers)
    return (
        "\n\n".join([_table(topic_rows, 1), _table(sub_rows, 3), f"dispatchers alive: {alive}"])
        + "\n"
    )


def status(sub: SubscriptionFigures) -> str:
    if not sub.active:
        return "inactive"
    if not sub.paused:
        return "active"
    text = "paused"
    if sub.paused_until is not None:
        until = timezone.localtime(sub.paused_until) if settings.USE_TZ else sub.paused_until
        text += f" until {until.strftime('%Y-%m-%d %H:%M:%S %Z').strip()}"
    return f"{text} ({sub.paused_reason})" if sub.paused_reason else text


def _table(rows: list[list[Any]], names: int) -> str:
    """Rows as aligned columns: the first ``names`` to the left, numbers to the right."""
    cells = [[str(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    return "\n".join(
        "  ".join(
            cell.ljust(width) if i < names else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in cells
    )


@dataclass
class Minute:
    at: datetime
    # Deliveries finished (acked, dead or discarded) during the minute.
    handled: int
    # Of those, acked.
    acked: int
    # Messages not yet handled, summed over active subscriptions, at the minute's end.
    lag: int


def last_hour(now: datetime, figures: Figures) -> list[Minute]:
    """Per minute over the last hour: deliveries handled, and the total lag, worked back
    from the lag now by the messages published and deliveries finished since."""
    start = (now - timedelta(hours=1)).replace(second=0, microsecond=0)
    minutes = [start + timedelta(minutes=n) for n in range(61)]
    finished = (
        Delivery.objects.filter(finished_at__gte=start)
        .annotate(minute=TruncMinute("finished_at"))
        .values("minute")
        .annotate(n=Count("id"), acked=Count("id", filter=Q(state=Delivery.State.ACKED)))
    )
    handled = {row["minute"]: (row["n"], row["acked"]) for row in finished}
    # Each message published adds one to the lag of every active subscription of its topic.
    readers = Counter(Subscription.objects.filter(active=True).values_list("topic_id", flat=True))
    published: Counter[datetime] = Counter()
    rows = (
        Message.objects.filter(published_at__gte=start)
        .annotate(minute=TruncMinute("published_at"))
        .values("minute", "topic_id")
        .annotate(n=Count("id"))
    )
    for row in rows:
        published[row["minute"]] += row["n"] * readers[row["topic_id"]]
    lag = sum(sub.lag for sub in figures.subscriptions if sub.active)
    series = []
    for minute in reversed(minutes):
        done, acked = handled.get(minute, (0, 0))
        series.append(Minute(minute, done, acked, max(lag, 0)))
        lag += done - published[minute]  # the lag at the end of the minute before
    return list(reversed(series))
