"""Backpressure: a topic's backlog (the messages its slowest active subscription has not
finished) against its PUBSUB["BACKPRESSURE"] limit, without a query per publish.

Dispatchers measure the backlog of each limited topic every BACKLOG_INTERVAL seconds and
keep it in the topic's row. A publisher reads that row at most every READ_INTERVAL
seconds per topic and process; if the figure is older than STALE (no dispatcher runs),
the publisher counts it itself (reads only: it keeps nothing, so it takes no lock in the
caller's transaction). So what publish() compares with the limit is at most
about BACKLOG_INTERVAL + READ_INTERVAL seconds old while a dispatcher runs, and STALE +
READ_INTERVAL if none does.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime, timedelta
from typing import Any

from django.db.models import Count
from django.utils import timezone

from . import signals
from .conf import pubsub_settings, user_settings
from .exceptions import Backpressure

logger = logging.getLogger("django_pubsub.publish")

BACKLOG_INTERVAL = 2.0
READ_INTERVAL = 1.0
STALE = 30.0

# Per process: topic name -> (backlog, slowest subscription, when read: time.monotonic()).
_read: dict[str, tuple[int, str, float]] = {}
_lock = threading.Lock()


def check(topic: str) -> None:
    """Before a publish to ``topic``: raise Backpressure if its backlog is at or past its
    limit and its policy is "reject"; warn (log, backlog_exceeded) if "warn". Nothing at
    all for a topic without a limit."""
    raw = user_settings()
    if not isinstance(raw, dict) or not raw.get("BACKPRESSURE"):
        return  # no limits (the common case): not even the setting's validation
    limits = pubsub_settings.backpressure.get(topic)
    if limits is None:
        return
    limit, policy = int(limits["max_backlog"]), limits.get("policy", "reject")
    backlog, slowest, fresh = _known(topic)
    if backlog < limit:
        return
    from .models import Topic

    signals.send(
        signals.backlog_exceeded,
        Topic,
        topic=topic,
        backlog=backlog,
        limit=limit,
        subscription=slowest,
        policy=policy,
    )
    if policy == "reject":
        raise Backpressure(topic, backlog, limit, slowest)
    if not fresh:
        return  # said once per figure read, not at every publish
    logger.warning(
        "topic %s backed up: subscription %s has %s messages unfinished, over %s "
        "(PUBSUB['BACKPRESSURE'], policy warn): published anyway",
        topic,
        slowest,
        backlog,
        limit,
    )


def forget() -> None:
    """Drop what this process read (tests that change backlogs or settings)."""
    with _lock:
        _read.clear()


def _known(topic: str) -> tuple[int, str, bool]:
    """The topic's backlog, its slowest subscription, and whether the figure was read just
    now (not from this process's cache)."""
    with _lock:
        cached = _read.get(topic)
    if cached is not None and time.monotonic() - cached[2] < READ_INTERVAL:
        return cached[0], cached[1], False
    from .models import Topic

    row = Topic.objects.filter(name=topic).values("pk", "backlog", "backlog_of", "backlog_at")
    found = row.first()
    now = timezone.now()
    if found is None:
        backlog, slowest = 0, ""  # no topic yet: nothing waits
    elif found["backlog_at"] is None or now - found["backlog_at"] > timedelta(seconds=STALE):
        # Counted, not kept: a write here would lock the topic's row in the caller's
        # transaction, holding up the sequencer and other publishers until it commits.
        backlog, slowest = measure(found["pk"], now, keep=False)
    else:
        backlog, slowest = int(found["backlog"] or 0), found["backlog_of"]
    with _lock:
        _read[topic] = (backlog, slowest, time.monotonic())
    return backlog, slowest, True


def measure(topic_id: int, now: datetime, *, keep: bool = True) -> tuple[int, str]:
    """The topic's backlog now, and the slowest subscription's name; kept in its row
    unless not ``keep`` (only reads then)."""
    from .models import Delivery, Message, Subscription, Topic

    head = Topic.objects.values_list("next_offset", flat=True).get(pk=topic_id)
    waiting = Message.objects.unsequenced(now).filter(topic_id=topic_id).count()
    subs = list(Subscription.objects.filter(topic_id=topic_id, active=True))
    unfinished: dict[Any, int] = dict(
        Delivery.objects.unfinished()
        .filter(subscription__in=subs)
        .values_list("subscription_id")
        .annotate(n=Count("id"))
        .values_list("subscription_id", "n")
    )
    backlog, slowest = 0, ""
    for sub in subs:
        behind = waiting + (head - sub.position) + unfinished.get(sub.pk, 0)
        if behind > backlog or not slowest:
            backlog, slowest = behind, sub.name
    if keep:
        Topic.objects.filter(pk=topic_id).update(
            backlog=backlog, backlog_of=slowest, backlog_at=now
        )
    return backlog, slowest


def measure_limited(now: datetime) -> None:
    """Measure every topic that has a limit (a dispatcher, every BACKLOG_INTERVAL)."""
    from .models import Topic

    names = list(pubsub_settings.backpressure)
    if not names:
        return
    for topic_id in Topic.objects.filter(name__in=names).values_list("pk", flat=True):
        measure(topic_id, now)
