"""ordered="key": each key in offset order, keys in parallel, a failing head holds back its
own key only, a dead head lets it go on or dead-letters the rest of it."""

from __future__ import annotations

from collections import defaultdict
from itertools import pairwise
from typing import Any

import pytest
from django.utils import timezone

from django_pubsub import publish, signals
from django_pubsub.models import Delivery, Subscription
from tests.conftest import FakeClock, runs, states

pytestmark = pytest.mark.django_db(transaction=True)


def _by_key(subscription: str) -> dict[str, list[int]]:
    """The offsets each key's handler runs had, in the order they started."""
    started: dict[str, list[int]] = defaultdict(list)
    for run in runs(subscription):
        started[run.payload["k"]].append(run.offset)
    return started


def _publish_keys(topic: str, keys: list[str | None], **extra: Any) -> list[int]:
    return [publish(topic, {"k": key, **extra}, key=key) for key in keys]


def test_each_key_runs_in_offset_order_and_keys_run_side_by_side(dispatch: Any) -> None:
    keys = [f"k{n % 7}" for n in range(140)]
    _publish_keys("t.keyed", keys, span=True, sleep=0.002)
    counts = dispatch("keyed.one", workers=6)
    assert counts.acked == 140 and states("keyed.one") == {"acked": 140}
    started = _by_key("keyed.one")
    assert set(started) == {f"k{n}" for n in range(7)}
    for offsets in started.values():
        assert offsets == sorted(offsets) and len(offsets) == 20
    # No two runs of one key overlapped; runs of different keys did.
    spans: dict[str, list[tuple[float, float]]] = defaultdict(list)
    every = []
    for run in runs("keyed.one"):
        spans[run.payload["k"]].append((run.started, run.ended))
        every.append((run.started, run.ended))
    for key_spans in spans.values():
        assert all(end <= start for (_, end), (start, _) in pairwise(sorted(key_spans)))
    every.sort()
    assert any(later[0] < earlier[1] for earlier, later in pairwise(every))


def test_a_failing_head_holds_back_only_its_own_key(dispatch: Any, clock: FakeClock) -> None:
    publish("t.keyed", {"k": "a", "fail_times": 1}, key="a")
    _publish_keys("t.keyed", ["a", "b", None, "a", "b", None])
    dispatch("keyed.one", clock=clock)
    # Key a waits for its head's retry; key b and the messages without a key went on.
    started = _by_key("keyed.one")
    assert (started["a"], started["b"], sorted(started[None])) == ([0], [2, 5], [3, 6])
    assert states("keyed.one") == {"retry": 1, "pending": 2, "acked": 4}
    behind = Delivery.objects.get(subscription__name="keyed.one", offset=4)
    why = behind.why(clock())
    assert "key 'a'" in why and "behind message" in why and "retrying at" in why, why
    clock.advance(120)  # past the retry, jitter and all
    dispatch("keyed.one", clock=clock)
    assert _by_key("keyed.one")["a"] == [0, 0, 1, 4]
    assert states("keyed.one") == {"acked": 7}


def test_blocked_keys_are_counted_and_signalled(dispatch: Any, clock: FakeClock) -> None:
    from django_pubsub.keys import blocked_keys

    publish("t.keyed", {"k": "a", "fail_times": 2}, key="a")
    _publish_keys("t.keyed", ["a", "b"])
    dispatch("keyed.one", clock=clock)
    sub = Subscription.objects.get(name="keyed.one")
    (blocked,) = blocked_keys(sub, clock())
    assert (blocked.key, blocked.offset, blocked.waiting) == ("a", 0, 2)
    heard: list[dict[str, Any]] = []

    def receiver(sender: Any, **kwargs: Any) -> None:
        heard.append(kwargs)

    signals.key_blocked.connect(receiver)
    try:
        clock.advance(30)
        dispatch("keyed.one", clock=clock, key_blocked_after=20)
    finally:
        signals.key_blocked.disconnect(receiver)
    assert [(h["key"], h["subscription"].name) for h in heard] == [("a", "keyed.one")]
    assert heard[0]["blocked_for"] >= 20


def test_a_dead_head_lets_its_key_go_on(dispatch: Any, clock: FakeClock) -> None:
    publish("t.keyed", {"k": "a", "fail_times": 99}, key="a")
    _publish_keys("t.keyed", ["a", "a"])
    for _ in range(3):
        dispatch("keyed.one", clock=clock)
        clock.advance(3600)
    assert states("keyed.one") == {"dead": 1, "acked": 2}
    assert _by_key("keyed.one")["a"] == [0, 0, 0, 1, 2]


