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
