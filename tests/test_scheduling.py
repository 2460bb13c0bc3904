"""publish(deliver_at=/delay=, expires_at=/ttl=): messages that join their topic's log later,
and deliveries that end "expired", unrun, when they could not start in time."""

from __future__ import annotations

import math
from datetime import datetime, timedelta
from typing import Any

import pytest
from django.db import transaction
from django.utils import timezone

from django_pubsub import publish, publish_many, stats
from django_pubsub.exceptions import InvalidSchedule
from django_pubsub.models import Delivery, Message
from tests.conftest import FakeClock, runs, states

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def clock() -> FakeClock:
    """A clock moved by hand from the wall's time: publish() stamps messages with that."""
    return FakeClock(timezone.now())


def _offsets(subscription: str) -> list[int]:
    return [run.offset for run in runs(subscription)]


def test_a_delayed_message_joins_the_log_and_runs_only_once_its_time_comes(
    dispatch: Any, clock: FakeClock
) -> None:
    later = publish("t.basic", {"n": "later"}, delay=60)
    now = publish("t.basic", {"n": "now"})
    counts = dispatch("basic.one", "basic.two", clock=clock)
    assert counts.acked == 2 and [run.message_id for run in runs("basic.one")] == [now]
    assert Message.objects.get(pk=later).offset is None  # not in the log yet
    figures = stats.collect(clock())
    topic = next(t for t in figures.topics if t.name == "t.basic")
    assert (topic.scheduled, topic.published, topic.lag) == (1, 2, 0)

    clock.advance(61)
    counts = dispatch("basic.one", "basic.two", clock=clock)
    assert counts.acked == 2 and [run.message_id for run in runs("basic.one")] == [now, later]
    assert Message.objects.get(pk=later).offset == 1
    assert states("basic.one") == {"acked": 2}


def test_deliver_at_and_publish_many_take_a_time_for_every_message(
    dispatch: Any, clock: FakeClock
) -> None:
    at = clock() + timedelta(minutes=5)
    ids = publish_many("t.basic", [{"n": n} for n in range(3)], deliver_at=at)
    assert {m.deliver_at for m in Message.objects.filter(pk__in=ids)} == {at}
    assert dispatch("basic.one", clock=clock).acked == 0
    clock.advance(minutes=5)
    assert dispatch("basic.one", clock=clock).acked == 3
    offsets = Message.objects.filter(pk__in=ids).order_by("id").values_list("offset", flat=True)
    assert list(offsets) == [0, 1, 2]  # in their call's order


def test_an_ordered_subscription_runs_a_delayed_message_where_it_joins_the_log(
    dispatch: Any, clock: FakeClock
) -> None:
    """The documented choice: a message published for later takes its place in the order
    when its time comes; what joined the log before then runs before it, and nothing
    published after that overtakes it."""
    delayed = publish("t.ordered", {"n": "a"}, delay=30)
    first = [publish("t.ordered", {"n": n}) for n in "bc"]
    dispatch("ordered.one", clock=clock)
    assert [run.message_id for run in runs("ordered.one")] == first
    clock.advance(31)
    after = publish("t.ordered", {"n": "d"})
    dispatch("ordered.one", clock=clock)
    assert [run.message_id for run in runs("ordered.one")] == [*first, delayed, after]
    assert _offsets("ordered.one") == [0, 1, 2, 3]


def test_a_keyed_subscription_runs_a_delayed_message_where_it_joins_the_log(
    dispatch: Any, clock: FakeClock
) -> None:
    delayed = publish("t.keyed", {"k": "a", "n": 0}, key="a", delay=30)
    first = [publish("t.keyed", {"k": "a", "n": n}, key="a") for n in (1, 2)]
    dispatch("keyed.one", clock=clock)
    assert [run.message_id for run in runs("keyed.one")] == first
    clock.advance(31)
    after = publish("t.keyed", {"k": "a", "n": 3}, key="a")
    dispatch("keyed.one", clock=clock)
    assert [run.message_id for run in runs("keyed.one")] == [*first, delayed, after]


def test_until_idle_waits_for_a_message_due_within_its_idle_wait(dispatch: Any) -> None:
    message_id = publish("t.basic", {"n": 1}, delay=0.5)
    counts = dispatch("basic.one", idle_wait=5)
    assert counts.acked == 1 and [run.message_id for run in runs("basic.one")] == [message_id]


