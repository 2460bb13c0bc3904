"""The PostgreSQL server itself restarted or down, with runpubsub as a real process.

The server is a throwaway one of the test's own (conftest.PostgresServer), never the one
the suite shares. Invariants: a restart mid-run loses nothing, keeps order and
re-establishes LISTEN; a dispatcher started while the server is down waits for it without
busy-looping, answers SIGTERM meanwhile, and delivers once the server is up.
"""

from __future__ import annotations

import signal
import time
from collections import Counter
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from django.db import connection

from django_pubsub import publish, publish_many
from tests.conftest import PostgresServer, runs, states, wait_for
from tests.pubsub_app.models import HandlerRun

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.processes]
SUBS = ("multi.a", "multi.b", "multi.ordered")


def test_a_server_restart_mid_run_loses_nothing_and_listen_comes_back(
    postgres_server: PostgresServer, runpubsub: Any, tmp_path: Path
) -> None:
    log = tmp_path / "run.log"
    # A 5 s poll: a message handled within 1 s after the restart was woken by NOTIFY.
    runpubsub("--subscriptions", ",".join(SUBS), "--poll-interval", "5", "-v", "2", log=log)
    wait_for(lambda: "dispatcher started" in log.read_text())
    ids = publish_many("t.multi", [{"n": n, "sleep": 0.01} for n in range(150)])
    wait_for(lambda: HandlerRun.objects.filter(subscription="multi.ordered").count() >= 20)
    restarted = time.monotonic()
    postgres_server.restart()
    wait_for(lambda: all(states(name) == {"acked": len(ids)} for name in SUBS), timeout=60)
    caught_up = time.monotonic() - restarted
    text = log.read_text()
    assert "database error, retrying" in text
    wait_for(lambda: "listening again" in log.read_text(), timeout=10)
    for name in SUBS:
        assert set(Counter(run.message_id for run in runs(name))) == set(ids), name
    ordered = [run.offset for run in runs("multi.ordered")]
    assert all(a <= b for a, b in pairwise(ordered))
    # LISTEN is back: three messages in a row each reach their handler well within the poll.
    for n in range(3):
        sent = time.monotonic()
        message_id = publish("t.multi", {"after_restart": n})
        wait_for(
            lambda message_id=message_id: HandlerRun.objects.filter(
                subscription="multi.a", message_id=message_id
            ).exists(),
            timeout=4,
        )
        assert time.monotonic() - sent < 1.0
    duplicates = sum(
        sum(1 for run in runs(name) if run.message_id in set(ids)) - len(ids) for name in SUBS
    )
    print(f"restart: caught up {caught_up:.2f}s after the restart, duplicates={duplicates}")


def test_a_dispatcher_started_while_the_server_is_down_waits_for_it(
    postgres_server: PostgresServer, runpubsub: Any, tmp_path: Path
) -> None:
    ids = publish_many("t.multi", [{"n": n} for n in range(10)])
    postgres_server.stop()
    try:
        waiting_log, term_log = tmp_path / "waiting.log", tmp_path / "term.log"
        waiting = runpubsub(
            "--subscriptions", "multi.a", "--poll-interval", "0.05", log=waiting_log
        )
        term = runpubsub("--subscriptions", "multi.a", "--poll-interval", "0.05", log=term_log)
        time.sleep(4)
        assert waiting.poll() is None and term.poll() is None  # waiting, not crashed
        retries = term_log.read_text().count("database unavailable at start")
        assert 1 <= retries <= 12, term_log.read_text()  # backoff, not a busy loop
        term.send_signal(signal.SIGTERM)
        assert term.wait(timeout=10) == 0, term_log.read_text()
    finally:
        postgres_server.start()
    # multi.a existed before (created at migrate) and starts where it was: all 10 arrive.
    wait_for(lambda: states("multi.a") == {"acked": len(ids)}, timeout=30)
    assert waiting.poll() is None
    assert connection.vendor == "postgresql"
