"""The dispatch loop in-process: ordering, retries, dead letters, leases, idling."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import pytest

from django_pubsub import publish, publish_many, registry, signals
from django_pubsub.backends import padded_ids
from django_pubsub.dispatcher import MAX_HELD, DispatchLoop
from django_pubsub.exceptions import HandlerImportError
from django_pubsub.models import Delivery, Dispatcher, Subscription, Topic
from django_pubsub.registry import SubscriberSpec
from django_pubsub.retry import Backoff
from tests.conftest import FakeClock, runs, states, wait_for
from tests.pubsub_app.subscribers import Gate

pytestmark = pytest.mark.django_db(transaction=True)


def test_handler_gets_a_frozen_message_snapshot(dispatch: Any) -> None:
    seen = []
    from tests.pubsub_app import subscribers

    original = subscribers.record
    subscribers.record = seen.append  # type: ignore[assignment]
    try:
        message_id = publish("t.basic", {"a": [1, 2]}, key="k", headers={"h": "v"})
        dispatch("basic.one")
    finally:
        subscribers.record = original
    (message,) = seen
    assert (message.id, message.offset, message.topic) == (message_id, 0, "t.basic")
    assert (message.payload, message.key, dict(message.headers)) == ({"a": [1, 2]}, "k", {"h": "v"})
    assert message.attempt == 1 and message.subscription == "basic.one"
    assert message.published_at is not None
    with pytest.raises(AttributeError):
        message.payload = {}


def test_offsets_are_consecutive_in_publish_order(dispatch: Any) -> None:
    ids = publish_many("t.ordered", [{"n": n} for n in range(30)])
    ids += [publish("t.ordered", {"n": 30 + n}) for n in range(10)]
    dispatch("ordered.one", "ordered.two")
    for name in ("ordered.one", "ordered.two"):
        seen = runs(name)
        assert [run.message_id for run in seen] == ids
        assert [run.offset for run in seen] == list(range(40))


def test_ordered_subscription_waits_for_a_retry_of_the_head(
    dispatch: Any, clock: FakeClock
) -> None:
    publish("t.ordered", {"n": 0, "fail_times": 1})
    publish_many("t.ordered", [{"n": 1}, {"n": 2}])
    dispatch("ordered.one", clock=clock)
    # Offset 0 failed once and waits for its retry: nothing behind it may start.
    assert [(run.offset, run.attempt) for run in runs("ordered.one")] == [(0, 1)]
    assert states("ordered.one") == {"retry": 1, "pending": 2}
    clock.advance(60)
    dispatch("ordered.one", clock=clock)
    assert [(run.offset, run.attempt) for run in runs("ordered.one")] == [
        (0, 1),
        (0, 2),
        (1, 1),
        (2, 1),
    ]
    assert states("ordered.one") == {"acked": 3}


def test_ordered_subscription_moves_on_after_a_dead_letter(dispatch: Any) -> None:
    publish_many("t.ordered", [{"n": 0, "fail_times": 99}, {"n": 1}])
    dispatch("ordered.one", idle_wait=2)
    assert [(run.offset, run.attempt) for run in runs("ordered.one")] == [
        (0, 1),
        (0, 2),
        (0, 3),
        (1, 1),
    ]
    assert states("ordered.one") == {"dead": 1, "acked": 1}


def test_retries_follow_the_backoff_and_dead_letter_exactly_at_max_attempts(
    dispatch: Any, clock: FakeClock
) -> None:
    # flaky.one: max_attempts=4, backoff base 10, factor 3, max 100, jitter 0.5.
    publish("t.flaky", {"fail_times": 99})
    rand = iter([0.0, 1.0, 0.5] * 3).__next__
    backoff = Backoff(base=10, factor=3, maximum=100, jitter=0.5)
    expected = [
        backoff.delay(1, lambda: 0.0),
        backoff.delay(2, lambda: 1.0),
        backoff.delay(3, lambda: 0.5),
    ]
    assert expected == [5.0, 45.0, 90.0]
    for attempt, delay in enumerate(expected, start=1):
        dispatch("flaky.one", clock=clock, rand=rand)
        delivery = Delivery.objects.get(subscription__name="flaky.one")
        assert (delivery.state, delivery.attempts) == ("retry", attempt)
        assert delivery.available_at == clock.now + timedelta(seconds=delay)
        clock.advance(delay - 0.001)
        dispatch("flaky.one", clock=clock, rand=rand)  # not due yet: nothing runs
        assert len(runs("flaky.one")) == attempt
        clock.advance(0.001)
    dispatch("flaky.one", clock=clock, rand=rand)
    delivery = Delivery.objects.get(subscription__name="flaky.one")
    assert (delivery.state, delivery.attempts) == ("dead", 4)
    assert [entry["attempt"] for entry in delivery.errors] == [1, 2, 3, 4]
    assert all("Planned: planned failure" in entry["error"] for entry in delivery.errors)
    assert all("Traceback" in entry["traceback"] for entry in delivery.errors)
    assert len(runs("flaky.one")) == 4


def test_a_flaky_handler_succeeds_on_retry(dispatch: Any) -> None:
    # basic.one has no backoff of its own: the test settings' 10 ms one applies.
    publish("t.basic", {"fail_times": 2})
    dispatch("basic.one", idle_wait=2)
    assert [run.attempt for run in runs("basic.one")] == [1, 2, 3]
    assert states("basic.one") == {"acked": 1}


def test_an_expired_lease_is_delivered_again(dispatch: Any, clock: FakeClock) -> None:
    publish("t.basic", {"n": 1})
    loop = DispatchLoop(
        subscriptions=["basic.one"], until_idle=True, handle_signals=False, clock=clock
    )
    loop.start()
    try:
        sub = loop.subscriptions[Subscription.objects.get(name="basic.one").pk]
        Topic.sequence_all(batch=10)
        Topic.fan_out(sub.topic_id, now=clock.now, batch=10)
        # Claimed by a dispatcher that then vanished: no handler runs, the lease stays.
        (claimed,) = Delivery.objects.claim(
            sub, limit=1, now=clock.now, token="lost", dispatcher_id=None
        )
    finally:
        loop.stop()
        loop.close()
    # While the lease holds: no second start, and --until-idle counts it as in flight.
    loop = DispatchLoop(
        subscriptions=["basic.one"], until_idle=True, handle_signals=False, clock=clock
    )
    loop.start()
    loop.step()
    assert runs("basic.one") == []
    assert not loop.idle()
    loop.stop()
    loop.close()
    clock.advance(31)
    dispatch("basic.one", clock=clock)
    assert [run.attempt for run in runs("basic.one")] == [2]
    delivery = Delivery.objects.get(pk=claimed[0])
    assert delivery.state == "acked"
    assert delivery.errors[0]["error"] == "lease expired before an ack"


def _ghost_dispatcher() -> Dispatcher:
    """A dispatcher on another host that stopped beating an hour ago."""
    started = Dispatcher.objects.get().started_at
    return Dispatcher.objects.create(
        hostname="gone-host", pid=1, started_at=started, last_seen=started - timedelta(hours=1)
    )


def test_a_dead_dispatchers_leases_are_taken_back_without_waiting(dispatch: Any) -> None:
    publish("t.basic", {"n": 1})
    dispatch("basic.one", max_messages=1, until_idle=False)
    Delivery.objects.all().delete()
    Subscription.objects.filter(name="basic.one").update(position=0)
    ghost = _ghost_dispatcher()
    from django.utils import timezone

    sub = Subscription.objects.get(name="basic.one")
    Topic.fan_out(sub.topic_id, now=timezone.now(), batch=10)
    Delivery.objects.claim(sub, limit=1, now=timezone.now(), token="ghost", dispatcher_id=ghost.pk)
    started = time.monotonic()
    dispatch("basic.one")
    assert time.monotonic() - started < 10  # well inside the 30 s lease
    assert states("basic.one") == {"acked": 1}
    ghost.refresh_from_db()
    assert ghost.stopped_at is not None


def test_shutdown_gives_back_claimed_work_that_never_started(clock: FakeClock, gate: Gate) -> None:
    loop = DispatchLoop(subscriptions=["basic.one"], workers=1, handle_signals=False, clock=clock)
    loop.start()
    assert loop.parts is not None
    pool = loop.parts.pool
    # Quick ones first, one at a time: recorded, they let the next chunk (the one worker's
    # share of a claim) grow past one. (The first opens the worker's connection: slow.)
    for n in range(2):
        publish("t.basic", {"n": f"quick {n}"})
        loop.step()
        wait_for(lambda: pool.busy_chunks == 0)
        loop.step()
    publish_many("t.basic", [{"n": n, "gate": True} for n in range(3)])
    loop.step()  # one chunk for the one worker: the first runs, the rest waits behind it
    wait_for(lambda: len(gate.started) == 1)
    leased = states("basic.one")["inflight"]
    assert leased >= 2
    loop.stop()
    gate.open()
    loop.close()
    assert loop.counts.given_back == leased - 1
    assert states("basic.one") == {"acked": 3, "pending": 2}
    assert (
        Delivery.objects.filter(state="pending").values_list("attempts", flat=True).distinct().get()
        == 0
    )


def test_max_inflight_bounds_one_subscription() -> None:
    # slow.one: max_inflight=2. With 4 workers, never more than 2 of its handlers at once.
    publish_many("t.slow", [{"sleep": 0.05} for _ in range(8)])
    peak = 0
    loop = DispatchLoop(
        subscriptions=["slow.one"],
        workers=4,
        until_idle=True,
        handle_signals=False,
        poll_interval=0.005,
    )
    running = 0
    lock = threading.Lock()

    def started(**kwargs: Any) -> None:
        nonlocal peak, running
        with lock:
            running += 1
            peak = max(peak, running)

    def done(**kwargs: Any) -> None:
        nonlocal running
        with lock:
            running -= 1

    # A slot is free again once its outcome is recorded, which is when success is signalled.
    signals.delivery_started.connect(started)
    signals.delivery_succeeded.connect(done)
    try:
        loop.run()
    finally:
        signals.delivery_started.disconnect(started)
        signals.delivery_succeeded.disconnect(done)
    assert peak == 2
    assert states("slow.one") == {"acked": 8}


def test_until_idle_waits_for_work_due_within_idle_wait(dispatch: Any, settings: Any) -> None:
    settings.PUBSUB = {
        **settings.PUBSUB,
        "BACKOFF": {"base": 0.3, "factor": 1, "maximum": 1, "jitter": 0},
    }
    publish("t.basic", {"fail_times": 1})
    dispatch("basic.one")  # idle_wait 0: the retry is not due yet, so it exits
    assert states("basic.one") == {"retry": 1}
    dispatch("basic.one", idle_wait=1.0)
    assert states("basic.one") == {"acked": 1}


def test_unknown_subscription_names_are_refused() -> None:
    with pytest.raises(ValueError, match="Unknown or inactive subscriptions: nope"):
        DispatchLoop(subscriptions=["basic.one", "nope"], handle_signals=False).run()


def _break_handler(name: str) -> None:
    """Make a subscription's row point at a handler that no longer imports, as a row
    written by other code (a newer release) or left behind by a deleted module would."""
    from django_pubsub import sync

    sync.sync_subscriptions()
    Subscription.objects.filter(name=name).update(handler="tests.pubsub_app.gone.handler")


def test_a_named_subscription_whose_handler_does_not_import_stops_the_start() -> None:
    _break_handler("basic.one")
    loop = DispatchLoop(subscriptions=["basic.one"], handle_signals=False)
    with pytest.raises(HandlerImportError, match="does not import"):
        # load() reads rows as they are; run() would first re-sync from code.
        loop.subscriptions.load()


@contextmanager
def _running_with(spec: SubscriberSpec) -> Iterator[DispatchLoop]:
    """A dispatcher in a thread while ``spec`` is also declared, after 3 messages to t.basic
    have been handled by basic.one."""
    registry.register(spec)
    loop = DispatchLoop(poll_interval=0.01, handle_signals=False)
    thread = threading.Thread(target=loop.run, daemon=True)
    try:
        thread.start()
        wait_for(lambda: loop.row is not None)
        publish_many("t.basic", [{"n": n} for n in range(3)])
        wait_for(lambda: states("basic.one") == {"acked": 3})
        yield loop
    finally:
        loop.stop()
        thread.join(20)
        registry.unregister(spec.name)
    assert not thread.is_alive()


def test_a_handler_that_does_not_import_leaves_its_deliveries_waiting(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A declaration whose path does not import: as a row written by a newer release, or
    # a module that broke. (The E004 check stops a runpubsub whose own code does this.)
    gone = SubscriberSpec(name="basic.gone", topic="t.basic", handler="tests.gone.handler")
    with caplog.at_level("ERROR", logger="django_pubsub"), _running_with(gone) as loop:
        wait_for(lambda: states("basic.gone") == {"pending": 3})
        assert "'basic.gone': its handler 'tests.gone.handler' does not import" in caplog.text
        time.sleep(0.2)
        assert states("basic.gone") == {"pending": 3}  # waiting, never acked
        # Fixed by a deploy: the next import retry picks it up and delivers.
        Subscription.objects.filter(name="basic.gone").update(
            handler="tests.pubsub_app.subscribers.basic_two"
        )
        loop.subscriptions.retry_imports_soon()
        wait_for(lambda: states("basic.gone") == {"acked": 3})


def test_a_handler_module_that_raises_at_import_is_skipped_until_deactivated(
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = "tests.pubsub_app.broken_at_import.handler"
    broken = SubscriberSpec(name="basic.broken", topic="t.basic", handler=path)
    with caplog.at_level("ERROR", logger="django_pubsub"), _running_with(broken) as loop:
        # Retried imports raise again; the dispatcher keeps going.
        retried = loop.subscriptions.imports_retried
        loop.subscriptions.retry_imports_soon()
        wait_for(lambda: loop.subscriptions.imports_retried > retried)
        publish("t.basic", {"n": 3})
        wait_for(lambda: states("basic.one") == {"acked": 4})
        assert "RuntimeError: settings for the mail server are missing" in caplog.text
        assert states("basic.broken") == {"pending": 4}
        # Deactivated meanwhile (a later deploy removed it): no more import attempts.
        Subscription.objects.filter(name="basic.broken").update(active=False)
        loop.subscriptions.retry_imports_soon()
        wait_for(lambda: not loop.subscriptions.unloaded)


def test_heartbeat_row_is_written_and_closed(dispatch: Any) -> None:
    dispatch("basic.one")
    row = Dispatcher.objects.get()
    assert row.stopped_at is not None and row.last_seen >= row.started_at


def test_a_dead_dispatchers_ordered_run_charges_an_attempt_only_to_its_head(
    dispatch: Any,
) -> None:
    publish_many("t.ordered", [{"n": n} for n in range(3)])
    dispatch("ordered.one", max_messages=1, until_idle=False)  # registers; runs offset 0
    ghost = _ghost_dispatcher()
    from django.utils import timezone

    sub = Subscription.objects.get(name="ordered.one")
    claimed = Delivery.objects.claim(
        sub, limit=10, now=timezone.now(), token="ghost", dispatcher_id=ghost.pk
    )
    assert [row.offset for row in claimed] == [1, 2]  # one run, leased to the dead one
    stats = dispatch("ordered.one")
    assert [run.offset for run in runs("ordered.one")] == [0, 1, 2]
    attempts = dict(Delivery.objects.filter(subscription=sub).values_list("offset", "attempts"))
    # Offset 1 may have been running when its dispatcher died; offset 2 cannot have started.
    assert attempts == {0: 1, 1: 2, 2: 1}
    assert stats.recovered == 1 and stats.given_back == 1


def test_a_database_error_part_way_through_recording_counts_nothing_twice(
    clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    from django.db import OperationalError

    from django_pubsub.models import DeliveryQuerySet

    publish_many("t.basic", [{"n": 0, "fail_times": 1}, {"n": 1}])
    loop = DispatchLoop(subscriptions=["basic.one"], workers=2, handle_signals=False, clock=clock)
    loop.start()
    try:
        ack = DeliveryQuerySet.ack
        calls = []

        def ack_once_failing(self: Any, *args: Any, **kwargs: Any) -> list[int]:
            calls.append(args)
            if len(calls) == 1:
                raise OperationalError("connection lost")
            return ack(self, *args, **kwargs)

        loop.step()  # claims both; the workers run them
        assert loop.parts is not None
        pool = loop.parts.pool
        wait_for(lambda: not pool.busy_chunks)
        monkeypatch.setattr(DeliveryQuerySet, "ack", ack_once_failing)
        with pytest.raises(OperationalError):
            loop.step()  # the failure is written, then the ack fails
        loop.step()  # the ack again, and nothing else (the retry is not due)
        assert len(calls) == 2
        assert (loop.counts.failed, loop.counts.retried, loop.counts.acked) == (1, 1, 1)
        assert loop.counts.fenced == 0
        assert sum(loop.parts.claimer.in_flight.values()) == 0
        assert states("basic.one") == {"acked": 1, "retry": 1}
    finally:
        loop.stop()
        loop.close()


def test_an_ordered_run_recovered_in_parts_charges_only_its_head(
    dispatch: Any, clock: FakeClock
) -> None:
    from django.db.models import Q
    from django.test import override_settings

    publish_many("t.ordered", [{"n": n} for n in range(4)])
    dispatch("ordered.one", max_messages=1, until_idle=False, clock=clock)  # runs offset 0
    sub = Subscription.objects.get(name="ordered.one")
    claimed = Delivery.objects.claim(sub, limit=10, now=clock.now, token="lost", dispatcher_id=None)
    assert [row.offset for row in claimed] == [1, 2, 3]
    loop = DispatchLoop(subscriptions=["ordered.one"], handle_signals=False, clock=clock)
    loop.start()
    assert loop.parts is not None
    recovery = loop.parts.recovery
    try:
        with override_settings(PUBSUB={"BATCH_SIZE": 2}):  # the run is taken back in two parts
            for _ in range(2):
                lost = Delivery.objects.inflight().filter(lease_token="lost").order_by("-offset")
                recovery.take_back(lost, clock.now, "lease expired before an ack", Q())
    finally:
        loop.stop()
        loop.close()
    rows = Delivery.objects.filter(subscription=sub).order_by("offset")
    assert [(row.offset, row.state, row.attempts) for row in rows] == [
        (0, "acked", 1),
        (1, "retry", 1),  # the only one that can have been running: its attempt stays
        (2, "pending", 0),
        (3, "pending", 0),
    ]


def test_lists_of_ids_come_in_few_shapes_and_fit_one_statement() -> None:
    assert padded_ids([]) == [] and padded_ids([7]) == [7]
    assert padded_ids([7, 8, 9]) == [7, 8, 9, -1]
    shapes = {len(padded_ids(range(1, n + 1))) for n in range(1, MAX_HELD + 1)}
    assert len(shapes) <= 32
    # What the dispatcher may hold, with room for the statement's own parameters.
    assert max(shapes) <= 32_766 - 16
    for n in (1_000, 1_025, MAX_HELD):
        padded = padded_ids(range(1, n + 1))
        assert padded[:n] == list(range(1, n + 1)) and all(i < 0 for i in padded[n:])
        assert len(set(padded)) == len(padded)  # distinct: the ORM would drop repeats
