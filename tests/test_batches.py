"""batch_size/batch_wait: the handler takes a list of messages; returning acks all of
them, raising fails all of them, BatchFailure fails the ones it names."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from django_pubsub import publish_many
from django_pubsub.models import Delivery, Subscription
from django_pubsub.sync import sync_subscriptions
from tests.conftest import FakeClock, runs, states
from tests.pubsub_app.subscribers import BATCHES

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def batches() -> Iterator[list[list[int]]]:
    BATCHES.clear()
    yield BATCHES
    BATCHES.clear()


def test_a_batch_handler_gets_lists_of_at_most_batch_size(dispatch: Any) -> None:
    ids = publish_many("t.batch", [{"n": n} for n in range(45)])
    counts = dispatch("batch.one", workers=2)
    assert counts.acked == 45 and states("batch.one") == {"acked": 45}
    assert all(1 <= len(batch) <= 10 for batch in BATCHES)
    assert sorted(mid for batch in BATCHES for mid in batch) == ids
    assert all(batch == sorted(batch) for batch in BATCHES)  # each in offset order


def test_raising_fails_the_whole_batch(dispatch: Any, clock: FakeClock) -> None:
    publish_many("t.batch", [{"n": 0}, {"n": 1, "fail_batch": True}, {"n": 2}])
    dispatch("batch.one", clock=clock)
    assert states("batch.one") == {"retry": 3}
    rows = Delivery.objects.filter(subscription__name="batch.one")
    assert {row.last_error for row in rows} == {"Planned: the whole batch failed"}
    assert {row.attempts for row in rows} == {1}


def test_batch_failure_fails_only_the_messages_it_names(dispatch: Any, clock: FakeClock) -> None:
    publish_many("t.batch", [{"n": 0}, {"n": 1, "fail_in_batch": 1}, {"n": 2}])
    dispatch("batch.one", clock=clock)
    assert states("batch.one") == {"acked": 2, "retry": 1}
    failed = Delivery.objects.get(subscription__name="batch.one", state="retry")
    assert failed.offset == 1 and failed.last_error == "Planned: planned 1"
    clock.advance(3600)
    dispatch("batch.one", clock=clock)
    assert states("batch.one") == {"acked": 3}
    assert [(run.offset, run.attempt) for run in runs("batch.one")][-1] == (1, 2)


def test_a_keyed_batch_fails_what_follows_a_failure_in_its_key(
    dispatch: Any, clock: FakeClock
) -> None:
    from django_pubsub import publish

    publish("t.batch", {"n": 0, "fail_in_batch": 1}, key="a")
    publish("t.batch", {"n": 1}, key="a")
    publish("t.batch", {"n": 2}, key="b")
    dispatch("batch.keyed", clock=clock)
    rows = {row.offset: row for row in Delivery.objects.filter(subscription__name="batch.keyed")}
    assert (rows[0].state, rows[1].state, rows[2].state) == ("retry", "retry", "acked")
    assert "behind failed message" in rows[1].last_error
    clock.advance(3600)
    dispatch("batch.keyed", clock=clock)
    assert states("batch.keyed") == {"acked": 3}
    a_runs = [run.offset for run in runs("batch.keyed") if run.offset in (0, 1)]
    assert a_runs == [0, 1, 0, 1]  # in order each time


def test_a_batch_waits_until_full_or_batch_wait(transactional_db: None) -> None:
    sync_subscriptions()
    sub = Subscription.objects.get(name="batch.one")
    sub.batch_wait = 30.0
    sub.save()
    publish_many("t.batch", [{"n": n} for n in range(3)])
    from django_pubsub.models import Topic

    Topic.sequence_all(batch=100)
    now = timezone.now()
    Topic.fan_out(sub.topic_id, now=now, batch=100)
    claim = Delivery.objects.claim
    assert (
        claim(sub, limit=10, now=now + timedelta(seconds=1), token="t1", dispatcher_id=None) == []
    )
    publish_many("t.batch", [{"n": n} for n in range(3, 12)])
    Topic.sequence_all(batch=100)
    Topic.fan_out(sub.topic_id, now=now + timedelta(seconds=2), batch=100)
    full = claim(sub, limit=10, now=now + timedelta(seconds=2), token="t2", dispatcher_id=None)
    assert len(full) == 10  # full: at once
    later = now + timedelta(seconds=40)
    assert len(claim(sub, limit=10, now=later, token="t3", dispatcher_id=None)) == 2


def test_the_dispatcher_runs_a_gathering_batch_once_it_waited(dispatch: Any) -> None:
    import time

    ids = publish_many("t.batch.wait", [{"n": n} for n in range(3)])
    started = time.monotonic()
    counts = dispatch("batch.wait", poll_interval=5)
    assert counts.acked == 3 and BATCHES == [ids]
    # It waited for more (0.3 s), and looked again well before the 5 s poll.
    assert 0.3 <= time.monotonic() - started < 4


def test_in_a_keyed_batch_a_message_without_a_key_holds_nothing_back(
    dispatch: Any, clock: FakeClock
) -> None:
    publish_many("t.batch", [{"n": 0, "fail_in_batch": 1}, {"n": 1}])  # no key
    dispatch("batch.keyed", clock=clock)
    rows = Delivery.objects.filter(subscription__name="batch.keyed").order_by("offset")
    assert [row.state for row in rows] == ["retry", "acked"]


def test_drain_runs_a_batch_backlog_of_any_size(transactional_db: None) -> None:
    from django_pubsub.testing import drain

    ids = publish_many("t.batch", [{"n": n} for n in range(4100)])
    drained = drain(["batch.keyed"])
    assert len(drained["batch.keyed"].acked) == len(ids)
    assert all(len(batch) <= 4 for batch in BATCHES)
