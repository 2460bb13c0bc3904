"""The @subscriber decorator and the plain registry it records into.

The registry holds declarations only; it never touches the database. Subscription rows are
synced from it by ``sync.py``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from django.core.exceptions import ImproperlyConfigured

from .conf import START_CHOICES
from .exceptions import AlreadyRegistered, InvalidSubscriber
from .retry import Backoff
from .validation import (
    COUNT,
    NAME_RE,
    SECONDS,
    check_topic,
    is_positive_int,
    is_positive_number,
)

if TYPE_CHECKING:
    from .message import Message

Handler = Callable[["Message"], Any]
H = TypeVar("H", bound=Handler)


@dataclass(frozen=True)
class SubscriberSpec:
    """What one @subscriber declaration asked for; None means "the PUBSUB setting applies"."""

    name: str
    topic: str
    handler: str
    ordered: bool | None = None
    max_attempts: int | None = None
    lease: float | None = None
    timeout: float | None = None
    max_inflight: int | None = None
    start: str | None = None
    backoff: Backoff | None = None


_registry: dict[str, SubscriberSpec] = {}


def _optional_positive(value: object, name: str, kind: type) -> None:
    if value is None:
        return
    if not (is_positive_int(value) if kind is int else is_positive_number(value)):
        expected = COUNT if kind is int else SECONDS
        raise InvalidSubscriber(f"@subscriber {name} must be {expected}, or None; not {value!r}.")


def handler_path(func: Callable[..., Any]) -> str:
    module = getattr(func, "__module__", None)
    qualname = getattr(func, "__qualname__", None)
    # A dotted qualname is a method or a staticmethod: import_string() cannot find it.
    if not module or not qualname or "<" in qualname or "." in qualname or module == "__main__":
        raise InvalidSubscriber(
            f"@subscriber needs a module-level function that can be imported by its dotted "
            f"path; {func!r} cannot be (define it at the top level of an app module)."
        )
    return f"{module}.{qualname}"


def check_handler(func: Any) -> None:
    """Refuse at declaration what could not run as a handler: what is not a function of
    one message, and async functions, whose body a thread would never run."""
    if isinstance(func, staticmethod | classmethod) or not callable(func):
        raise InvalidSubscriber(f"@subscriber must decorate a module-level function, not {func!r}.")
    if inspect.iscoroutinefunction(func) or inspect.isasyncgenfunction(func):
        raise InvalidSubscriber(
            f"@subscriber cannot take {handler_name(func)}: it is an async function, and "
            f"handlers run in worker threads, where its body would never run. Write it with "
            f"def (call async code from it with asgiref.sync.async_to_sync)."
        )
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):  # no signature to read (some builtins): let it be
        return
    try:
        signature.bind(object())
    except TypeError:
        raise InvalidSubscriber(
            f"@subscriber handlers are called with one argument, the message; "
            f"{handler_name(func)}{signature} cannot be."
        ) from None


def handler_name(func: Any) -> str:
    return str(getattr(func, "__qualname__", None) or repr(func))


def subscriber(
    topic: str,
    *,
    name: str,
    ordered: bool | None = None,
    max_attempts: int | None = None,
    lease: float | None = None,
    timeout: float | None = None,
    max_inflight: int | None = None,
    start: str | None = None,
    backoff: Backoff | Mapping[str, float] | None = None,
) -> Callable[[H], H]:
    """Declare ``func`` as the handler of the subscription ``name`` on ``topic``.

    ``name`` is the subscription's identity: moving or renaming the function keeps it.
    """
    check_topic(topic)
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise InvalidSubscriber(
            f"@subscriber name must be 1 to 200 characters from A-Z, a-z, 0-9, '.', '_' "
            f"and '-'; got {name!r}."
        )
    if ordered is not None and not isinstance(ordered, bool):
        raise InvalidSubscriber(
            f"@subscriber ordered must be True, False or None, not {ordered!r}."
        )
    _optional_positive(max_attempts, "max_attempts", int)
    _optional_positive(max_inflight, "max_inflight", int)
    _optional_positive(lease, "lease", float)
    _optional_positive(timeout, "timeout", float)
    if start is not None and start not in START_CHOICES:
        raise InvalidSubscriber(
            f'@subscriber start must be "latest", "earliest" or None, not {start!r}.'
        )
    try:
        coerced_backoff = Backoff.coerce(backoff)
    except ImproperlyConfigured as exc:
        raise InvalidSubscriber(f"@subscriber {exc}") from None

    def decorate(func: H) -> H:
        check_handler(func)
        spec = SubscriberSpec(
            name=name,
            topic=topic,
            handler=handler_path(func),
            ordered=ordered,
            max_attempts=max_attempts,
            lease=float(lease) if lease is not None else None,
            timeout=float(timeout) if timeout is not None else None,
            max_inflight=max_inflight,
            start=start,
            backoff=coerced_backoff,
        )
        register(spec)
        return func

    return decorate


def register(spec: SubscriberSpec) -> None:
    existing = _registry.get(spec.name)
    # Importing a module twice re-runs its decorators; only a different declaration clashes.
    if existing is not None and existing != spec:
        raise AlreadyRegistered(
            f"Subscription name {spec.name!r} is declared twice: by {existing.handler} on "
            f"{existing.topic!r} and by {spec.handler} on {spec.topic!r}. Names are the "
            f"subscriptions' identity and must be unique."
        )
    _registry[spec.name] = spec


def get_specs() -> dict[str, SubscriberSpec]:
    return dict(_registry)


def unregister(name: str) -> None:
    _registry.pop(name, None)


def reset() -> None:
    """Forget every declaration (for tests)."""
    _registry.clear()
