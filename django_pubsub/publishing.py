"""publish() and publish_many(): validate everything, then insert in the caller's transaction."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from django.db import IntegrityError, transaction
from django.utils import timezone

from .exceptions import InvalidPayload
from .validation import check_headers, check_key, check_payload, check_topic
from .wakeups import notify


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
    return publish_many(topic, [payload], key=key, headers=headers)[0]


def publish_many(
    topic: str,
    payloads: Iterable[Any],
    *,
    key: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> list[int]:
    """Publish several messages to ``topic`` atomically, in order; return their ids."""
    from .models import Message

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
    now = timezone.now()
    with transaction.atomic():
        topic_id = _topic_id(topic)
        rows = [
            Message(
                topic_id=topic_id,
                payload=None if isinstance(body, bytes) else body,
                payload_bytes=body if isinstance(body, bytes) else None,
                key=key,
                headers=header_dict,
                published_at=now,
            )
            for body in checked
        ]
        created = Message.objects.bulk_create(rows)
        notify()
    return [message.pk for message in created]


def _topic_id(name: str) -> int:
    from .models import Topic

    found = Topic.objects.filter(name=name).values_list("pk", flat=True).first()
    if found is not None:
        return found
    try:
        with transaction.atomic():
            return Topic.objects.create(name=name).pk
    except IntegrityError:
        # Another transaction created it first.
        return Topic.objects.get(name=name).pk
