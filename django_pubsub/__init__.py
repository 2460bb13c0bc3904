"""Durable publish/subscribe inside your Django project's own database.

Importing this package imports no models, so it is safe in settings and app modules.
"""

from __future__ import annotations

from .exceptions import BatchFailure
from .message import Message
from .publishing import publish, publish_many
from .registry import subscriber
from .retry import Backoff

__all__ = ["Backoff", "BatchFailure", "Message", "publish", "publish_many", "subscriber"]
