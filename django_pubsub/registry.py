"""The @subscriber decorator and the plain registry it records into.

The registry holds declarations only; it never touches the database. Subscription rows are
synced from it by ``sync.py``.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

from django.core.exceptions import ImproperlyConfigured

from .conf import DELIVERY_CHOICES, ON_DEAD_CHOICES, START_CHOICES
from .exceptions import AlreadyRegistered, InvalidSubscriber
from .retry import Backoff
from .validation import (
    COUNT,
    NAME_RE,
    SECONDS,
    check_start,
    check_text,
    check_topic,
    is_positive_int,
    is_positive_number,
    parse_rate,
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
    ordered: bool | str | None = None
    max_attempts: int | None = None
    lease: float | None = None
    timeout: float | None = None
    max_inflight: int | None = None
    start: str | None = None
    backoff: Backoff | None = None
    on_dead: str | None = None
    delivery: str | None = None
    batch_size: int | None = None
    batch_wait: float | None = None
    # circuit_breaker=: failures in a row with one exception type, and the pause's seconds.
    breaker_failures: int | None = None
    breaker_pause: float | None = None
    # rate=, as declared ("100/s"); None: no limit.
    rate: str | None = None
    # filter=, as canonical JSON text ({"headers": {...}, "key": ...}); None: every message.
    message_filter: str | None = None


# The most messages one batch handler call takes.
MAX_BATCH_SIZE = 10_000


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


def check_handler(func: Any, delivery: str | None = None) -> None:
    """Refuse at declaration what could not run as a handler: what is not a function of
    one argument (a message, or a batch's list of them), async generators, and an async
    function that would have to run inside a transaction."""
    if isinstance(func, staticmethod | classmethod) or not callable(func):
        raise InvalidSubscriber(f"@subscriber must decorate a module-level function, not {func!r}.")
    if inspect.isasyncgenfunction(func) or inspect.isgeneratorfunction(func):
        raise InvalidSubscriber(
            f"@subscriber cannot take {handler_name(func)}: it is a generator, whose body "
            f"would not run when called. Write it with def or async def, without yield."
        )
    if inspect.iscoroutinefunction(func) and delivery == "transactional":
        raise InvalidSubscriber(
            f'@subscriber delivery="transactional" needs a def handler: '
            f"{handler_name(func)} is async, and Django's transaction.atomic() works only "
            f"in synchronous code."
        )
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):  # no signature to read (some builtins): let it be
        return
    try:
        signature.bind(object())
    except TypeError:
        raise InvalidSubscriber(
            f"@subscriber handlers are called with one argument, the message (or a batch's "
            f"list of messages); "
            f"{handler_name(func)}{signature} cannot be."
        ) from None


def handler_name(func: Any) -> str:
    return str(getattr(func, "__qualname__", None) or repr(func))


def subscriber(
    topic: str,
    *,
    name: str,
    ordered: bool | str | None = None,
    max_attempts: int | None = None,
    lease: float | None = None,
    timeout: float | None = None,
    max_inflight: int | None = None,
    start: str | datetime | tuple[str, int] | None = None,
    backoff: Backoff | Mapping[str, float] | None = None,
    on_dead: str | None = None,
    delivery: str | None = None,
    batch_size: int | None = None,
    batch_wait: float | None = None,
    circuit_breaker: int | Mapping[str, float | None] | None = None,
    filter: Mapping[str, Any] | None = None,
    rate: str | None = None,
) -> Callable[[H], H]:
    """Declare ``func`` as the handler of the subscription ``name`` on ``topic``.

    ``name`` is the subscription's identity: moving or renaming the function keeps it.
    ``ordered="key"``: messages of one key run in offset order, keys in parallel.
    ``batch_size``: the handler takes a list of at most that many messages, gathered for
    at most ``batch_wait`` seconds. ``delivery``: "at_least_once" (the default),
    "at_most_once" or "transactional". ``circuit_breaker``: N (or {"failures": N,
    "pause": seconds}): N failures in a row with one exception type pause the
    subscription (for that long, or until resumed). ``filter``: {"headers": {name: value},
    "key": key}: only messages with all of these get a delivery to run; the others are
    "filtered" at fan-out. ``rate``: "100/s" (or /min, /hour, /day): at most that many
    starts of its handler, across all dispatchers. See docs/reference/api.md.
    """
    check_topic(topic)
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise InvalidSubscriber(
            f"@subscriber name must be 1 to 200 characters from A-Z, a-z, 0-9, '.', '_' "
            f"and '-'; got {name!r}."
        )
    if not (ordered is None or isinstance(ordered, bool) or ordered == "key"):
        raise InvalidSubscriber(
            f'@subscriber ordered must be True, False, "key" or None, not {ordered!r}.'
        )
    _check_modes(ordered, on_dead, delivery, max_attempts)
    _check_batch(batch_size, batch_wait)
    breaker_failures, breaker_pause = _check_breaker(circuit_breaker)
    message_filter = _check_filter(filter)
    if rate is not None:
        try:
            parse_rate(rate)
        except ValueError as exc:
            raise InvalidSubscriber(f"@subscriber {exc}.") from None
    _optional_positive(max_attempts, "max_attempts", int)
    _optional_positive(max_inflight, "max_inflight", int)
    _optional_positive(lease, "lease", float)
    _optional_positive(timeout, "timeout", float)
    try:
        start_label = check_start(start, START_CHOICES)
    except ValueError as exc:
        raise InvalidSubscriber(f"@subscriber {exc}.") from None
    try:
        coerced_backoff = Backoff.coerce(backoff)
    except ImproperlyConfigured as exc:
        raise InvalidSubscriber(f"@subscriber {exc}") from None

    def decorate(func: H) -> H:
        check_handler(func, delivery)
        spec = SubscriberSpec(
            name=name,
            topic=topic,
            handler=handler_path(func),
            ordered=ordered,
            max_attempts=max_attempts,
            lease=float(lease) if lease is not None else None,
            timeout=float(timeout) if timeout is not None else None,
            max_inflight=max_inflight,
            start=start_label,
            backoff=coerced_backoff,
            on_dead=on_dead,
            delivery=delivery,
            batch_size=batch_size,
            batch_wait=float(batch_wait) if batch_wait is not None else None,
            breaker_failures=breaker_failures,
            breaker_pause=breaker_pause,
            message_filter=message_filter,
            rate=rate,
        )
        register(spec)
        return func

    return decorate


def _check_modes(ordered: object, on_dead: object, delivery: object, max_attempts: object) -> None:
    if on_dead is not None and on_dead not in ON_DEAD_CHOICES:
        raise InvalidSubscriber(
            f'@subscriber on_dead must be "continue", "dead_letter_key" or None, not {on_dead!r}.'
        )
    if on_dead == "dead_letter_key" and ordered != "key":
        raise InvalidSubscriber(
            f'@subscriber on_dead="dead_letter_key" needs ordered="key" (it dead-letters the '
            f"rest of a dead message's key); ordered is {ordered!r}."
        )
    if delivery is not None and delivery not in DELIVERY_CHOICES:
        raise InvalidSubscriber(
            f'@subscriber delivery must be "at_least_once", "at_most_once", "transactional" '
            f"or None, not {delivery!r}."
        )
    if delivery == "at_most_once" and max_attempts not in (None, 1):
        raise InvalidSubscriber(
            f'@subscriber delivery="at_most_once" runs each message at most once: '
            f"max_attempts must be 1 or None, not {max_attempts!r}."
        )


def _check_batch(batch_size: object, batch_wait: object) -> None:
    if batch_size is not None and not is_positive_int(batch_size, MAX_BATCH_SIZE):
        raise InvalidSubscriber(
            f"@subscriber batch_size must be an integer from 1 to {MAX_BATCH_SIZE}, or "
            f"None; not {batch_size!r}."
        )
    if batch_wait is None:
        return
    if batch_size is None:
        raise InvalidSubscriber(
            "@subscriber batch_wait needs batch_size: it is how long a batch gathers."
        )
    zero = isinstance(batch_wait, int | float) and batch_wait == 0
    if isinstance(batch_wait, bool) or not (zero or is_positive_number(batch_wait, 3600)):
        raise InvalidSubscriber(
            f"@subscriber batch_wait must be a number of seconds from 0 to 3600, or None; "
            f"not {batch_wait!r}."
        )


def _check_filter(spec: object) -> str | None:
    """filter= as canonical JSON text: {"headers": {str: str, ...}, "key": str}, either
    part optional, at least one condition."""
    if spec is None:
        return None
    problem = ""
    if not isinstance(spec, Mapping) or not spec or set(spec) - {"headers", "key"}:
        problem = 'a dict with "headers" (a dict of str to str) and/or "key" (a str)'
    else:
        headers, key = spec.get("headers", {}), spec.get("key")
        if not isinstance(headers, Mapping) or not all(
            isinstance(name, str) and isinstance(value, str) for name, value in headers.items()
        ):
            problem = '"headers" must be a dict of str to str'
        elif key is not None and not (isinstance(key, str) and key):
            problem = '"key" must be a non-empty str'
        elif not headers and key is None:
            problem = "at least one header or a key"
        else:
            try:  # what the database can store, on both
                for text in [*headers, *headers.values(), *([key] if key else [])]:
                    check_text(text, "a filter's text")
            except ValueError as exc:
                problem = f"text it can store ({exc})"
    if problem:
        raise InvalidSubscriber(f"@subscriber filter needs {problem}; not {spec!r}.")
    assert isinstance(spec, Mapping)
    return json.dumps(
        {name: dict(value) if name == "headers" else value for name, value in spec.items()},
        sort_keys=True,
    )


def _check_breaker(breaker: object) -> tuple[int | None, float | None]:
    """circuit_breaker= as (failures, pause seconds or None)."""
    if breaker is None:
        return None, None
    failures: object = breaker
    pause: object = None
    if isinstance(breaker, Mapping):
        unknown = sorted(set(breaker) - {"failures", "pause"})
        failures, pause = breaker.get("failures"), breaker.get("pause")
        if unknown:
            failures = None  # refused below, naming the keys
    if not is_positive_int(failures, 1_000_000) or not (pause is None or is_positive_number(pause)):
        raise InvalidSubscriber(
            f"@subscriber circuit_breaker must be a number of failures from 1 to 1000000, or "
            f'{{"failures": N, "pause": seconds or None}} (pause {SECONDS}); not {breaker!r}.'
        )
    assert isinstance(failures, int)
    return failures, None if pause is None else float(pause)  # type: ignore[arg-type]


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
