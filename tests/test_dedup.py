"""publish(dedup_key=): one message per key and topic within PUBSUB["DEDUP_WINDOW"], and the
second caller gets the first one's id, also when the two publish at the same time."""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any

import pytest
from django.db import close_old_connections, transaction
from django.test import override_settings

from django_pubsub import publish, signals
from django_pubsub.exceptions import InvalidKey
from django_pubsub.models import Message
from tests.conftest import is_postgres, runs

pytestmark = pytest.mark.django_db(transaction=True)

# Bounds every wait of the concurrent tests.
WAIT = 10.0


def test_a_second_publish_of_a_key_writes_nothing_and_returns_the_first_id(
    dispatch: Any,
) -> None:
    published: list[list[int]] = []

    def receiver(sender: Any, topic: str, ids: list[int], **kwargs: Any) -> None:
        published.append(ids)

    signals.message_published.connect(receiver)
    try:
        first = publish("t.basic", {"n": 1}, dedup_key="order-7:created")
        again = publish("t.basic", {"n": 2}, dedup_key="order-7:created")
    finally:
        signals.message_published.disconnect(receiver)
    assert again == first and published == [[first]]
    assert Message.objects.count() == 1 and Message.objects.get().payload == {"n": 1}
    # Another topic, or no key, is another message.
    other = publish("t.ordered", {"n": 3}, dedup_key="order-7:created")
    plain = publish("t.basic", {"n": 4})
    assert len({first, other, plain}) == 3
    dispatch("basic.one")
    assert sorted(run.message_id for run in runs("basic.one")) == sorted([first, plain])


def test_a_producer_sequence_number_makes_retried_sends_idempotent() -> None:
    ids = [publish("t.basic", {"seq": seq}, dedup_key=f"billing:{seq}") for seq in range(5)]
    retried = [publish("t.basic", {"seq": seq}, dedup_key=f"billing:{seq}") for seq in range(5)]
    assert ids == retried and Message.objects.count() == 5


def test_a_key_older_than_the_window_is_forgotten() -> None:
    first = publish("t.basic", {"n": 1}, dedup_key="k")
    Message.objects.filter(pk=first).update(
        published_at=Message.objects.get(pk=first).published_at - timedelta(seconds=120)
    )
    with override_settings(PUBSUB={"DEDUP_WINDOW": 60}):
        second = publish("t.basic", {"n": 2}, dedup_key="k")
        assert second != first
        assert publish("t.basic", {"n": 3}, dedup_key="k") == second
    assert Message.objects.get(pk=first).dedup_key is None
    with override_settings(PUBSUB={"DEDUP_WINDOW": None}):
        Message.objects.filter(pk=second).update(
            published_at=Message.objects.get(pk=second).published_at - timedelta(days=3650)
        )
        assert publish("t.basic", {"n": 4}, dedup_key="k") == second


def test_a_rolled_back_publish_leaves_its_key_free() -> None:
    with pytest.raises(RuntimeError), transaction.atomic():
        publish("t.basic", {"n": 1}, dedup_key="k")
        raise RuntimeError("rolled back")
    kept = publish("t.basic", {"n": 2}, dedup_key="k")
    assert Message.objects.get().pk == kept


def test_the_first_publish_of_a_topic_with_a_key_creates_the_topic() -> None:
    first = publish("t.brand-new", {"n": 1}, dedup_key="k")
    assert publish("t.brand-new", {"n": 2}, dedup_key="k") == first


@pytest.mark.parametrize("bad", ["", "x" * 256, 7, b"k", "nul\x00"])
def test_a_bad_dedup_key_is_refused_and_nothing_is_written(bad: Any) -> None:
    with pytest.raises(InvalidKey, match=r"^dedup_key "):
        publish("t.basic", {"n": 1}, dedup_key=bad)
    assert not Message.objects.exists()


def _publisher(
    name: str, key: str, hold: threading.Event, results: dict[str, Any], *, rollback: bool
) -> threading.Thread:
    """A thread publishing ``key`` on its own connection, in a transaction it keeps open
    until ``hold`` is set (then commits, or rolls back)."""

    def run() -> None:
        try:
            with transaction.atomic():
                results[name] = publish("t.basic", {"by": name}, dedup_key=key)
                results[f"{name}.published"] = True
                if not hold.wait(WAIT):
                    raise TimeoutError("never released")
                if rollback:
                    raise RuntimeError("rolled back on purpose")
        except RuntimeError:
            results[f"{name}.rolled_back"] = True
        except BaseException as exc:
            results[f"{name}.error"] = exc
        finally:
            close_old_connections()

    return threading.Thread(target=run, name=name, daemon=True)


def _concurrent(rollback_first: bool) -> dict[str, Any]:
    results: dict[str, Any] = {}
    first_hold, second_hold = threading.Event(), threading.Event()
    second_hold.set()  # the second commits as soon as its publish returns
    first = _publisher("first", "race", first_hold, results, rollback=rollback_first)
    second = _publisher("second", "race", second_hold, results, rollback=False)
    first.start()
    for _ in range(int(WAIT / 0.01)):
        if "first.published" in results or "first.error" in results:
            break
        threading.Event().wait(0.01)
    second.start()
    # The second publish waits for the first transaction: it has not returned.
    second.join(0.5)
    waited = second.is_alive()
    first_hold.set()
    first.join(WAIT)
    second.join(WAIT)
    assert not first.is_alive() and not second.is_alive()
    results["waited"] = waited
    return results


@pytest.mark.skipif(not is_postgres(), reason="concurrent writers: PostgreSQL only")
def test_two_transactions_publishing_one_key_at_once_end_with_one_message() -> None:
    results = _concurrent(rollback_first=False)
    assert "first.error" not in results and "second.error" not in results, results
    assert results["waited"]  # it waited for the first to commit
    assert results["second"] == results["first"]
    assert list(Message.objects.values_list("pk", flat=True)) == [results["first"]]


@pytest.mark.skipif(not is_postgres(), reason="concurrent writers: PostgreSQL only")
def test_when_the_first_rolls_back_the_second_publishes_its_own() -> None:
    results = _concurrent(rollback_first=True)
    assert "first.error" not in results and "second.error" not in results, results
    assert results["waited"] and results["first.rolled_back"]
    assert results["second"] != results["first"]
    message = Message.objects.get()
    assert message.pk == results["second"] and message.payload == {"by": "second"}
