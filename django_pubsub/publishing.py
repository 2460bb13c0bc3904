"""publish() and publish_many(): validate everything, then insert in the caller's transaction."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from contextlib import nullcontext
from datetime import datetime, timedelta
from typing import Any

from django.db import DEFAULT_DB_ALIAS, IntegrityError, connections, transaction
from django.utils import timezone

from . import backends, signals
from .backends.base import INSERT_BATCH
from .conf import pubsub_settings
from .exceptions import InvalidPayload
from .validation import check_headers, check_key, check_payload, check_schedule, check_topic


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
) -> int:
    """Publish one message to ``topic``; return its id.

    The row is written on the default database inside the caller's transaction: if that
    transaction rolls back, nothing is published. Outside a transaction it commits at once.

    ``deliver_at`` (or ``delay``, seconds or a timedelta from now): the message joins the
    topic's log then, and no subscription runs it before. ``expires_at`` (or ``ttl``,
    counted from when it is due): a delivery of it not started by then ends "expired",
    unrun.
    """
    check_topic(topic)
    key = check_key(key)
    header_dict = check_headers(headers)
    body = check_payload(payload, pubsub_settings.max_payload_bytes)
    now = timezone.now()
    schedule = check_schedule(now, deliver_at, delay, expires_at, ttl)
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


def _create_topic(name: str) -> None:
    from .models import Topic

    try:
        with transaction.atomic():
            Topic.objects.create(name=name)
    except IntegrityError:
        pass  # another transaction created it first
