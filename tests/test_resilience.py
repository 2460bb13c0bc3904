"""Regressions: a dispatcher never re-runs its own running handler, keeps leases while
draining, and survives losing its database connection."""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from typing import Any

import pytest
from django.db import OperationalError, connection
from django.utils import timezone

from django_pubsub import publish, publish_many
from django_pubsub.dispatcher import DispatchLoop
from django_pubsub.models import Delivery
from tests.conftest import (
    FakeClock,
    claims_lost,
    connection_lost,
    is_postgres,
    runs,
    states,
    wait_for,
)
from tests.pubsub_app.subscribers import Gate

pytestmark = pytest.mark.django_db(transaction=True)


def test_a_slow_pass_does_not_take_back_the_dispatchers_own_running_lease(
    clock: FakeClock, gate: Gate
) -> None:
    message_id = publish("t.slow", {"n": 1, "gate": True})  # slow.one: lease 1 s
    loop = DispatchLoop(subscriptions=["slow.one"], handle_signals=False, clock=clock)
    loop.start()
    assert loop.parts is not None
    pool = loop.parts.pool
    loop.step()
    wait_for(lambda: gate.started == [(message_id, 1)])
    clock.advance(5)  # the database now says the lease expired: as after a long stall
    loop.step()
    assert gate.started == [(message_id, 1)]  # not started a second time by its dispatcher
    assert states("slow.one") == {"inflight": 1}
    gate.open()
    wait_for(lambda: pool.busy_chunks == 0)
    loop.step()
    loop.stop()
    loop.close()
    assert states("slow.one") == {"acked": 1}
    assert loop.counts.fenced == 0


def test_draining_keeps_the_leases_of_running_handlers() -> None:
    publish("t.slow", {"sleep": 2.5})  # runs past its 1 s lease
    loop = DispatchLoop(subscriptions=["slow.one"], handle_signals=False, poll_interval=0.01)
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    wait_for(lambda: len(runs("slow.one")) == 1)
    loop.stop()
    time.sleep(1.6)
    assert thread.is_alive()  # still draining
    assert Delivery.objects.expired(timezone.now()).count() == 0
    thread.join(20)
    assert states("slow.one") == {"acked": 1}
    assert loop.counts.fenced == 0


def test_the_dispatcher_survives_losing_its_connection() -> None:
    if not is_postgres():
        pytest.skip("SQLite has no server connection to kill")
    publish_many("t.basic", [{"n": n, "sleep": 0.01} for n in range(40)])
    loop = DispatchLoop(
        subscriptions=["basic.one"], handle_signals=False, poll_interval=0.01, workers=2
    )
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    wait_for(lambda: len(runs("basic.one")) >= 5)
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        killed = cursor.rowcount
    assert killed >= 1
    wait_for(lambda: Delivery.objects.filter(state="acked").count() == 40, timeout=30)
    loop.stop()
    thread.join(20)
    assert not thread.is_alive()
    assert states("basic.one") == {"acked": 40}


def test_a_commit_wakes_the_dispatcher_before_the_next_poll() -> None:
    """PostgreSQL: NOTIFY, delivered at commit. SQLite: PRAGMA data_version, read when the
    database's files change."""
    loop = DispatchLoop(subscriptions=["basic.one"], handle_signals=False, poll_interval=5.0)
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    wait_for(
        lambda: (
            loop.parts is not None
            and loop.parts.waker is not None
            and loop.parts.waker.ready.is_set()
        )
    )
    time.sleep(0.3)  # let the loop settle into its 5 s wait
    latencies = []
    for n in range(3):
        started = time.monotonic()
        publish("t.basic", {"n": n})
        wait_for(lambda n=n: len(runs("basic.one")) == n + 1, timeout=4)
        latencies.append(time.monotonic() - started)
        time.sleep(0.2)
    loop.stop()
    thread.join(20)
    print("wake-up latencies ms:", [round(x * 1000, 1) for x in latencies])
    assert max(latencies) < 1.0, latencies  # a poll would take up to 5 s


def test_a_claim_whose_messages_cannot_be_read_is_rolled_back(clock: FakeClock) -> None:
    publish_many("t.basic", [{"n": 1}, {"n": 2}])
    loop = DispatchLoop(subscriptions=["basic.one"], handle_signals=False, clock=clock)
    loop.start()
    with claims_lost(loop), pytest.raises(OperationalError):
        loop.step()
    # Not leased to a dispatcher that will never run them, and no attempt counted.
    assert states("basic.one") == {"pending": 2}
    assert set(Delivery.objects.values_list("attempts", flat=True)) == {0}
    loop.step()
    wait_for(lambda: len(runs("basic.one")) == 2)
    loop.stop()
    loop.close()
    assert states("basic.one") == {"acked": 2}


