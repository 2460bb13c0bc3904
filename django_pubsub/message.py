"""The snapshot a handler receives."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any


@dataclass(frozen=True, slots=True)
class Message:
    """One delivery of one message to one subscription, as the handler sees it.

    A frozen copy, not a model instance: handlers cannot change what was published.
    """

    id: int
    offset: int
    topic: str
    payload: Any
    key: str | None
    headers: Mapping[str, str]
    published_at: datetime
    attempt: int
    subscription: str
    delivery_id: int
    # The subscription's delivery mode: "at_least_once", "at_most_once" (this attempt is
    # the only one) or "transactional" (the handler runs in the transaction of its ack).
    delivery: str = "at_least_once"
