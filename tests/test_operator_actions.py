"""What an operator can do: retry now, replay dead letters, discard, pause and resume; as
model methods, through the dispatcher, and as admin actions with permissions and a log."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.contrib.admin.models import LogEntry
from django.contrib.auth.models import Permission, User
from django.test import Client
from django.utils import timezone

from django_pubsub import publish, publish_many
from django_pubsub.models import Delivery, Subscription
from tests.conftest import FakeClock, log_in_operator, runs, states

pytestmark = pytest.mark.django_db(transaction=True)


def dead_letter(dispatch: Any, **payload: Any) -> Delivery:
    """A delivery of basic.one that failed all its attempts."""
    publish("t.basic", {"fail_times": 99, **payload})
    dispatch("basic.one", idle_wait=1)
    return Delivery.objects.get(subscription__name="basic.one", state="dead")


def test_a_replayed_dead_letter_runs_again_with_fresh_attempts(
    dispatch: Any, tmp_path: Path
) -> None:
    broken = tmp_path / "broken"
    broken.touch()
    dead = dead_letter(dispatch, fail_times=0, fail_while=str(broken))
    assert dead.attempts == 3 and len(dead.errors) == 3
    assert Delivery.objects.filter(pk=dead.pk).replay(timezone.now()) == 1
    assert Delivery.objects.filter(pk=dead.pk).replay(timezone.now()) == 0  # no longer dead
    broken.unlink()  # the cause is fixed
    dispatch("basic.one")
    dead.refresh_from_db()
    assert (dead.state, dead.attempts) == ("acked", 1)
    assert len(dead.errors) == 3  # the history of the first round stays
    assert [run.attempt for run in runs("basic.one")] == [1, 2, 3, 1]


def test_retry_now_makes_a_waiting_retry_due(dispatch: Any, clock: FakeClock) -> None:
    publish("t.flaky", {"fail_times": 1})  # backoff 10 s and more
    dispatch("flaky.one", clock=clock)
    retrying = Delivery.objects.get(subscription__name="flaky.one")
    assert retrying.state == "retry" and retrying.available_at > clock.now
    assert Delivery.objects.all().retry_now(clock.now) == 1
    dispatch("flaky.one", clock=clock)
    assert states("flaky.one") == {"acked": 1}
    assert [run.attempt for run in runs("flaky.one")] == [1, 2]


def test_discard_ends_waiting_and_dead_deliveries_but_not_running_ones(
    dispatch: Any, clock: FakeClock
) -> None:
    dead = dead_letter(dispatch)
    publish_many("t.basic", [{"n": 1}, {"n": 2}])
    dispatch("basic.two")  # only fans out basic.one's new deliveries: they stay pending
    pending = Delivery.objects.filter(subscription__name="basic.one", state="pending")
    first, second = pending.order_by("offset")
    Delivery.objects.filter(pk=second.pk).update(state="inflight", lease_token="held")
    mine = Delivery.objects.filter(subscription__name="basic.one")
    assert mine.discard(clock.now) == 2  # the dead one and the pending one
    assert Delivery.objects.get(pk=dead.pk).state == "discarded"
    assert Delivery.objects.get(pk=first.pk).state == "discarded"
    assert Delivery.objects.get(pk=second.pk).state == "inflight"
    assert mine.replay(clock.now) == 0  # discarded is final


def test_a_paused_subscription_is_not_claimed_until_resumed(dispatch: Any) -> None:
    sub = Subscription.objects.get(name="basic.one")
    assert sub.pause() and not sub.pause()
    publish_many("t.basic", [{"n": 1}, {"n": 2}])
    dispatch("basic.one", "basic.two")  # --until-idle: a paused subscription does not hold it
    assert runs("basic.one") == [] and states("basic.one") == {"pending": 2}
    assert len(runs("basic.two")) == 2
    assert sub.resume() and not sub.resume()
    dispatch("basic.one")
    assert states("basic.one") == {"acked": 2}


def test_a_paused_ordered_subscription_is_not_claimed(dispatch: Any) -> None:
    Subscription.objects.get(name="ordered.one").pause()
    publish("t.ordered", {"n": 1})
    dispatch("ordered.one")
    assert runs("ordered.one") == [] and states("ordered.one") == {"pending": 1}


@pytest.fixture
def operator(client: Client) -> tuple[Client, User]:
    codenames = ["view_delivery", "change_delivery", "view_subscription"]
    return client, log_in_operator(client, *codenames)


def test_admin_replays_a_selected_dead_letter_and_logs_it(
    operator: tuple[Client, User], dispatch: Any
) -> None:
    client, user = operator
    dead = dead_letter(dispatch)
    page = client.get("/admin/django_pubsub/delivery/?state__exact=dead")
    assert b'value="replay"' in page.content
    response = client.post(
        "/admin/django_pubsub/delivery/",
        {"action": "replay", "_selected_action": [dead.pk]},
        follow=True,
    )
    assert b"Replayed 1 of 1 selected delivery." in response.content
    dead.refresh_from_db()
    assert (dead.state, dead.attempts) == ("pending", 0)
    (entry,) = LogEntry.objects.filter(object_id=str(dead.pk))
    assert (entry.user_id, entry.change_message) == (user.pk, "Replayed")
    # The detail page stays read-only: no form saves a row the dispatcher owns.
    detail = f"/admin/django_pubsub/delivery/{dead.pk}/change/"
    assert client.post(detail, {"state": "acked"}).status_code == 403


def test_admin_actions_need_the_change_permission(
    operator: tuple[Client, User], dispatch: Any
) -> None:
    client, user = operator
    publish("t.basic", {"n": 1})
    dispatch("basic.two")
    # Subscriptions: view only, so no action is offered and none runs.
    page = client.get("/admin/django_pubsub/subscription/")
    assert page.status_code == 200 and b'value="pause"' not in page.content
    sub = Subscription.objects.get(name="basic.one")
    client.post(
        "/admin/django_pubsub/subscription/", {"action": "pause", "_selected_action": [sub.pk]}
    )
    sub.refresh_from_db()
    assert not sub.paused and not LogEntry.objects.exists()
    user.user_permissions.add(Permission.objects.get(codename="change_subscription"))
    client.post(
        "/admin/django_pubsub/subscription/", {"action": "pause", "_selected_action": [sub.pk]}
    )
    sub.refresh_from_db()
    assert sub.paused
    assert LogEntry.objects.get().change_message == "Paused"


def test_admin_replays_every_dead_letter_of_a_subscription(
    operator: tuple[Client, User], dispatch: Any
) -> None:
    client, user = operator
    user.user_permissions.add(Permission.objects.get(codename="change_subscription"))
    publish_many("t.basic", [{"fail_times": 99, "n": n} for n in range(3)])
    dispatch("basic.one", idle_wait=1)
    assert states("basic.one") == {"dead": 3}
    sub = Subscription.objects.get(name="basic.one")
    response = client.post(
        "/admin/django_pubsub/subscription/",
        {"action": "replay_dead", "_selected_action": [sub.pk]},
        follow=True,
    )
    assert b"Replayed 3 of 3 selected dead letters." in response.content
    assert states("basic.one") == {"pending": 3}
    assert LogEntry.objects.count() == 3


def test_each_delivery_says_why_it_waits(dispatch: Any, clock: FakeClock) -> None:
    dead = dead_letter(dispatch)
    assert "Dead after 3 failed attempt(s)" in dead.why(clock.now)
    publish_many("t.ordered", [{"n": 0}, {"n": 1}])
    dispatch("ordered.two", max_messages=0, until_idle=False)  # fans out; claims nothing
    head, behind = Delivery.objects.filter(subscription__name="ordered.one").order_by("offset")
    assert behind.why(clock.now).startswith(f"Ordered: waits behind message {head.message_id}")
    assert head.why(clock.now) == "Due now, but no dispatcher is running."
    Delivery.objects.filter(pk=head.pk).update(
        state="retry", attempts=1, available_at=clock.now + timedelta(minutes=1)
    )
    head.refresh_from_db()
    assert head.why(clock.now).startswith("Waiting to retry at")
    assert "(attempt 2 of 3)" in head.why(clock.now)
    Subscription.objects.get(name="ordered.one").pause()
    head.refresh_from_db()
    assert head.why(clock.now) == "Waiting: subscription ordered.one is paused."
    Delivery.objects.filter(pk=head.pk).discard(clock.now)
    head.refresh_from_db()
    assert head.why(clock.now).startswith("Discarded by an operator")


def test_pausing_several_subscriptions_locks_them_in_id_order(
    operator: tuple[Client, User],
) -> None:
    """As the fan-out does (and sync, and every hold): the admin's pause of subscriptions
    whose names sort the other way round from their ids used to lock them in name order
    and deadlock with the dispatchers. Seen from outside: while the lowest id is locked,
    the action waits on it and has locked none of the others."""
    import threading

    import psycopg
    from django.db import connection

    from tests.conftest import is_postgres, wait_for

    if not is_postgres():
        pytest.skip("SQLite has no row locks: one writer at a time")
    client, user = operator
    user.user_permissions.add(Permission.objects.get(codename="change_subscription"))
    subs = list(Subscription.objects.order_by("pk"))
    low, high = next((a, b) for i, a in enumerate(subs) for b in subs[i + 1 :] if a.name > b.name)
    table = Subscription._meta.db_table
    db = connection.settings_dict
    params = {"dbname": db["NAME"], "user": db["USER"], "host": db["HOST"], "port": db["PORT"]}
    with psycopg.connect(**params) as holder, psycopg.connect(**params) as prober:
        holder.execute(f"SELECT 1 FROM {table} WHERE id = %s FOR UPDATE", [low.pk])
        selected = {"action": "pause", "_selected_action": [low.pk, high.pk]}

        def act() -> None:
            try:
                client.post("/admin/django_pubsub/subscription/", selected)
            finally:
                connection.close()  # this thread's own

        acting = threading.Thread(target=act)
        acting.start()
        try:
            time.sleep(0.5)  # for the action to reach the lock it waits on
            # NOWAIT: fails at once if the action holds the row.
            prober.execute(f"SELECT 1 FROM {table} WHERE id = %s FOR UPDATE NOWAIT", [high.pk])
            prober.rollback()
        finally:
            holder.rollback()
            acting.join(30)
    wait_for(
        lambda: Subscription.objects.filter(pk__in=[low.pk, high.pk], paused=True).count() == 2
    )
