"""runpubsub as a real subprocess: SIGKILL and restart, SIGTERM drain, double SIGINT."""

from __future__ import annotations

import os
import signal
import time
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

from django_pubsub import publish_many
from django_pubsub.models import Delivery, Dispatcher
from tests.conftest import runs, states, wait_for
from tests.pubsub_app.models import HandlerRun

pytestmark = pytest.mark.django_db(transaction=True)
KILL_SUBS = "kill.unordered,kill.ordered"
# The default suite kills twice; a soak sets PUBSUB_SOAK_KILLS (docs/guarantees.md).
KILLS = int(os.environ.get("PUBSUB_SOAK_KILLS", "2"))
PER_KILL = 30  # ordered handler starts between two kills


def test_sigkill_mid_run_loses_nothing_and_keeps_order(runpubsub: Any, tmp_path: Path) -> None:
    ids = publish_many("t.kill", [{"n": n, "sleep": 0.003} for n in range(PER_KILL * KILLS + 180)])
    kills = 0
    for round_ in range(KILLS):
        proc = runpubsub(
            "--subscriptions",
            KILL_SUBS,
            "--workers",
            "4",
            "--poll-interval",
            "0.02",
            log=tmp_path / f"run{round_}.log",
        )
        target = PER_KILL * (round_ + 1)
        wait_for(
            lambda target=target: (
                HandlerRun.objects.filter(subscription="kill.ordered").count() >= target
            )
        )
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=10) == -signal.SIGKILL
        kills += 1
    inflight_at_kill = Delivery.objects.filter(state="inflight").count()
    started = time.monotonic()
    final = runpubsub("--subscriptions", KILL_SUBS, "--until-idle", log=tmp_path / "final.log")
    assert final.wait(timeout=90) == 0, (tmp_path / "final.log").read_text()
    recovery = time.monotonic() - started
    for name in ("kill.unordered", "kill.ordered"):
        assert states(name) == {"acked": len(ids)}, name  # none lost, none left inflight
        handled = runs(name)
        assert {run.message_id for run in handled} == set(ids)
        duplicates = len(handled) - len(ids)
        # Only deliveries in flight at a kill run twice: at most one per worker per kill.
        assert duplicates <= 4 * kills
    ordered = [run.offset for run in runs("kill.ordered")]
    # A re-run of the head that was in flight at the kill is allowed; going back is not.
    assert all(later >= earlier for earlier, later in pairwise(ordered))
    assert sorted(set(ordered)) == list(range(len(ids)))
    dupes = [len(runs(name)) - len(ids) for name in ("kill.unordered", "kill.ordered")]
    print(
        f"kills={kills} inflight_at_kill={inflight_at_kill} recovery={recovery:.2f}s dupes={dupes}"
    )
    assert kills == KILLS
    # The dead dispatchers were recognised at once (same host, pid gone), not after the lease.
    assert recovery < 60
    assert Dispatcher.objects.filter(stopped_at__isnull=True).count() == 0


def test_sigterm_lets_running_handlers_finish_and_starts_nothing_new(
    runpubsub: Any, tmp_path: Path
) -> None:
    # slow.one: max_inflight=2, so two run and two wait when the signal comes.
    publish_many("t.slow", [{"sleep": 0.6} for _ in range(4)])
    log = tmp_path / "term.log"
    proc = runpubsub("--subscriptions", "slow.one", "--workers", "4", log=log)
    wait_for(lambda: len(runs("slow.one")) == 2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0, log.read_text()
    assert states("slow.one") == {"acked": 2, "pending": 2}
    assert len(runs("slow.one")) == 2
    assert Dispatcher.objects.get().stopped_at is not None


def test_a_second_sigint_exits_at_once(runpubsub: Any, tmp_path: Path) -> None:
    publish_many("t.slow", [{"sleep_first": 30}])
    log = tmp_path / "int.log"
    proc = runpubsub("--subscriptions", "slow.one", log=log)
    wait_for(lambda: len(runs("slow.one")) == 1)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    assert proc.poll() is None  # draining: the 30 s handler is still running
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=10) == 128 + signal.SIGINT
    assert time.monotonic() - started < 5
    assert states("slow.one") == {"inflight": 1}
    # The next dispatcher sees the process is gone (same host) and takes the lease back.
    final = runpubsub("--subscriptions", "slow.one", "--until-idle", log=tmp_path / "final.log")
    assert final.wait(timeout=30) == 0
    assert [run.attempt for run in runs("slow.one")] == [1, 2]
    delivery = Delivery.objects.get()
    assert delivery.state == "acked"
    assert "stopped; lease taken back" in delivery.errors[0]["error"]


def test_a_paused_dispatchers_late_ack_is_rejected(runpubsub: Any, tmp_path: Path) -> None:
    # slow.one: lease 1 s. The first attempt sleeps 3 s; A is frozen while it runs.
    publish_many("t.slow", [{"sleep_first": 3}])
    log_a = tmp_path / "a.log"
    a = runpubsub("--subscriptions", "slow.one", "--poll-interval", "0.02", "-v", "2", log=log_a)
    wait_for(lambda: len(runs("slow.one")) == 1)
    a.send_signal(signal.SIGSTOP)
    try:
        # B sees the lease expire (A is alive, just frozen), takes over and delivers.
        b = runpubsub(
            "--subscriptions",
            "slow.one",
            "--until-idle",
            "--idle-wait",
            "3",
            log=tmp_path / "b.log",
        )
        assert b.wait(timeout=30) == 0, (tmp_path / "b.log").read_text()
        assert [run.attempt for run in runs("slow.one")] == [1, 2]
        delivery = Delivery.objects.get()
        assert (delivery.state, delivery.attempts) == ("acked", 2)
        finished_at = delivery.finished_at
    finally:
        a.send_signal(signal.SIGCONT)
    # A wakes, its handler returns, and its ack with the old lease token changes nothing.
    wait_for(lambda: "ack rejected" in log_a.read_text(), timeout=15)
    a.send_signal(signal.SIGTERM)
    assert a.wait(timeout=15) == 0
    delivery.refresh_from_db()
    assert (delivery.state, delivery.attempts, delivery.finished_at) == ("acked", 2, finished_at)
    assert delivery.errors[0]["error"] == "lease expired before an ack"
