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


@pytest.mark.parametrize("awkward", ["nul", "surrogate", "huge", "unprintable"])
def test_any_exception_a_handler_raises_is_recorded_and_stops_nothing(
    awkward: str, dispatch: Any
) -> None:
    """Text no column holds as it is (NUL, a lone surrogate, a megabyte) and an exception
    whose str() raises are recorded as a retry like any failure; the deliveries around
    them, of the same ordered subscription and of others, all run."""
    ids = publish_many("t.ordered", [{"n": 0}, {"raise": awkward}, {"n": 2}])
    other = publish("t.basic", {"n": 3})
    counts = dispatch("ordered.one", "basic.one", idle_wait=2.0)
    assert counts.retried == 1
    rows = {d.message_id: d for d in Delivery.objects.filter(subscription__name="ordered.one")}
    assert [rows[i].state for i in ids] == ["acked", "acked", "acked"]
    failed = rows[ids[1]]
    assert failed.attempts == 2
    error = failed.errors[0]["error"]
    expected = {
        "nul": "Planned: bad \\x00 text",
        "surrogate": "Planned: bad \\ud800 text",
        "huge": "Planned: xxxx",
        "unprintable": "Unprintable: <str() of the exception raised RuntimeError>",
    }[awkward]
    assert error.startswith(expected)
    assert len(error) < 5_000 and len(failed.errors[0]["traceback"]) < 25_000
    assert failed.errors[0]["traceback"]
    assert Delivery.objects.get(message_id=other, subscription__name="basic.one").state == "acked"


def test_a_database_outage_logs_one_line_per_retry(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """runpubsub's default verbosity shows INFO and up: a line per retry, no traceback
    (that is DEBUG, -v 2)."""
    import logging

    from django_pubsub.models import Topic

    publish("t.basic", {"n": 1})
    real = Topic.sequence_all
    failures = iter(range(3))

    def flaky(*args: Any, **kwargs: Any) -> Any:
        if next(failures, None) is not None:
            connection_lost()
        return real(*args, **kwargs)

    monkeypatch.setattr(Topic, "sequence_all", flaky)
    with caplog.at_level(logging.DEBUG, logger="django_pubsub"):
        DispatchLoop(until_idle=True, handle_signals=False, subscriptions=["basic.one"]).run()
    assert states("basic.one") == {"acked": 1}
    shown = [r for r in caplog.records if r.levelno >= logging.INFO]
    retries = [r.getMessage() for r in shown if "database error, retrying" in r.getMessage()]
    assert len(retries) == 3
    assert all("\n" not in line and "server closed the connection" in line for line in retries)
    assert not [r for r in shown if r.exc_info]
    assert [r for r in caplog.records if r.levelno == logging.DEBUG and r.exc_info]


def test_a_start_the_database_refuses_is_an_error_not_an_outage() -> None:
    """A value the database refuses (here, past an integer column's range, which only a
    declaration that skipped @subscriber's checks can carry) stops runpubsub with the
    database's reason instead of retrying for ever as if the database were down."""
    if not is_postgres():
        pytest.skip("SQLite's integer columns hold any 64-bit value")
    from django_pubsub import registry
    from django_pubsub.exceptions import PubSubError

    spec = registry.SubscriberSpec(
        name="too.many.attempts",
        topic="t.basic",
        handler="tests.pubsub_app.subscribers.basic_one",
        max_attempts=2**31,
    )
    registry.register(spec)
    try:
        loop = DispatchLoop(handle_signals=False)
        started = time.monotonic()
        with pytest.raises(PubSubError, match="the database refused what runpubsub writes"):
            loop.start()
        assert time.monotonic() - started < 5
    finally:
        registry.unregister(spec.name)


def test_a_retry_log_line_says_when_it_is_due(
    caplog: pytest.LogCaptureFixture, clock: FakeClock
) -> None:
    import logging

    publish("t.flaky", {"fail_times": 1})
    with caplog.at_level(logging.WARNING, logger="django_pubsub"):
        DispatchLoop(
            until_idle=True, handle_signals=False, subscriptions=["flaky.one"], clock=clock
        ).run()
    (line,) = [r.getMessage() for r in caplog.records if "will retry" in r.getMessage()]
    retry = Delivery.objects.get(subscription__name="flaky.one")
    assert retry.available_at is not None
    assert f"at {retry.available_at.isoformat(timespec='seconds')}" in line
    assert "will retry in " in line and "Planned: planned failure 1" in line
