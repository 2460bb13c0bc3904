"""Where a new subscription starts (@subscriber start=: "earliest", "latest", a time, the
last N messages), and seek(last=N), from code and from the admin."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
from django.utils import timezone

from django_pubsub import publish, registry, subscriber
from django_pubsub.exceptions import InvalidSeek, InvalidSubscriber
from django_pubsub.models import Message, Subscription
from django_pubsub.sync import sync_subscriptions
from tests.conftest import log_in_operator, runs
from tests.pubsub_app.subscribers import basic_one

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def declared() -> Iterator[list[str]]:
    names: list[str] = []
    yield names
    for name in names:
        registry.unregister(name)


def _declare(declared: list[str], name: str, **options: Any) -> None:
    subscriber("t.start", name=name, **options)(basic_one)
    declared.append(name)


def _ran(name: str) -> list[int]:
    return sorted(run.message_id for run in runs(name))


def test_each_start_begins_where_it_says(declared: list[str], dispatch: Any) -> None:
    old = [publish("t.start", {"n": n}) for n in range(5)]
    an_hour_ago = timezone.now() - timedelta(hours=1)
    Message.objects.filter(pk__in=old[:3]).update(published_at=an_hour_ago)
    middle = an_hour_ago + timedelta(minutes=30)
    _declare(declared, "start.earliest", start="earliest")
    _declare(declared, "start.latest", start="latest")
    _declare(declared, "start.last2", start=("last", 2))
    _declare(declared, "start.last0", start=("last", 0))
    _declare(declared, "start.last99", start=("last", 99))
    _declare(declared, "start.time", start=middle)
    sync_subscriptions()
    new = publish("t.start", {"n": "new"})
    dispatch(*declared)
    assert _ran("start.earliest") == [*old, new]
    assert _ran("start.latest") == [new]
    assert _ran("start.last2") == [*old[3:], new]
    assert _ran("start.last0") == [new]
    assert _ran("start.last99") == [*old, new]  # no more than the topic holds
    assert _ran("start.time") == [*old[3:], new]
    rows = dict(Subscription.objects.filter(name__in=declared).values_list("name", "start"))
    assert rows["start.last2"] == "last 2" and rows["start.time"] == middle.isoformat()


@pytest.mark.parametrize(
    "start",
    [
        "middle",
        ("last", -1),
        ("last", 1.5),
        ("last", True),
        ("first", 3),
        ["last", 3],
        datetime(2030, 1, 1),  # naive, with USE_TZ
    ],
)
def test_a_start_that_cannot_work_is_refused_at_the_declaration(start: Any) -> None:
    with pytest.raises(InvalidSubscriber, match="start must be"):
        subscriber("t.start", name="start.bad", start=start)(basic_one)
    assert "start.bad" not in registry.get_specs()


def test_seek_to_the_last_n_messages(dispatch: Any) -> None:
    ids = [publish("t.basic", {"n": n}) for n in range(6)]
    dispatch("basic.one")
    sub = Subscription.objects.get(name="basic.one")
    done = sub.seek(last=2)
    assert done.offset == 4 and done.replayed == 2
    dispatch("basic.one")
    assert sorted(run.message_id for run in runs("basic.one")) == sorted([*ids, *ids[4:]])
    with pytest.raises(InvalidSeek, match="one of them"):
        sub.seek(last=2, offset=1)
    with pytest.raises(InvalidSeek, match="last must be 0 or more"):
        sub.seek(last=-1)


def test_the_admin_seeks_to_the_last_n_messages(client: Any, dispatch: Any) -> None:
    ids = [publish("t.basic", {"n": n}) for n in range(5)]
    dispatch("basic.one")
    log_in_operator(client, "view_subscription", "change_subscription", "change_delivery")
    sub = Subscription.objects.get(name="basic.one")
    response = client.post(
        "/admin/django_pubsub/subscription/",
        {"action": "seek", "_selected_action": [sub.pk], "apply": "1", "last": "3"},
        follow=True,
    )
    assert response.status_code == 200
    assert "sought to offset 2" in response.content.decode()
    dispatch("basic.one")
    assert sorted(run.message_id for run in runs("basic.one")) == sorted([*ids, *ids[2:]])
