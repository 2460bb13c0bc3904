"""@subscriber(rate=): at most N starts per period, across every dispatcher at once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from django.utils import timezone

from django_pubsub import publish_many, registry, subscriber
from django_pubsub.exceptions import InvalidSubscriber
from django_pubsub.models import Subscription, Topic
from tests.conftest import runs, states
from tests.pubsub_app.subscribers import basic_one

pytestmark = pytest.mark.django_db(transaction=True)

RATE = 20  # rate.one's: "20/s"


@pytest.mark.processes
def test_two_dispatchers_together_keep_to_one_rate(runpubsub: Any, tmp_path: Path) -> None:
    publish_many("t.rate", [{"n": n} for n in range(60)])
    procs = [
        runpubsub(
            "--subscriptions",
            "rate.one",
            "--until-idle",
            "--poll-interval",
            "0.05",
            log=tmp_path / f"d{n}.log",
        )
        for n in range(2)
    ]
    for n, proc in enumerate(procs):
        assert proc.wait(timeout=60) == 0, (tmp_path / f"d{n}.log").read_text()
    assert states("rate.one") == {"acked": 60}
    started = sorted(run.started for run in runs("rate.one") if run.started is not None)
    assert len(started) == 60
    # A bucket of 20 that refills at 20 a second: 20 at once, then the other 40 over at
    # least two seconds; in any one second, never more than 40.
    assert started[-1] - started[0] >= 1.8
    for i, at in enumerate(started):
        within = sum(1 for other in started[i:] if other < at + 1.0)
        assert within <= 2 * RATE


def test_the_bucket_is_shared_and_gives_back_what_a_claim_did_not_use() -> None:
    publish_many("t.rate", [{"n": n} for n in range(50)])
    Topic.sequence_all(batch=100)
    Topic.fan_out(Topic.objects.get(name="t.rate").pk, now=timezone.now(), batch=100)
    sub = Subscription.objects.get(name="rate.one")
    now = timezone.now()
    assert sub.take_starts(50, now) == RATE  # a full bucket: one period's worth
    assert sub.take_starts(5, now) == 0
    sub.give_back_starts(3)
    assert Subscription.objects.get(pk=sub.pk).take_starts(5, now) == 3


def test_an_idle_rate_limited_subscription_writes_nothing(dispatch: Any) -> None:
    """Nothing to start: the bucket is not touched (two writes a pass, the SQLite write
    lock each time, for nothing)."""
    dispatch("rate.one", idle_wait=0.5)
    assert Subscription.objects.get(name="rate.one").rate_at is None
    publish_many("t.rate", [{"n": 1}])
    dispatch("rate.one")
    assert Subscription.objects.get(name="rate.one").rate_at is not None


def test_a_claim_with_an_older_clock_refills_nothing() -> None:
    """Two dispatchers' clocks differ, or one waited for the row's lock: the bucket's time
    never goes back, so no interval is refilled twice."""
    from datetime import timedelta

    publish_many("t.rate", [{"n": n} for n in range(50)])
    Topic.sequence_all(batch=100)
    Topic.fan_out(Topic.objects.get(name="t.rate").pk, now=timezone.now(), batch=100)
    sub, now = Subscription.objects.get(name="rate.one"), timezone.now()
    assert sub.take_starts(100, now) == RATE
    assert sub.take_starts(100, now + timedelta(seconds=1)) == RATE
    assert sub.take_starts(100, now + timedelta(seconds=0.5)) == 0
    assert sub.take_starts(100, now + timedelta(seconds=1.5)) == RATE // 2


@pytest.mark.parametrize(
    "rate",
    ["20", "0/s", "-1/s", "x/s", "10/week", "10/", 10, "1.5/s", "²/s", "1" + " " * 40 + "/s"],
)
def test_a_rate_that_cannot_work_is_refused(rate: Any) -> None:
    with pytest.raises(InvalidSubscriber, match="rate must be"):
        subscriber("t.basic", name="rate.bad", rate=rate)(basic_one)
    assert "rate.bad" not in registry.get_specs()
