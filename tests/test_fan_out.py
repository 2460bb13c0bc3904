"""Sequencing and fan-out as the dispatcher runs them on the way from a commit to a handler:
one call sequences every topic, and on PostgreSQL a fan-out leases what it creates."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.db import OperationalError
from django.utils import timezone

from django_pubsub import publish, publish_many
from django_pubsub.backends import Lease
from django_pubsub.dispatcher import DispatchLoop
from django_pubsub.models import Delivery, DeliveryQuerySet, Message, Subscription, Topic
from tests.conftest import FakeClock, claims_lost, is_postgres, runs, states, wait_for
from tests.pubsub_app.subscribers import Gate

pytestmark = pytest.mark.django_db(transaction=True)


def test_one_call_sequences_every_topic_and_one_topic_alone() -> None:
    basic = publish_many("t.basic", [{"n": n} for n in range(3)])
    ordered = publish_many("t.ordered", [{"n": n} for n in range(2)])
    topic = Topic.objects.get(name="t.ordered")
    assert Topic.sequence(topic.pk, batch=10) == 2
    assert Message.objects.filter(id__in=basic, offset__isnull=True).count() == 3
    publish("t.ordered", {"n": 2})
    sequenced = Topic.sequence_all(batch=10)
    assert sequenced == {Topic.objects.get(name="t.basic").pk: 3, topic.pk: 1}
    offsets = Message.objects.filter(id__in=[*ordered]).order_by("id")
    assert list(offsets.values_list("offset", flat=True)) == [0, 1]
    assert Topic.sequence_all(batch=10) == {}


@pytest.fixture
def claimed(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many deliveries each DeliveryQuerySet.claim() call took."""
    counts: list[int] = []
    original = DeliveryQuerySet.claim

    def counting(self: DeliveryQuerySet, *args: Any, **kwargs: Any) -> Any:
        rows = original(self, *args, **kwargs)
        counts.append(len(rows))
        return rows

    monkeypatch.setattr(DeliveryQuerySet, "claim", counting)
    return counts


def _lease(name: str, limit: int, token: str = "fan") -> Lease:
    sub = Subscription.objects.get(name=name)
    return Lease(sub.pk, limit, token, timezone.now() + timedelta(seconds=30))


def test_a_fan_out_leases_the_first_new_deliveries_on_postgresql() -> None:
    ids = publish_many("t.basic", [{"n": n} for n in range(3)])
    topic = Topic.objects.get(name="t.basic")
    Topic.sequence_all(batch=10)
    fanned = Topic.fan_out(topic.pk, now=timezone.now(), batch=10, leases=[_lease("basic.one", 2)])
    assert fanned.created == 6  # three messages, two subscriptions
    one = Subscription.objects.get(name="basic.one")
    if not is_postgres():
        # Elsewhere a fan-out leases nothing: the claim that follows does.
        assert fanned.leased == {}
        assert states("basic.one") == {"pending": 3}
        return
    (leased,) = fanned.leased.values()
    assert [row.message_id for row in leased] == ids[:2]
    assert [row.offset for row in leased] == [0, 1]
    assert [row.payload for row in leased] == [{"n": 0}, {"n": 1}]
    assert {row.attempt for row in leased} == {1}
    assert list(fanned.leased) == [one.pk]
    rows = Delivery.objects.filter(subscription=one).order_by("offset")
    assert [(d.state, d.attempts, d.lease_token) for d in rows] == [
        ("inflight", 1, "fan"),
        ("inflight", 1, "fan"),
        ("pending", 0, None),
    ]
    assert states("basic.two") == {"pending": 3}
    # What it leased is fenced like a claim: its token acks it.
    assert (
        len(
            Delivery.objects.ack(
                [row.delivery_id for row in leased], token="fan", now=timezone.now()
            )
        )
        == 2
    )


