"""Input checks shared by publish() and @subscriber: fail at the call, before any write."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from .exceptions import InvalidHeaders, InvalidKey, InvalidPayload, InvalidTopic

NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,200}")
KEY_MAX_LENGTH = 255


def check_topic(topic: object) -> str:
    if not isinstance(topic, str) or not NAME_RE.fullmatch(topic):
        raise InvalidTopic(
            f"Topic names are 1 to 200 characters from A-Z, a-z, 0-9, '.', '_' and '-'; "
            f"got {topic!r}."
        )
    return topic


def check_key(key: object) -> str | None:
    if key is None:
        return None
    if not isinstance(key, str) or not 0 < len(key) <= KEY_MAX_LENGTH:
        raise InvalidKey(
            f"key must be None or a string of 1 to {KEY_MAX_LENGTH} characters; got {key!r}."
        )
    return key


def check_headers(headers: object) -> dict[str, str]:
    if headers is None:
        return {}
    if not isinstance(headers, Mapping):
        raise InvalidHeaders(f"headers must be a dict of str to str; got {type(headers).__name__}.")
    for name, value in headers.items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise InvalidHeaders(f"headers must map str to str; {name!r}: {value!r} is not.")
    return dict(headers)


def check_payload(payload: object) -> object:
    """Return bytes for binary payloads; raise unless the value survives JSON unchanged."""
    if isinstance(payload, bytes | bytearray | memoryview):
        return bytes(payload)
    _check_json(payload, "payload")
    return payload


def _check_json(value: Any, where: str) -> None:
    # A walk instead of json.dumps(): json would silently turn {1: "a"} into {"1": "a"} and
    # accept NaN, which PostgreSQL's jsonb refuses at commit time, far from the call.
    if value is None or isinstance(value, str | bool | int):
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
            _check_json(item, f"{where}[{name!r}]")
        return
    raise InvalidPayload(
        f"{where} is a {type(value).__name__}, which is not JSON-serialisable; "
        f"publish JSON data (dict, list, str, int, float, bool, None) or bytes."
    )


def is_positive_number(value: object) -> bool:
    """An int or float above zero (not a bool): settings, @subscriber options, flags."""
    return not isinstance(value, bool) and isinstance(value, int | float) and value > 0


def is_positive_int(value: object) -> bool:
    return is_positive_number(value) and isinstance(value, int)
