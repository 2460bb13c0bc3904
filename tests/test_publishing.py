"""publish() and publish_many(): what is written, in whose transaction, and what is refused."""

from __future__ import annotations

import math
from typing import Any

import pytest
from django.db import IntegrityError, transaction
from django.db.transaction import TransactionManagementError

from django_pubsub import publish, publish_many
from django_pubsub.exceptions import InvalidHeaders, InvalidKey, InvalidPayload, InvalidTopic
from django_pubsub.models import Delivery, Message, Topic
from tests.conftest import runs

pytestmark = pytest.mark.django_db(transaction=True)


def test_publish_creates_the_topic_and_returns_the_id() -> None:
    message_id = publish("t.basic", {"n": 1}, key="k1", headers={"source": "test"})
    row = Message.objects.get(pk=message_id)
    assert row.topic.name == "t.basic"
    assert row.payload == {"n": 1}
    assert row.key == "k1"
    assert row.headers == {"source": "test"}
    assert row.offset is None  # sequenced by the dispatcher, not by the publisher


def test_publish_many_keeps_order_and_is_atomic() -> None:
    ids = publish_many("t.new-topic", [{"n": n} for n in range(5)])
    assert ids == sorted(ids)
    assert [m.payload["n"] for m in Message.objects.filter(pk__in=ids).order_by("id")] == list(
        range(5)
    )
    assert Topic.objects.filter(name="t.new-topic").count() == 1
    assert publish_many("t.basic", []) == []


def test_a_rolled_back_transaction_publishes_nothing(dispatch: Any) -> None:
    with pytest.raises(RuntimeError), transaction.atomic():
        publish("t.basic", {"n": "lost"})
        raise RuntimeError("the caller's transaction fails")
    kept = publish("t.basic", {"n": "kept"})
    dispatch("basic.one", "basic.two")
    assert Message.objects.count() == 1
    for name in ("basic.one", "basic.two"):
        assert [run.message_id for run in runs(name)] == [kept]


def test_publish_in_a_transaction_that_must_roll_back_is_refused_like_any_query() -> None:
    with transaction.atomic():
        with pytest.raises(IntegrityError), transaction.atomic():
            Topic.objects.create(name="t.basic-dup")
            Topic.objects.create(name="t.basic-dup")  # the inner block must roll back
        publish("t.basic", {"n": "after the savepoint rolled back"})
    with pytest.raises(TransactionManagementError), transaction.atomic():
        with pytest.raises(IntegrityError), transaction.atomic(savepoint=False):
            Topic.objects.create(name="t.basic-dup2")
            Topic.objects.create(name="t.basic-dup2")  # the whole transaction must roll back
        publish("t.basic", {"n": "refused"})  # Django's error, not the driver's
    assert list(Message.objects.values_list("payload", flat=True)) == [
        {"n": "after the savepoint rolled back"}
    ]


def test_a_committed_message_reaches_every_subscription(dispatch: Any) -> None:
    with transaction.atomic():
        ids = [publish("t.basic", {"n": n}) for n in range(20)]
    dispatch("basic.one", "basic.two")
    for name in ("basic.one", "basic.two"):
        assert sorted(run.message_id for run in runs(name)) == ids
        assert set(
            Delivery.objects.filter(subscription__name=name).values_list("state", flat=True)
        ) == {"acked"}


def test_bytes_come_back_as_bytes(dispatch: Any) -> None:
    publish("t.basic", b"\x00\xffbinary")
    publish("t.basic", bytearray(b""))
    seen: list[Any] = []
    from tests.pubsub_app import subscribers

    original = subscribers.record
    subscribers.record = lambda message: seen.append(message.payload)  # type: ignore[assignment]
    try:
        dispatch("basic.one")
    finally:
        subscribers.record = original
    assert sorted(seen) == [b"", b"\x00\xffbinary"]


BAD_PAYLOADS = [
    {1: "int key"},
    {"when": object()},
    [1, 2, {3}],
    math.nan,
    {"deep": [{"x": math.inf}]},
    b"ok".decode,  # a function
    # What PostgreSQL refuses in its text and jsonb columns is refused on every database.
    "\ud800",  # a lone surrogate
    {"note": "a\x00b"},
    {"ke\x00y": 1},
    {"\udc80": 1},
    [["deep", "\ud83d"]],
    {"big": 10**5000},  # more digits than JSON here can carry
]


@pytest.mark.parametrize("payload", BAD_PAYLOADS)
def test_bad_payloads_are_refused_and_write_nothing(payload: Any) -> None:
    with pytest.raises(InvalidPayload):
        publish("t.basic", payload)
    assert Message.objects.count() == 0
    assert Topic.objects.filter(name="t.basic", messages__isnull=False).count() == 0


def test_publish_many_refuses_the_whole_batch_for_one_bad_payload() -> None:
    with pytest.raises(InvalidPayload, match=r"payloads\[2\]"):
        publish_many("t.basic", [{"ok": 1}, {"ok": 2}, {"bad": object()}])
    with pytest.raises(InvalidPayload):
        publish_many("t.basic", {"not": "a list"})
    assert Message.objects.count() == 0