def test_a_dead_head_can_dead_letter_the_rest_of_its_key(dispatch: Any, tmp_path: Any) -> None:
    broken = tmp_path / "broken"
    broken.touch()
    dead: list[Any] = []

    def receiver(sender: Any, message: Any, error: str, **kwargs: Any) -> None:
        dead.append((message.offset, error))

    publish("t.keyed.bury", {"k": "a", "fail_while": str(broken)}, key="a")
    _publish_keys("t.keyed.bury", ["a", "b", "a"])
    signals.dead_lettered.connect(receiver)
    try:
        dispatch("keyed.bury")
        # Published after the head died: its key still has a dead letter, so it follows.
        _publish_keys("t.keyed.bury", ["a", "b"])
        dispatch("keyed.bury")
    finally:
        signals.dead_lettered.disconnect(receiver)
    assert _by_key("keyed.bury") == {"a": [0], "b": [2, 5]}
    rows = Delivery.objects.filter(subscription__name="keyed.bury").order_by("offset")
    assert [(row.offset, row.state, row.attempts) for row in rows] == [
        (0, "dead", 1),
        (1, "dead", 0),
        (2, "acked", 1),
        (3, "dead", 0),
        (4, "dead", 0),
        (5, "acked", 1),
    ]
    assert "earlier message of key a is dead" in rows[1].last_error
    assert sorted(offset for offset, _ in dead) == [0, 1, 3, 4]
    # Fixed, and replayed together, the key's dead letters run in offset order.
    broken.unlink()
    now = timezone.now()
    Delivery.objects.filter(subscription__name="keyed.bury", state="dead").replay(now)
    dispatch("keyed.bury")
    assert _by_key("keyed.bury")["a"] == [0, 0, 1, 3, 4]


def test_making_a_subscription_keyed_keys_its_backlog(dispatch: Any) -> None:
    from django_pubsub import registry
    from django_pubsub.sync import sync_subscriptions

    spec = registry.get_specs()["keyed.one"]
    registry.unregister("keyed.one")
    registry.register(spec.__class__(**{**spec.__dict__, "ordered": None}))
    try:
        sync_subscriptions()
        publish("t.keyed", {"k": "a"}, key="a")
        dispatch("keyed.one", max_messages=0)  # fans out, runs nothing
    finally:
        registry.unregister("keyed.one")
        registry.register(spec)
    assert list(Delivery.objects.values_list("key", flat=True)) == [None]
    sync_subscriptions()
    assert list(Delivery.objects.values_list("key", flat=True)) == ["a"]


def test_the_admin_shows_keys_modes_and_blocked_keys(
    dispatch: Any, clock: FakeClock, client: Any
) -> None:
    from tests.conftest import log_in_operator

    publish("t.keyed", {"k": "a", "fail_times": 1}, key="a")
    _publish_keys("t.keyed", ["a"])
    dispatch("keyed.one", clock=clock)
    log_in_operator(client, "view_subscription", "view_delivery")
    sub = Subscription.objects.get(name="keyed.one")
    page = client.get(f"/admin/django_pubsub/subscription/{sub.pk}/change/").content.decode()
    assert "by message key" in page and "lets its key go on" in page
    assert "at least once" in page and "one message a call" in page
    html = client.get("/admin/django_pubsub/topic/dashboard/").content.decode()
    assert "ordered by key" in html and "oldest key a for" in html
    behind = Delivery.objects.get(subscription=sub, offset=1)
    page = client.get(f"/admin/django_pubsub/delivery/{behind.pk}/change/").content.decode()
    assert "waits behind message" in page and "of key &#x27;a&#x27;" in page


def test_a_hung_head_holds_its_key_here_until_it_returns(dispatch: Any) -> None:
    """Its attempt timed out and is retried, but not beside the run still going, and
    nothing behind it starts before that ends (one process: see guarantees 3)."""
    publish("t.keyed.hang", {"k": "a", "sleep_first": 1.2, "span": True}, key="a")
    publish("t.keyed.hang", {"k": "a", "span": True}, key="a")
    publish("t.keyed.hang", {"k": "b", "span": True}, key="b")
    dispatch("keyed.hang", idle_wait=0.5)
    a = [run for run in runs("keyed.hang") if run.payload["k"] == "a"]
    assert [(run.offset, run.attempt) for run in a] == [(0, 1), (0, 2), (1, 1)]
    hung = a[0]
    assert all(run.started >= hung.ended for run in a[1:]), [(r.started, r.ended) for r in a]
    b = [run for run in runs("keyed.hang") if run.payload["k"] == "b"]
    assert b[0].started < hung.ended  # other keys went on meanwhile


def test_replay_and_seek_are_refused_while_a_key_runs(dispatch: Any) -> None:
    from django_pubsub.exceptions import ActionRefused

    publish("t.keyed", {"k": "a"}, key="a")
    publish("t.keyed", {"k": "a"}, key="a")
    dispatch("keyed.one")
    first, second = Delivery.objects.filter(subscription__name="keyed.one").order_by("offset")
    Delivery.objects.filter(pk=first.pk).update(state="dead")
    Delivery.objects.filter(pk=second.pk).update(state="inflight", lease_token="x")
    with pytest.raises(ActionRefused, match=r"keyed\.one"):
        Delivery.objects.filter(pk=first.pk).replay(timezone.now())
    with pytest.raises(ActionRefused, match=r"keyed\.one"):
        Subscription.objects.get(name="keyed.one").seek(offset=0)
    assert Delivery.objects.get(pk=first.pk).state == "dead"
