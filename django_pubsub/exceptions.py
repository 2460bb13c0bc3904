"""Errors raised by django-pubsub. Each one names the call that received the bad input."""

from __future__ import annotations

from django.core.exceptions import ImproperlyConfigured


class PubSubError(Exception):
    """Base class of every error django-pubsub raises on purpose."""


class InvalidTopic(PubSubError, ValueError):
    """A topic name outside ``[A-Za-z0-9._-]{1,200}``."""


class InvalidPayload(PubSubError, TypeError):
    """A payload that is neither JSON-serialisable data nor bytes."""


class InvalidHeaders(PubSubError, TypeError):
    """Headers that are not a dict of str to str."""


class InvalidKey(PubSubError, TypeError):
    """A message key that is not a short string."""


class InvalidSubscriber(PubSubError, ImproperlyConfigured):
    """A ``@subscriber`` declaration that cannot work as written."""


class AlreadyRegistered(InvalidSubscriber):
    """Two different handlers declared with the same subscription name."""


class HandlerImportError(InvalidSubscriber):
    """A subscription's handler path does not import."""


class InvalidSeek(PubSubError, ValueError):
    """A seek with neither or both of an offset and a time, or past the topic's end."""


class ActionRefused(PubSubError):
    """An operator action that cannot be done now without breaking a guarantee; nothing
    was changed. The message says what to do first."""
