"""The ``PUBSUB`` setting: one dict, read on every access so ``override_settings`` works.

Each property returns a validated value or raises ``ImproperlyConfigured`` naming the key;
``validate()`` collects the same problems for the system checks.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

from .retry import Backoff
from .validation import COUNT, SECONDS, is_positive_int, is_positive_number

DEFAULTS: dict[str, Any] = {
    # Seconds between polls of the database when there is nothing to do.
    "POLL_INTERVAL": 0.2,
    # Handler threads in one runpubsub process.
    "WORKERS": 4,
    # Seconds a claimed delivery stays leased to its dispatcher.
    "LEASE": 30.0,
    # Seconds a handler may run before its attempt fails as timed out (None: no limit).
    "TIMEOUT": None,
    # Handler starts before a delivery is dead-lettered.
    "MAX_ATTEMPTS": 5,
    # Deliveries of one subscription in flight at once in one process (None: no bound
    # of its own; the WORKERS threads bound how many run at once).
    "MAX_INFLIGHT": None,
    # Whether subscriptions run strictly in offset order unless they say otherwise.
    "ORDERED": False,
    # Where a new subscription starts: "latest" or "earliest".
    "START": "latest",
    "BACKOFF": {"base": 1.0, "factor": 2.0, "maximum": 300.0, "jitter": 0.1},
    # Module imported from every installed app to find @subscriber declarations.
    "AUTODISCOVER_MODULE": "subscribers",
    # Messages sequenced and deliveries fanned out per topic and subscription in one pass.
    "BATCH_SIZE": 1000,
    # Seconds between a dispatcher's heartbeats, and silence after which it counts as dead.
    "HEARTBEAT_INTERVAL": 5.0,
    "DISPATCHER_TIMEOUT": 60.0,
    # Seconds running handlers get to finish after SIGINT/SIGTERM.
    "SHUTDOWN_GRACE": 30.0,
    # A secret that lets a request without a logged-in user (a load balancer, Prometheus)
    # read the health, stats and metrics views: "Authorization: Bearer <token>". None: only
    # users with the view_delivery permission may.
    "MONITORING_TOKEN": None,
    # Seconds the oldest unhandled message may wait before the health view reports
    # unhealthy (None: only whether a dispatcher is alive counts).
    "HEALTH_MAX_AGE": None,
    # Largest payload publish() accepts, in bytes: bytes as given, JSON data as its text.
    "MAX_PAYLOAD_BYTES": 1024 * 1024,
    # How long ended deliveries and messages are kept (docs/reference/settings.md): seconds
    # or a timedelta, None to keep for ever, and "topics": {name: {...}} to differ per topic.
    "RETENTION": {},
    # Seconds between runpubsub's prunes (one process at a time); None: only the command.
    "PRUNE_INTERVAL": 300.0,
    # Seconds a key of a keyed subscription may be held back by its failing head before
    # the key_blocked signal fires (None: never).
    "KEY_BLOCKED_AFTER": 300.0,
    # Seconds a publish(dedup_key=) is remembered within its topic (None: as long as its
    # message is kept).
    "DEDUP_WINDOW": 24 * 3600.0,
    # Per topic name: {"max_backlog": N, "policy": "reject" or "warn"}. Past N messages
    # unfinished by the topic's slowest subscription, publish() refuses or warns.
    "BACKPRESSURE": {},
}

RETENTION_DEFAULTS: dict[str, float | None] = {
    "acked": 24 * 3600.0,  # a day: what ran, to look at while it is fresh
    "discarded": 7 * 24 * 3600.0,  # an operator's act, kept a week
    "dead": 30 * 24 * 3600.0,  # a month: dead letters wait for someone to look at them
    "expired": 7 * 24 * 3600.0,  # not started before its message expired: kept a week
    "filtered": 24 * 3600.0,  # passed over by the subscription's filter: a day, as acked
    "messages": 7 * 24 * 3600.0,  # a week to seek back over, once every subscription is past
}

# Rows far larger strain both databases (PostgreSQL's jsonb stops at 256 MiB).
MAX_PAYLOAD_CEILING = 64 * 1024 * 1024

START_CHOICES = ("latest", "earliest")
# What a dead head of a keyed subscription does to the rest of its key.
ON_DEAD_CHOICES = ("continue", "dead_letter_key")
DELIVERY_CHOICES = ("at_least_once", "at_most_once", "transactional")
# Handler threads of one process: far more would only contend for the same connections.
MAX_WORKERS = 1024
# Rows of one batch: larger ones hold locks for seconds.
MAX_BATCH = 100_000


def _optional_positive_number(value: Any) -> bool:
    return value is None or is_positive_number(value)


def _optional_positive_int(value: Any) -> bool:
    return value is None or is_positive_int(value)


# Longest retention: 100 years, which a timedelta from now still holds.
MAX_RETENTION = 100 * 365 * 24 * 3600.0


def _backoff(value: Any) -> bool:
    """Raises ImproperlyConfigured naming the value that is wrong."""
    return Backoff.coerce(value) is not None


def _module_name(value: Any) -> bool:
    return (
        isinstance(value, str) and bool(value) and all(p.isidentifier() for p in value.split("."))
    )


def _retention(value: Any) -> bool:
    """Raises ImproperlyConfigured naming the part that is wrong."""
    problem = retention_problem(value)
    if problem:
        raise ImproperlyConfigured(problem)
    return True


BACKPRESSURE_POLICIES = ("reject", "warn")


def _backpressure(value: Any) -> bool:
    """Raises ImproperlyConfigured naming the part that is wrong."""
    if not isinstance(value, dict):
        return False
    for topic, limits in value.items():
        if not isinstance(topic, str) or not isinstance(limits, dict):
            raise ImproperlyConfigured(
                f"each entry must map a topic name to a dict, not {topic!r}: {limits!r}"
            )
        unknown = sorted(set(limits) - {"max_backlog", "policy"})
        if unknown or not is_positive_int(limits.get("max_backlog")):
            raise ImproperlyConfigured(
                f"{topic!r} needs max_backlog, {COUNT}, and no other key than policy; "
                f"got {limits!r}"
            )
        if limits.get("policy", "reject") not in BACKPRESSURE_POLICIES:
            raise ImproperlyConfigured(
                f"{topic!r}: policy must be 'reject' or 'warn', not {limits.get('policy')!r}"
            )
    return True


def retention_seconds(value: Any) -> float | None:
    """A retention as seconds: a number of seconds, a timedelta, or None (for ever)."""
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if value is None:
        return None
    if not is_positive_number(value, MAX_RETENTION):
        raise ImproperlyConfigured(
            f"a retention must be seconds or a timedelta above 0 and at most {MAX_RETENTION:,.0f} "
            f"seconds (100 years), or None, not {value!r}"
        )
    return float(value)


def retention_problem(value: Any, *, topic: str | None = None) -> str | None:
    """What is wrong with a RETENTION dict (or a topic's part of it), or None."""
    where = "RETENTION" if topic is None else f"RETENTION['topics'][{topic!r}]"
    if not isinstance(value, dict):
        return f"{where} must be a dict, not {type(value).__name__}"
    allowed = set(RETENTION_DEFAULTS) | ({"topics"} if topic is None else set())
    unknown = sorted(set(value) - allowed)
    if unknown:
        return f"{where} has unknown keys {unknown}; use {sorted(allowed)}"
    for kind in RETENTION_DEFAULTS:
        if kind in value:
            try:
                retention_seconds(value[kind])
            except ImproperlyConfigured as exc:
                return f"{where}[{kind!r}]: {exc}"
    topics = value.get("topics", {})
    if not isinstance(topics, dict):
        return f"{where}['topics'] must be a dict of topic names, not {type(topics).__name__}"
    for name, part in topics.items():
        problem = retention_problem(part, topic=name)
        if problem:
            return problem
    return None


VALIDATORS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "POLL_INTERVAL": (is_positive_number, SECONDS),
    "WORKERS": (lambda v: is_positive_int(v, MAX_WORKERS), f"an integer from 1 to {MAX_WORKERS}"),
    "LEASE": (is_positive_number, SECONDS),
    "TIMEOUT": (_optional_positive_number, f"{SECONDS}, or None"),
    "MAX_ATTEMPTS": (is_positive_int, COUNT),
    "MAX_INFLIGHT": (_optional_positive_int, f"{COUNT}, or None"),
    "ORDERED": (lambda v: isinstance(v, bool), "True or False"),
    "START": (lambda v: v in START_CHOICES, '"latest" or "earliest"'),
    "BACKOFF": (_backoff, "a dict with base, factor, maximum and jitter"),
    "AUTODISCOVER_MODULE": (_module_name, "a dotted module name such as 'subscribers'"),
    "BATCH_SIZE": (lambda v: is_positive_int(v, MAX_BATCH), f"an integer from 1 to {MAX_BATCH}"),
    "HEARTBEAT_INTERVAL": (is_positive_number, SECONDS),
    "DISPATCHER_TIMEOUT": (is_positive_number, SECONDS),
    "SHUTDOWN_GRACE": (is_positive_number, SECONDS),
    "MONITORING_TOKEN": (
        lambda v: v is None or (isinstance(v, str) and len(v) >= 16),
        "None or a string of at least 16 characters",
    ),
    "HEALTH_MAX_AGE": (_optional_positive_number, f"{SECONDS}, or None"),
    "MAX_PAYLOAD_BYTES": (
        lambda v: is_positive_int(v, MAX_PAYLOAD_CEILING),
        f"an integer of bytes from 1 to {MAX_PAYLOAD_CEILING:,}",
    ),
    "RETENTION": (
        _retention,
        "a dict of acked, discarded, dead, expired, filtered, messages (and topics)",
    ),
    "PRUNE_INTERVAL": (_optional_positive_number, f"{SECONDS}, or None"),
    "KEY_BLOCKED_AFTER": (_optional_positive_number, f"{SECONDS}, or None"),
    "DEDUP_WINDOW": (_optional_positive_number, f"{SECONDS}, or None"),
    "BACKPRESSURE": (
        lambda v: _backpressure(v),
        'a dict of topic name to {"max_backlog": N, "policy": "reject" or "warn"}',
    ),
}


