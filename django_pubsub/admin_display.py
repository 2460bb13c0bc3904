"""How the admin shows values: payloads (as written, cut, downloadable), effective
options, counts in words."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from django.conf import settings
from django.contrib import admin
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html

from .models import Message


def effective(value: object, declared: object) -> str:
    return f"{value} ({'declared' if declared is not None else 'PUBSUB setting'})"


def count(n: int, noun: str) -> str:
    plural = noun[:-1] + "ies" if noun.endswith("y") else noun + "s"
    return f"{n:,} {noun if n == 1 else plural}"


# Characters of a payload a page shows; the whole of it is a download away.
PAYLOAD_SHOWN = 10_000


def as_json(value: Any) -> str:
    # As written: "Zoë", not "Zo\u00eb".
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False)


def pretty_payload(message: Message) -> str:
    download = reverse("admin:django_pubsub_message_payload", args=[message.pk])
    if message.payload_bytes is not None:
        size = len(message.payload_bytes)
        return format_html('{} bytes (<a href="{}">download</a>)', f"{size:,}", download)
    text = as_json(message.payload)
    if len(text) <= PAYLOAD_SHOWN:
        return format_html("<pre>{}</pre>", text)
    return format_html(
        '<pre>{}</pre><p>The first {} of {} characters: <a href="{}">download the whole '
        "payload</a>.</p>",
        text[:PAYLOAD_SHOWN],
        f"{PAYLOAD_SHOWN:,}",
        f"{len(text):,}",
        download,
    )


def to_the_second(field: str) -> Callable[[Any], str]:
    """A list column of a datetime field in one format, to the second (the admin's own
    drops the seconds, which matter for leases and retries)."""

    @admin.display(description=field.replace("_", " "), ordering=field)
    def show(obj: Any) -> str:
        value = getattr(obj, field)
        if value is None:
            return "-"
        if settings.USE_TZ:
            value = timezone.localtime(value)
        return str(value.strftime("%Y-%m-%d %H:%M:%S %Z")).strip()

    show.__name__ = field
    return show
