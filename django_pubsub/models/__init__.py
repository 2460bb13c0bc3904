"""Topics, their ordered log of messages, subscriptions, per-message deliveries, and the
dispatchers' heartbeat rows; a module each, and every state transition on its model.

How a message travels: ``publish()`` inserts it unsequenced (``log``); the dispatcher
sequences it and fans it out past each subscription's cursor into deliveries
(``subscription``); deliveries are claimed, acked, retried or dead-lettered
(``delivery``). What SQL that takes on each database is the backends' (``backends/``).
"""

from __future__ import annotations

from ..backends import Claimed
from .delivery import Delivery, DeliveryQuerySet
from .dispatcher import Dispatcher, DispatcherQuerySet, pid_namespace
from .log import Message, MessageQuerySet, Topic
from .subscription import Seek, Subscription, starting_position

__all__ = [
    "Claimed",
    "Delivery",
    "DeliveryQuerySet",
    "Dispatcher",
    "DispatcherQuerySet",
    "Message",
    "MessageQuerySet",
    "Seek",
    "Subscription",
    "Topic",
    "pid_namespace",
    "starting_position",
]
