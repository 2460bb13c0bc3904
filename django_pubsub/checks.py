"""System checks; every id is listed in docs/reference/checks.md."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from django.conf import settings
from django.core.checks import CheckMessage, Error, Tags, Warning, register
from django.db import DatabaseError
from django.db.models import Q
from django.utils.module_loading import import_string

from . import backends, conf, registry

SETTINGS_HINT = "See docs/reference/settings.md for every PUBSUB key and its default."


@register()
def check_settings(**kwargs: Any) -> list[CheckMessage]:
    """E001: PUBSUB is not a dict. E002: unknown key. E003: a value out of range."""
    problems = conf.validate()
    messages: list[CheckMessage] = []
    for key, text in problems:
        if key == "":
            messages.append(
                Error(text, hint="Set PUBSUB = {...} in settings.", id="django_pubsub.E001")
            )
        elif key not in conf.DEFAULTS:
            messages.append(
                Error(
                    text,
                    hint=f"Known keys: {', '.join(sorted(conf.DEFAULTS))}.",
                    id="django_pubsub.E002",
                )
            )
        else:
            messages.append(Error(text, hint=SETTINGS_HINT, id="django_pubsub.E003"))
    return messages


@register()
def check_handlers(**kwargs: Any) -> list[CheckMessage]:
    """E004: a declared handler's dotted path does not import back to a callable."""
    messages: list[CheckMessage] = []
    for spec in registry.get_specs().values():
        try:
            handler = import_string(spec.handler)
        except ImportError as exc:
            handler, reason = None, str(exc)
        else:
            reason = "it is not callable"
        if not callable(handler):
            messages.append(
                Error(
                    f"Subscription {spec.name!r}: handler {spec.handler!r} cannot be used: "
                    f"{reason}.",
                    hint="Declare @subscriber on a module-level function of an installed app.",
                    id="django_pubsub.E004",
                )
            )
    return messages


@register()
def check_routers(**kwargs: Any) -> list[CheckMessage]:
    """E005: a database router sends django-pubsub's models away from the default database
    (a read replica, say), where the dispatcher would read stale rows or write nowhere."""
    from django.apps import apps
    from django.db import DEFAULT_DB_ALIAS, router

    elsewhere = []
    for model in apps.get_app_config("django_pubsub").get_models():
        for kind, route in (("reads", router.db_for_read), ("writes", router.db_for_write)):
            alias = route(model)
            if alias not in (None, DEFAULT_DB_ALIAS):
                elsewhere.append(f"{kind} of {model.__name__} to {alias!r}")
    if not elsewhere:
        return []
    return [
        Error(
            f"DATABASE_ROUTERS send django-pubsub's models away from the default database: "
            f"{', '.join(elsewhere)}.",
            hint="Return 'default' (or None) from db_for_read and db_for_write for the "
            "django_pubsub app's models; django-pubsub works on the default database only.",
            id="django_pubsub.E005",
        )
    ]


@register(Tags.database)
def check_sqlite(databases: Sequence[str] | None = None, **kwargs: Any) -> list[CheckMessage]:
    """W001: a SQLite database set up so that writers can fail with "database is locked"."""
    return sqlite_warnings(settings.DATABASES.get("default", {}))


def sqlite_warnings(db: dict[str, Any]) -> list[CheckMessage]:
    messages: list[CheckMessage] = []
    missing = backends.missing_options(db)
    if missing:
        messages.append(
            Warning(
                "The default SQLite database is not set up for a dispatcher and handlers "
                "writing at the same time; writes can fail with 'database is locked'.",
                hint=f"Add to DATABASES['default']['OPTIONS']: {', '.join(missing)}.",
                id="django_pubsub.W001",
            )
        )
    return messages


def _on_the_database(
    check: Callable[[], list[CheckMessage]],
) -> Callable[..., list[CheckMessage]]:
    """A database check (run by migrate, or check --database default): nothing unless the
    default database is asked for, and nothing before it is migrated."""

    def run(databases: Sequence[str] | None = None, **kwargs: Any) -> list[CheckMessage]:
        if not databases or "default" not in databases:
            return []
        try:
            return check()
        except DatabaseError:
            return []  # not migrated yet

    # Not functools.wraps: Django reads the signature, which must take **kwargs.
    run.__name__, run.__doc__ = check.__name__, check.__doc__
    return register(Tags.database)(run)


@_on_the_database
def check_moved() -> list[CheckMessage]:
    """E006: a subscription the code declares on another topic than its row's."""
    from .models import Subscription

    specs = registry.get_specs()
    found = Subscription.objects.filter(name__in=list(specs)).values_list("name", "topic__name")
    rows = list(found)
    return [
        Error(
            f"Subscription {name!r} is on topic {topic!r}, but the code now declares it on "
            f"{specs[name].topic!r}. Its position belongs to its topic, so it cannot move.",
            hint=f"Declare a new name for the subscription on {specs[name].topic!r}, or "
            f"declare {name!r} on {topic!r} again.",
            id="django_pubsub.E006",
        )
        for name, topic in rows
        if specs[name].topic != topic
    ]


@_on_the_database
def check_undeclared_topics() -> list[CheckMessage]:
    """W003: topics that received messages but no subscription in code listens to (a typo
    such as order.created publishes into the void)."""
    from .models import Message, Topic

    declared = {spec.topic for spec in registry.get_specs().values()}
    names = [
        topic.name
        for topic in Topic.objects.exclude(name__in=declared).order_by("name")
        if Message.objects.filter(topic=topic).exists()
    ]
    if not names:
        return []
    return [
        Warning(
            f"Messages were published to topics no @subscriber declared in code listens to: "
            f"{', '.join(names)}.",
            hint="Check the topic's spelling where it is published, or declare a subscriber "
            "for it. Its messages age out by PUBSUB['RETENTION']['messages'].",
            id="django_pubsub.W003",
        )
    ]


@_on_the_database
def check_inactive() -> list[CheckMessage]:
    """W002: subscriptions no longer declared in code still hold undelivered messages."""
    from .models import Delivery, Message, Subscription

    names = []
    for sub in Subscription.objects.filter(active=False):
        unread = Message.objects.filter(topic_id=sub.topic_id).filter(
            Q(offset__isnull=True) | Q(offset__gte=sub.position)
        )
        unfinished = Delivery.objects.filter(subscription=sub, state__in=Delivery.UNFINISHED)
        if unread.exists() or unfinished.exists():
            names.append(sub.name)
    if not names:
        return []
    return [
        Warning(
            "Subscriptions no longer declared in code hold undelivered messages: "
            f"{', '.join(names)}.",
            hint="Declare them again (same name and topic) to resume where they stopped; "
            "until then nothing is delivered to them and nothing of theirs is deleted.",
            id="django_pubsub.W002",
        )
    ]
