"""Seek: an operator moves a subscription to an offset or a time in its topic, and it is
delivered again from there; and the refusals that keep an ordered subscription's runs one
at a time (seek, and replay of a dead letter, while part of it is running)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from django.contrib.admin.models import LogEntry
from django.contrib.auth.models import Permission, User
from django.test import Client
from django.utils import timezone

from django_pubsub import publish, publish_many
from django_pubsub.exceptions import ActionRefused, InvalidSeek
from django_pubsub.models import Delivery, Message, Subscription, Topic
from tests.conftest import log_in_operator, runs, states

pytestmark = pytest.mark.django_db(transaction=True)


def offsets_run(subscription: str) -> list[int]:
    return [run.offset for run in runs(subscription)]


def sub(name: str) -> Subscription:
    return Subscription.objects.get(name=name)


def test_seeking_back_runs_everything_from_there_again(dispatch: Any) -> None:
    publish_many("t.basic", [{"n": n} for n in range(5)])
    dispatch("basic.one")
    assert sorted(offsets_run("basic.one")) == [0, 1, 2, 3, 4]
    done = sub("basic.one").seek(offset=2)
    assert (done.offset, done.replayed, done.skipped, done.passed_over) == (2, 3, 0, 0)
    assert states("basic.one") == {"acked": 2, "pending": 3}
    replayed = Delivery.objects.filter(subscription__name="basic.one", state="pending")
    assert {d.attempts for d in replayed} == {0}
    dispatch("basic.one")
    again = offsets_run("basic.one")[5:]  # unordered: in any order
    assert sorted(again) == [2, 3, 4]
    assert states("basic.one") == {"acked": 5}
    assert states("basic.two") == {"pending": 5}  # another subscription is not moved


def test_seeking_forward_discards_what_waits_and_passes_over_the_rest(dispatch: Any) -> None:
    publish_many("t.basic", [{"n": n} for n in range(3)])
    dispatch("basic.two")  # sequences and fans out: basic.one's three wait, pending
    publish_many("t.basic", [{"n": n} for n in range(3, 6)])
    Topic.sequence_all(batch=100)  # sequenced, not fanned out yet
    done = sub("basic.one").seek(offset=5)
    assert (done.offset, done.replayed, done.skipped, done.passed_over) == (5, 0, 3, 2)
    assert states("basic.one") == {"discarded": 3}
    publish("t.basic", {"n": 6})
    dispatch("basic.one")
    assert sorted(offsets_run("basic.one")) == [5, 6]
    # Nothing is lost for good: a seek back creates what was passed over (3, 4), and
    # replays what was discarded (0 to 2) and handled (5, 6).
    done = sub("basic.one").seek(offset=0)
    assert (done.replayed, done.skipped, done.passed_over) == (7, 0, 0)
    dispatch("basic.one")
    assert sorted(offsets_run("basic.one")) == [0, 1, 2, 3, 4, 5, 5, 6, 6]
    assert states("basic.one") == {"acked": 7}


def test_seeking_to_a_time_starts_at_the_first_message_published_then(dispatch: Any) -> None:
    ids = publish_many("t.basic", [{"n": n} for n in range(4)])
    dispatch("basic.one")
    start = timezone.now() - timedelta(hours=4)
    for hours, message_id in enumerate(ids):  # published 4, 3, 2 and 1 hours ago
        Message.objects.filter(pk=message_id).update(published_at=start + timedelta(hours=hours))
    done = sub("basic.one").seek(at=start + timedelta(hours=1, minutes=30))
    assert (done.offset, done.replayed) == (2, 2)
    done = sub("basic.one").seek(at=timezone.now())  # after the last one: the topic's end
    assert (done.offset, done.replayed, done.skipped) == (4, 0, 2)
    assert states("basic.one") == {"acked": 2, "discarded": 2}


def test_a_seek_leaves_running_deliveries_to_their_dispatcher(dispatch: Any) -> None:
    publish_many("t.basic", [{"n": n} for n in range(3)])
    dispatch("basic.two")
    first = Delivery.objects.filter(subscription__name="basic.one").order_by("offset").first()
    assert first is not None
    Delivery.objects.filter(pk=first.pk).update(state="inflight", lease_token="held")
    done = sub("basic.one").seek(offset=3)
    assert done.skipped == 2
    assert Delivery.objects.get(pk=first.pk).state == "inflight"
    done = sub("basic.one").seek(offset=0)
    assert done.replayed == 2 and Delivery.objects.get(pk=first.pk).state == "inflight"


@pytest.mark.parametrize(
    ("arguments", "error"),
    [
        ({}, "an offset, a time"),
        ({"offset": 1, "at": datetime(2026, 1, 1, tzinfo=UTC)}, "one of them"),
        ({"offset": -1}, "0 or more"),
        ({"offset": True}, "must be an int"),
        ({"offset": "3"}, "must be an int"),
        ({"offset": 4}, "past the end of topic t.basic"),
        ({"at": datetime(2026, 1, 1)}, "aware datetime"),
    ],
)
def test_a_bad_seek_is_refused_and_changes_nothing(
    dispatch: Any, arguments: dict[str, Any], error: str
) -> None:
    publish_many("t.basic", [{"n": n} for n in range(3)])
    dispatch("basic.one")
    with pytest.raises(InvalidSeek, match=error):
        sub("basic.one").seek(**arguments)
    assert states("basic.one") == {"acked": 3} and sub("basic.one").position == 3


def hold_head(name: str) -> Delivery:
    """The first delivery of ``name``, made to look running (a lease held elsewhere)."""
    mine = Delivery.objects.unfinished().filter(subscription__name=name)
    head = mine.order_by("offset").first()
    assert head is not None
    Delivery.objects.filter(pk=head.pk).update(state="inflight", lease_token="held", attempts=1)
    return head


def test_an_ordered_subscription_is_not_sought_or_replayed_while_part_of_it_runs(
    dispatch: Any,
) -> None:
    publish_many("t.ordered", [{"n": 0, "fail_times": 99}, {"n": 1}, {"n": 2}])
    dispatch("ordered.one", idle_wait=1)
    assert states("ordered.one") == {"dead": 1, "acked": 2}
    publish("t.ordered", {"n": 3})
    dispatch("ordered.two")  # fans out offset 3 to ordered.one: pending
    held = hold_head("ordered.one")  # offset 0 is dead, so the head is offset 3
    assert held.offset == 3
    with pytest.raises(ActionRefused, match=r"ordered subscription ordered\.one has deliveries"):
        sub("ordered.one").seek(offset=0)
    with pytest.raises(ActionRefused, match="Pause it"):
        Delivery.objects.filter(subscription__name="ordered.one").replay(timezone.now())
    assert states("ordered.one") == {"dead": 1, "acked": 2, "inflight": 1}
    # Once nothing of it runs, both are done.
    Delivery.objects.filter(pk=held.pk).update(state="acked", lease_token=None)
    assert Delivery.objects.filter(subscription__name="ordered.one").replay(timezone.now()) == 1
    assert sub("ordered.one").seek(offset=1).replayed == 3


@pytest.fixture
def operator(client: Client) -> tuple[Client, User]:
    codenames = ["view_subscription", "change_subscription", "view_delivery"]
    return client, log_in_operator(client, *codenames)


def test_the_admin_seeks_from_a_form_and_logs_it(
    operator: tuple[Client, User], dispatch: Any
) -> None:
    client, user = operator
    publish_many("t.basic", [{"n": n} for n in range(4)])
    dispatch("basic.one")
    changelist = "/admin/django_pubsub/subscription/"
    target = sub("basic.one")
    # Seek changes deliveries: without change_delivery it is not offered, nor is replay.
    page = client.get(changelist)
    assert b'value="pause"' in page.content
    assert b'value="seek"' not in page.content and b'value="replay_dead"' not in page.content
    client.post(changelist, {"action": "seek", "_selected_action": [target.pk]})
    user.user_permissions.add(Permission.objects.get(codename="change_delivery"))
    user = User.objects.get(pk=user.pk)  # permissions are cached on the instance
    client.force_login(user)
    form = client.post(changelist, {"action": "seek", "_selected_action": [target.pk]})
    assert form.status_code == 200 and b'name="offset"' in form.content
    assert b"basic.one" in form.content and states("basic.one") == {"acked": 4}
    invalid = client.post(
        changelist, {"action": "seek", "_selected_action": [target.pk], "apply": "Seek"}
    )
    assert b"Give an offset, a time or a number of last messages" in invalid.content
    done = client.post(
        changelist,
        {"action": "seek", "_selected_action": [target.pk], "apply": "Seek", "offset": "1"},
        follow=True,
    )
    assert b"Subscription basic.one sought to offset 1: 3 deliveries to run again" in done.content
    assert states("basic.one") == {"acked": 1, "pending": 3}
    (entry,) = LogEntry.objects.all()
    assert entry.object_id == str(target.pk) and entry.change_message.startswith("Sought")
    too_far = client.post(
        changelist,
        {"action": "seek", "_selected_action": [target.pk], "apply": "Seek", "offset": "9"},
        follow=True,
    )
    assert b"past the end of topic t.basic" in too_far.content
    assert LogEntry.objects.count() == 1 and states("basic.one") == {"acked": 1, "pending": 3}


def test_the_admin_refuses_a_replay_while_an_ordered_run_is_inflight(
    operator: tuple[Client, User], dispatch: Any
) -> None:
    client, user = operator
    user.user_permissions.add(Permission.objects.get(codename="change_delivery"))
    publish_many("t.ordered", [{"n": 0, "fail_times": 99}, {"n": 1}])
    dispatch("ordered.one", idle_wait=1)
    publish("t.ordered", {"n": 2})
    dispatch("ordered.two")
    hold_head("ordered.one")
    dead = Delivery.objects.get(subscription__name="ordered.one", state="dead")
    response = client.post(
        "/admin/django_pubsub/delivery/",
        {"action": "replay", "_selected_action": [dead.pk]},
        follow=True,
    )
    shown = [str(message) for message in response.context["messages"]]
    assert any("cannot replay now" in message for message in shown), shown
    assert Delivery.objects.get(pk=dead.pk).state == "dead" and not LogEntry.objects.exists()


def test_select_all_acts_on_more_rows_than_a_statement_takes_parameters(
    operator: tuple[Client, User], dispatch: Any
) -> None:
    client, user = operator
    user.user_permissions.add(Permission.objects.get(codename="change_delivery"))
    count = 33_000  # SQLite takes at most 32,766 parameters a statement
    publish_many("t.basic", [{"n": n} for n in range(count)])
    while Topic.sequence_all(batch=10_000):
        pass
    while Topic.fan_out(sub("basic.one").topic_id, now=timezone.now(), batch=10_000).created:
        pass
    Delivery.objects.filter(subscription__name="basic.one").update(state="dead")
    response = client.post(
        "/admin/django_pubsub/delivery/?subscription__id__exact=" + str(sub("basic.one").pk),
        {
            "action": "discard",
            "select_across": "1",
            "index": "0",
            "_selected_action": ["0"],
            "confirmed": "yes",
        },
        follow=True,
    )
    assert f"Discarded {count} of {count} selected deliveries.".encode() in response.content
    assert states("basic.one") == {"discarded": count}
    assert LogEntry.objects.count() == count


@pytest.fixture
def batches_seen(monkeypatch: pytest.MonkeyPatch, settings: Any) -> list[tuple[int, bool]]:
    """Each batch a seek or a replay makes due again: (its size, whether ordered.one was
    paused while it ran), with batches of 3."""
    from django_pubsub.models import DeliveryQuerySet

    settings.PUBSUB = {**settings.PUBSUB, "BATCH_SIZE": 3}
    seen: list[tuple[int, bool]] = []
    real = DeliveryQuerySet.run_again

    def run_again(self: DeliveryQuerySet, now: datetime) -> int:
        changed = real(self, now)
        seen.append((changed, sub("ordered.one").paused))
        return changed

    monkeypatch.setattr(DeliveryQuerySet, "run_again", run_again)
    return seen


def test_a_seek_works_a_batch_at_a_time_and_holds_an_ordered_subscription(
    dispatch: Any, batches_seen: list[tuple[int, bool]]
) -> None:
    publish_many("t.ordered", [{"n": n} for n in range(8)])
    dispatch("ordered.one")
    done = sub("ordered.one").seek(offset=0)
    assert done.replayed == 8
    # In batches of 3, no claim could start any of them before all were due again.
    assert batches_seen == [(3, True), (3, True), (2, True)]
    assert not sub("ordered.one").paused  # the hold ended with the seek
    dispatch("ordered.one")
    assert offsets_run("ordered.one")[8:] == list(range(8))


def test_an_operators_pause_during_a_hold_stands(
    dispatch: Any, batches_seen: list[tuple[int, bool]]
) -> None:
    publish_many("t.ordered", [{"n": n, "fail_times": 9} for n in range(4)])
    dispatch("ordered.one", idle_wait=2)  # each dead in turn
    assert states("ordered.one") == {"dead": 4}
    from django_pubsub.models import DeliveryQuerySet

    run_again = DeliveryQuerySet.run_again

    def paused_by_an_operator_meanwhile(self: DeliveryQuerySet, now: datetime) -> int:
        sub("ordered.one").pause()
        return run_again(self, now)

    DeliveryQuerySet.run_again = paused_by_an_operator_meanwhile  # type: ignore[method-assign]
    try:
        assert Delivery.objects.filter(subscription__name="ordered.one").replay(timezone.now()) == 4
    finally:
        DeliveryQuerySet.run_again = run_again  # type: ignore[method-assign]
    assert [paused for _, paused in batches_seen] == [True, True]
    assert sub("ordered.one").paused  # the operator's pause, not the hold's end, decides
    assert states("ordered.one") == {"pending": 4}


def test_a_seek_interrupted_half_way_is_finished_by_the_same_seek_again(
    dispatch: Any, batches_seen: list[tuple[int, bool]]
) -> None:
    from django.db import OperationalError

    from django_pubsub.models import DeliveryQuerySet

    publish_many("t.ordered", [{"n": n} for n in range(8)])
    dispatch("ordered.one")
    real = DeliveryQuerySet.run_again
    calls = 0

    def dies_at_the_second_batch(self: DeliveryQuerySet, now: datetime) -> int:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise OperationalError("the process doing the seek died")
        return real(self, now)

    DeliveryQuerySet.run_again = dies_at_the_second_batch  # type: ignore[method-assign]
    try:
        with pytest.raises(OperationalError):
            sub("ordered.one").seek(offset=0)
    finally:
        DeliveryQuerySet.run_again = real  # type: ignore[method-assign]
    assert states("ordered.one") == {"pending": 3, "acked": 5}
    done = sub("ordered.one").seek(offset=0)
    assert (done.replayed, states("ordered.one")) == (5, {"pending": 8})
    assert not sub("ordered.one").paused
    dispatch("ordered.one")
    assert offsets_run("ordered.one")[8:] == list(range(8))


def test_a_seek_runs_again_only_what_had_ended_when_it_began(dispatch: Any) -> None:
    """A claim already under way when the seek's hold began may lease and ack a delivery
    meanwhile: the seek must not make it pending again (it would run twice)."""
    publish_many("t.basic", [{"n": n} for n in range(3)])
    dispatch("basic.one")
    began = timezone.now()
    later = sub_deliveries("basic.one").order_by("offset").last()
    assert later is not None
    # As if handled after the seek began.
    Delivery.objects.filter(pk=later.pk).update(finished_at=began + timedelta(seconds=1))
    done = sub("basic.one").seek(offset=0, now=began)
    assert done.replayed == 2
    assert Delivery.objects.get(pk=later.pk).state == "acked"


def sub_deliveries(name: str) -> Any:
    return Delivery.objects.filter(subscription__name=name)


def test_a_replay_of_one_batch_keeps_the_ordered_subscriptions_row_lock(
    dispatch: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Refused while a run is in flight, a replay must make the dead letter due before any
    claim can start a run behind it: in the same transaction, under the row lock."""
    import threading

    from django.db import OperationalError, connection

    from django_pubsub.models import DeliveryQuerySet

    publish_many("t.ordered", [{"n": 0, "fail_times": 9}, {"n": 1}])
    dispatch("ordered.one", idle_wait=2)
    assert states("ordered.one") == {"dead": 1, "acked": 1}
    ordered = sub("ordered.one")
    locked_out: list[bool] = []
    real = DeliveryQuerySet.run_again

    def try_a_claim_meanwhile(self: DeliveryQuerySet, now: datetime) -> int:
        def claim() -> None:
            from django.db import connection as theirs

            try:
                with theirs.cursor() as cursor:
                    if theirs.vendor == "postgresql":
                        cursor.execute("SET lock_timeout = '200ms'")
                        cursor.execute("BEGIN")
                        cursor.execute(
                            "SELECT 1 FROM django_pubsub_subscription WHERE id = %s "
                            "FOR NO KEY UPDATE",
                            [ordered.pk],
                        )
                        cursor.execute("ROLLBACK")
                    else:
                        theirs.connection.execute("PRAGMA busy_timeout = 200")
                        cursor.execute("BEGIN IMMEDIATE")
                        cursor.execute("ROLLBACK")
                locked_out.append(False)
            except OperationalError:
                locked_out.append(True)
            finally:
                theirs.close()

        thread = threading.Thread(target=claim)
        thread.start()
        thread.join(10)
        return real(self, now)

    monkeypatch.setattr(DeliveryQuerySet, "run_again", try_a_claim_meanwhile)
    assert Delivery.objects.filter(subscription=ordered).replay(timezone.now()) == 1
    assert locked_out == [True]
    assert not sub("ordered.one").paused  # one batch: nothing held, nothing to release
    assert connection.vendor in ("postgresql", "sqlite")


def test_a_seek_inside_a_transaction_is_that_transactions(dispatch: Any) -> None:
    from django.db import transaction

    publish_many("t.basic", [{"n": n} for n in range(3)])
    dispatch("basic.one")
    with transaction.atomic():
        done = sub("basic.one").seek(offset=1)
        assert not sub("basic.one").paused  # no hold: it would show only at commit
    assert (done.replayed, states("basic.one")) == (2, {"acked": 1, "pending": 2})
    assert not sub("basic.one").paused
