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
from tests.conftest import runs, states

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


def test_pruning_while_dispatchers_run_and_are_killed_loses_nothing(
    runpubsub: Any, tmp_path: Any
) -> None:
    """Two runpubsub processes prune every 0.1 s with acked deliveries and messages kept
    0.2 s, and are SIGKILLed in turn; then one drains. Every message runs on both
    subscriptions, a second run only for a delivery in flight at a kill, the ordered one
    never goes back, and pruning did remove what had ended."""
    import json
    import signal
    from collections import Counter
    from itertools import pairwise

    from tests.conftest import runs, wait_for
    from tests.pubsub_app.models import HandlerRun

    subs = ["kill.unordered", "kill.ordered"]
    ids = publish_many("t.kill", [{"n": n, "sleep": 0.002} for n in range(400)])
    env = {
        "PUBSUB_TEST_PRUNE_INTERVAL": "0.1",
        "PUBSUB_TEST_RETENTION": json.dumps({"acked": 0.2, "messages": 0.2}),
    }
    args = ["--subscriptions", ",".join(subs), "--workers", "4", "--poll-interval", "0.02"]
    at_kill: Counter[tuple[str, int]] = Counter()
    procs = [runpubsub(*args, env=env, log=tmp_path / f"p{n}.log") for n in range(2)]
    for kill in range(4):
        target = 60 * (kill + 1)
        wait_for(
            lambda target=target: (
                HandlerRun.objects.filter(subscription="kill.ordered").count() >= target
            )
        )
        victim = procs[kill % 2]
        victim.send_signal(signal.SIGKILL)
        assert victim.wait(timeout=10) == -signal.SIGKILL
        inflight = Delivery.objects.filter(state="inflight").values_list(
            "subscription__name", "message_id"
        )
        at_kill.update(inflight)
        procs[kill % 2] = runpubsub(*args, env=env, log=tmp_path / f"k{kill}.log")
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    last = runpubsub(*args, "--until-idle", env=env, log=tmp_path / "last.log")
    assert last.wait(timeout=120) == 0
    for name in subs:
        history = runs(name)
        assert set(ids) <= {run.message_id for run in history}, name  # nothing lost
        repeated = Counter(run.message_id for run in history)
        unexplained = [m for m, n in repeated.items() if n > 1 and (name, m) not in at_kill]
        assert unexplained == [], name
    ordered = [run.offset for run in runs("kill.ordered")]
    assert not [(a, b) for a, b in pairwise(ordered) if b < a]
    assert Delivery.objects.exclude(state="acked").count() == 0
    # Pruning ran meanwhile: far fewer rows than the 800 deliveries and 400 messages made.
    assert Delivery.objects.count() < 800 and Message.objects.count() < 400


def test_a_topic_nobody_listens_to_is_warned_about() -> None:
    from django.core.checks import run_checks

    publish("order.created", {"typo": True})  # the code listens to orders.created
    publish("t.basic", {"n": 1})
    (warned,) = [m for m in run_checks(databases=["default"]) if m.id == "django_pubsub.W003"]
    assert "order.created" in warned.msg and "t.basic" not in warned.msg
    assert warned.hint and "spelling" in warned.hint


def test_retention_settings_are_checked(settings: Any) -> None:
    from django_pubsub import checks

    for bad, said in [
        ({"acked": -1}, "RETENTION['acked']: a retention must be"),
        ({"ackd": 5}, "unknown keys ['ackd']"),
        ({"topics": {"t.x": {"dead": "soon"}}}, "RETENTION['topics']['t.x']['dead']"),
        ({"topics": {"t.x": {"topics": {}}}}, "unknown keys ['topics']"),
    ]:
        settings.PUBSUB = {"RETENTION": bad}
        (found,) = checks.check_settings()
        assert found.id == "django_pubsub.E003" and said in found.msg, found.msg
    settings.PUBSUB = {
        "RETENTION": {"acked": timedelta(hours=2), "dead": None},
        "PRUNE_INTERVAL": None,
    }
    assert checks.check_settings() == []


