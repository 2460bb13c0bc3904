"""publish() and publish_many(): validate everything, then insert in the caller's transaction."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from contextlib import nullcontext
from datetime import datetime, timedelta
from typing import Any

from django.db import DEFAULT_DB_ALIAS, IntegrityError, connections, transaction
from django.utils import timezone

from . import backends, backpressure, signals
from .backends.base import INSERT_BATCH
from .conf import pubsub_settings
from .exceptions import InvalidPayload, PubSubError
from .validation import check_headers, check_key, check_payload, check_schedule, check_topic

# Rounds of insert, look up, forget a key older than the window: two suffice unless other
# publishers of the same key keep coming and going.
DEDUP_TRIES = 5


def publish(
    topic: str,
    payload: Any,
    *,
    key: str | None = None,
    headers: Mapping[str, str] | None = None,
    deliver_at: datetime | None = None,
    delay: float | timedelta | None = None,
    expires_at: datetime | None = None,
    ttl: float | timedelta | None = None,
    dedup_key: str | None = None,
) -> int:
    """Publish one message to ``topic``; return its id.

    The row is written on the default database inside the caller's transaction: if that
    transaction rolls back, nothing is published. Outside a transaction it commits at once.

    ``deliver_at`` (or ``delay``, seconds or a timedelta from now): the message joins the
    topic's log then, and no subscription runs it before. ``expires_at`` (or ``ttl``,
    counted from when it is due): a delivery of it not started by then ends "expired",
    unrun.

    ``dedup_key``: if the topic has a message published with the same key within
    ``PUBSUB["DEDUP_WINDOW"]``, nothing is written and that message's id is returned. A
    publish of the same key in a transaction not yet committed is waited for (on
    PostgreSQL; SQLite has one writer at a time): its id once it commits, this one's if
    it rolls back.
    """
    check_topic(topic)
    key = check_key(key)
    dedup_key = check_key(dedup_key, "dedup_key")
    header_dict = check_headers(headers)
    body = check_payload(payload, pubsub_settings.max_payload_bytes)
    now = timezone.now()
    schedule = check_schedule(now, deliver_at, delay, expires_at, ttl)
    backpressure.check(topic)
    if dedup_key is not None:
        return _write_once(topic, body, key, header_dict, now, schedule, dedup_key)
    return _write(topic, [body], key, header_dict, now, schedule)[0]


def publish_many(
    topic: str,
    payloads: Iterable[Any],
    *,
    key: str | None = None,
    headers: Mapping[str, str] | None = None,
    deliver_at: datetime | None = None,
    delay: float | timedelta | None = None,
    expires_at: datetime | None = None,
    ttl: float | timedelta | None = None,
) -> list[int]:
    """Publish several messages to ``topic`` atomically, in order; return their ids.
    The keywords apply to every one of them, as publish() says."""
    check_topic(topic)
    key = check_key(key)
    header_dict = check_headers(headers)
    now = timezone.now()
    schedule = check_schedule(now, deliver_at, delay, expires_at, ttl)
    if isinstance(payloads, str | bytes | bytearray | Mapping) or not isinstance(
        payloads, Iterable
    ):
        raise InvalidPayload(
            f"publish_many() takes an iterable of payloads (such as a list), not "
            f"{type(payloads).__name__}."
        )
    checked = []
    max_bytes = pubsub_settings.max_payload_bytes
    for index, payload in enumerate(payloads):
        try:
            checked.append(check_payload(payload, max_bytes))
        except InvalidPayload as exc:
            raise InvalidPayload(f"payloads[{index}]: {exc}") from None
    if not checked:
        return []
    backpressure.check(topic)
    return _write(topic, checked, key, header_dict, now, schedule)


def _write(
    topic: str,
    checked: list[str | bytes | None],
    key: str | None,
    header_dict: dict[str, str],
    now: datetime,
    schedule: tuple[datetime | None, datetime | None],
) -> list[int]:
    """Insert checked payloads (as check_payload() returns them: JSON text, bytes or None);
    tell the receivers of message_published."""
    from .models import Message

    # The default database, as documented (docs/guarantees.md), whatever a router says of
    # reads: the caller's transaction is there, and a replica would refuse the write.
    connection = connections[DEFAULT_DB_ALIAS]
    backend = backends.for_connection(connection)
    # No savepoint: a failed insert spoils the caller's transaction either way, and two
    # round trips per publish are worth saving. Outside a transaction, one statement
    # commits on its own; more need a transaction of their own.
    single = len(checked) <= INSERT_BATCH and not connection.in_atomic_block
    with nullcontext() if single else transaction.atomic(savepoint=False):
        insert = functools.partial(
            backend.insert_messages, key=key, headers=header_dict, now=now, schedule=schedule
        )
        ids = insert(topic, checked)
        if ids is None:  # the first message of this topic: create it, then insert
            _create_topic(topic)
            ids = insert(topic, checked)
    assert ids is not None
    signals.send(signals.message_published, Message, savepoint=True, topic=topic, ids=ids)
    return ids


def _write_once(
    topic: str,
    body: str | bytes | None,
    key: str | None,
    header_dict: dict[str, str],
    now: datetime,
    schedule: tuple[datetime | None, datetime | None],
    dedup_key: str,
) -> int:
    """publish(dedup_key=): insert unless the topic has the key (within the window); the
    id of whichever message holds it."""
    from .models import Message

    backend = backends.for_connection(connections[DEFAULT_DB_ALIAS])
    window = pubsub_settings.dedup_window
    insert = functools.partial(
        backend.insert_messages,
        key=key,
        headers=header_dict,
        now=now,
        schedule=schedule,
        dedup_key=dedup_key,
    )
    # A few statements: in a transaction of their own outside the caller's.
    with transaction.atomic(savepoint=False):
        for _ in range(DEDUP_TRIES):
            ids = insert(topic, [body])
            if ids:
                signals.send(
                    signals.message_published, Message, savepoint=True, topic=topic, ids=ids
                )
                return ids[0]
            # Nothing written: the key is taken (by a committed message: a transaction that
            # was writing it has ended), or the topic is new.
            seen = (
                Message.objects.filter(topic__name=topic, dedup_key=dedup_key)
                .values_list("pk", "published_at")
                .first()
            )
            if seen is None:
                _create_topic(topic)
            elif window is None or seen[1] > now - timedelta(seconds=window):
                return int(seen[0])
            else:  # remembered longer than the window: forget it, and publish again
                Message.objects.filter(pk=seen[0], dedup_key=dedup_key).update(dedup_key=None)
    raise PubSubError(
        f"publish(dedup_key={dedup_key!r}) to {topic!r} did not settle in {DEDUP_TRIES} "
        f"tries (other publishers of the same key kept changing it); nothing was written."
    )


def _create_topic(name: str) -> None:
    from .models import Topic

    try:
        with transaction.atomic():
            Topic.objects.create(name=name)
    except IntegrityError:
        pass  # another transaction created it first
