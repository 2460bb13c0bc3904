"""Keyed and transactional subscriptions across several runpubsub processes, SIGKILLed
while they run: a key never runs two messages at once nor goes back, and a transactional
handler's writes happen once per message."""

from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from django.db import connection

from django_pubsub import publish
from django_pubsub.models import Delivery, Dispatcher
from tests.conftest import ROOT, runs, wait_for
from tests.pubsub_app.models import HandlerRun

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.processes]
KILLS = int(os.environ.get("PUBSUB_SOAK_KILLS", "3"))
DISPATCHERS = 3


def _kill_while_running(
    runpubsub: Any, tmp_path: Path, subscription: str, total: int, started: Callable[[], int]
) -> tuple[dict[int, float], Counter[int]]:
    """Run DISPATCHERS processes; SIGKILL one (in turn) KILLS times while handlers run,
    starting another in its place; wait until every delivery is acked, then stop them.
    Returns when each killed pid died, and how many kills each message was inflight at."""

    def start(n: int) -> Any:
        return runpubsub(
            "--subscriptions", subscription, "--workers", "4", "--poll-interval", "0.02",
            log=tmp_path / f"d{n}.log",
        )  # fmt: skip

    procs = [start(n) for n in range(DISPATCHERS)]
    killed: dict[int, float] = {}
    at_kill: Counter[int] = Counter()
    for kill in range(KILLS):
        target = total * (kill + 1) // (KILLS + 2)
        wait_for(lambda target=target: started() >= target, timeout=120)
        victim = procs[kill % DISPATCHERS]
        victim.send_signal(signal.SIGKILL)
        assert victim.wait(timeout=10) == -signal.SIGKILL
        killed[victim.pid] = time.time()
        inflight = Delivery.objects.filter(subscription__name=subscription, state="inflight")
        at_kill.update(inflight.values_list("message_id", flat=True))
        procs[kill % DISPATCHERS] = start(DISPATCHERS + kill)
    mine = Delivery.objects.filter(subscription__name=subscription)
    wait_for(lambda: mine.exclude(state="acked").count() == 0, timeout=240)
    for proc in procs:  # started (its SIGTERM handler installed) before it is told to stop
        wait_for(lambda proc=proc: Dispatcher.objects.filter(pid=proc.pid).exists(), timeout=120)
        proc.send_signal(signal.SIGTERM)
    for proc in procs:
        assert proc.wait(timeout=120) == 0
    return killed, at_kill


def _record(name: str, figures: dict[str, Any]) -> None:
    print(json.dumps(figures))
    results = ROOT / ".test-results"
    results.mkdir(exist_ok=True)
    (results / f"{name}-{connection.vendor}.json").write_text(json.dumps(figures, indent=1))


def test_keys_never_overlap_nor_go_back_across_killed_dispatchers(
    runpubsub: Any, tmp_path: Path
) -> None:
    total = 400
    ids = [
        publish("t.keyed.kill", {"k": f"k{n % 12}", "span": True, "sleep": 0.004}, key=f"k{n % 12}")
        for n in range(total)
    ]
    killed, at_kill = _kill_while_running(
        runpubsub,
        tmp_path,
        "keyed.kill",
        total,
        lambda: HandlerRun.objects.filter(subscription="keyed.kill").count(),
    )
    by_key: dict[str, list[Any]] = defaultdict(list)
    for run in runs("keyed.kill"):
        by_key[run.payload["k"]].append(run)
    overlaps = backwards = 0
    for key_runs in by_key.values():
        key_runs.sort(key=lambda run: run.started)
        for earlier, later in pairwise(key_runs):
            backwards += later.offset < earlier.offset
            # A run cut short by a kill ended when its process died.
            ended = earlier.ended if earlier.ended is not None else killed.get(earlier.pid)
            overlaps += ended is None or later.started < ended
    handled = Counter(run.message_id for run in runs("keyed.kill"))
    figures = {
        "database": connection.vendor,
        "dispatchers": DISPATCHERS,
        "kills": len(killed),
        "messages": total,
        "keys": len(by_key),
        "lost": len(set(ids) - set(handled)),
        "overlaps": overlaps,
        "order_violations": backwards,
        "duplicates": sum(count - 1 for count in handled.values()),
        "duplicates_not_inflight_at_a_kill": sum(
            1 for mid, count in handled.items() if count > 1 and mid not in at_kill
        ),
    }
    _record("keyed-kill", figures)
    assert figures["lost"] == 0 and overlaps == 0 and backwards == 0, figures
    assert figures["duplicates_not_inflight_at_a_kill"] == 0, figures
    assert len(killed) == KILLS


def test_transactional_writes_happen_once_across_killed_dispatchers(
    runpubsub: Any, tmp_path: Path
) -> None:
    total = 400
    ids = [publish("t.tx.kill", {"n": n, "sleep": 0.01}) for n in range(total)]
    acked = Delivery.objects.filter(subscription__name="tx.kill", state="acked")
    killed, at_kill = _kill_while_running(runpubsub, tmp_path, "tx.kill", total, acked.count)
    rows = Counter(
        HandlerRun.objects.filter(subscription="tx.kill").values_list("message_id", flat=True)
    )
    attempts = Counter(
        Delivery.objects.filter(subscription__name="tx.kill").values_list("attempts", flat=True)
    )
    figures = {
        "database": connection.vendor,
        "dispatchers": DISPATCHERS,
        "kills": len(killed),
        "messages": total,
        "inflight_at_kills": sum(at_kill.values()),
        "rerun_after_a_kill": sum(count for attempt, count in attempts.items() if attempt > 1),
        "missing_rows": len(set(ids) - set(rows)),
        "duplicate_rows": sum(count - 1 for count in rows.values()),
    }
    _record("transactional-kill", figures)
    assert figures["missing_rows"] == 0 and figures["duplicate_rows"] == 0, figures
    assert len(killed) == KILLS