@pytest.fixture
def leaving(dispatch: Any) -> Any:
    """A subscription of its own topic that ran 3 messages, then left the code (inactive)
    before 2 more were published."""
    from django_pubsub import registry
    from django_pubsub.registry import SubscriberSpec
    from django_pubsub.sync import sync_subscriptions

    spec = SubscriberSpec(
        name="solo.sub", topic="t.solo", handler="tests.pubsub_app.subscribers.basic_one"
    )
    registry.register(spec)
    try:
        sync_subscriptions()
        publish_many("t.solo", [{"n": n} for n in range(3)])
        dispatch("solo.sub")
    finally:
        registry.unregister(spec.name)
    sync_subscriptions()  # no longer declared: inactive
    publish_many("t.solo", [{"n": n} for n in range(3, 5)])
    from django_pubsub.models import Topic

    Topic.sequence_all(batch=10)
    return Subscription.objects.get(name="solo.sub")


def test_retiring_takes_its_deliveries_and_lets_its_messages_go(leaving: Any) -> None:
    assert not leaving.active
    gone = retention.retiring(leaving)
    assert (gone.deliveries, gone.unfinished, gone.messages) == (3, 0, 5)
    # Inactive, it keeps what it has not finished (the 2 it never fanned out); what it
    # finished ages out as any other subscription's.
    pruned = retention.prune(later(30))
    assert pruned.rows == {("t.solo", "acked"): 3, ("t.solo", "messages"): 3}
    assert Message.objects.filter(topic__name="t.solo").count() == 2
    gone = retention.retire(leaving)
    assert (gone.deliveries, gone.messages) == (0, 2)
    assert not Subscription.objects.filter(name="solo.sub").exists()
    assert retention.prune(later(30)).rows == {("t.solo", "messages"): 2}


def test_a_declared_subscription_cannot_be_retired() -> None:
    from django_pubsub.exceptions import ActionRefused

    with pytest.raises(ActionRefused, match="still declared in code"):
        retention.retire(Subscription.objects.get(name="basic.one"))
    assert Subscription.objects.filter(name="basic.one").exists()


