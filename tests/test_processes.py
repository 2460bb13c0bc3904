"""runpubsub as a real subprocess: SIGKILL and restart, SIGTERM drain, double SIGINT."""

from __future__ import annotations

import json
import os
import signal
import statistics
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from django.db import connection

from django_pubsub import publish_many
from django_pubsub.models import Delivery, Dispatcher
from tests.conftest import ROOT, runs, states, wait_for
from tests.pubsub_app.models import HandlerRun

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.processes]
KILL_SUBS = "kill.unordered,kill.ordered"
# The default suite kills twice; a soak sets PUBSUB_SOAK_KILLS (docs/guarantees.md).
KILLS = int(os.environ.get("PUBSUB_SOAK_KILLS", "2"))
PER_KILL = 30  # ordered handler starts between two kills


def _all_acked(delivery_ids: list[int]) -> bool:
    acked = Delivery.objects.filter(id__in=delivery_ids, state="acked").count()
    return acked == len(delivery_ids)


def test_sigkill_mid_run_loses_nothing_and_keeps_order(runpubsub: Any, tmp_path: Path) -> None:
    """Invariant: every (subscription, message) is handled, none stays in flight, the ordered
    subscription never goes back, and a second run happens only to a delivery that was in
    flight at a kill (at most once more per such kill)."""
    subs = KILL_SUBS.split(",")
    ids = publish_many("t.kill", [{"n": n, "sleep": 0.003} for n in range(PER_KILL * KILLS + 180)])
    at_kill: Counter[tuple[str, int]] = Counter()  # (subscription, message): kills it was inflight
    inflight_sizes: list[int] = []
    recoveries: list[float] = []
    pending: list[int] = []
    killed_at = 0.0
    proc = None
    for round_ in range(KILLS + 1):
        proc = runpubsub(
            "--subscriptions",
            KILL_SUBS,
            "--workers",
            "4",
            "--poll-interval",
            "0.02",
            *(["--until-idle"] if round_ == KILLS else []),
            log=tmp_path / f"run{round_ % 3}.log",
        )
        if round_:
            # Recovery: from the kill until every delivery in flight at it is acked again.
            wait_for(lambda pending=pending: _all_acked(pending))
            recoveries.append(time.monotonic() - killed_at)
        if round_ == KILLS:
            break
        target = PER_KILL * (round_ + 1)
        wait_for(
            lambda target=target: (
                HandlerRun.objects.filter(subscription="kill.ordered").count() >= target
            )
        )
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=10) == -signal.SIGKILL
        killed_at = time.monotonic()
        inflight = list(
            Delivery.objects.filter(state="inflight").values_list(
                "id", "subscription__name", "message_id"
            )
        )
        pending = [delivery_id for delivery_id, _, _ in inflight]
        at_kill.update((name, mid) for _, name, mid in inflight)
        inflight_sizes.append(len(inflight))
    assert proc is not None and proc.wait(timeout=90) == 0
    histories = {name: runs(name) for name in subs}
    lost = sum(len(set(ids) - {run.message_id for run in histories[name]}) for name in subs)
    extra = {
        (name, mid): count - 1
        for name in subs
        for mid, count in Counter(run.message_id for run in histories[name]).items()
        if count > 1
    }
    ordered = [run.offset for run in histories["kill.ordered"]]
    backwards = sum(1 for earlier, later in pairwise(ordered) if later < earlier)
    figures = {
        "database": connection.vendor,
        "kills": len(inflight_sizes),
        "messages": len(ids),
        "subscriptions": len(subs),
        "lost": lost,
        "left_inflight": Delivery.objects.exclude(state="acked").count(),
        "order_violations": backwards,
        "duplicates": sum(extra.values()),
        "duplicates_not_inflight_at_a_kill": sum(1 for key in extra if key not in at_kill),
        "inflight_at_kill_max": max(inflight_sizes, default=0),
        "inflight_at_kill_mean": round(sum(inflight_sizes) / max(len(inflight_sizes), 1), 2),
        "recovery_s_median": round(statistics.median(recoveries), 3) if recoveries else None,
        "recovery_s_max": round(max(recoveries), 3) if recoveries else None,
    }
    print(json.dumps(figures))
    results = ROOT / ".test-results"
    results.mkdir(exist_ok=True)
    (results / f"soak-sigkill-{connection.vendor}.json").write_text(json.dumps(figures, indent=1))
    assert lost == 0 and figures["left_inflight"] == 0 and backwards == 0
    assert sorted(set(ordered)) == list(range(len(ids)))
    # A second run only where a delivery was in flight at a kill, once per such kill.
    assert all(count <= at_kill[key] for key, count in extra.items()), extra
    assert figures["kills"] == KILLS
    # The dead dispatchers were recognised at once (same host, pid gone), not after a lease.
    assert all(seconds < 30 for seconds in recoveries), recoveries
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


@contextmanager
def _writer_lock_held() -> Iterator[None]:
    """On SQLite, hold the one writer lock for a moment. A process frozen while it holds it
    would stop every other one until it runs again (SQLite cannot take a lock back from a
    living process): freezing it inside this block freezes it between two writes."""
    if connection.vendor != "sqlite":
        yield
        return
    import sqlite3

    raw = sqlite3.connect(connection.settings_dict["NAME"], timeout=30, isolation_level=None)
    try:
        raw.execute("BEGIN IMMEDIATE")
        yield
        raw.execute("ROLLBACK")
    finally:
        raw.close()


def test_a_paused_dispatchers_late_ack_is_rejected(runpubsub: Any, tmp_path: Path) -> None:
    # slow.one: lease 1 s. The first attempt sleeps 3 s; A is frozen while it runs.
    publish_many("t.slow", [{"sleep_first": 3}])
    log_a = tmp_path / "a.log"
    a = runpubsub("--subscriptions", "slow.one", "--poll-interval", "0.02", "-v", "2", log=log_a)
    wait_for(lambda: len(runs("slow.one")) == 1)
    with _writer_lock_held():  # A is not frozen inside a write transaction of its own
        a.send_signal(signal.SIGSTOP)
    try:
        # B sees A silent for DISPATCHER_TIMEOUT (A is alive, just frozen), takes over and
        # delivers.
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
