"""delivery="transactional" and "at_most_once", and async def handlers."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from django_pubsub import Message, publish, publish_many, signals
from django_pubsub.models import Delivery
from tests.conftest import FakeClock, runs, states
from tests.pubsub_app.models import HandlerRun

pytestmark = pytest.mark.django_db(transaction=True)


def _rows(subscription: str) -> Counter[int]:
    """Rows the handler's writes left, per message id."""
    return Counter(
        HandlerRun.objects.filter(subscription=subscription).values_list("message_id", flat=True)
    )


def test_a_transactional_handlers_failed_attempt_leaves_no_writes(
    dispatch: Any, clock: FakeClock
) -> None:
    ids = publish_many("t.tx", [{"n": 0, "fail_times": 1}, {"n": 1}])
    dispatch("tx.one", clock=clock)
    # The first attempt wrote its row and raised: rolled back with it.
    assert _rows("tx.one") == Counter({ids[1]: 1})
    assert states("tx.one") == {"retry": 1, "acked": 1}
    clock.advance(3600)
    dispatch("tx.one", clock=clock)
    assert _rows("tx.one") == Counter({ids[0]: 1, ids[1]: 1})
    assert states("tx.one") == {"acked": 2}


def test_a_transactional_handler_sees_its_mode(dispatch: Any) -> None:
    seen: list[Message] = []

    def receiver(sender: Any, message: Message, **kwargs: Any) -> None:
        seen.append(message)

    publish("t.tx", {"n": 0})
    signals.delivery_started.connect(receiver)
    try:
        dispatch("tx.one")
    finally:
        signals.delivery_started.disconnect(receiver)
    assert [(m.delivery, m.attempt) for m in seen] == [("transactional", 1)]


def test_a_transactional_batch_rolls_back_whole(dispatch: Any, clock: FakeClock) -> None:
    ids = publish_many("t.tx", [{"n": 0}, {"n": 1, "fail_in_batch": 1}, {"n": 2}])
    dispatch("tx.batch", clock=clock)
    assert _rows("tx.batch") == Counter() and states("tx.batch") == {"retry": 3}
    clock.advance(3600)
    dispatch("tx.batch", clock=clock)
    assert _rows("tx.batch") == Counter(ids) and states("tx.batch") == {"acked": 3}


def test_at_most_once_runs_a_message_once_whatever_happens(dispatch: Any) -> None:
    publish_many("t.amo", [{"n": 0, "fail_times": 5}, {"n": 1}])
    counts = dispatch("amo.one")
    assert (counts.acked, counts.dead, counts.retried) == (1, 1, 0)
    assert states("amo.one") == {"dead": 1, "acked": 1}
    assert [run.attempt for run in runs("amo.one")] == [1, 1]


def test_async_handlers_run_on_an_event_loop(dispatch: Any) -> None:
    ids = publish_many("t.async", [{"n": n} for n in range(20)])
    counts = dispatch("async.one", workers=4)
    assert counts.acked == 20 and _rows("async.one") == Counter(ids)


def test_an_async_handlers_timeout_cancels_it(dispatch: Any, clock: FakeClock) -> None:
    publish("t.async", {"sleep": 30})
    counts = dispatch("async.one", clock=clock)
    (row,) = Delivery.objects.filter(subscription__name="async.one")
    assert row.state == "retry" and "cancelled after 0.5s" in row.last_error
    # Cancelled, not stuck: no thread was left running it.
    assert counts.timed_out == 0


def test_an_async_handler_keeps_djangos_async_rules(dispatch: Any, clock: FakeClock) -> None:
    publish("t.async", {"sync_orm": True})
    dispatch("async.one", clock=clock)
    (row,) = Delivery.objects.filter(subscription__name="async.one")
    assert row.state == "retry" and row.last_error.startswith("SynchronousOnlyOperation")


def test_an_async_batch_handler(dispatch: Any) -> None:
    ids = [publish("t.async", {"n": n}, key=f"k{n % 3}") for n in range(12)]
    counts = dispatch("async.batch")
    assert counts.acked == 12 and _rows("async.batch") == Counter(ids)