def user_settings() -> Any:
    return getattr(settings, "PUBSUB", {})


def validate() -> list[tuple[str, str]]:
    """Every problem with ``settings.PUBSUB`` as (key, message); key '' for the whole dict."""
    raw = user_settings()
    if not isinstance(raw, dict):
        return [("", f"PUBSUB must be a dict, not {type(raw).__name__}.")]
    problems = [
        (key, f"PUBSUB[{key!r}] is not a known setting.") for key in raw if key not in DEFAULTS
    ]
    for key, value in raw.items():
        if key in VALIDATORS:
            problem = _problem(key, value)
            if problem:
                problems.append((key, problem))
    if not problems:
        merged = {**DEFAULTS, **raw}
        if merged["DISPATCHER_TIMEOUT"] <= merged["HEARTBEAT_INTERVAL"]:
            problems.append(
                (
                    "DISPATCHER_TIMEOUT",
                    "PUBSUB['DISPATCHER_TIMEOUT'] must be longer than HEARTBEAT_INTERVAL.",
                )
            )
    return problems


def get(key: str) -> Any:
    """The current value of one setting, validated."""
    raw = user_settings()
    if not isinstance(raw, dict):
        raise ImproperlyConfigured(f"PUBSUB must be a dict, not {type(raw).__name__}.")
    value = raw.get(key, DEFAULTS[key])
    problem = _problem(key, value)
    if problem:
        raise ImproperlyConfigured(problem)
    return value


