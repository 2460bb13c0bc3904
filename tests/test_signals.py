"""Lifecycle signals: what each carries, when it is sent, and that a receiver that raises
breaks nothing."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from django.dispatch import Signal

from django_pubsub import publish, publish_many, signals
from django_pubsub.models import Message, Subscription
from tests.conftest import runs, states

pytestmark = pytest.mark.django_db(transaction=True)


@contextmanager
def received(*watched: Signal) -> Iterator[list[tuple[Signal, dict[str, Any]]]]:
    seen: list[tuple[Signal, dict[str, Any]]] = []

    def receiver(signal: Signal, sender: Any, **kwargs: Any) -> None:
        seen.append((signal, {"sender": sender, **kwargs}))

    for signal in watched:
        signal.connect(receiver, weak=False, dispatch_uid="test")
    try:
        yield seen
    finally:
        for signal in watched:
            signal.disconnect(dispatch_uid="test")


def test_publishing_sends_the_ids_in_order() -> None:
    with received(signals.message_published) as seen:
        first = publish("t.basic", {"n": 0})
        more = publish_many("t.basic", [{"n": 1}, {"n": 2}])
    assert [kwargs["ids"] for _, kwargs in seen] == [[first], more]
    assert {kwargs["topic"] for _, kwargs in seen} == {"t.basic"}
    assert {kwargs["sender"] for _, kwargs in seen} == {Message}


def test_a_delivery_that_fails_to_the_end_sends_each_step(dispatch: Any) -> None:
    watched = (
        signals.delivery_started,
        signals.delivery_succeeded,
        signals.delivery_failed,
        signals.retry_scheduled,
        signals.dead_lettered,
    )
    message_id = publish("t.basic", {"fail_times": 99})
    with received(*watched) as seen:
        dispatch("basic.one", idle_wait=1)
    names = {
        getattr(signals, name): name
        for name in dir(signals)
        if isinstance(getattr(signals, name), Signal)
    }
    steps = [names[signal] for signal, _ in seen]
    # max_attempts 3: start, fail, retry; start, fail, retry; start, fail, dead.
    assert steps == [
        "delivery_started",
        "delivery_failed",
        "retry_scheduled",
    ] * 2 + ["delivery_started", "delivery_failed", "dead_lettered"]
    assert {kwargs["message"].id for _, kwargs in seen} == {message_id}
    assert [kwargs["message"].attempt for _, kwargs in seen][::3] == [1, 2, 3]
    failed = [kwargs for signal, kwargs in seen if signal is signals.delivery_failed]
    assert [kwargs["state"] for kwargs in failed] == ["retry", "retry", "dead"]
    assert "planned failure 1" in failed[0]["error"] and "Planned" in failed[0]["traceback"]
    retried = [kwargs for signal, kwargs in seen if signal is signals.retry_scheduled]
    assert retried[0]["available_at"] is not None


def test_a_handled_delivery_sends_started_then_succeeded(dispatch: Any) -> None:
    publish("t.basic", {"n": 1})
    with received(signals.delivery_started, signals.delivery_succeeded) as seen:
        dispatch("basic.one")
    assert [signal for signal, _ in seen] == [signals.delivery_started, signals.delivery_succeeded]
    assert seen[1][1]["duration"] >= 0 and seen[1][1]["message"].subscription == "basic.one"


def test_a_receiver_that_raises_breaks_nothing(
    dispatch: Any, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(**kwargs: Any) -> None:
        raise RuntimeError("receiver bug")

    for signal in (signals.message_published, signals.delivery_started, signals.delivery_succeeded):
        signal.connect(broken, weak=False, dispatch_uid="broken")
    try:
        publish("t.basic", {"n": 1})
        with caplog.at_level("ERROR", logger="django_pubsub.signals"):
            dispatch("basic.one")
    finally:
        for signal in (
            signals.message_published,
            signals.delivery_started,
            signals.delivery_succeeded,
        ):
            signal.disconnect(dispatch_uid="broken")
    assert states("basic.one") == {"acked": 1} and len(runs("basic.one")) == 1
    assert (
        sum("receiver bug" in record.exc_text for record in caplog.records if record.exc_text) >= 2
    )


def test_pausing_and_resuming_send_once_each() -> None:
    sub = Subscription.objects.get(name="basic.one")
    with received(signals.subscription_paused, signals.subscription_resumed) as seen:
        sub.pause()
        sub.pause()  # already paused: nothing changes, nothing is sent
        sub.resume()
    assert [signal for signal, _ in seen] == [
        signals.subscription_paused,
        signals.subscription_resumed,
    ]
    assert seen[0][1]["subscription"] == sub


def test_a_lease_taken_back_sends_delivery_failed(dispatch: Any) -> None:
    """The process that ran it died: the failure is recorded by another dispatcher."""
    from django.utils import timezone

    from django_pubsub.models import Delivery, Topic
    from tests.conftest import FakeClock

    clock = FakeClock()
    message_id = publish("t.basic", {"n": 1})
    sub = Subscription.objects.get(name="basic.one")
    Topic.sequence_all(batch=10)
    Topic.fan_out(sub.topic_id, now=timezone.now(), batch=10)
    Delivery.objects.claim(sub, limit=1, now=clock.now, token="gone", dispatcher_id=None)
    clock.advance(31)  # past the 30 s lease
    with received(signals.delivery_failed, signals.retry_scheduled) as seen:
        dispatch("basic.one", clock=clock)
    assert [signal for signal, _ in seen] == [signals.delivery_failed, signals.retry_scheduled]
    failed = seen[0][1]
    assert failed["message"].id == message_id and failed["message"].attempt == 1
    assert failed["error"] == "lease expired before an ack" and failed["state"] == "retry"


def test_no_success_is_signalled_when_the_ack_was_fenced_out(dispatch: Any) -> None:
    from django_pubsub.models import Delivery

    def taken_back(message: Any, **kwargs: Any) -> None:
        # As if its lease had been taken back meanwhile, and another dispatcher had run it.
        Delivery.objects.filter(pk=message.delivery_id).update(state="acked", lease_token=None)

    publish("t.basic", {"n": 1})
    signals.delivery_started.connect(taken_back, weak=False, dispatch_uid="taken_back")
    try:
        with received(signals.delivery_succeeded) as seen:
            stats = dispatch("basic.one")
    finally:
        signals.delivery_started.disconnect(dispatch_uid="taken_back")
    assert stats.fenced == 1 and seen == []


def test_a_receiver_whose_query_fails_leaves_the_publishers_transaction_usable(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from django.db import connection, transaction

    from tests.pubsub_app.models import HandlerRun

    def broken(**kwargs: Any) -> None:
        HandlerRun.objects.create(subscription="receiver", message_id=0, offset=0, attempt=1, pid=0)
        with connection.cursor() as cursor:
            cursor.execute("SELECT * FROM no_such_table")

    signals.message_published.connect(broken, weak=False, dispatch_uid="broken")
    try:
        with caplog.at_level("ERROR", logger="django_pubsub.signals"), transaction.atomic():
            first = publish("t.basic", {"n": 1})
            second = publish("t.basic", {"n": 2})  # PostgreSQL would refuse this if aborted
    finally:
        signals.message_published.disconnect(dispatch_uid="broken")
    assert list(Message.objects.order_by("id").values_list("id", flat=True)) == [first, second]
    assert not HandlerRun.objects.exists()  # the receivers' writes were rolled back
    ours = [r for r in caplog.records if r.name == "django_pubsub.signals"]
    assert sum("no_such_table" in (record.exc_text or "") for record in ours) == 2
