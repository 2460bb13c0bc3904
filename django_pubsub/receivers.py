"""Signal receivers the app connects in ready()."""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger("django_pubsub.sync")


def sync_after_migrate(sender: Any, using: str = "default", **kwargs: Any) -> None:
    """Bring Subscription rows in line with the code after every migrate (and flush)."""
    from .exceptions import InvalidSubscriber
    from .sync import sync_subscriptions

    if using == "default":
        try:
            sync_subscriptions(using=using)
        except InvalidSubscriber as exc:
            # The checks (E006) report it; migrate itself has done its work.
            logger.error("subscriptions not brought in line with the code: %s", exc)