def test_the_retire_command_says_what_goes_and_asks(
    leaving: Any, capsys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from django.core.management.base import CommandError

    with pytest.raises(CommandError, match="No such subscription: nope"):
        call_command("pubsub_retire", "nope")
    monkeypatch.setattr("builtins.input", lambda prompt: "no")
    with pytest.raises(CommandError, match="Nothing retired"):
        call_command("pubsub_retire", "solo.sub")
    out = capsys.readouterr().out
    assert "3 deliveries go with it (0 of them never finished), and 5 messages" in out
    assert Subscription.objects.filter(name="solo.sub").exists()
    call_command("pubsub_retire", "solo.sub", "--yes")
    assert "Retired solo.sub." in capsys.readouterr().out
    assert not Subscription.objects.filter(name="solo.sub").exists()


def test_the_admin_retires_after_a_confirmation_page(leaving: Any, client: Any) -> None:
    from django.contrib.admin.models import LogEntry
    from django.contrib.auth.models import User

    client.force_login(User.objects.create_superuser("root", "r@example.com", "pw"))
    asked = client.post(
        "/admin/django_pubsub/subscription/",
        {"action": "retire", "_selected_action": [leaving.pk]},
    ).content.decode()
    assert "3 deliveries (0 of them never finished), and\n5 messages only it keeps" in asked
    assert Subscription.objects.filter(pk=leaving.pk).exists()
    done = client.post(
        "/admin/django_pubsub/subscription/",
        {"action": "retire", "_selected_action": [leaving.pk], "confirmed": "yes"},
        follow=True,
    ).content.decode()
    assert "Subscription solo.sub retired." in done
    assert not Subscription.objects.filter(pk=leaving.pk).exists()
    assert LogEntry.objects.get().change_message == "Retired: 3 deliveries deleted"


def _sizes() -> dict[str, int]:
    """Rows of messages and deliveries, and the bytes they take (PostgreSQL: the tables
    with their indexes; SQLite: the pages in use, free pages left out)."""
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute(
                "SELECT pg_total_relation_size('django_pubsub_message') "
                "+ pg_total_relation_size('django_pubsub_delivery')"
            )
            used = int(cursor.fetchone()[0])
        else:
            cursor.execute("PRAGMA page_count")
            pages = int(cursor.fetchone()[0])
            cursor.execute("PRAGMA freelist_count")
            pages -= int(cursor.fetchone()[0])
            cursor.execute("PRAGMA page_size")
            used = pages * int(cursor.fetchone()[0])
    ended = Delivery.objects.filter(state__in=["acked", "discarded", "dead"])
    return {"messages": Message.objects.count(), "deliveries": Delivery.objects.count(),
            "ended": ended.count(), "bytes": used}  # fmt: skip


# The soak's messages a second.
RATE = 100


def _autovacuum() -> bool:
    with connection.cursor() as cursor:
        cursor.execute("SHOW autovacuum")
        return bool(cursor.fetchone()[0] == "on")


def _vacuum() -> None:
    with connection.cursor() as cursor:
        cursor.execute("VACUUM django_pubsub_message, django_pubsub_delivery")


def test_tables_stay_flat_while_publishing_and_pruning(runpubsub: Any, tmp_path: Any) -> None:
    """Publish 100 messages a second to two subscriptions while runpubsub delivers them and
    prunes every 0.5 s what is 1 s old: the ended rows and the bytes stay flat (what the
    dispatcher has not run yet is kept, and counted apart). 10 s in the suite;
    runtests.py --soak runs it for PUBSUB_SOAK_RETENTION_SECONDS (600) and writes the
    figures to .test-results/retention-soak-<database>.json (docs/reliability.md)."""
    import json
    import os
    import statistics
    import time

    from tests.conftest import ROOT
    from tests.pubsub_app.models import HandlerRun

    seconds = float(os.environ.get("PUBSUB_SOAK_RETENTION_SECONDS", "10"))
    env = {
        "PUBSUB_TEST_PRUNE_INTERVAL": "0.5",
        "PUBSUB_TEST_RETENTION": json.dumps({"acked": 1, "messages": 1}),
    }
    proc = runpubsub("--subscriptions", "basic.one,basic.two", env=env, log=tmp_path / "r.log")
    # PostgreSQL reuses the space of removed rows once VACUUM has seen them: autovacuum's
    # work, every minute or so by default. Where the server runs without it (this
    # machine's shared server), the test vacuums every 30 s instead, as it would.
    vacuum = connection.vendor == "postgresql" and not _autovacuum()
    samples: list[dict[str, float]] = []
    published = 0
    started = time.monotonic()
    next_sample = started
    while (now := time.monotonic()) - started < seconds:
        publish_many("t.basic", [{"n": published + i} for i in range(10)])
        published += 10
        if now >= next_sample:
            # The test's own record of each run would grow the SQLite file: not ours.
            HandlerRun.objects.all().delete()
            samples.append({"t": round(now - started, 1), **_sizes()})
            next_sample += 1.0
            if vacuum and len(samples) % 30 == 0:
                _vacuum()
        time.sleep(max(0.0, started + published / RATE - time.monotonic()))
    proc.terminate()
    proc.wait(timeout=30)
    warm = [s for s in samples if s["t"] >= min(5.0, seconds / 3)]
    middle, last = warm[: len(warm) // 2], warm[len(warm) // 2 :]

    def median(part: list[dict[str, float]], key: str) -> float:
        return float(statistics.median(sample[key] for sample in part))

    figures = {
        "database": connection.vendor,
        "seconds": seconds,
        "published": published,
        "vacuum_by_the_test": vacuum,
        "ended_median_middle": median(middle, "ended"),
        "ended_median_last": median(last, "ended"),
        "ended_max": max(sample["ended"] for sample in warm),
        "rows_max": max(sample["messages"] + sample["deliveries"] for sample in warm),
        "bytes_max_middle": max(sample["bytes"] for sample in middle),
        "bytes_max_last": max(sample["bytes"] for sample in last),
        "bytes_end": samples[-1]["bytes"],
        "samples": samples,
    }
    if "PUBSUB_SOAK_RETENTION_SECONDS" in os.environ:
        report = ROOT / ".test-results" / f"retention-soak-{connection.vendor}.json"
        report.write_text(json.dumps(figures, indent=1))
    # Ended rows: what 2.5 s of deliveries leaves (1 s kept, pruned every 0.5 s, a second
    # of slack), and no more at the end than in the middle; nowhere near the 2 per message
    # that nothing pruned would leave. The space is reused: the files stop growing.
    assert figures["ended_median_last"] < RATE * 2 * 4
    assert figures["ended_median_last"] <= 1.5 * figures["ended_median_middle"] + RATE
    assert figures["bytes_end"] <= 2 * figures["bytes_max_middle"]


def test_a_new_earliest_subscription_starts_at_what_is_still_stored(settings: Any) -> None:
    """Retention pruned the low end of the topic; a subscription declared afterwards with
    start="earliest" begins at the first stored offset, not at 0 (where the fan-out would
    walk pruned offsets a window per pass), and runs what is stored."""
    from django_pubsub import registry
    from django_pubsub.models import Topic
    from django_pubsub.registry import SubscriberSpec
    from django_pubsub.testing import drain

    settings.PUBSUB = {**settings.PUBSUB, "BATCH_SIZE": 10}
    publish_many("t.nobody.listens", [{"n": n} for n in range(50)])
    Topic.sequence_all(batch=100)
    assert retention.prune(later(8)).by_kind() == {"messages": 50}
    kept = publish("t.nobody.listens", {"n": 50})
    spec = SubscriberSpec(
        name="late.comer",
        topic="t.nobody.listens",
        handler="tests.pubsub_app.subscribers.basic_one",
        start="earliest",
    )
    registry.register(spec)
    try:
        drained = drain(["late.comer"])
    finally:
        registry.unregister(spec.name)
    assert [m.id for m in drained["late.comer"].acked] == [kept]
    assert Subscription.objects.get(name="late.comer").position == 51


def test_a_seek_back_past_what_retention_removed_starts_at_the_first_stored(
    dispatch: Any,
) -> None:
    publish_many("t.basic", [{"n": n} for n in range(4)])
    dispatch("basic.one", "basic.two")
    retention.prune(later(8))  # all four, deliveries and messages
    kept = publish_many("t.basic", [{"n": n} for n in range(4, 6)])
    dispatch("basic.one", "basic.two")
    done = Subscription.objects.get(name="basic.one").seek(offset=0)
    assert (done.offset, done.replayed) == (4, 2)  # from offset 4, the first stored
    dispatch("basic.one")
    ran = [run.message_id for run in runs("basic.one")]
    assert len(ran) == 8 and all(ran.count(message) == 2 for message in kept)


def test_a_topic_with_a_paused_subscription_keeps_its_messages(dispatch: Any) -> None:
    """An operator's seek holds (pauses) the subscription while it creates deliveries of
    old messages; a prune's snapshot might not see them, so it leaves the topic alone."""
    publish_many("t.basic", [{"n": n} for n in range(3)])
    dispatch("basic.one", "basic.two")
    Subscription.objects.get(name="basic.two").pause()
    assert retention.prune(later(8)).by_kind() == {"acked": 6}
    assert Message.objects.count() == 3
    Subscription.objects.get(name="basic.two").resume()
    assert retention.prune(later(8)).by_kind() == {"messages": 3}