def test_a_host_clock_off_from_the_databases_is_warned_about(
    caplog: pytest.LogCaptureFixture,
) -> None:
    if not is_postgres():
        pytest.skip("SQLite runs in the dispatcher's own process: one clock")
    ahead = DispatchLoop(
        clock=lambda: timezone.now() + timedelta(seconds=30),
        until_idle=True,
        handle_signals=False,
        subscriptions=["basic.one"],
    )
    with caplog.at_level("WARNING", logger="django_pubsub"):
        ahead.run()
        DispatchLoop(until_idle=True, handle_signals=False, subscriptions=["basic.one"]).run()
    warnings = [r.getMessage() for r in caplog.records if "clock" in r.getMessage()]
    assert len(warnings) == 1 and "30.0s ahead of the database server's" in warnings[0]


def test_passes_that_keep_failing_still_heartbeat(clock: FakeClock) -> None:
    """Or other dispatchers would presume this one dead and take back its running leases."""
    from django_pubsub.models import Dispatcher, Topic

    loop = DispatchLoop(subscriptions=["basic.one"], handle_signals=False, clock=clock)
    loop.start()
    loop.step()
    real = Topic.sequence_all
    Topic.sequence_all = connection_lost  # type: ignore[method-assign]
    assert loop.row is not None
    row = loop.row
    try:
        for _ in range(3):
            clock.advance(10)  # past the heartbeat interval each time
            with pytest.raises(OperationalError):
                loop.step()
            # The heartbeat has a thread of its own: it beats while passes fail.
            wait_for(lambda: Dispatcher.objects.get(pk=row.pk).last_seen == clock.now)
    finally:
        Topic.sequence_all = real  # type: ignore[method-assign]
        loop.stop()
        loop.close()


def test_shutdown_gives_back_what_a_failed_claim_leased(clock: FakeClock) -> None:
    publish("t.basic", {"n": 1})
    loop = DispatchLoop(subscriptions=["basic.one"], handle_signals=False, clock=clock)
    loop.start()
    # A claim whose rows were lost with the connection, and whose give-back failed too.
    with claims_lost(loop, give_back_fails=True), pytest.raises(OperationalError):
        loop.step()
    assert states("basic.one") == {"inflight": 1}
    loop.stop()
    loop.close()
    assert states("basic.one") == {"pending": 1}
    assert set(Delivery.objects.values_list("attempts", flat=True)) == {0}


def test_a_heartbeat_that_fails_once_beats_on(
    clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever goes wrong in a tick, the heartbeat's thread lives on: if it died, others
    would take this dispatcher's leases while its handlers run."""
    from django_pubsub.dispatcher.leases import LeaseKeeper
    from django_pubsub.models import Dispatcher

    real, failures = LeaseKeeper.extend, []

    def fails_once(self: LeaseKeeper, now: Any) -> int:
        if not failures:
            failures.append(now)
            raise RuntimeError("a bug in a tick")
        return real(self, now)

    monkeypatch.setattr(LeaseKeeper, "extend", fails_once)
    loop = DispatchLoop(subscriptions=["basic.one"], handle_signals=False, clock=clock)
    loop.start()
    try:
        assert loop.row is not None
        row = loop.row
        wait_for(lambda: bool(failures))
        clock.advance(10)
        wait_for(lambda: Dispatcher.objects.get(pk=row.pk).last_seen == clock.now)
    finally:
        loop.stop()
        loop.close()


def test_a_loop_that_stops_moving_is_reported_and_keeps_its_leases(
    settings: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A signal receiver that never returns stalls the loop. It is reported, and the
    heartbeat goes on: a pass that waits long for a lock looks the same from here, and its
    running handlers must not lose their leases to another dispatcher."""
    from django_pubsub import signals
    from django_pubsub.models import Dispatcher

    settings.PUBSUB = {**settings.PUBSUB, "HEARTBEAT_INTERVAL": 0.1, "DISPATCHER_TIMEOUT": 1.0}
    stalled, release = threading.Event(), threading.Event()

    def stall(**kwargs: Any) -> None:
        stalled.set()
        release.wait(10)

    signals.delivery_succeeded.connect(stall)
    loop = DispatchLoop(subscriptions=["basic.one"], handle_signals=False, poll_interval=0.01)
    thread = threading.Thread(target=loop.run, daemon=True)
    try:
        with caplog.at_level("WARNING", logger="django_pubsub"):
            thread.start()
            wait_for(lambda: loop.row is not None)
            assert loop.row is not None
            row = loop.row
            publish("t.basic", {"n": 1})
            assert stalled.wait(10)
            wait_for(lambda: "has not begun a pass" in caplog.text)
            seen = Dispatcher.objects.get(pk=row.pk).last_seen
            wait_for(lambda: Dispatcher.objects.get(pk=row.pk).last_seen > seen)
            release.set()
            wait_for(lambda: "the dispatch loop moves again" in caplog.text)
    finally:
        release.set()
        signals.delivery_succeeded.disconnect(stall)
        loop.stop()
        thread.join(20)
