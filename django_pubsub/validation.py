"""Input checks shared by publish() and @subscriber: fail at the call, before any write."""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any, TypeGuard

from django.conf import settings
from django.utils import timezone

from .exceptions import InvalidHeaders, InvalidKey, InvalidPayload, InvalidSchedule, InvalidTopic

NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,200}")
KEY_MAX_LENGTH = 255


def check_topic(topic: object) -> str:
    if not isinstance(topic, str) or not NAME_RE.fullmatch(topic):
        raise InvalidTopic(
            f"Topic names are 1 to 200 characters from A-Z, a-z, 0-9, '.', '_' and '-'; "
            f"got {topic!r}."
        )
    return topic


def check_key(key: object, name: str = "key") -> str | None:
    """A message's key or dedup key (``name``): None, or a short string."""
    if key is None:
        return None
    if not isinstance(key, str) or not 0 < len(key) <= KEY_MAX_LENGTH:
        raise InvalidKey(
            f"{name} must be None or a string of 1 to {KEY_MAX_LENGTH} characters; got {key!r}."
        )
    _check_text(key, name, InvalidKey)
    return key


def check_headers(headers: object) -> dict[str, str]:
    if headers is None:
        return {}
    if not isinstance(headers, Mapping):
        raise InvalidHeaders(f"headers must be a dict of str to str; got {type(headers).__name__}.")
    for name, value in headers.items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise InvalidHeaders(f"headers must map str to str; {name!r}: {value!r} is not.")
        _check_text(name, f"the header name {name!r}", InvalidHeaders)
        _check_text(value, f"headers[{name!r}]", InvalidHeaders)
    return dict(headers)


def check_payload(payload: object, max_bytes: int) -> str | bytes | None:
    """What is stored of a payload: bytes for binary payloads, the JSON text of JSON data
    (None for None). Raises InvalidPayload unless the value survives JSON unchanged, fits
    both databases' columns and ``max_bytes``."""
    body: str | bytes
    if isinstance(payload, bytes | bytearray | memoryview):
        body = bytes(payload)
        size = len(body)
    elif payload is None:
        return None
    else:
        try:
            _check_json(payload, "payload")
        except RecursionError:
            raise InvalidPayload("payload is nested too deeply to be stored as JSON.") from None
        # ASCII only (the default): its length is its size in bytes.
        body = json.dumps(payload, allow_nan=False)
        size = len(body)
    if size > max_bytes:
        raise InvalidPayload(
            f"payload is {size:,} bytes{' as JSON' if isinstance(body, str) else ''}, more "
            f"than PUBSUB['MAX_PAYLOAD_BYTES'] ({max_bytes:,}); store large content elsewhere "
            f"and publish a reference to it."
        )
    return body


def _check_text(text: str, where: str, error: type[Exception] = InvalidPayload) -> None:
    """Refuse what PostgreSQL cannot store in text or JSON (and so refuse it on every
    database): NUL characters and lone surrogates, which no UTF-8 can encode."""
    if "\x00" in text:
        raise error(f"{where} contains a NUL character (\\x00), which cannot be stored.")
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise error(
            f"{where} contains {text[exc.start : exc.end]!r} at index {exc.start}, a lone "
            f"surrogate that is not valid Unicode text and cannot be stored."
        ) from None


def check_text(text: str, where: str) -> None:
    """As publish() checks text, for other callers: raises ValueError."""
    _check_text(text, where, ValueError)


def storable(text: str, limit: int) -> str:
    """Any text (a handler's error, a traceback) as both databases store it: NUL and lone
    surrogates written as escapes, at most ``limit`` characters, the cut said so."""
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    if not text.isascii():
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    if len(text) > limit:
        text = f"{text[:limit]}... ({len(text) - limit:,} more characters cut)"
    return text


def _check_json(value: Any, where: str) -> None:
    # A walk instead of json.dumps() alone: json would silently turn {1: "a"} into
    # {"1": "a"} and accept NUL and lone surrogates, which PostgreSQL's jsonb refuses in
    # the database, far from the call and after the caller's transaction is spoilt.
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, str):
        _check_text(value, where)
        return
    if isinstance(value, int):
        # Python writes and reads integers of up to sys.get_int_max_str_digits() digits.
        if value.bit_length() > 3 * sys.get_int_max_str_digits():
            try:
                str(value)
            except ValueError:
                raise InvalidPayload(
                    f"{where} is an integer of more than {sys.get_int_max_str_digits()} "
                    f"digits, which JSON here cannot carry; publish it as a string."
                ) from None
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidPayload(f"{where} is {value!r}, which JSON cannot represent.")
        return
    if isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _check_json(item, f"{where}[{index}]")
        return
    if isinstance(value, dict):
        for name, item in value.items():
            if not isinstance(name, str):
                raise InvalidPayload(
                    f"{where} has the key {name!r}; JSON object keys must be strings."
                )
            _check_text(name, f"the key {name!r} of {where}")
            _check_json(item, f"{where}[{name!r}]")
        return
    raise InvalidPayload(
        f"{where} is {_a(type(value).__name__)}, which is not JSON-serialisable; "
        f"publish JSON data (dict, list, str, int, float, bool, None) or bytes."
    )


def _a(noun: str) -> str:
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


