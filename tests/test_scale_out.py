"""Several runpubsub processes on one database share the work without doubling it.

Invariant for every test here (no process crashes): each (subscription, message) that was
committed is handled exactly once, nothing else is, and an ordered subscription's handler
starts follow the log's offsets one by one.

The big run of the fault suite (4 dispatchers x 10,000 messages x 5 subscriptions) is the
same test with PUBSUB_SCALE_MESSAGES=10000; see docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from django.db import connection, transaction

from django_pubsub import publish, publish_many
from django_pubsub.models import Delivery
from tests.conftest import ROOT, is_postgres, runs, wait_for, write_with_rollbacks
from tests.pubsub_app.models import HandlerRun

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.processes]
SCALE_SUBS = ("scale.a", "scale.b", "scale.c", "scale.d", "scale.e")
SCALE_MESSAGES = int(os.environ.get("PUBSUB_SCALE_MESSAGES", "200"))


def start_dispatchers(
    runpubsub: Any, count: int, subs: Sequence[str], tmp_path: Path, *extra: str
) -> list[Any]:
    return [
        runpubsub(
            "--subscriptions",
            ",".join(subs),
            "--poll-interval",
            "0.01",
            *extra,
            log=tmp_path / f"d{n}.log",
        )
        for n in range(count)
    ]


def wait_all(procs: list[Any], tmp_path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for n, proc in enumerate(procs):
        code = proc.wait(timeout=max(deadline - time.monotonic(), 1))
        assert code == 0, (tmp_path / f"d{n}.log").read_text()


def check_exactly_once(subs: Sequence[str], ids: Sequence[int], ordered: Sequence[str]) -> None:
    assert Delivery.objects.filter(subscription__name__in=subs).exclude(state="acked").count() == 0
    for name in subs:
        handled = Counter(run.message_id for run in runs(name))
        assert set(handled) == set(ids), name
        assert set(handled.values()) == {1}, (name, handled.most_common(3))
    for name in ordered:
        offsets = [run.offset for run in runs(name)]
        assert all(b == a + 1 for a, b in pairwise(offsets)), name


def test_dispatchers_share_the_work_exactly_once(runpubsub: Any, tmp_path: Path) -> None:
    """4 dispatchers x SCALE_MESSAGES x 5 subscriptions. (Ordered subscriptions across
    processes: the test below, and the kill tests.)"""
    processes = 4
    ids = publish_many("t.scale", [{"n": n} for n in range(SCALE_MESSAGES)])
    started = time.monotonic()
    procs = start_dispatchers(
        runpubsub, processes, SCALE_SUBS, tmp_path, "--until-idle", "--idle-wait", "1"
    )
    wait_all(procs, tmp_path, timeout=max(120, SCALE_MESSAGES / 10))
    elapsed = time.monotonic() - started
    check_exactly_once(SCALE_SUBS, ids, ordered=[])
    pids = Counter(HandlerRun.objects.values_list("pid", flat=True))
    figures = {
        "database": connection.vendor,
        "dispatchers": processes,
        "messages": len(ids),
        "subscriptions": len(SCALE_SUBS),
        "handled": sum(pids.values()),
        "duplicates": sum(pids.values()) - len(ids) * len(SCALE_SUBS),
        "per_dispatcher": sorted(pids.values()),
        "seconds": round(elapsed, 1),
    }
    print(json.dumps(figures))
    results = ROOT / ".test-results"
    results.mkdir(exist_ok=True)
    (results / f"scale-{connection.vendor}.json").write_text(json.dumps(figures, indent=1))
    if is_postgres():
        # The work really was shared (SQLite's one writer may let one process win).
        assert len(pids) > 1


def test_out_of_order_commits_and_rollbacks_with_several_dispatchers(
    runpubsub: Any, tmp_path: Path
) -> None:
    """Writers commit out of id order (one holds a low id open for a while) and roll back at
    random, while several dispatchers run: delivered = committed, in the log's order."""
    subs = ("ordered.one", "ordered.two")
    procs = start_dispatchers(runpubsub, 3 if is_postgres() else 2, subs, tmp_path)
    committed: list[int] = []
    lock = threading.Lock()
    rng = random.Random(11)
    plans = [[rng.random() for _ in range(20)] for _ in range(4)]
    long_open = threading.Event()

    def writer(plan: list[float]) -> None:
        try:
            write_with_rollbacks("t.ordered", plan, committed, lock)
        finally:
            connection.close()

    def long_writer() -> None:
        try:
            with transaction.atomic():
                message_id = publish("t.ordered", {"long": True})
                long_open.set()
                time.sleep(1.5)  # later writers commit meanwhile with higher ids
            with lock:
                committed.append(message_id)
        finally:
            connection.close()

    threads = [threading.Thread(target=long_writer, daemon=True)]
    threads[0].start()
    assert long_open.wait(10)
    threads += [threading.Thread(target=writer, args=(plan,), daemon=True) for plan in plans]
    for thread in threads[1:]:
        thread.start()
    for thread in threads:
        thread.join(60)
    wait_for(
        lambda: all(
            Delivery.objects.filter(subscription__name=name, state="acked").count()
            == len(committed)
            for name in subs
        ),
        timeout=60,
    )
    for proc in procs:
        proc.terminate()
    wait_all(procs, tmp_path, timeout=30)
    check_exactly_once(subs, committed, ordered=subs)
    # Both subscriptions saw the one order of the log.
    assert [r.message_id for r in runs(subs[0])] == [r.message_id for r in runs(subs[1])]
