"""django_pubsub.testing, as a project's own tests use it: drain() and published() inside
Django's TestCase (the test's transaction), TransactionTestCase, and pytest-django's db and
transactional_db; the fake clock stepping through retries; runpubsub refused in a
transaction."""

from __future__ import annotations

from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection, transaction
from django.test import TestCase, TransactionTestCase

from django_pubsub import publish, publish_many
from django_pubsub.models import Delivery
from django_pubsub.testing import Clock, PubSub, PubSubTestMixin, drain, published
from tests.conftest import runs, states


def _publish_and_drain(pubsub: PubSub) -> None:
    """What every flavour of test below checks: publish in the test, drain, see it run."""
    first = publish("t.basic", {"n": 1})
    publish("t.other.topic", {"n": 2})
    assert [m.id for m in pubsub.published("t.basic")] == [first]
    assert [m.payload for m in pubsub.published()] == [{"n": 1}, {"n": 2}]
    drained = pubsub.drain()
    assert [m.id for m in drained["basic.one"].acked] == [first]
    assert [m.id for m in drained["basic.two"].acked] == [first]
    assert drained.acked == 2 and drained.retried == drained.dead == 0
    assert [run.message_id for run in runs("basic.one")] == [first]  # its writes are there
    assert pubsub.drain() == {}  # nothing left


class InATestCase(PubSubTestMixin, TestCase):
    """The test's transaction: nothing commits, and nothing needs to."""

    def test_drain_runs_what_the_test_published(self) -> None:
        assert connection.in_atomic_block
        _publish_and_drain(self.pubsub)

    def test_runpubsub_is_refused_and_points_to_drain(self) -> None:
        publish("t.basic", {"n": 1})
        with self.assertRaisesMessage(CommandError, "django_pubsub.testing.drain()"):
            call_command("runpubsub", "--until-idle")
        self.assertEqual(Delivery.objects.count(), 0)  # it wrote nothing


class InATransactionTestCase(PubSubTestMixin, TransactionTestCase):
    def test_drain_runs_what_the_test_published(self) -> None:
        assert not connection.in_atomic_block
        _publish_and_drain(self.pubsub)


@pytest.mark.django_db
def test_the_fixture_with_db(pubsub: PubSub) -> None:
    _publish_and_drain(pubsub)


@pytest.mark.django_db(transaction=True)
def test_the_fixture_with_a_transactional_test(pubsub: PubSub) -> None:
    _publish_and_drain(pubsub)


def test_the_fixture_with_transactional_db(pubsub: PubSub, transactional_db: None) -> None:
    _publish_and_drain(pubsub)


def test_the_fixture_alone_gives_database_access(pubsub: PubSub) -> None:
    _publish_and_drain(pubsub)


def test_the_clock_steps_through_retries_to_a_dead_letter(pubsub: PubSub) -> None:
    """flaky.one: 4 attempts, backoff 10 s x3 up to 100 s (its jitter left out by drain)."""
    message = publish("t.flaky", {"fail_times": 99})
    waits = []
    for attempt in (1, 2, 3):
        drained = pubsub.drain(["flaky.one"])
        assert [m.attempt for m in drained["flaky.one"].retried] == [attempt]
        retry = Delivery.objects.get(message_id=message, subscription__name="flaky.one")
        waits.append((retry.available_at - pubsub.clock.now).total_seconds())
        assert pubsub.drain(["flaky.one"]) == {}  # not due yet: no sleeping, no running
        pubsub.advance(waits[-1])
    assert waits == [10.0, 30.0, 90.0]
    drained = pubsub.drain(["flaky.one"])
    assert [m.attempt for m in drained["flaky.one"].dead] == [4]
    assert states("flaky.one") == {"dead": 1}


def test_an_ordered_head_that_fails_holds_back_the_rest(pubsub: PubSub) -> None:
    publish_many("t.ordered", [{"fail_times": 1, "n": 0}, {"n": 1}, {"n": 2}])
    drained = pubsub.drain(["ordered.one"])
    assert [m.offset for m in drained["ordered.one"].retried] == [0]
    assert drained["ordered.one"].acked == []
    pubsub.advance(minutes=10)
    drained = pubsub.drain(["ordered.one"])
    assert [m.offset for m in drained["ordered.one"].acked] == [0, 1, 2]


def test_a_failing_handler_leaves_the_tests_transaction_usable_and_its_writes_undone(
    pubsub: PubSub,
) -> None:
    """Each handler runs in a savepoint inside a transaction: a failure, even one the
    database raised, rolls back that handler's writes only."""
    with transaction.atomic():
        publish("t.ordered", {"fail_times": 1})
        drained = pubsub.drain(["ordered.one"])
        assert len(drained["ordered.one"].retried) == 1
        assert runs("ordered.one") == []  # its HandlerRun row went with the savepoint
        publish("t.ordered", {"n": 2})  # the transaction still works
    assert len(pubsub.published("t.ordered")) == 2