# The bounds of every option: a duration fits a timedelta added to today's date with room to
# spare, a count the integer columns that store it.
MAX_SECONDS = 365 * 24 * 3600
MAX_COUNT = 2**31 - 1
SECONDS = f"a number of seconds > 0 and at most {MAX_SECONDS} (a year)"
COUNT = f"an integer from 1 to {MAX_COUNT}"


def is_positive_number(value: object, maximum: float = MAX_SECONDS) -> bool:
    """A finite int or float above zero and at most ``maximum`` (not a bool): a duration
    in settings, @subscriber options and flags."""
    return (
        not isinstance(value, bool)
        and isinstance(value, int | float)
        and math.isfinite(value)
        and 0 < value <= maximum
    )


def is_positive_int(value: object, maximum: int = MAX_COUNT) -> bool:
    return isinstance(value, int) and is_positive_number(value, maximum)


def is_stored_datetime(value: object) -> TypeGuard[datetime]:
    """A point in time as the project stores them: a datetime, aware with USE_TZ and naive
    without (what publish(), pause(), seek() and @subscriber take)."""
    return isinstance(value, datetime) and timezone.is_aware(value) == settings.USE_TZ


def datetime_kind() -> str:
    """What is_stored_datetime() asks for, in words for an error."""
    return f"{'an aware' if settings.USE_TZ else 'a naive'} datetime (USE_TZ)"


def check_schedule(
    now: datetime,
    deliver_at: object = None,
    delay: object = None,
    expires_at: object = None,
    ttl: object = None,
) -> tuple[datetime | None, datetime | None]:
    """publish()'s deliver_at/delay and expires_at/ttl as two times (None: not given):
    when the message joins its topic's log, and after which no delivery of it starts.
    ``ttl`` counts from the first: a message published for later lives that long from
    then."""
    if deliver_at is None and delay is None and expires_at is None and ttl is None:
        return None, None  # every plain publish
    due = _moment("deliver_at", deliver_at, "delay", delay, now, zero_ok=True)
    expiry = _moment("expires_at", expires_at, "ttl", ttl, due or now, zero_ok=False)
    start = now if due is None or due < now else due
    if expiry is not None and expiry <= start:
        when = "its deliver_at" if start is due else "now"
        raise InvalidSchedule(
            f"expires_at ({expiry.isoformat()}) must be after {when} "
            f"({start.isoformat()}): the message could never run."
        )
    return due, expiry


def _moment(
    at_name: str, at: object, span_name: str, span: object, base: datetime, *, zero_ok: bool
) -> datetime | None:
    if at is not None and span is not None:
        raise InvalidSchedule(f"Pass {at_name}= or {span_name}=, not both.")
    if at is not None:
        if not is_stored_datetime(at):
            raise InvalidSchedule(f"{at_name} must be {datetime_kind()}; got {at!r}.")
        return at
    if span is None:
        return None
    seconds = span.total_seconds() if isinstance(span, timedelta) else span
    bounds = f"from 0 to {MAX_SECONDS}" if zero_ok else f"above 0 and at most {MAX_SECONDS}"
    if (
        isinstance(seconds, bool)
        or not isinstance(seconds, int | float)
        or not math.isfinite(seconds)
        or not (seconds >= 0 if zero_ok else seconds > 0)
        or seconds > MAX_SECONDS
    ):
        raise InvalidSchedule(
            f"{span_name} must be seconds {bounds} (a year), as a number or a timedelta; "
            f"got {span!r}."
        )
    return base + timedelta(seconds=seconds)


# How a start of the last N messages is kept (Subscription.start): "last 10".
LAST_PREFIX = "last "


def check_start(start: object, choices: tuple[str, ...]) -> str | None:
    """@subscriber start=: "earliest" or "latest" (``choices``), a datetime, or ("last", N);
    as the text the subscription row keeps (None: the setting's). Raises ValueError."""
    if start is None or (isinstance(start, str) and start in choices):
        return start
    if isinstance(start, datetime):
        if not is_stored_datetime(start):
            raise ValueError(f"start must be {datetime_kind()}, not {start!r}")
        return start.isoformat()
    if (
        isinstance(start, tuple)
        and len(start) == 2
        and start[0] == "last"
        and isinstance(start[1], int)
        and not isinstance(start[1], bool)
        and 0 <= start[1] <= MAX_COUNT
    ):
        return f"{LAST_PREFIX}{start[1]}"
    raise ValueError(
        f'start must be "latest", "earliest", a datetime or ("last", N) with N a whole '
        f"number from 0 to {MAX_COUNT}, not {start!r}"
    )


# @subscriber rate=: "N/unit", the unit's first letter: seconds in it.
RATE_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
MAX_RATE = 1_000_000
RATE_RE = re.compile(r"([0-9]{1,7})/(s|sec|second|m|min|minute|h|hour|d|day)")


def parse_rate(rate: str) -> tuple[int, float]:
    """A rate as declared ("100/s", "10/min", "1000/hour", "5/day") as (N, seconds of its
    period). Raises ValueError."""
    found = RATE_RE.fullmatch(rate) if isinstance(rate, str) else None
    count, seconds = (int(found[1]), RATE_UNITS[found[2][0]]) if found else (0, 0.0)
    if not 0 < count <= MAX_RATE:
        raise ValueError(
            f'rate must be "N/s", "N/min", "N/hour" or "N/day" with N a whole number from 1 '
            f"to {MAX_RATE:,}, not {rate!r}"
        )
    return int(count), seconds