@pytest.mark.parametrize("topic", ["", "has space", "x" * 201, "semi;colon", None, 5, "ünïcode"])
def test_bad_topic_names_are_refused(topic: Any) -> None:
    with pytest.raises(InvalidTopic):
        publish(topic, {})
    assert Message.objects.count() == 0


def _nested(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


def test_a_payload_nested_too_deeply_is_refused() -> None:
    with pytest.raises(InvalidPayload, match="nested too deeply"):
        publish("t.basic", _nested(100_000))
    assert Message.objects.count() == 0


def test_a_refused_payload_leaves_the_callers_transaction_usable() -> None:
    """Every check runs before the first write: the caller's own rows and earlier
    publishes in that transaction are kept, whatever was refused and wherever it was."""
    bad_late = [{"n": n} for n in range(1_499)] + [{"text": "NUL \x00 late"}]
    with transaction.atomic():
        Topic.objects.create(name="callers.own.row")
        kept = publish("t.basic", {"before": True})
        for payload in ("\ud800", {"big": 10**5000}, {"x": "\x00"}):
            with pytest.raises(InvalidPayload):
                publish("t.basic", payload)
        with pytest.raises(InvalidPayload, match=r"payloads\[1499\]"):
            publish_many("t.basic", bad_late)
        after = publish("t.basic", {"after": True})
    assert Topic.objects.filter(name="callers.own.row").exists()
    assert list(Message.objects.order_by("id").values_list("id", flat=True)) == [kept, after]


def test_payloads_larger_than_the_limit_are_refused(settings: Any) -> None:
    settings.PUBSUB = {"MAX_PAYLOAD_BYTES": 100}
    publish("t.basic", b"x" * 100)
    publish("t.basic", "y" * 98)  # "yyy..." with its quotes: 100 bytes of JSON
    with pytest.raises(InvalidPayload, match=r"101 bytes, more than .*MAX_PAYLOAD_BYTES.* \(100\)"):
        publish("t.basic", b"x" * 101)
    with pytest.raises(InvalidPayload, match=r"101 bytes as JSON"):
        publish("t.basic", "y" * 99)
    with pytest.raises(InvalidPayload, match=r"payloads\[1\]"):
        publish_many("t.basic", [{}, {"text": "z" * 200}])
    assert Message.objects.count() == 2


@pytest.mark.parametrize(
    "headers", [{"a": 1}, {1: "a"}, ["a"], "a=b", {"a\x00": "b"}, {"a": "\x00"}, {"a": "\udfff"}]
)
def test_bad_headers_are_refused(headers: Any) -> None:
    with pytest.raises(InvalidHeaders):
        publish("t.basic", {}, headers=headers)
    assert Message.objects.count() == 0


@pytest.mark.parametrize("key", [5, "", "k" * 256, b"bytes", "k\x00", "\ud800k"])
def test_bad_keys_are_refused(key: Any) -> None:
    with pytest.raises(InvalidKey):
        publish("t.basic", {}, key=key)
    assert Message.objects.count() == 0


class ReadsFromAReplica:
    """A read/write split, as projects with a replica route: reads to an alias that does
    not exist here, writes to the default database."""

    def db_for_read(self, model: Any, **hints: Any) -> str:
        return "replica"

    def db_for_write(self, model: Any, **hints: Any) -> str:
        return "default"


def test_publish_writes_to_the_default_database_whatever_reads_do(settings: Any) -> None:
    settings.DATABASE_ROUTERS = [ReadsFromAReplica()]
    message_id = publish("t.basic", {"n": 1})
    ids = publish_many("t.basic", [{"n": 2}, {"n": 3}])
    settings.DATABASE_ROUTERS = []
    assert list(Message.objects.order_by("id").values_list("id", flat=True)) == [message_id, *ids]


def test_publish_after_the_connection_was_closed() -> None:
    """publish() keeps a psycopg cursor on the connection: a new connection gets its own."""
    from django.db import connection

    first = publish("t.basic", {"n": 1})
    connection.close()
    second = publish("t.basic", {"n": 2})
    with transaction.atomic():
        third = publish("t.basic", {"n": 3})
    assert list(Message.objects.order_by("id").values_list("id", flat=True)) == [
        first,
        second,
        third,
    ]


@pytest.mark.django_db(transaction=True)
def test_sequencing_works_where_psycopg_prepares_every_statement() -> None:
    """prepare_threshold=0 (with server_side_binding) makes psycopg prepare each statement,
    and a string of two statements cannot be prepared."""
    from django.db import connection

    if connection.vendor != "postgresql":
        pytest.skip("PostgreSQL only")
    ids = publish_many("t.basic", [{"n": 0}, {"n": 1}])
    connection.ensure_connection()
    import psycopg

    raw = connection.connection
    # As Django sets the connection up with OPTIONS server_side_binding and prepare_threshold.
    before = raw.prepare_threshold, raw.cursor_factory
    raw.prepare_threshold, raw.cursor_factory = 0, psycopg.Cursor
    try:
        topic = Topic.objects.get(name="t.basic")
        assert Topic.sequence(topic.pk, batch=10) == 2
    finally:
        raw.prepare_threshold, raw.cursor_factory = before
    offsets = Message.objects.filter(id__in=ids).order_by("id").values_list("offset", flat=True)
    assert list(offsets) == [0, 1]
