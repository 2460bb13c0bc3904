"""A dispatcher held up by a lock keeps its leases: two real runpubsub processes with 1 s
leases and 1.5 s handlers, while a pass of each waits on a lock for longer than a lease.

Invariants: no delivery runs twice (no crash explains one), none is lost, an ordered
subscription's runs never overlap.
"""

from __future__ import annotations

import threading
import time
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from django.db import connection, transaction
from django.utils import timezone

from django_pubsub import publish, publish_many
from django_pubsub.models import Delivery, Subscription, Topic
from tests.conftest import is_postgres, runs, states, wait_for

# Minutes, not seconds: an ordered subscription runs every message one after the other.
pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.timeout(600),
    pytest.mark.processes,
]
RUN = ("lock.ordered", "lock.unordered")  # lease 1 s each
HANDLER = {"sleep": 1.5, "span": True}


def _two_dispatchers(runpubsub: Any, tmp_path: Path) -> list[Any]:
    logs = [tmp_path / f"{name}.log" for name in "ab"]
    procs = [
        runpubsub("--subscriptions", ",".join(RUN), "--poll-interval", "0.05", log=log)
        for log in logs
    ]
    wait_for(lambda: all("dispatcher started" in log.read_text() for log in logs))
    return procs


def _handled_once_in_order(ids: list[int], procs: list[Any]) -> None:
    for name in RUN:
        wait_for(lambda name=name: states(name) == {"acked": len(ids)}, timeout=120)
    for proc in procs:
        proc.terminate()
        assert proc.wait(timeout=30) == 0
    for name in RUN:
        seen = runs(name)
        assert sorted(run.message_id for run in seen) == sorted(ids), name  # once each
        assert {run.attempt for run in seen} == {1}, name
    spans = sorted((run.started, run.ended) for run in runs("lock.ordered"))
    assert all(end <= start for (_, end), (start, _) in pairwise(spans)), spans
    assert [run.offset for run in runs("lock.ordered")] == sorted(
        run.offset for run in runs("lock.ordered")
    )


def test_a_pass_held_up_by_a_lock_does_not_cost_a_live_dispatcher_its_leases(
    runpubsub: Any, tmp_path: Path
) -> None:
    """PostgreSQL: an operator's transaction holds the topic's subscription rows for 4 s,
    so every fan-out and ordered claim of it waits. SQLite: an application's transaction
    publishes as it goes for 4 s, so every write waits (the lease keeper's too); three
    times, as which writer goes first when it ends is up to SQLite's busy handler."""
    procs = _two_dispatchers(runpubsub, tmp_path)
    ids: list[int] = []
    for _ in range(1 if is_postgres() else 3):
        running = len(runs("lock.unordered"))
        ids += publish_many("t.lock", [{"n": len(ids) + n, **HANDLER} for n in range(4)])
        wait_for(lambda running=running: len(runs("lock.unordered")) >= running + 2)
        with transaction.atomic():
            if is_postgres():
                locked = Subscription.objects.select_for_update().filter(topic__name="t.lock")
                assert len(locked) == 3
            for _ in range(4):
                ids.append(publish("t.lock", {"n": len(ids), **HANDLER}))
                time.sleep(1.0)
    _handled_once_in_order(ids, procs)


def _history(topic: str, subscription: str, count: int) -> None:
    """``count`` messages of ``topic``, handled (acked) by ``subscription`` long ago; the
    topic's other subscriptions start after them. Written in SQL: the ORM would take
    minutes."""
    topic_id = Topic.objects.get(name=topic).pk
    sub_id = Subscription.objects.get(name=subscription).pk
    now = connection.ops.adapt_datetimefield_value(timezone.now())
    if is_postgres():
        offsets = "SELECT g AS n FROM generate_series(0, %s - 1) g"
    else:
        offsets = (
            "WITH RECURSIVE g(n) AS (SELECT 0 UNION ALL SELECT n + 1 FROM g WHERE n < %s - 1) "
            "SELECT n FROM g"
        )
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(
            f'INSERT INTO django_pubsub_message (topic_id, "offset", payload, headers, '
            f"published_at) SELECT %s, n, '{{}}', '{{}}', %s FROM ({offsets}) AS s",
            [topic_id, now, count],
        )
        cursor.execute(
            'INSERT INTO django_pubsub_delivery (subscription_id, message_id, "offset", state, '
            "attempts, available_at, errors, last_error, created_at, updated_at, finished_at) "
            "SELECT %s, id, \"offset\", 'acked', 1, %s, '[]', '', %s, %s, %s "
            "FROM django_pubsub_message WHERE topic_id = %s",
            [sub_id, now, now, now, now, topic_id],
        )
    Topic.objects.filter(pk=topic_id).update(next_offset=count)
    Subscription.objects.filter(topic_id=topic_id).update(position=count)


def test_a_seek_over_a_long_backlog_costs_no_dispatcher_its_leases(
    runpubsub: Any, tmp_path: Path
) -> None:
    """An operator seeks lock.backlog back over 100,000 messages while the dispatchers run
    lock.ordered and lock.unordered of the same topic, and messages keep coming (so every
    fan-out of the topic needs lock.backlog's row, which the seek locks)."""
    _history("t.lock", "lock.backlog", 100_000)
    procs = _two_dispatchers(runpubsub, tmp_path)
    ids = publish_many("t.lock", [{"n": n, **HANDLER} for n in range(4)])
    wait_for(lambda: len(runs("lock.unordered")) >= 2 and len(runs("lock.ordered")) >= 1)
    seeking = threading.Event()
    published: list[int] = []

    def publish_meanwhile() -> None:
        try:
            while not seeking.wait(0.3) and len(published) < 20:
                published.append(publish("t.lock", {"n": "meanwhile", **HANDLER}))
        finally:
            connection.close()

    publisher = threading.Thread(target=publish_meanwhile)
    publisher.start()
    try:
        done = Subscription.objects.get(name="lock.backlog").seek(offset=0)
    finally:
        seeking.set()
        publisher.join(30)
    assert done.replayed == 100_000
    backlog = Delivery.objects.filter(subscription__name="lock.backlog", state="pending")
    wait_for(lambda: backlog.count() == 100_000 + len(published) + len(ids))
    _handled_once_in_order(ids + published, procs)
