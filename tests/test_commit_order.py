"""Guarantee: no message is skipped when transactions commit out of id order or roll back.

Every writer here is a real connection of its own (one per thread). On PostgreSQL the
writers really overlap: the lower id commits last. On SQLite one writer at a time holds the
database, so the later writer waits for the earlier one; the same checks apply.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from django.db import connection, transaction

from django_pubsub import publish
from django_pubsub.dispatcher import DispatchLoop
from django_pubsub.models import Delivery, Message
from tests.conftest import is_postgres, runs, wait_for, write_with_rollbacks

pytestmark = pytest.mark.django_db(transaction=True)
ORDERED = ("ordered.one", "ordered.two")


def in_thread(target: Callable[[], None]) -> threading.Thread:
    def run() -> None:
        try:
            target()
        finally:
            connection.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


class Background:
    """A dispatcher running in its own thread until stopped."""

    def __init__(self, *subscriptions: str) -> None:
        self.loop = DispatchLoop(
            subscriptions=list(subscriptions), handle_signals=False, poll_interval=0.005
        )
        self.thread = in_thread(self.loop.run)

    def stop(self) -> None:
        self.loop.stop()
        self.thread.join(30)
        assert not self.thread.is_alive()


def delivered(name: str) -> list[Any]:
    return [run.payload["who"] for run in runs(name)]


def test_a_lower_id_that_commits_last_is_still_delivered(dispatch: Any) -> None:
    ids: dict[str, int] = {}
    a_open, a_may_commit = threading.Event(), threading.Event()

    def writer_a() -> None:
        with transaction.atomic():
            ids["a"] = publish("t.ordered", {"who": "a"})
            a_open.set()
            assert a_may_commit.wait(30)

    def writer_b() -> None:
        ids["b"] = publish("t.ordered", {"who": "b"})

    a = in_thread(writer_a)
    assert a_open.wait(10)
    b = in_thread(writer_b)
    if is_postgres():
        b.join(10)
        assert ids["a"] < ids["b"]  # A holds the lower id, B committed first
        # Many passes while A is still open: none may move past A's message for good.
        background = Background(*ORDERED)
        wait_for(lambda: len(runs("ordered.one")) >= 1, timeout=10)
        time.sleep(0.2)
        background.stop()
        for name in ORDERED:
            assert delivered(name) == ["b"]
    a_may_commit.set()
    a.join(30)
    b.join(30)
    dispatch(*ORDERED)
    expected = ["b", "a"] if is_postgres() else ["a", "b"]
    for name in ORDERED:
        assert delivered(name) == expected  # each exactly once, in commit order
        assert [run.offset for run in runs(name)] == [0, 1]


def test_transactions_that_commit_before_a_pass_interleave_in_call_order(
    dispatch: Any,
) -> None:
    """What guarantees §2 promises and no more: T1 publishes A, T2 publishes B, T1
    publishes C, T1 commits, then T2, all before the dispatcher looks. Offsets follow ids
    among what it finds committed: A, B, C. Each transaction's own messages keep their
    call order (A before C), and nothing is skipped."""
    if not is_postgres():
        pytest.skip("SQLite has one writer at a time: T2 cannot publish while T1 is open")
    step = [threading.Event() for _ in range(4)]

    def t1() -> None:
        with transaction.atomic():
            publish("t.ordered", {"who": "A"})
            step[0].set()
            assert step[1].wait(10)
            publish("t.ordered", {"who": "C"})
        step[2].set()

    def t2() -> None:
        with transaction.atomic():
            assert step[0].wait(10)
            publish("t.ordered", {"who": "B"})
            step[1].set()
            assert step[2].wait(10)  # T1 has committed
        step[3].set()

    threads = [in_thread(t1), in_thread(t2)]
    for thread in threads:
        thread.join(30)
    assert step[3].is_set()
    dispatch(*ORDERED)
    for name in ORDERED:
        assert delivered(name) == ["A", "B", "C"]
        assert [run.offset for run in runs(name)] == [0, 1, 2]


def test_a_rollback_hole_is_neither_waited_for_nor_delivered(dispatch: Any) -> None:
    c_open, c_may_end = threading.Event(), threading.Event()

    def writer_c() -> None:
        with pytest.raises(RuntimeError), transaction.atomic():
            publish("t.ordered", {"who": "c"})
            c_open.set()
            assert c_may_end.wait(30)
            raise RuntimeError("rolled back")

    c = in_thread(writer_c)
    assert c_open.wait(10)
    d = in_thread(lambda: publish("t.ordered", {"who": "d"}))
    if is_postgres():
        d.join(10)
        dispatch(*ORDERED)
        assert delivered("ordered.one") == ["d"]
    c_may_end.set()
    c.join(30)
    d.join(30)
    publish("t.ordered", {"who": "e"})
    dispatch(*ORDERED)
    for name in ORDERED:
        assert delivered(name) == ["d", "e"]
        # The rolled-back id leaves a hole in ids, never in offsets.
        assert [run.offset for run in runs(name)] == [0, 1]


def test_many_concurrent_writers_with_rollbacks_while_dispatching(dispatch: Any) -> None:
    committed: list[int] = []
    lock = threading.Lock()
    rng = random.Random(7)
    plans = [[rng.random() for _ in range(25)] for _ in range(4)]

    background = Background(*ORDERED)
    writers = [
        in_thread(lambda plan=plan: write_with_rollbacks("t.ordered", plan, committed, lock))
        for plan in plans
    ]
    for thread in writers:
        thread.join(60)
    background.stop()
    dispatch(*ORDERED)
    assert Message.objects.count() == len(committed)
    for name in ORDERED:
        seen = runs(name)
        assert sorted(run.message_id for run in seen) == sorted(committed)
        assert [run.offset for run in seen] == list(range(len(committed)))
    # Both ordered subscriptions saw the one order of the log.
    assert [r.message_id for r in runs("ordered.one")] == [
        r.message_id for r in runs("ordered.two")
    ]
    assert set(Delivery.objects.values_list("state", flat=True)) == {"acked"}
