"""Subscription rows follow the code: created, updated, deactivated, never deleted."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from django_pubsub import checks, publish, registry
from django_pubsub.exceptions import InvalidSubscriber
from django_pubsub.models import Subscription
from django_pubsub.registry import SubscriberSpec
from django_pubsub.sync import sync_subscriptions
from tests.conftest import runs

pytestmark = pytest.mark.django_db(transaction=True)
HANDLER = "tests.pubsub_app.subscribers.basic_one"


@pytest.fixture
def extra() -> Iterator[list[str]]:
    names: list[str] = []
    yield names
    for name in names:
        registry.unregister(name)


def declare(extra: list[str], **fields: Any) -> SubscriberSpec:
    spec = SubscriberSpec(**{"handler": HANDLER, **fields})
    registry.unregister(spec.name)
    registry.register(spec)
    extra.append(spec.name)
    return spec


def test_migrate_created_a_row_per_declaration() -> None:
    names = set(Subscription.objects.values_list("name", flat=True))
    assert set(registry.get_specs()) <= names
    assert Subscription.objects.get(name="billing.charge").topic.name == "orders.created"


def test_latest_starts_after_what_is_already_published(extra: list[str], dispatch: Any) -> None:
    before = publish("t.late", {"n": "before"})
    declare(extra, name="late.latest", topic="t.late")
    declare(extra, name="late.earliest", topic="t.late", start="earliest")
    sync_subscriptions()
    after = publish("t.late", {"n": "after"})
    dispatch("late.latest", "late.earliest")
    assert [run.message_id for run in runs("late.latest")] == [after]
    assert sorted(run.message_id for run in runs("late.earliest")) == [before, after]


def test_moving_the_function_keeps_the_subscription(extra: list[str]) -> None:
    declare(extra, name="moving", topic="t.move")
    sync_subscriptions()
    first = Subscription.objects.get(name="moving")
    declare(
        extra,
        name="moving",
        topic="t.move",
        handler="tests.pubsub_app.subscribers.basic_two",
        max_attempts=9,
    )
    result = sync_subscriptions()
    moved = Subscription.objects.get(name="moving")
    assert moved.pk == first.pk and moved.handler.endswith("basic_two") and moved.max_attempts == 9
    assert "moving" in result.updated


def test_a_subscription_removed_from_code_is_kept_inactive_and_warned_about(
    extra: list[str],
) -> None:
    declare(extra, name="leaving", topic="t.leave")
    sync_subscriptions()
    publish("t.leave", {"n": 1})
    registry.unregister("leaving")
    result = sync_subscriptions()
    row = Subscription.objects.get(name="leaving")
    assert result.deactivated == ["leaving"] and row.active is False
    found = checks.check_inactive(databases=["default"])
    assert [message.id for message in found] == ["django_pubsub.W002"]
    assert "leaving" in found[0].msg
    declare(extra, name="leaving", topic="t.leave")
    sync_subscriptions()
    assert Subscription.objects.get(name="leaving").active is True


def test_changing_a_subscriptions_topic_is_refused(extra: list[str]) -> None:
    declare(extra, name="switcher", topic="t.one")
    sync_subscriptions()
    declare(extra, name="switcher", topic="t.two")
    with pytest.raises(InvalidSubscriber, match="declare a new name"):
        sync_subscriptions()


def test_a_moved_subscription_is_a_check_error_and_migrate_does_not_crash(
    extra: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    from django.core.checks import run_checks
    from django.core.management import call_command
    from django.core.management.base import SystemCheckError

    declare(extra, name="switcher", topic="t.one")
    sync_subscriptions()
    assert not [m for m in run_checks(databases=["default"]) if m.id == "django_pubsub.E006"]
    declare(extra, name="switcher", topic="t.two")
    (moved,) = [m for m in run_checks(databases=["default"]) if m.id == "django_pubsub.E006"]
    assert "'switcher' is on topic 't.one'" in moved.msg and "'t.two'" in moved.msg
    assert moved.hint and "new name" in moved.hint
    # manage.py migrate runs the checks first, and stops on the error with this message.
    with pytest.raises(SystemCheckError, match=r"django_pubsub\.E006"):
        call_command("migrate", verbosity=0, skip_checks=False)
    # Without the checks (--skip-checks), its post_migrate sync logs instead of crashing.
    call_command("migrate", verbosity=0)
    assert "subscriptions not brought in line" in caplog.text
    assert Subscription.objects.get(name="switcher").topic.name == "t.one"


def test_no_declaration_at_all_keeps_the_subscriptions_and_runpubsub_refuses(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A wrong AUTODISCOVER_MODULE finds nothing: that must not retire every subscription."""
    from django.core.management import call_command
    from django.core.management.base import CommandError

    saved = registry.get_specs()
    active = set(Subscription.objects.filter(active=True).values_list("name", flat=True))
    registry.reset()
    try:
        result = sync_subscriptions()
        assert result.deactivated == []
        assert "no @subscriber declaration was found" in caplog.text
        with pytest.raises(CommandError, match="no @subscriber declaration was found"):
            call_command("runpubsub", "--until-idle")
    finally:
        for spec in saved.values():
            registry.register(spec)
    assert set(Subscription.objects.filter(active=True).values_list("name", flat=True)) == active


def test_dispatchers_starting_together_create_a_new_subscription_once(extra: list[str]) -> None:
    import threading

    from django.db import connection

    declare(extra, name="together", topic="t.together")
    publish("t.together", {"n": 0})  # the topic exists: nothing else serialises the syncs
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def start() -> None:
        try:
            barrier.wait(10)
            sync_subscriptions()
        except BaseException as exc:
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=start) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    assert Subscription.objects.filter(name="together").count() == 1
