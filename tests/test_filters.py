"""@subscriber(filter=): messages that do not match get a "filtered" delivery at fan-out,
decided in SQL, never run, counted in the stats; a seek back leaves them so."""

from __future__ import annotations

from typing import Any

import pytest

from django_pubsub import publish, registry, stats, subscriber
from django_pubsub.exceptions import InvalidSubscriber
from django_pubsub.models import Delivery, Subscription
from tests.conftest import runs, states
from tests.pubsub_app.subscribers import basic_one

pytestmark = pytest.mark.django_db(transaction=True)


def _publish_mix() -> dict[str, int]:
    return {
        "eu": publish("t.filter", {"n": 1}, headers={"region": "eu"}),
        "us": publish("t.filter", {"n": 2}, headers={"region": "us"}),
        "none": publish("t.filter", {"n": 3}),
        "eu-gold-vip": publish(
            "t.filter", {"n": 4}, key="vip", headers={"region": "eu", "tier": "gold"}
        ),
        "gold-no-key": publish("t.filter", {"n": 5}, headers={"tier": "gold"}),
        "vip-silver": publish("t.filter", {"n": 6}, key="vip", headers={"tier": "silver"}),
    }


def test_only_matching_messages_run_and_the_rest_are_filtered(dispatch: Any) -> None:
    ids = _publish_mix()
    counts = dispatch("filter.eu", "filter.key", "filter.keyed")
    assert counts.acked == 2 + 1 + 2
    assert sorted(run.message_id for run in runs("filter.eu")) == [ids["eu"], ids["eu-gold-vip"]]
    assert [run.message_id for run in runs("filter.key")] == [ids["eu-gold-vip"]]
    assert sorted(run.message_id for run in runs("filter.keyed")) == sorted(
        [ids["eu"], ids["eu-gold-vip"]]
    )
    assert states("filter.eu") == {"acked": 2, "filtered": 4}
    assert states("filter.key") == {"acked": 1, "filtered": 5}
    row = Delivery.objects.get(subscription__name="filter.eu", message_id=ids["us"])
    assert row.attempts == 0 and row.finished_at is not None
    assert row.why(row.finished_at).startswith("Filtered out")
    figures = stats.collect()
    eu = next(s for s in figures.subscriptions if s.name == "filter.eu")
    assert eu.states["filtered"] == 4 and eu.lag == 0


def test_a_seek_back_runs_again_only_what_matched(dispatch: Any) -> None:
    ids = _publish_mix()
    dispatch("filter.eu")
    sub = Subscription.objects.get(name="filter.eu")
    done = sub.seek(offset=0)
    assert done.replayed == 2
    dispatch("filter.eu")
    ran = sorted(run.message_id for run in runs("filter.eu"))
    assert ran == sorted([ids["eu"], ids["eu-gold-vip"]] * 2)
    assert states("filter.eu") == {"acked": 2, "filtered": 4}


def test_drain_filters_too(pubsub: Any) -> None:
    ids = _publish_mix()
    drained = pubsub.drain(["filter.eu"])
    assert sorted(m.id for m in drained["filter.eu"].acked) == [ids["eu"], ids["eu-gold-vip"]]


def test_a_filtered_subscription_among_others_of_its_topic(dispatch: Any) -> None:
    """The fan-out statement serves every subscription of a topic at once (on PostgreSQL it
    also leases the first deliveries of unordered ones): each gets its own filter."""
    for n in range(30):
        publish("t.filter", {"n": n}, headers={"region": "eu" if n % 3 == 0 else "us"})
    dispatch("filter.eu", "filter.key")
    assert states("filter.eu") == {"acked": 10, "filtered": 20}
    assert states("filter.key") == {"filtered": 30}


@pytest.mark.parametrize(
    "spec",
    [
        {},
        {"region": "eu"},
        {"headers": {"region": 1}},
        {"headers": ["region"]},
        {"headers": {}},
        {"key": ""},
        {"key": 5},
        {"headers": {"region": "eu\x00"}},
        {"headers": {"\ud800": "eu"}},
        "region=eu",
    ],
)
def test_a_filter_that_cannot_work_is_refused(spec: Any) -> None:
    with pytest.raises(InvalidSubscriber, match="filter needs"):
        subscriber("t.basic", name="filter.bad", filter=spec)(basic_one)
    assert "filter.bad" not in registry.get_specs()
