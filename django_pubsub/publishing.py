"""publish() and publish_many(): validate everything, then insert in the caller's transaction."""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Mapping, Sequence
from contextlib import nullcontext
from datetime import datetime
from typing import Any

from django.db import DEFAULT_DB_ALIAS, IntegrityError, connections, transaction
from django.utils import timezone

from . import signals
from .exceptions import InvalidPayload
from .sql import bound_cursor, quoted
from .validation import check_headers, check_key, check_payload, check_topic
from .wakeups import CHANNEL


def publish(
    topic: str,
    payload: Any,
    *,
    key: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> int:
    """Publish one message to ``topic``; return its id.

    The row is written on the default database inside the caller's transaction: if that
    transaction rolls back, nothing is published. Outside a transaction it commits at once.
    """
    check_topic(topic)
    key = check_key(key)
    header_dict = check_headers(headers)
    return _write(topic, [check_payload(payload)], key, header_dict)[0]


def publish_many(
    topic: str,
    payloads: Iterable[Any],
    *,
    key: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> list[int]:
    """Publish several messages to ``topic`` atomically, in order; return their ids."""
    check_topic(topic)
    key = check_key(key)
    header_dict = check_headers(headers)
    if isinstance(payloads, str | bytes | bytearray | Mapping) or not isinstance(
        payloads, Iterable
    ):
        raise InvalidPayload(
            f"publish_many() takes an iterable of payloads (such as a list), not "
            f"{type(payloads).__name__}."
        )
    checked = []
    for index, payload in enumerate(payloads):
        try:
            checked.append(check_payload(payload))
        except InvalidPayload as exc:
            raise InvalidPayload(f"payloads[{index}]: {exc}") from None
    if not checked:
        return []
    return _write(topic, checked, key, header_dict)


def _write(
    topic: str, checked: list[Any], key: str | None, header_dict: dict[str, str]
) -> list[int]:
    """Insert checked payloads; tell the receivers of message_published."""
    from .models import Message

    now = timezone.now()
    # The default database, as documented (docs/guarantees.md), whatever a router says of
    # reads: the caller's transaction is there, and a replica would refuse the write.
    connection = connections[DEFAULT_DB_ALIAS]
    # No savepoint: a failed insert spoils the caller's transaction either way, and two
    # round trips per publish are worth saving. Outside a transaction, one statement
    # commits on its own; more need a transaction of their own.
    single = len(checked) <= INSERT_BATCH and not connection.in_atomic_block
    with nullcontext() if single else transaction.atomic(savepoint=False):
        ids = insert_messages(
            connection, topic, checked, key=key, headers=header_dict, now=now, wake=CHANNEL
        )
        if ids is None:  # the first message of this topic: create it, then insert
            _create_topic(topic)
            ids = insert_messages(
                connection, topic, checked, key=key, headers=header_dict, now=now, wake=CHANNEL
            )
    assert ids is not None
    signals.send(signals.message_published, Message, savepoint=True, topic=topic, ids=ids)
    return ids


def _create_topic(name: str) -> None:
    from .models import Topic

    try:
        with transaction.atomic():
            Topic.objects.create(name=name)
    except IntegrityError:
        pass  # another transaction created it first


# Rows per INSERT statement: well under both databases' limits on parameters.
INSERT_BATCH = 1000


@functools.lru_cache(maxsize=64)
def _insert_sql(vendor: str, rows: int, notify: bool) -> str:
    """insert_messages()'s statement for ``rows`` messages, built once: a publish is
    one round trip, and building it every time was a tenth of the client's share.

    Typed on PostgreSQL, where a NULL parameter would otherwise have no type. ``notify``
    (PostgreSQL): the statement also notifies a channel, the last parameter.
    """
    from .models import Message, Topic

    postgres = vendor == "postgresql"
    table, topics = quoted(Message), quoted(Topic)
    columns = "topic_id, payload, payload_bytes, key, headers, published_at"
    shared_sql = "%s::varchar, %s::jsonb, %s::timestamptz" if postgres else "%s, %s, %s"
    if rows == 1:
        # The common case, in the plainest statement the server can plan.
        own = "%s::jsonb, %s::bytea" if postgres else "%s, %s"
        insert = (
            f"INSERT INTO {table} ({columns}) SELECT id, {own}, {shared_sql} "
            f"FROM {topics} WHERE name = %s RETURNING id"
        )
    elif postgres:
        # Two arrays whatever the batch's size: no parameter per message to send and parse,
        # and the same statement every time, which psycopg can prepare. The ordinality
        # keeps the call's order, which the ids follow.
        insert = (
            f"INSERT INTO {table} ({columns}) SELECT t.id, p.payload, p.bytes, "
            f"{shared_sql} FROM {topics} t CROSS JOIN unnest(%s::jsonb[], %s::bytea[]) "
            f"WITH ORDINALITY AS p(payload, bytes, n) WHERE t.name = %s "
            f"ORDER BY p.n RETURNING id"
        )
    else:
        # VALUES columns are column1, column2...; column1 keeps the call's order, which the
        # ids follow.
        insert = (
            f"INSERT INTO {table} ({columns}) SELECT t.id, v.column2, v.column3, "
            f"{shared_sql} FROM {topics} t CROSS JOIN (VALUES "
            f"{', '.join(['(%s, %s, %s)'] * rows)}) AS v WHERE t.name = %s "
            f"ORDER BY v.column1 RETURNING id"
        )
    if not notify:
        return insert
    return f"WITH m AS ({insert}) SELECT m.id FROM m CROSS JOIN (SELECT pg_notify(%s, '')) AS woken"


def insert_messages(
    connection: Any,
    topic: str,
    bodies: Sequence[Any],
    *,
    key: str | None,
    headers: dict[str, str],
    now: datetime,
    wake: str | None,
) -> list[int] | None:
    """Insert messages into the topic named ``topic``, in order, through ``connection`` (a
    Django connection: publish() passes the default one); return their ids, or None
    (nothing written) when the topic does not exist yet.

    One statement per INSERT_BATCH messages, the topic looked up inside it: a publish is
    one round trip. On PostgreSQL ``wake`` names a channel notified in that same
    statement, delivered when the caller's transaction commits.

    A function of the connection rather than a queryset method: a publish is a few hundred
    microseconds, and making a queryset and looking the connection up again for each was a
    measurable part of what is Python's in it.
    """
    postgres = connection.vendor == "postgresql"
    # The same for every message of the call, so sent once.
    shared = [
        key,
        json.dumps(headers) if headers else "{}",
        connection.ops.adapt_datetimefield_value(now),
    ]
    ids: list[int] = []
    for start in range(0, len(bodies), INSERT_BATCH):
        batch = bodies[start : start + INSERT_BATCH]
        payloads = [None if b is None or isinstance(b, bytes) else json.dumps(b) for b in batch]
        blobs = [b if isinstance(b, bytes) else None for b in batch]
        single = len(batch) == 1
        params: list[Any]
        if single:
            params = [payloads[0], blobs[0], *shared]
        elif postgres:
            params = [*shared, payloads, blobs]
        else:
            params = [*shared]
            for n, row in enumerate(zip(payloads, blobs, strict=True)):
                params += [n, *row]
        params.append(topic)
        notify = bool(postgres and wake and start == 0)
        if notify:
            params.append(wake)
        # One statement for every batch on PostgreSQL, one per size on SQLite.
        rows = min(len(batch), 2) if postgres else len(batch)
        sql = _insert_sql(connection.vendor, rows, notify)
        with connection.wrap_database_errors, bound_cursor(connection, keep=single) as cursor:
            cursor.execute(sql, params)
            found = [row[0] for row in cursor.fetchall()]
        found.sort()
        if not found:
            return None
        ids += found
    return ids
