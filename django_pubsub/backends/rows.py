"""What the backends hand back and take: a claimed delivery with its message, a fan-out's
result, the leases a fan-out may take, the wake-up thread; and lists of ids in few shapes.
No SQL here, and no models."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any, NamedTuple, Protocol


def decode_body(payload: str | None, payload_bytes: bytes | memoryview | None) -> Any:
    """A message's payload as published, from its columns as the database returns them:
    bytes for binary payloads, JSON data decoded from its text otherwise."""
    if payload_bytes is not None:
        return bytes(payload_bytes)
    return None if payload is None else json.loads(payload)


class Claimed(NamedTuple):
    """A delivery just leased, with what its handler needs of its message."""

    delivery_id: int
    attempt: int
    message_id: int
    offset: int
    payload: Any
    key: str | None
    headers: dict[str, str]
    published_at: datetime
    # The message's expires_at: a delivery leased after it is not to run.
    expires_at: datetime | None = None
    # Ended dead unrun by the claim (a keyed subscription whose key has a dead letter
    # before it, on_dead="dead_letter_key"): not to run.
    buried: bool = False

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> Claimed:
        """From the columns delivery id, attempt, message id, offset, payload as JSON
        text, payload bytes, key, headers as JSON text, published at, expires at."""
        payload = decode_body(row[4], row[5])
        headers = json.loads(row[7]) or {}
        return cls(row[0], row[1], row[2], row[3], payload, row[6], headers, row[8], row[9])

    def expired_by(self, now: datetime) -> bool:
        """Whether its message expired by ``now``: then it ends "expired", unrun."""
        return self.expires_at is not None and self.expires_at <= now


class Lease(NamedTuple):
    """What a fan-out may lease of the deliveries it creates for one unordered
    subscription: up to ``limit`` of them, to ``token`` until ``expires`` (counted from
    when the fan-out holds its locks)."""

    subscription_id: int
    limit: int
    token: str
    expires: datetime


class FanOut(NamedTuple):
    # Deliveries created.
    created: int
    # Those leased as they were created, by subscription id.
    leased: dict[int, list[Claimed]]


class Waker(Protocol):
    """A thread that calls its wake function when another connection commits new
    messages; polling stays the safety net."""

    # Set while it listens for commits.
    ready: threading.Event

    def stop(self) -> None: ...


PADDED_STEP = 1024


def padded_ids(ids: Iterable[int]) -> list[int]:
    """``ids`` with negative ids (which no row has) added up to the next power of two, or
    past 1,024 to the next multiple of 1,024; an empty list stays empty (no query at all).

    The dispatcher's statements that list ids would otherwise take a new shape for every
    count, and each shape is a statement the database driver prepares and keeps: on
    SQLite a hundred and twenty-eight of them a connection, about 10 MB more memory in a
    busy dispatcher before that cache is full. So a few shapes serve every count, and a
    list of the most a dispatcher holds stays under SQLite's 32,766 parameters a
    statement. (Distinct fillers: the ORM drops repeated values from an IN list.)
    """
    found = list(ids)
    count = len(found)
    if count <= 1:
        return found
    size = 1 << (count - 1).bit_length()
    if size > PADDED_STEP:
        size = -(-count // PADDED_STEP) * PADDED_STEP
    return found + list(range(-1, count - size - 1, -1))


def in_list(ids: Sequence[int]) -> tuple[str, list[Any]]:
    """``IN (...)`` for ``ids``, padded to few shapes, and its parameters."""
    params = padded_ids(ids)
    return f"IN ({', '.join(['%s'] * len(params))})", params
