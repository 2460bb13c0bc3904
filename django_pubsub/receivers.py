"""Signal receivers the app connects in ready()."""

from __future__ import annotations

from typing import Any


def sync_after_migrate(sender: Any, using: str = "default", **kwargs: Any) -> None:
    """Bring Subscription rows in line with the code after every migrate (and flush)."""
    from .sync import sync_subscriptions

    if using == "default":
        sync_subscriptions(using=using)