def _problem(key: str, value: Any) -> str | None:
    """What is wrong with one setting's value, or None."""
    check, expected = VALIDATORS[key]
    try:
        if check(value):
            return None
    except ImproperlyConfigured as exc:  # a validator that can say more: which part
        return f"PUBSUB[{key!r}]: {exc}"
    return f"PUBSUB[{key!r}] must be {expected}, not {value!r}."


class PubSubSettings:
    """One property per setting; nothing is cached, so tests can override settings freely."""

    @property
    def poll_interval(self) -> float:
        return float(get("POLL_INTERVAL"))

    @property
    def workers(self) -> int:
        return int(get("WORKERS"))

    @property
    def lease(self) -> float:
        return float(get("LEASE"))

    @property
    def timeout(self) -> float | None:
        value = get("TIMEOUT")
        return None if value is None else float(value)

    @property
    def max_attempts(self) -> int:
        return int(get("MAX_ATTEMPTS"))

    @property
    def max_inflight(self) -> int | None:
        value = get("MAX_INFLIGHT")
        return None if value is None else int(value)

    @property
    def ordered(self) -> bool:
        return bool(get("ORDERED"))

    @property
    def start(self) -> str:
        return str(get("START"))

    @property
    def backoff(self) -> Backoff:
        backoff = Backoff.coerce(get("BACKOFF"))
        assert backoff is not None
        return backoff

    @property
    def autodiscover_module(self) -> str:
        return str(get("AUTODISCOVER_MODULE"))

    @property
    def key_blocked_after(self) -> float | None:
        value = get("KEY_BLOCKED_AFTER")
        return None if value is None else float(value)

    @property
    def backpressure(self) -> dict[str, dict[str, Any]]:
        return dict(get("BACKPRESSURE"))

    @property
    def dedup_window(self) -> float | None:
        value = get("DEDUP_WINDOW")
        return None if value is None else float(value)

    @property
    def batch_size(self) -> int:
        return int(get("BATCH_SIZE"))

    @property
    def heartbeat_interval(self) -> float:
        return float(get("HEARTBEAT_INTERVAL"))

    @property
    def dispatcher_timeout(self) -> float:
        return float(get("DISPATCHER_TIMEOUT"))

    @property
    def shutdown_grace(self) -> float:
        return float(get("SHUTDOWN_GRACE"))

    @property
    def monitoring_token(self) -> str | None:
        value = get("MONITORING_TOKEN")
        return None if value is None else str(value)

    @property
    def health_max_age(self) -> float | None:
        value = get("HEALTH_MAX_AGE")
        return None if value is None else float(value)

    @property
    def max_payload_bytes(self) -> int:
        return int(get("MAX_PAYLOAD_BYTES"))

    @property
    def prune_interval(self) -> float | None:
        value = get("PRUNE_INTERVAL")
        return None if value is None else float(value)

    def retention(self, topic: str) -> dict[str, float | None]:
        """Seconds each kind of row of ``topic`` is kept (None: for ever): the defaults,
        then RETENTION, then RETENTION["topics"][topic]."""
        configured = get("RETENTION")
        merged: dict[str, Any] = {**RETENTION_DEFAULTS}
        merged.update({k: v for k, v in configured.items() if k != "topics"})
        merged.update(configured.get("topics", {}).get(topic, {}))
        return {kind: retention_seconds(value) for kind, value in merged.items()}


pubsub_settings = PubSubSettings()
