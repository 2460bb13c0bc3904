"""A fault at each step of a delivery, in a real runpubsub process: the documented outcome.

Each test starts runpubsub with PUBSUB_TEST_FAULT=<step>: the process SIGKILLs itself the
first time it reaches that step (tests/pubsub_app/faults.py). The state it leaves behind is
checked against docs/reliability.md, then a clean runpubsub finishes, and the whole history
of handler runs is checked: every message handled for every subscription, the ordered one
never going back, and a second run only where the step says one may happen.
"""

from __future__ import annotations

import signal
from collections import Counter
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

from django_pubsub import publish_many
from django_pubsub.models import Delivery, Message, Subscription, Topic
from tests.conftest import runs, states
from tests.pubsub_app.models import HandlerRun

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.processes]
SUBS = ("kill.unordered", "kill.ordered")
N = 24


def crash_at(step: str, runpubsub: Any, tmp_path: Path) -> set[tuple[str, int]]:
    """Run until the fault kills the process; return the (subscription, message) in flight."""
    log = tmp_path / "faulty.log"
    proc = runpubsub(
        "--subscriptions",
        ",".join(SUBS),
        "--workers",
        "4",
        "--poll-interval",
        "0.02",
        log=log,
        env={"PUBSUB_TEST_FAULT": step},
    )
    assert proc.wait(timeout=60) == -signal.SIGKILL, log.read_text()
    inflight = Delivery.objects.filter(state="inflight").values_list(
        "subscription__name", "message_id"
    )
    return set(inflight)


def finish(runpubsub: Any, tmp_path: Path) -> None:
    log = tmp_path / "final.log"
    proc = runpubsub("--subscriptions", ",".join(SUBS), "--until-idle", log=log)
    assert proc.wait(timeout=60) == 0, log.read_text()


def check_history(ids: list[int], inflight_at_kill: set[tuple[str, int]]) -> int:
    """Everything handled and in order; a second run only for what was in flight. Returns
    the number of second runs."""
    duplicates = 0
    for name in SUBS:
        assert states(name) == {"acked": len(ids)}, name
        handled = runs(name)
        counts = Counter(run.message_id for run in handled)
        assert set(counts) == set(ids), name
        again = {mid for mid, count in counts.items() if count > 1}
        assert all(count <= 2 for count in counts.values()), name
        assert {(name, mid) for mid in again} <= inflight_at_kill, name
        duplicates += len(again)
    ordered = [run.offset for run in runs("kill.ordered")]
    assert all(a <= b for a, b in pairwise(ordered)), ordered
    return duplicates


def publish(**extra: Any) -> list[int]:
    return publish_many("t.kill", [{"n": n, "sleep": 0.005, **extra} for n in range(N)])


def test_a_crash_while_sequencing_rolls_the_offsets_back(runpubsub: Any, tmp_path: Path) -> None:
    ids = publish()
    inflight = crash_at("sequence", runpubsub, tmp_path)
    # The offsets were being assigned when it died: none of them committed.
    assert Message.objects.filter(id__in=ids, offset__isnull=False).count() == 0
    assert Topic.objects.get(name="t.kill").next_offset == 0
    assert not inflight and not Delivery.objects.exists()
    finish(runpubsub, tmp_path)
    assert check_history(ids, inflight) == 0
    offsets = sorted(Message.objects.filter(id__in=ids).values_list("offset", flat=True))
    assert offsets == list(range(N))


def test_a_crash_while_advancing_the_cursor_rolls_the_fan_out_back(
    runpubsub: Any, tmp_path: Path
) -> None:
    ids = publish()
    inflight = crash_at("fan_out", runpubsub, tmp_path)
    # Offsets committed; the deliveries and the cursor move were one transaction: neither.
    assert Message.objects.filter(id__in=ids, offset__isnull=True).count() == 0
    assert not Delivery.objects.exists()
    assert set(Subscription.objects.filter(name__in=SUBS).values_list("position", flat=True)) == {0}
    finish(runpubsub, tmp_path)
    assert check_history(ids, inflight) == 0
    assert set(Delivery.objects.values_list("attempts", flat=True)) == {1}


def test_a_crash_after_the_claim_runs_each_claimed_delivery_once(
    runpubsub: Any, tmp_path: Path
) -> None:
    ids = publish()
    inflight = crash_at("after_claim", runpubsub, tmp_path)
    # Leased, attempt counted, but no handler started.
    assert inflight and not HandlerRun.objects.exists()
    finish(runpubsub, tmp_path)
    assert check_history(ids, inflight) == 0
    # The attempt that never ran stays counted (docs/guarantees.md section 4).
    for name, message_id in inflight:
        delivery = Delivery.objects.get(subscription__name=name, message_id=message_id)
        assert delivery.attempts == 2
        assert "lease taken back" in delivery.errors[0]["error"]


def test_a_crash_inside_a_handler_runs_that_delivery_again(runpubsub: Any, tmp_path: Path) -> None:
    ids = publish()
    victim = publish_many("t.kill", [{"n": N, "kill": "kill.unordered"}])[0]
    ids.append(victim)
    inflight = crash_at("handler", runpubsub, tmp_path)
    assert ("kill.unordered", victim) in inflight
    assert HandlerRun.objects.filter(subscription="kill.unordered", message_id=victim).count() == 1
    finish(runpubsub, tmp_path)
    check_history(ids, inflight)
    victim_runs = [r.attempt for r in runs("kill.unordered") if r.message_id == victim]
    assert victim_runs == [1, 2]


def test_a_crash_between_handler_and_ack_runs_the_handled_deliveries_again(
    runpubsub: Any, tmp_path: Path
) -> None:
    ids = publish()
    inflight = crash_at("before_ack", runpubsub, tmp_path)
    handled_unacked = {
        (name, mid)
        for name, mid in inflight
        if HandlerRun.objects.filter(subscription=name, message_id=mid).exists()
    }
    assert handled_unacked  # the handlers returned; their ack was never written
    finish(runpubsub, tmp_path)
    duplicates = check_history(ids, inflight)
    assert duplicates >= len(handled_unacked)