def test_drain_keeps_keys_batches_and_modes(pubsub: PubSub) -> None:
    """drain() runs keyed, batch, transactional and async subscriptions as runpubsub does."""
    from django_pubsub.exceptions import BatchFailure  # noqa: F401  (the public name)

    publish("t.keyed", {"k": "a", "fail_times": 1}, key="a")
    publish("t.keyed", {"k": "a"}, key="a")
    publish("t.keyed", {"k": "b"}, key="b")
    drained = pubsub.drain(["keyed.one"])
    assert [m.offset for m in drained["keyed.one"].retried] == [0]
    assert [m.offset for m in drained["keyed.one"].acked] == [2]  # key b went on
    pubsub.advance(minutes=10)
    assert [m.offset for m in pubsub.drain(["keyed.one"])["keyed.one"].acked] == [0, 1]

    publish_many("t.batch", [{"n": 0}, {"n": 1, "fail_in_batch": 1}, {"n": 2}])
    drained = pubsub.drain(["batch.one"])
    assert [m.offset for m in drained["batch.one"].acked] == [0, 2]
    assert [m.offset for m in drained["batch.one"].retried] == [1]

    publish("t.tx", {"n": 0, "fail_times": 1})
    drained = pubsub.drain(["tx.one"])
    assert len(drained["tx.one"].retried) == 1 and runs("tx.one") == []  # rolled back
    pubsub.advance(minutes=10)
    assert len(pubsub.drain(["tx.one"])["tx.one"].acked) == 1 and len(runs("tx.one")) == 1

    publish("t.async", {"n": 0})
    assert len(pubsub.drain(["async.one"])["async.one"].acked) == 1


def test_unknown_subscriptions_are_refused_by_name(pubsub: Any) -> None:
    with pytest.raises(ValueError, match="unknown or inactive subscriptions: nope"):
        pubsub.drain(["basic.one", "nope"])


@pytest.mark.django_db
def test_the_functions_alone_with_a_clock_of_ones_own() -> None:
    clock = Clock()
    publish("t.basic", {"n": 1})
    assert drain(["basic.one"], clock=clock).acked == 1
    assert len(published("t.basic")) == 1


@pytest.mark.django_db(transaction=True)
def test_runpubsub_inside_an_atomic_block_is_refused() -> None:
    publish("t.basic", {"n": 1})
    with transaction.atomic(), pytest.raises(CommandError, match=r"inside a transaction"):
        call_command("runpubsub", "--until-idle")
    assert Delivery.objects.count() == 0


def test_the_tutorials_examples_run_as_written() -> None:
    """docs/tutorial.md section 6 is testproject/orders/tests.py: run it both ways, as a
    user would, on the example project's SQLite database (an in-memory test copy)."""
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    env = {**os.environ, "DATABASE_URL": ""}
    env.pop("DJANGO_SETTINGS_MODULE", None)
    commands = [
        [sys.executable, "manage.py", "test", "testproject.orders", "--noinput"],
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
         "--ds=testproject.settings", "testproject/orders/tests.py"],
    ]  # fmt: skip
    for command in commands:
        done = subprocess.run(
            command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stdout + done.stderr


def test_a_clock_in_another_zone_keeps_retries_on_time(pubsub: PubSub) -> None:
    """The clock works in UTC whatever zone it starts in: SQLite compares stored times as
    text, and a time written with +01:00 beside one written in UTC would be hours off."""
    from datetime import datetime
    from zoneinfo import ZoneInfo

    for zone in ("Europe/Paris", "America/New_York"):
        clock = Clock(datetime(2030, 6, 1, 9, 0, tzinfo=ZoneInfo(zone)))
        message = publish("t.flaky", {"fail_times": 1, "zone": zone})
        drained = drain(["flaky.one"], clock=clock)
        assert [m.id for m in drained["flaky.one"].retried] == [message]
        assert drain(["flaky.one"], clock=clock) == {}  # due in 10 s, not at once
        clock.advance(10)
        assert [m.id for m in drain(["flaky.one"], clock=clock)["flaky.one"].acked] == [message]


@pytest.mark.django_db(transaction=True)
def test_a_handler_that_aborts_the_test_leaves_nothing_leased() -> None:
    publish_many("t.ordered", [{"raise": "interrupt"}, {"n": 1}])
    with pytest.raises(KeyboardInterrupt):
        drain(["ordered.one"])
    assert states("ordered.one") == {"pending": 2}


@pytest.mark.django_db(transaction=True)
def test_runpubsub_without_autocommit_is_refused() -> None:
    transaction.set_autocommit(False)
    try:
        with pytest.raises(CommandError, match=r"inside a transaction"):
            call_command("runpubsub", "--until-idle")
    finally:
        transaction.rollback()
        transaction.set_autocommit(True)
