"""System checks and settings: each id fires on the problem it names, with a hint."""

from __future__ import annotations

from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.test import override_settings

from django_pubsub import checks, registry
from django_pubsub.conf import pubsub_settings
from django_pubsub.registry import SubscriberSpec


def ids(messages: list[Any]) -> list[str]:
    return [message.id for message in messages]


@pytest.mark.django_db
def test_the_project_passes_its_checks() -> None:
    # With database access: from Django 6.1 the model checks ask the database whether
    # it supports JSONField, as manage.py check does.
    call_command("check")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ([], ["django_pubsub.E001"]),
        ({"WORKER": 4}, ["django_pubsub.E002"]),
        ({"WORKERS": 0}, ["django_pubsub.E003"]),
        ({"POLL_INTERVAL": "fast"}, ["django_pubsub.E003"]),
        ({"START": "beginning"}, ["django_pubsub.E003"]),
        ({"BACKOFF": {"base": -1}}, ["django_pubsub.E003"]),
        ({"MAX_INFLIGHT": None, "ORDERED": True}, []),
        ({"TIMEOUT": 0}, ["django_pubsub.E003"]),
        ({"TIMEOUT": None}, []),
        ({"TIMEOUT": 2.5}, []),
        ({"HEARTBEAT_INTERVAL": 10, "DISPATCHER_TIMEOUT": 5}, ["django_pubsub.E003"]),
        ({"LEASE": float("inf")}, ["django_pubsub.E003"]),
        ({"LEASE": 1e12}, ["django_pubsub.E003"]),
        ({"MAX_ATTEMPTS": 2**31}, ["django_pubsub.E003"]),
        ({"WORKERS": 10**6}, ["django_pubsub.E003"]),
        ({"BACKOFF": {"maximum": float("inf")}}, ["django_pubsub.E003"]),
        ({"MAX_PAYLOAD_BYTES": 0}, ["django_pubsub.E003"]),
        ({"MAX_PAYLOAD_BYTES": 2**30}, ["django_pubsub.E003"]),
        ({"MAX_PAYLOAD_BYTES": 4096}, []),
    ],
)
def test_settings_checks(value: Any, expected: list[str]) -> None:
    with override_settings(PUBSUB=value):
        found = checks.check_settings()
    assert ids(found) == expected
    assert all(message.hint for message in found)


@pytest.mark.parametrize(
    ("backoff", "said"),
    [
        ({"base": -1}, "backoff base must be from 0 to 31536000 seconds, not -1"),
        ({"factor": 0.5}, "backoff factor must be from 1 to 1000, not 0.5"),
        ({"jitter": 2}, "backoff jitter must be from 0 to 1, not 2"),
        ({"maximum": "5m"}, "backoff maximum must be a finite number, not '5m'"),
        ({"speed": 2}, "Unknown backoff keys ['speed']"),
    ],
)
def test_a_bad_backoff_says_which_value_is_wrong(backoff: Any, said: str) -> None:
    with override_settings(PUBSUB={"BACKOFF": backoff}):
        (found,) = checks.check_settings()
        with pytest.raises(ImproperlyConfigured) as raised:
            pubsub_settings.backoff  # noqa: B018
    assert found.msg == raised.value.args[0]
    assert found.msg.startswith(f"PUBSUB['BACKOFF']: {said}")


def test_settings_are_read_when_used_and_refuse_bad_values() -> None:
    with override_settings(PUBSUB={"WORKERS": 9}):
        assert pubsub_settings.workers == 9
    assert pubsub_settings.workers == 4
    with (
        override_settings(PUBSUB={"LEASE": -5}),
        pytest.raises(ImproperlyConfigured, match="LEASE"),
    ):
        pubsub_settings.lease  # noqa: B018


def test_unimportable_handler_is_reported() -> None:
    spec = SubscriberSpec(name="ghost.sub", topic="ghost", handler="tests.nowhere.handler")
    registry.register(spec)
    try:
        found = checks.check_handlers()
    finally:
        registry.unregister("ghost.sub")
    assert ids(found) == ["django_pubsub.E004"]
    assert "ghost.sub" in found[0].msg


class ToReplica:
    """Sends reads of every model to a replica, as read/write splits do."""

    def db_for_read(self, model: Any, **hints: Any) -> str:
        return "replica"


class ToReplicaButPubsub(ToReplica):
    def db_for_read(self, model: Any, **hints: Any) -> str | None:
        return None if model._meta.app_label == "django_pubsub" else "replica"


@pytest.mark.parametrize(
    ("routers", "expected"),
    [([], []), ([ToReplica()], ["django_pubsub.E005"]), ([ToReplicaButPubsub()], [])],
)
def test_routers_that_send_pubsub_models_elsewhere_are_reported(
    routers: list[Any], expected: list[str]
) -> None:
    with override_settings(DATABASE_ROUTERS=routers):
        found = checks.check_routers()
    assert ids(found) == expected
    assert all(message.hint and "reads of Delivery" in message.msg for message in found)


@pytest.mark.parametrize(
    ("options", "warned"),
    [
        (
            {
                "init_command": "PRAGMA journal_mode=WAL;",
                "transaction_mode": "IMMEDIATE",
                "timeout": 20,
            },
            False,
        ),
        # Python's default of 5 s applies: the hint asks for a timeout all the same.
        ({"init_command": "PRAGMA journal_mode=WAL;", "transaction_mode": "IMMEDIATE"}, True),
        ({"transaction_mode": "IMMEDIATE"}, True),
        ({"init_command": "PRAGMA journal_mode = wal"}, True),
        ({}, True),
    ],
)
def test_sqlite_settings_check(options: dict[str, Any], warned: bool) -> None:
    found = checks.sqlite_warnings({"ENGINE": "django.db.backends.sqlite3", "OPTIONS": options})
    assert ids(found) == (["django_pubsub.W001"] if warned else [])
    if warned and "timeout" not in options:
        assert found[0].hint and '"timeout": 20' in found[0].hint


def test_postgres_is_not_subject_to_the_sqlite_check() -> None:
    assert checks.sqlite_warnings({"ENGINE": "django.db.backends.postgresql"}) == []
    assert checks.check_sqlite(databases=["default"]) == []  # the test project is set up right
