"""Retention: prune() removes ended deliveries and messages older than their retention,
never what a subscription (paused, behind or inactive) has not finished; the command, the
one-at-a-time lock, and the settings."""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any

import pytest
from django.core.management import call_command
from django.db import connection
from django.utils import timezone

from django_pubsub import publish, publish_many, retention
from django_pubsub.models import Delivery, Message, Subscription
from tests.conftest import states

pytestmark = pytest.mark.django_db(transaction=True)
DAY = 24 * 3600


def later(days: float) -> Any:
    return timezone.now() + timedelta(days=days)


def test_ended_deliveries_go_after_their_kinds_retention(dispatch: Any) -> None:
    publish_many("t.basic", [{"n": 0}, {"n": 1, "fail_times": 99}])
    dispatch("basic.one", idle_wait=1)  # one acked, one dead; basic.two's stay pending
    assert states("basic.one") == {"acked": 1, "dead": 1}
    # Defaults: acked a day, dead a month. Nothing is old enough yet.
    assert retention.prune().total == 0
    pruned = retention.prune(later(2))
    assert pruned.rows == {("t.basic", "acked"): 1}
    assert states("basic.one") == {"dead": 1}
    pruned = retention.prune(later(31))
    assert pruned.rows == {("t.basic", "dead"): 1}
    # basic.two has not run them: its pending deliveries, and so the messages, stay.
    assert states("basic.two") == {"pending": 2}
    assert Message.objects.count() == 2


def test_a_message_goes_once_every_subscription_is_past_it_and_it_is_old(
    dispatch: Any,
) -> None:
    publish_many("t.basic", [{"n": 0}, {"n": 1}])
    dispatch("basic.one", "basic.two")
    assert retention.prune(later(2)).by_kind() == {"acked": 4}  # messages: a week
    assert Message.objects.count() == 2
    assert retention.prune(later(8)).by_kind() == {"messages": 2}
    assert Message.objects.count() == 0


def test_nothing_a_paused_or_inactive_subscription_has_not_finished_goes(
    dispatch: Any,
) -> None:
    paused = Subscription.objects.get(name="basic.two")
    paused.pause()
    publish_many("t.basic", [{"n": n} for n in range(3)])
    dispatch("basic.one")
    # A subscription no longer declared in code (inactive), behind: it never fanned the
    # topic's message out, and keeps it until it is retired.
    from django_pubsub.models import Topic

    topic, _ = Topic.objects.get_or_create(name="t.multi")
    Subscription.objects.create(
        name="gone.sub", topic=topic, handler="gone.handler", start="earliest", active=False
    )
    publish("t.multi", {"n": 9})
    dispatch("multi.a", "multi.b", "multi.ordered")
    pruned = retention.prune(later(365))
    assert pruned.by_kind() == {"acked": 6}  # basic.one's 3, and t.multi's three
    assert states("basic.two") == {"pending": 3}
    assert Message.objects.count() == 4  # every one: for basic.two, and for gone.sub
    assert Subscription.objects.get(name="gone.sub").position == 0


def test_messages_of_a_topic_without_subscriptions_age_out() -> None:
    publish_many("t.nobody.listens", [{"n": 0}, {"n": 1}])
    from django_pubsub.models import Topic

    Topic.sequence_all(batch=10)
    assert retention.prune(later(6)).total == 0
    assert retention.prune(later(8)).rows == {("t.nobody.listens", "messages"): 2}


def test_unsequenced_messages_are_never_pruned() -> None:
    publish("t.nobody.listens", {"n": 0})  # no dispatcher has sequenced it
    assert retention.prune(later(3650)).total == 0
    assert Message.objects.count() == 1


def test_a_dry_run_counts_what_the_prune_removes_and_removes_nothing(dispatch: Any) -> None:
    publish_many("t.basic", [{"n": n} for n in range(5)])
    dispatch("basic.one", "basic.two")
    dry = retention.prune(later(8), dry_run=True)
    assert dry.by_kind() == {"acked": 10, "messages": 5}
    assert Delivery.objects.count() == 10 and Message.objects.count() == 5
    assert retention.prune(later(8)).rows == dry.rows


def test_retention_per_topic_and_for_ever(settings: Any, dispatch: Any) -> None:
    settings.PUBSUB = {
        **settings.PUBSUB,
        "RETENTION": {
            "acked": timedelta(hours=1),
            "topics": {"t.basic": {"acked": None, "messages": 60}},
        },
    }
    publish("t.basic", {"n": 0})
    publish("t.multi", {"n": 0})
    dispatch("basic.one", "basic.two", "multi.a", "multi.b", "multi.ordered")
    pruned = retention.prune(later(0.5))
    assert pruned.rows == {("t.multi", "acked"): 3}  # t.basic keeps acked for ever
    assert Delivery.objects.filter(subscription__topic__name="t.basic").count() == 2


def test_small_batches_make_the_same_result(settings: Any, dispatch: Any) -> None:
    settings.PUBSUB = {**settings.PUBSUB, "BATCH_SIZE": 3}
    publish_many("t.basic", [{"n": n} for n in range(10)])
    dispatch("basic.one", "basic.two")
    assert retention.prune(later(8)).by_kind() == {"acked": 20, "messages": 10}
    assert Delivery.objects.count() == Message.objects.count() == 0


def test_one_process_at_a_time_prunes() -> None:
    held_elsewhere, release = threading.Event(), threading.Event()

    def hold() -> None:
        try:
            with retention.exclusive() as held:
                assert held
                held_elsewhere.set()
                release.wait(10)
        finally:
            connection.close()

    other = threading.Thread(target=hold)
    other.start()
    try:
        assert held_elsewhere.wait(10)
        with retention.exclusive() as held:
            assert not held
        with pytest.raises(Exception, match=r"another process .* is pruning now"):
            call_command("pubsub_prune")
    finally:
        release.set()
        other.join(10)
    with retention.exclusive() as held:
        assert held


def test_the_command_prints_what_it_removed(dispatch: Any, capsys: Any) -> None:
    publish_many("t.basic", [{"n": n} for n in range(3)])
    dispatch("basic.one", "basic.two")
    two_days_ago = timezone.now() - timedelta(days=2)
    Delivery.objects.update(created_at=two_days_ago, finished_at=two_days_ago)
    call_command("pubsub_prune", "--dry-run")
    out = capsys.readouterr().out
    assert "t.basic" in out and "Would remove 6 rows: 6 acked, 0 discarded" in out
    assert Delivery.objects.count() == 6
    call_command("pubsub_prune")
    out = capsys.readouterr().out
    assert "Removed 6 rows: 6 acked" in out
    call_command("pubsub_prune")
    assert "Nothing to prune" in capsys.readouterr().out
