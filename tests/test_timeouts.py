"""A per-subscriber timeout fails a hung handler's attempt and retries it; the hung thread is
replaced so other subscriptions keep their workers, and its late ack is fenced out."""

from __future__ import annotations

import threading
import time

import pytest

from django_pubsub import publish, publish_many
from django_pubsub.dispatcher import DispatchLoop
from django_pubsub.models import Delivery, Dispatcher
from tests.conftest import runs, states, wait_for

pytestmark = pytest.mark.django_db(transaction=True)
HANG = 4.0  # seconds the first attempts hang; hang.one's timeout is 0.3 s


def test_a_hung_handler_times_out_is_retried_and_its_late_ack_is_rejected() -> None:
    hung = publish_many("t.hang", [{"n": n, "sleep_first": HANG} for n in range(2)])
    loop = DispatchLoop(
        subscriptions=["hang.one", "basic.one"],
        workers=2,
        poll_interval=0.01,
        handle_signals=False,
    )
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: len(runs("hang.one")) == 2)
        # Both first attempts hang, holding both original threads. The other subscription
        # still gets workers: its messages are all handled while they hang.
        publish_many("t.basic", [{"n": n} for n in range(20)])
        wait_for(lambda: states("basic.one") == {"acked": 20}, timeout=HANG - 1)
        assert loop.counts.timed_out == 2
        assert states("hang.one") == {"retry": 2}
        assert loop.parts is not None
        pool = loop.parts.pool
        assert len(pool.stuck()) == 2
        wait_for(lambda: Dispatcher.objects.get(pk=loop.row.pk).stuck == 2, timeout=2)  # type: ignore[union-attr]
        # The stuck runs hold hang.one's two slots (its max_inflight), so the retries wait
        # for them; then the late acks are fenced out and the retries succeed.
        wait_for(lambda: states("hang.one") == {"acked": 2}, timeout=HANG + 10)
        wait_for(lambda: loop.counts.fenced == 2, timeout=5)
    finally:
        loop.stop()
        thread.join(20)
    for delivery in Delivery.objects.filter(message_id__in=hung):
        assert delivery.attempts == 2
        (error,) = delivery.errors
        assert error["error"].startswith("TimeoutError: handler still running after 0.3s")
        assert ", in record\n" in error["traceback"]  # the hung thread's stack: where it hung
    assert [run.attempt for run in runs("hang.one")] == [1, 1, 2, 2]
    assert loop.counts.acked == 22


def test_a_handler_that_always_hangs_is_dead_lettered_after_max_attempts() -> None:
    publish("t.hang", {"sleep": 0.8})
    stats = DispatchLoop(
        subscriptions=["hang.one"],
        poll_interval=0.01,
        until_idle=True,
        idle_wait=5.0,  # the retries' backoff
        handle_signals=False,
    ).run()
    assert states("hang.one") == {"dead": 1}
    assert stats.timed_out == 3
    (delivery,) = Delivery.objects.filter(subscription__name="hang.one")
    assert [e["attempt"] for e in delivery.errors] == [1, 2, 3]


def test_an_ordered_subscription_waits_for_its_timed_out_head_to_return() -> None:
    from tests.pubsub_app.subscribers import ORDERED_HANG_EVENTS

    ORDERED_HANG_EVENTS.clear()
    publish_many("t.hang.ordered", [{"n": 0, "sleep_first": 2.0}, {"n": 1}, {"n": 2}])
    stats = DispatchLoop(
        subscriptions=["hang.ordered"],
        workers=4,
        poll_interval=0.01,
        until_idle=True,
        handle_signals=False,
    ).run()
    assert states("hang.ordered") == {"acked": 3}
    assert stats.timed_out == 1
    # The first run of offset 0 timed out after 0.3 s but went on for 2 s. Neither its
    # retry nor anything behind it started until it had returned.
    assert ORDERED_HANG_EVENTS == [
        ("start", 0, 1),
        ("end", 0, 1),
        ("start", 0, 2),
        ("end", 0, 2),
        ("start", 1, 1),
        ("end", 1, 1),
        ("start", 2, 1),
        ("end", 2, 1),
    ]


def test_a_slow_ack_of_an_ordered_run_is_no_timeout() -> None:
    """The worker acks message n of an ordered run before n + 1 starts: a slow ack is not
    the handler's time, and the job stays this process's meanwhile."""
    from django_pubsub.dispatcher.workers import Chunk, Job, WorkerPool
    from django_pubsub.message import Message as Snapshot

    acking, release = threading.Event(), threading.Event()

    def slow_ack(jobs: list[Job]) -> set[int]:
        acking.set()
        release.wait(5)
        return {job.delivery_id for job in jobs}

    pool = WorkerPool(1, on_done=lambda: None)
    jobs = []
    for n in (1, 2):
        snapshot = Snapshot(
            id=n, offset=n, topic="t", payload=None, key=None, headers={}, published_at=None,
            attempt=1, subscription="s", delivery_id=n,
        )  # fmt: skip
        job = Job(n, "token", 1, snapshot, handler=lambda message: None, timeout=0.05)
        job.order = ""
        jobs.append(job)
    try:
        pool.submit(Chunk(jobs, ack=slow_ack, in_order=True))
        assert acking.wait(5)
        time.sleep(0.1)  # past the handler's timeout, while its ack is being written
        assert pool.time_out() == [] and pool.stuck() == []
        assert [j.delivery_id for j in pool.held()] == [2, 1]  # still ours meanwhile
        release.set()
        wait_for(lambda: not pool.busy_chunks)
        first, second = sorted(pool.take_outcomes(), key=lambda o: o.job.delivery_id)
        assert first.acked and first.error is None and not first.late
        # The last of the run: acked by the dispatcher, with the rest of its claim.
        assert not second.acked and second.error is None and not second.unstarted
    finally:
        release.set()
        pool.close()
