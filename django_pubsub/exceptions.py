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


class InvalidSchedule(PubSubError, ValueError):
    """A ``deliver_at``/``delay`` or ``expires_at``/``ttl`` that cannot work as given."""


class Backpressure(PubSubError):
    """publish() to a topic whose slowest subscription is further behind than its
    PUBSUB["BACKPRESSURE"] limit, with the policy "reject": nothing was written."""

    def __init__(self, topic: str, backlog: int, limit: int, subscription: str) -> None:
        self.topic, self.backlog, self.limit = topic, backlog, limit
        self.subscription = subscription
        super().__init__(
            f"topic {topic!r} is backed up: its slowest subscription ({subscription}) has "
            f"{backlog:,} messages unfinished, its limit is {limit:,} "
            f"(PUBSUB['BACKPRESSURE']); nothing was published. Try again later."
        )


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


class BatchFailure(Exception):
    """Raised by a batch handler to fail only some of its messages: the ones named (by
    message id, or the Message itself) fail, each with its own attempt count, backoff and
    dead letter; the rest of the batch is acked.

    ``failed``: ids or messages, or a mapping of them to the exception (or text) to
    record for each. In an ordered or keyed subscription the messages after a failed one
    of the same order fail with it: they would otherwise be acked ahead of it.
    """

    def __init__(self, failed: object, message: str = "") -> None:
        from collections.abc import Iterable, Mapping

        if isinstance(failed, Mapping):
            pairs = list(failed.items())
        elif isinstance(failed, Iterable) and not isinstance(failed, str | bytes):
            pairs = [(item, None) for item in failed]
        else:
            raise TypeError(
                f"BatchFailure takes the failed messages' ids (or the messages) as a list, "
                f"set or dict; not {type(failed).__name__}."
            )
        self.failed: dict[int, object] = {}
        for item, why in pairs:
            key = getattr(item, "id", item)
            if isinstance(key, bool) or not isinstance(key, int):
                raise TypeError(f"BatchFailure: {item!r} is neither a message id nor a Message.")
            self.failed[key] = why
        super().__init__(message or f"{len(self.failed)} message(s) of the batch failed")
