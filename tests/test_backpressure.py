"""PUBSUB["BACKPRESSURE"]: publish() refuses (or warns) when a topic's slowest subscription
is too far behind, from a backlog measured by the dispatchers, not per publish."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from django.core.checks import run_checks
from django.db import connections, transaction
from django.test import override_settings
from django.utils import timezone

from django_pubsub import backpressure, publish, publish_many, signals
from django_pubsub.exceptions import Backpressure
from django_pubsub.models import Message, Topic
from tests.conftest import is_postgres

pytestmark = pytest.mark.django_db(transaction=True)

REJECT = {"BACKPRESSURE": {"t.basic": {"max_backlog": 5, "policy": "reject"}}}
WARN = {"BACKPRESSURE": {"t.basic": {"max_backlog": 5, "policy": "warn"}}}


@pytest.fixture(autouse=True)
def fresh() -> Iterator[None]:
    backpressure.forget()
    yield
    backpressure.forget()


def _measured() -> None:
    """What a dispatcher does every BACKLOG_INTERVAL; and a publisher reads it anew."""
    backpressure.measure_limited(timezone.now())
    backpressure.forget()


def test_a_backed_up_topic_refuses_publishes_and_writes_nothing(dispatch: Any) -> None:
    with override_settings(PUBSUB=REJECT):
        publish_many("t.basic", [{"n": n} for n in range(5)])
        dispatch("basic.one")  # one subscription keeps up, basic.two is the slowest
        _measured()
        row = Topic.objects.get(name="t.basic")
        assert (row.backlog, row.backlog_of) == (5, "basic.two")
        with pytest.raises(Backpressure) as refused:
            publish("t.basic", {"n": "one too many"})
        assert refused.value.backlog == 5 and refused.value.limit == 5
        assert str(refused.value).startswith(
            "topic 't.basic' is backed up: its slowest subscription (basic.two) has 5 "
            "messages unfinished, its limit is 5"
        )
        for call in (
            lambda: publish_many("t.basic", [{"n": 1}]),
            lambda: publish("t.basic", {"n": 1}, dedup_key="k"),
        ):
            with pytest.raises(Backpressure):
                call()
        assert Message.objects.count() == 5
        publish("t.other", {"n": 1})  # other topics are not limited
        dispatch("basic.two")
        _measured()
        publish("t.basic", {"n": "room again"})
    assert Message.objects.filter(topic__name="t.basic").count() == 6


def test_a_warning_topic_publishes_and_says_so(caplog: Any) -> None:
    seen: list[dict[str, Any]] = []

    def receiver(sender: Any, **kwargs: Any) -> None:
        seen.append(kwargs)

    signals.backlog_exceeded.connect(receiver)
    try:
        with override_settings(PUBSUB=WARN), caplog.at_level(logging.WARNING):
            publish_many("t.basic", [{"n": n} for n in range(6)])
            _measured()
            publish("t.basic", {"n": "over"})
    finally:
        signals.backlog_exceeded.disconnect(receiver)
    assert Message.objects.count() == 7
    assert seen[-1]["backlog"] == 6 and seen[-1]["policy"] == "warn"
    assert "topic t.basic backed up" in caplog.text


def test_a_dispatcher_keeps_the_figure_and_a_stale_one_is_measured_again(
    dispatch: Any,
) -> None:
    with override_settings(PUBSUB=REJECT):
        publish_many("t.basic", [{"n": n} for n in range(3)])
        dispatch("basic.one")
        row = Topic.objects.get(name="t.basic")
        assert row.backlog == 3 and row.backlog_at is not None  # basic.two's
        # No dispatcher for a while: the figure is stale, and the publisher counts.
        old = timezone.now() - timedelta(seconds=backpressure.STALE + 1)
        Topic.objects.filter(pk=row.pk).update(backlog=0, backlog_at=old)
        publish_many("t.basic", [{"n": n} for n in range(3)])
        backpressure.forget()
        with pytest.raises(Backpressure):
            publish("t.basic", {"n": "over"})
        assert Topic.objects.get(pk=row.pk).backlog == 0  # counted, not written: no lock


@pytest.mark.skipif(not is_postgres(), reason="concurrent writers: PostgreSQL only")
def test_a_publisher_that_counts_a_stale_backlog_locks_nothing() -> None:
    """Counting it itself, a publisher writes nothing: its transaction, still open, holds
    up neither the sequencer nor another publisher of the topic."""
    with override_settings(PUBSUB=REJECT):
        publish("t.basic", {"n": 0})
        old = timezone.now() - timedelta(seconds=backpressure.STALE + 1)
        Topic.objects.filter(name="t.basic").update(backlog=0, backlog_at=old)
        opened, release, done = threading.Event(), threading.Event(), threading.Event()

        def hold() -> None:
            try:
                with transaction.atomic():
                    publish("t.basic", {"n": 1})  # counts the stale backlog itself
                    opened.set()
                    release.wait(10)
            finally:
                connections.close_all()
                done.set()

        threading.Thread(target=hold, daemon=True).start()
        assert opened.wait(10)
        try:
            started = time.monotonic()
            Topic.sequence_all(batch=10)
            backpressure.forget()
            publish("t.basic", {"n": 2})
            assert time.monotonic() - started < 1.0
        finally:
            release.set()
            assert done.wait(10)


@pytest.mark.parametrize(
    "value",
    [
        [],
        {"t.basic": 5},
        {"t.basic": {"max_backlog": 0}},
        {"t.basic": {"max_backlog": 5, "policy": "drop"}},
        {"t.basic": {"max_backlog": 5, "when": "now"}},
    ],
)
def test_a_backpressure_setting_that_cannot_work_is_a_check_error(value: Any) -> None:
    with override_settings(PUBSUB={"BACKPRESSURE": value}):
        errors = [e for e in run_checks() if e.id == "django_pubsub.E003"]
    assert errors and "BACKPRESSURE" in errors[0].msg
