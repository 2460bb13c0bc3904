"""Pauses that end by themselves (Subscription.pause(until=), the admin's "pause for 1
hour") and the circuit breaker (@subscriber circuit_breaker=)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
from django.contrib.admin.models import LogEntry
from django.utils import timezone

from django_pubsub import publish, publish_many, registry, signals, stats, subscriber
from django_pubsub.exceptions import InvalidSchedule, InvalidSubscriber
from django_pubsub.models import Delivery, Subscription
from tests.conftest import FakeClock, log_in_operator, runs, states
from tests.pubsub_app.subscribers import basic_one

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(timezone.now())


@pytest.fixture
def sent() -> Iterator[list[tuple[str, dict[str, Any]]]]:
    seen: list[tuple[str, dict[str, Any]]] = []
    receivers = {}
    for name in ("subscription_paused", "subscription_resumed", "breaker_tripped"):

        def receiver(sender: Any, _name: str = name, **kwargs: Any) -> None:
            seen.append((_name, kwargs))

        receivers[name] = receiver
        getattr(signals, name).connect(receiver)
    yield seen
    for name, receiver in receivers.items():
        getattr(signals, name).disconnect(receiver)


def _sub(name: str) -> Subscription:
    return Subscription.objects.get(name=name)


def test_a_pause_with_an_end_resumes_by_itself(
    dispatch: Any, clock: FakeClock, sent: list[Any]
) -> None:
    sub = _sub("basic.one")
    assert sub.pause(clock(), until=clock() + timedelta(minutes=5))
    message_id = publish("t.basic", {"n": 1})
    assert dispatch("basic.one", clock=clock).acked == 0
    row = Delivery.objects.get(subscription=sub)
    assert "is paused until" in row.why(clock())
    clock.advance(minutes=5)
    assert dispatch("basic.one", clock=clock).acked == 1
    assert [run.message_id for run in runs("basic.one")] == [message_id]
    sub.refresh_from_db()
    assert not sub.paused and sub.paused_until is None
    assert [name for name, _ in sent] == ["subscription_paused", "subscription_resumed"]


def test_an_operators_pause_without_an_end_replaces_one_with_an_end(clock: FakeClock) -> None:
    sub = _sub("basic.one")
    sub.pause(clock(), until=clock() + timedelta(minutes=5))
    assert not sub.pause(clock())  # already paused: now until resumed
    clock.advance(minutes=10)
    assert Subscription.resume_due(clock()) == []
    assert _sub("basic.one").paused


def test_drain_resumes_a_pause_that_ended_by_the_tests_clock(pubsub: Any) -> None:
    _sub("basic.one").pause(pubsub.clock(), until=pubsub.clock() + timedelta(hours=1))
    publish("t.basic", {"n": 1})
    assert pubsub.drain(["basic.one"]).acked == 0
    pubsub.advance(hours=1)
    assert pubsub.drain(["basic.one"]).acked == 1


def test_the_admin_pauses_for_an_hour(client: Any) -> None:
    log_in_operator(client, "view_subscription", "change_subscription")
    sub = _sub("basic.one")
    before = timezone.now()
    response = client.post(
        "/admin/django_pubsub/subscription/",
        {"action": "pause_1_hour", "_selected_action": [sub.pk]},
        follow=True,
    )
    assert response.status_code == 200
    sub.refresh_from_db()
    assert sub.paused and sub.paused_until is not None
    assert timedelta(minutes=59) < sub.paused_until - before <= timedelta(hours=1, seconds=5)
    (entry,) = LogEntry.objects.all()
    assert entry.change_message == "Paused until 1:00:00 from now"
    figures = stats.collect()
    row = next(s for s in figures.subscriptions if s.name == "basic.one")
    assert stats.status(row).startswith("paused until ")
    page = client.get("/admin/django_pubsub/subscription/")
    assert b"yes, until" in page.content


def test_the_circuit_breaker_pauses_after_failures_of_one_type_in_a_row(
    dispatch: Any, clock: FakeClock, sent: list[Any]
) -> None:
    for n in range(10):
        publish("t.breaker", {"n": n, "error": "value"})
    dispatch("breaker.one", clock=clock)
    # Three dead letters, then it paused: the other seven wait instead of dying.
    assert states("breaker.one") == {"dead": 3, "pending": 7}
    sub = _sub("breaker.one")
    assert sub.paused and sub.paused_until == clock() + timedelta(seconds=60)
    assert sub.paused_reason.startswith("circuit breaker: 3 failures in a row with ValueError")
    tripped = [kwargs for name, kwargs in sent if name == "breaker_tripped"]
    assert len(tripped) == 1 and tripped[0]["failures"] == 3
    assert tripped[0]["error"] == "ValueError: the partner's API said no"
    waiting = Delivery.objects.filter(subscription=sub, state="pending").first()
    assert waiting is not None and "circuit breaker" in waiting.why(clock())
    # Fixed meanwhile: after its pause it runs the rest.
    Delivery.objects.filter(subscription=sub, state="pending").update(available_at=clock())
    from django_pubsub.models import Message

    Message.objects.filter(topic__name="t.breaker").update(payload={"n": 0})
    clock.advance(61)
    dispatch("breaker.one", clock=clock)
    assert states("breaker.one") == {"dead": 3, "acked": 7}
    assert not _sub("breaker.one").paused


def test_failures_of_other_types_or_a_success_between_do_not_trip_it(
    dispatch: Any, clock: FakeClock
) -> None:
    for error in ["value", "value", "key", "value", "value", None, "value", "value"]:
        publish("t.breaker", {"error": error})
    dispatch("breaker.one", clock=clock)
    assert states("breaker.one") == {"dead": 7, "acked": 1}
    assert not _sub("breaker.one").paused
    assert len(runs("breaker.one")) == 8


@pytest.mark.parametrize(
    "breaker",
    [0, -1, 1.5, True, "3", {"failures": 3, "pause": -1}, {"failures": 3, "wait": 5}, {}],
)
def test_a_circuit_breaker_that_cannot_work_is_refused(breaker: Any) -> None:
    with pytest.raises(InvalidSubscriber, match="circuit_breaker must be"):
        subscriber("t.basic", name="breaker.bad", circuit_breaker=breaker)(basic_one)
    assert "breaker.bad" not in registry.get_specs()


def test_a_breaker_trips_on_errors_whose_text_the_database_cannot_hold(
    dispatch: Any, clock: FakeClock
) -> None:
    for n in range(6):
        publish("t.breaker", {"n": n, "error": "awkward"})
    dispatch("breaker.one", clock=clock)
    assert states("breaker.one") == {"dead": 3, "pending": 3}
    sub = _sub("breaker.one")
    assert sub.paused and "\\x00" in sub.paused_reason and "\\ud800" in sub.paused_reason


def test_a_failed_batch_is_one_failure_to_the_breaker(dispatch: Any) -> None:
    """Ten messages failing by one call of a batch handler are one failure: it takes three
    calls (the retries come at once here) to trip a breaker of three."""
    publish_many("t.breaker.batch", [{"n": n} for n in range(10)])
    dispatch("breaker.batch", idle_wait=2)
    sub = _sub("breaker.batch")
    assert sub.paused and sub.paused_reason.startswith("circuit breaker: 3 failures")
    assert len(runs("breaker.batch")) == 30  # three calls of ten
    assert states("breaker.batch") == {"retry": 10}


def test_a_trip_never_overwrites_a_pause_that_is_there(clock: FakeClock, sent: list[Any]) -> None:
    sub = _sub("breaker.one")
    sub.pause(clock())  # an operator's, until resumed
    assert not sub.trip(clock(), until=clock() + timedelta(minutes=1), reason="breaker")
    row = _sub("breaker.one")
    assert row.paused and row.paused_until is None and row.paused_reason == ""


@pytest.mark.parametrize("until", [3600, timedelta(hours=1), "tomorrow", datetime(2030, 1, 1)])
def test_a_pause_until_that_is_not_an_aware_datetime_is_refused(until: Any) -> None:
    with pytest.raises(InvalidSchedule, match="until= must be None or an aware datetime"):
        _sub("basic.one").pause(until=until)
    assert not _sub("basic.one").paused