def test_a_fan_out_leases_nothing_while_older_deliveries_wait() -> None:
    if not is_postgres():
        pytest.skip("Only PostgreSQL leases at fan-out")
    publish("t.basic", {"n": 0})
    topic = Topic.objects.get(name="t.basic")
    Topic.sequence_all(batch=10)
    Topic.fan_out(topic.pk, now=timezone.now(), batch=10)
    publish("t.basic", {"n": 1})
    Topic.sequence_all(batch=10)
    fanned = Topic.fan_out(topic.pk, now=timezone.now(), batch=10, leases=[_lease("basic.one", 5)])
    # The older one is due: a claim takes it first, so the new one is not leased past it.
    assert fanned.created == 2 and fanned.leased == {}
    assert states("basic.one") == {"pending": 2}


def test_a_new_message_reaches_its_handler_through_the_fan_out_lease(
    clock: FakeClock, claimed: list[int]
) -> None:
    loop = DispatchLoop(subscriptions=["basic.one"], handle_signals=False, clock=clock)
    loop.start()
    try:
        loop.step()  # settles in: nothing to do
        publish("t.basic", {"n": 1})
        loop.step()
        wait_for(lambda: len(runs("basic.one")) == 1)
    finally:
        loop.stop()
        loop.close()
    assert states("basic.one") == {"acked": 1}
    assert [run.attempt for run in runs("basic.one")] == [1]
    # PostgreSQL: leased by the fan-out, no claim took anything. SQLite: a claim did.
    assert sum(claimed) == (0 if is_postgres() else 1)


def test_a_lease_whose_messages_were_not_read_is_given_back(clock: FakeClock) -> None:
    """A fan-out or claim that leased and then failed (a lost connection, say) gives the
    leases back, attempt and all, even when the first attempt to give back fails too."""
    publish_many("t.basic", [{"n": 1}, {"n": 2}])
    loop = DispatchLoop(subscriptions=["basic.one"], handle_signals=False, clock=clock)
    loop.start()
    try:
        with claims_lost(loop, give_back_fails=True), pytest.raises(OperationalError):
            loop.step()
        # Leased to this live dispatcher, which could not give them back yet.
        leased = states("basic.one").get("inflight", 0)
        assert leased >= 1
        loop.step()  # gives them back first, then claims them again
        wait_for(lambda: len(runs("basic.one")) == 2)
        loop.step()
    finally:
        loop.stop()
        loop.close()
    assert states("basic.one") == {"acked": 2}
    # The lost lease cost no attempt.
    assert [run.attempt for run in runs("basic.one")] == [1, 1]
    assert loop.counts.given_back == leased


def test_an_ordered_subscription_is_never_leased_at_fan_out(
    clock: FakeClock, claimed: list[int]
) -> None:
    loop = DispatchLoop(subscriptions=["ordered.one"], handle_signals=False, clock=clock)
    loop.start()
    try:
        publish("t.ordered", {"n": 1})
        loop.step()
        wait_for(lambda: len(runs("ordered.one")) == 1)
    finally:
        loop.stop()
        loop.close()
    assert sum(claimed) == 1  # claimed under its subscription's lock, as a run


def test_a_fan_out_leases_past_older_deliveries_that_are_not_due() -> None:
    """Running or waiting for a retry later: nothing a claim would take first."""
    if not is_postgres():
        pytest.skip("Only PostgreSQL leases at fan-out")
    publish_many("t.basic", [{"n": 0}, {"n": 1}])
    topic = Topic.objects.get(name="t.basic")
    Topic.sequence_all(batch=10)
    Topic.fan_out(topic.pk, now=timezone.now(), batch=10)
    running, retrying = Delivery.objects.filter(subscription__name="basic.one").order_by("offset")
    Delivery.objects.filter(pk=running.pk).update(state="inflight", lease_token="other")
    later = timezone.now() + timedelta(minutes=5)
    Delivery.objects.filter(pk=retrying.pk).update(state="retry", available_at=later)
    publish("t.basic", {"n": 2})
    Topic.sequence_all(batch=10)
    fanned = Topic.fan_out(topic.pk, now=timezone.now(), batch=10, leases=[_lease("basic.one", 5)])
    (leased,) = fanned.leased.values()
    assert [row.offset for row in leased] == [2]