def test_a_rolled_back_delayed_publish_leaves_nothing(dispatch: Any, clock: FakeClock) -> None:
    with pytest.raises(RuntimeError), transaction.atomic():
        publish("t.basic", {"n": 1}, delay=1)
        raise RuntimeError("rolled back")
    clock.advance(5)
    assert dispatch("basic.one", clock=clock).acked == 0
    assert not Message.objects.exists()


def test_a_delivery_not_started_before_its_message_expired_ends_expired_unrun(
    dispatch: Any, clock: FakeClock
) -> None:
    stale = publish("t.basic", {"n": "stale"}, ttl=30)
    fresh = publish("t.basic", {"n": "fresh"}, ttl=timedelta(hours=1))
    clock.advance(31)
    counts = dispatch("basic.one", "basic.two", clock=clock)
    assert counts.expired == 2 and counts.acked == 2
    for name in ("basic.one", "basic.two"):
        assert [run.message_id for run in runs(name)] == [fresh]
        assert states(name) == {"acked": 1, "expired": 1}
    row = Delivery.objects.get(subscription__name="basic.one", message_id=stale)
    assert row.attempts == 0 and row.finished_at is not None
    assert "expired before it started" in row.last_error
    assert row.why(clock()).startswith("Expired: not started before")
    figures = stats.collect(clock())
    sub = next(s for s in figures.subscriptions if s.name == "basic.one")
    assert sub.states["expired"] == 1 and sub.lag == 0


def test_a_retry_due_after_the_expiry_ends_expired(dispatch: Any, clock: FakeClock) -> None:
    """Every start is checked: a message that failed once and whose retry comes after its
    expires_at is not run again."""
    publish("t.basic", {"fail_times": 1}, expires_at=clock() + timedelta(seconds=20))
    dispatch("basic.one", clock=clock)
    assert states("basic.one") == {"retry": 1}
    clock.advance(3600)
    counts = dispatch("basic.one", clock=clock)
    assert counts.expired == 1 and states("basic.one") == {"expired": 1}
    row = Delivery.objects.get(subscription__name="basic.one")
    assert row.attempts == 1 and len(runs("basic.one")) == 1


def test_a_waiting_delivery_past_its_expiry_says_so(pubsub: Any) -> None:
    publish("t.basic", {"n": 1}, ttl=10)
    pubsub.clock.advance(11)
    from django_pubsub.models import Subscription

    Subscription.objects.filter(name="basic.one").update(paused=True)
    pubsub.drain(["basic.one"])  # paused: fans out, runs nothing
    row = Delivery.objects.get(subscription__name="basic.one")
    assert row.state == "pending"
    assert "the next claim of it ends it expired" in row.why(pubsub.clock())


def test_drain_skips_expired_and_waits_for_delayed_messages(pubsub: Any) -> None:
    later = publish("t.basic", {"n": "later"}, delay=60)
    stale = publish("t.basic", {"n": "stale"}, ttl=5)
    pubsub.advance(6)
    drained = pubsub.drain(["basic.one"])
    assert drained.expired == 1 and drained.acked == 0
    assert [m.id for m in drained["basic.one"].expired] == [stale]
    pubsub.advance(60)
    drained = pubsub.drain(["basic.one"])
    assert [m.id for m in drained["basic.one"].acked] == [later]


