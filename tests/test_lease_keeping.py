"""A dispatcher held up by a lock keeps its leases: two real runpubsub processes with 1 s
leases and 2 s handlers, while a pass of each waits on a lock for longer than a lease.

Invariants: no delivery runs twice (no crash explains one), none is lost, an ordered
subscription's runs never overlap.
"""

from __future__ import annotations

import time
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from django.db import transaction

from django_pubsub import publish, publish_many
from django_pubsub.models import Subscription
from tests.conftest import is_postgres, runs, states, wait_for

pytestmark = pytest.mark.django_db(transaction=True)
RUN = ("lock.ordered", "lock.unordered")  # lease 1 s each
HANDLER = {"sleep": 2.0, "span": True}


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