def test_an_unordered_claim_whose_rows_were_not_read_is_given_back(clock: FakeClock) -> None:
    """The claim's own statement (not a fan-out's): on PostgreSQL it commits on its own."""
    publish("t.basic", {"n": 1})
    topic = Topic.objects.get(name="t.basic")
    Topic.sequence_all(batch=10)
    Topic.fan_out(topic.pk, now=clock.now, batch=10)  # no lease: the claim takes it
    loop = DispatchLoop(subscriptions=["basic.one"], handle_signals=False, clock=clock)
    loop.start()
    assert loop.parts is not None
    claimer = loop.parts.claimer
    try:
        with claims_lost(loop), pytest.raises(OperationalError):
            claimer.claim(clock.now)
        assert states("basic.one") == {"pending": 1}
        assert set(Delivery.objects.values_list("attempts", flat=True)) == {0}
        assert not claimer.orphans
    finally:
        loop.stop()
        loop.close()


def test_giving_back_leaves_what_a_worker_holds(clock: FakeClock, gate: Gate) -> None:
    publish_many("t.basic", [{"n": 1, "gate": True}, {"n": 2, "gate": True}])
    loop = DispatchLoop(subscriptions=["basic.one"], handle_signals=False, clock=clock, workers=1)
    loop.start()
    assert loop.parts is not None
    parts = loop.parts
    try:
        loop.step()  # one worker: one delivery leased and running, the other pending
        wait_for(lambda: len(gate.started) == 1)
        sub = Subscription.objects.get(name="basic.one")
        assert loop.row is not None
        # Leased to this dispatcher by a claim whose rows never arrived.
        (orphan,) = Delivery.objects.claim(
            sub, limit=1, now=clock.now, token="lost", dispatcher_id=loop.row.pk
        )
        parts.claimer.give_back_orphans()
        running = Delivery.objects.get(message_id=gate.started[0][0], subscription=sub)
        assert running.state == "inflight"
        given = Delivery.objects.get(pk=orphan.delivery_id)
        assert (given.state, given.attempts) == ("pending", 0)
        gate.open()
        wait_for(lambda: parts.pool.busy_chunks == 0)
        loop.step()
    finally:
        gate.open()
        loop.stop()
        loop.close()
    assert states("basic.one").get("acked", 0) >= 1


def test_messages_whose_topic_row_is_gone_are_left_alone() -> None:
    from django.db import connection

    publish("t.gone", {"n": 1})
    publish("t.basic", {"n": 1})
    gone = Topic.objects.get(name="t.gone")
    with connection.cursor() as cursor:  # as a raw DELETE could, now that no constraint stops it
        cursor.execute("DELETE FROM django_pubsub_topic WHERE id = %s", [gone.pk])
    assert Topic.sequence_all(batch=10) == {Topic.objects.get(name="t.basic").pk: 1}
    assert Topic.sequence_all(batch=10) == {}
    assert Topic.sequence(gone.pk, batch=10) == 0


def test_the_loop_compiles_no_statement_with_jit(clock: FakeClock) -> None:
    """JIT compiling a statement costs about 0.4 s once estimates grow with the history."""
    from django.db import connection

    if not is_postgres():
        pytest.skip("PostgreSQL only")
    loop = DispatchLoop(subscriptions=["basic.one"], handle_signals=False, clock=clock)
    loop.start()
    try:
        for _ in range(2):  # and again on a new connection, as after a lost one
            loop.step()
            with connection.cursor() as cursor:
                cursor.execute("SHOW jit")
                assert cursor.fetchone()[0] == "off"
            connection.close()
    finally:
        loop.stop()
        loop.close()