def test_a_delay_with_an_expiry_counts_the_ttl_from_when_it_is_due(clock: FakeClock) -> None:
    message_id = publish("t.basic", {"n": 1}, delay=60, ttl=30)
    row = Message.objects.get(pk=message_id)
    assert row.deliver_at is not None and row.expires_at is not None
    assert row.expires_at - row.deliver_at == timedelta(seconds=30)


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({"deliver_at": "tomorrow"}, "deliver_at must be an aware datetime"),
        ({"deliver_at": datetime(2030, 1, 1)}, "deliver_at must be an aware datetime"),
        ({"delay": -1}, "delay must be seconds from 0"),
        ({"delay": math.nan}, "delay must be seconds from 0"),
        ({"delay": True}, "delay must be seconds from 0"),
        ({"delay": 400 * 24 * 3600}, "delay must be seconds from 0"),
        ({"delay": "5"}, "delay must be seconds from 0"),
        ({"ttl": 0}, "ttl must be seconds above 0"),
        ({"ttl": timedelta(seconds=-5)}, "ttl must be seconds above 0"),
        ({"delay": 5, "deliver_at": "x"}, "Pass deliver_at= or delay=, not both"),
        ({"ttl": 5, "expires_at": "x"}, "Pass expires_at= or ttl=, not both"),
        ({"delay": 60, "expires_at": "soon"}, "expires_at must be an aware datetime"),
        ({"expires_at": "past"}, "must be after now"),
    ],
)
def test_a_schedule_that_cannot_work_is_refused_and_nothing_is_written(
    options: dict[str, Any], says: str
) -> None:
    resolved = dict(options)
    if resolved.get("expires_at") == "past":
        resolved["expires_at"] = timezone.now() - timedelta(seconds=1)
    for call in (
        lambda: publish("t.basic", {"n": 1}, **resolved),
        lambda: publish_many("t.basic", [{"n": 1}], **resolved),
    ):
        with pytest.raises(InvalidSchedule, match=says):
            call()
    assert not Message.objects.exists()


def test_an_expiry_already_past_is_refused_even_for_a_message_due_in_the_past() -> None:
    past = timezone.now() - timedelta(hours=1)
    for options in ({"deliver_at": past, "ttl": 60}, {"deliver_at": past, "expires_at": past}):
        with pytest.raises(InvalidSchedule, match="must be after now"):
            publish("t.basic", {"n": 1}, **options)
    assert not Message.objects.exists()


def test_an_expiry_before_the_delivery_time_is_refused() -> None:
    at = timezone.now() + timedelta(hours=1)
    with pytest.raises(InvalidSchedule, match="must be after its deliver_at"):
        publish("t.basic", {"n": 1}, deliver_at=at, expires_at=at - timedelta(minutes=1))
    assert not Message.objects.exists()


def test_a_delivery_that_expires_while_it_waits_in_its_chunk_does_not_run(
    dispatch: Any,
) -> None:
    """One worker runs a chunk's deliveries one after another: each is checked as it is
    about to start, not only when the chunk was claimed."""
    publish_many("t.ordered", [{"n": n} for n in range(300)])  # chunks grow on fast runs
    publish("t.ordered", {"n": "slow", "sleep": 2.0})
    expiring = publish("t.ordered", {"n": "expiring"}, ttl=1.0)
    after = publish("t.ordered", {"n": "after"})
    counts = dispatch("ordered.one", workers=1)
    ran = [run.message_id for run in runs("ordered.one")]
    assert expiring not in ran and ran[-1] == after  # the order goes on past it
    assert counts.expired == 1 and states("ordered.one") == {"acked": 302, "expired": 1}


def test_messages_that_came_due_in_one_pass_join_the_log_in_the_order_they_came_due(
    dispatch: Any, clock: FakeClock
) -> None:
    """After an outage, say: what came due meanwhile is numbered by when it came due (and
    before what was published for now), not by when it was published."""
    later = publish("t.ordered", {"n": "due in 20 s"}, delay=20)
    sooner = publish("t.ordered", {"n": "due in 10 s"}, delay=10)
    now = publish("t.ordered", {"n": "now"})
    clock.advance(30)
    dispatch("ordered.one", clock=clock)
    assert [run.message_id for run in runs("ordered.one")] == [sooner, later, now]


def test_a_seek_back_leaves_an_expired_delivery_expired(dispatch: Any, clock: FakeClock) -> None:
    publish("t.basic", {"n": "stale"}, ttl=30)
    fresh = publish("t.basic", {"n": "fresh"})
    clock.advance(31)
    dispatch("basic.one", clock=clock)
    from django_pubsub.models import Subscription

    done = Subscription.objects.get(name="basic.one").seek(offset=0, now=clock())
    assert done.replayed == 1
    dispatch("basic.one", clock=clock)
    assert states("basic.one") == {"acked": 1, "expired": 1}
    assert [run.message_id for run in runs("basic.one")] == [fresh, fresh]
