"""Several runpubsub processes on one database share the work without doubling it."""

from __future__ import annotations

import time
from collections import Counter
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

from django_pubsub import publish_many
from django_pubsub.models import Delivery
from tests.conftest import is_postgres, runs
from tests.pubsub_app.models import HandlerRun

pytestmark = pytest.mark.django_db(transaction=True)
SUBS = ("multi.a", "multi.b", "multi.ordered")


def test_dispatchers_share_the_work_exactly_once(runpubsub: Any, tmp_path: Path) -> None:
    count = 300
    processes = 3 if is_postgres() else 2
    ids = publish_many("t.multi", [{"n": n, "sleep": 0.002} for n in range(count)])
    procs = [
        runpubsub(
            "--subscriptions",
            ",".join(SUBS),
            "--until-idle",
            "--idle-wait",
            "1",
            "--poll-interval",
            "0.01",
            log=tmp_path / f"d{n}.log",
        )
        for n in range(processes)
    ]
    deadline = time.monotonic() + 120
    for n, proc in enumerate(procs):
        assert proc.wait(timeout=max(deadline - time.monotonic(), 1)) == 0, (
            tmp_path / f"d{n}.log"
        ).read_text()
    assert Delivery.objects.filter(subscription__name__in=SUBS).exclude(state="acked").count() == 0
    for name in SUBS:
        handled = Counter(run.message_id for run in runs(name))
        # No crash, no failure: every message handled exactly once per subscription.
        assert set(handled) == set(ids) and set(handled.values()) == {1}, name
    ordered = [run.offset for run in runs("multi.ordered")]
    assert all(b == a + 1 for a, b in pairwise(ordered))
    # The work really was shared (on PostgreSQL; SQLite's one writer may let one win).
    pids = set(HandlerRun.objects.filter(subscription="multi.a").values_list("pid", flat=True))
    if is_postgres():
        assert len(pids) > 1
