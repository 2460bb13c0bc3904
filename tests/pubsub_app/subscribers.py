"""Subscribers used by the tests, each on its own topic so tests do not see each other's."""

from __future__ import annotations

import os
import threading
import time

from django_pubsub import Message, subscriber

from .models import HandlerRun


class Planned(Exception):
    """Raised by a handler because its payload asked it to fail."""


class Unprintable(Exception):
    """An exception whose text cannot be had: its __str__ raises."""

    def __str__(self) -> str:
        raise RuntimeError("no text for you")


# Exceptions a handler raises when its payload's "raise" names one: texts no column can
# hold as they are, and one without any text.
AWKWARD = {
    "nul": lambda: Planned("bad \x00 text"),
    "surrogate": lambda: Planned("bad \ud800 text"),
    "huge": lambda: Planned("x" * 1_000_000),
    "unprintable": Unprintable,
    "interrupt": KeyboardInterrupt,
}


class Gate:
    """Handlers whose payload has ``"gate": true`` wait here (10 s at most) until a test
    opens it: dispatchers in the test's own process only. ``started`` lists the (message
    id, attempt) of each that reached it."""

    def __init__(self) -> None:
        self.opened = threading.Event()
        self.started: list[tuple[int, int]] = []

    def reset(self) -> None:
        self.opened.clear()
        self.started.clear()

    def open(self) -> None:
        self.opened.set()


GATE = Gate()


def record(message: Message) -> None:
    payload = message.payload if not isinstance(message.payload, bytes) else None
    span = isinstance(payload, dict) and payload.get("span")
    run = record_only(message, started=time.time() if span else None)
    try:
        _act_on(message, payload)
    finally:
        if span:
            HandlerRun.objects.filter(pk=run.pk).update(ended=time.time())


def _act_on(message: Message, payload: object) -> None:
    """Do what the payload asks: die, wait, sleep, fail."""
    if isinstance(payload, dict):
        if payload.get("kill") == message.subscription and message.attempt == 1:
            from .faults import die

            die()
        if payload.get("gate"):
            GATE.started.append((message.id, message.attempt))
            GATE.opened.wait(10)
        if payload.get("raise") and message.attempt == 1:
            raise AWKWARD[payload["raise"]]()
        if payload.get("sleep"):
            time.sleep(payload["sleep"])
        if payload.get("sleep_first") and message.attempt == 1:
            time.sleep(payload["sleep_first"])
        if message.attempt <= payload.get("fail_times", 0):
            raise Planned(f"planned failure {message.attempt}")
        if payload.get("fail_while") and os.path.exists(payload["fail_while"]):
            raise Planned(f"broken while {payload['fail_while']} exists")


@subscriber("t.basic", name="basic.one")
def basic_one(message: Message) -> None:
    record(message)


@subscriber("t.basic", name="basic.two")
def basic_two(message: Message) -> None:
    record(message)


@subscriber("t.ordered", name="ordered.one", ordered=True)
def ordered_one(message: Message) -> None:
    record(message)


@subscriber("t.ordered", name="ordered.two", ordered=True)
def ordered_two(message: Message) -> None:
    record(message)


@subscriber(
    "t.flaky",
    name="flaky.one",
    max_attempts=4,
    backoff={"base": 10.0, "factor": 3.0, "maximum": 100.0, "jitter": 0.5},
)
def flaky_one(message: Message) -> None:
    record(message)


@subscriber("t.slow", name="slow.one", lease=1.0, max_inflight=2)
def slow_one(message: Message) -> None:
    record(message)


@subscriber("t.earliest", name="earliest.one", start="earliest")
def earliest_one(message: Message) -> None:
    record(message)


@subscriber("t.kill", name="kill.unordered", lease=3.0)
def kill_unordered(message: Message) -> None:
    record(message)


@subscriber("t.kill", name="kill.ordered", ordered=True, lease=3.0)
def kill_ordered(message: Message) -> None:
    record(message)


@subscriber("t.multi", name="multi.a")
def multi_a(message: Message) -> None:
    record(message)


@subscriber("t.multi", name="multi.b")
def multi_b(message: Message) -> None:
    record(message)


@subscriber("t.multi", name="multi.ordered", ordered=True)
def multi_ordered(message: Message) -> None:
    record(message)


@subscriber("t.hang", name="hang.one", timeout=0.3, max_inflight=2, max_attempts=3)
def hang_one(message: Message) -> None:
    record(message)


# Starts and ends of hang.ordered's runs in this process: (event, offset, attempt).
ORDERED_HANG_EVENTS: list[tuple[str, int, int]] = []


@subscriber(
    "t.hang.ordered",
    name="hang.ordered",
    ordered=True,
    timeout=0.3,
    backoff={"base": 0.05, "factor": 1.0, "maximum": 0.05, "jitter": 0.0},
)
def hang_ordered(message: Message) -> None:
    ORDERED_HANG_EVENTS.append(("start", message.offset, message.attempt))
    try:
        record(message)
    finally:
        ORDERED_HANG_EVENTS.append(("end", message.offset, message.attempt))


# t.scale: five subscriptions on one topic for the scale-out test.
# t.lock: short leases, for dispatchers held up by a lock while their handlers run.
@subscriber("t.lock", name="lock.ordered", ordered=True, lease=1.0)
def lock_ordered(message: Message) -> None:
    record(message)


@subscriber("t.lock", name="lock.unordered", lease=1.0)
def lock_unordered(message: Message) -> None:
    record(message)


@subscriber("t.lock", name="lock.backlog")
def lock_backlog(message: Message) -> None:
    record(message)


@subscriber("t.scale", name="scale.a")
def scale_a(message: Message) -> None:
    record(message)


@subscriber("t.scale", name="scale.b")
def scale_b(message: Message) -> None:
    record(message)


@subscriber("t.scale", name="scale.c")
def scale_c(message: Message) -> None:
    record(message)


@subscriber("t.scale", name="scale.d")
def scale_d(message: Message) -> None:
    record(message)


@subscriber("t.scale", name="scale.e")
def scale_e(message: Message) -> None:
    record(message)


# Ordering keys, batches, delivery modes, async handlers (issue: docs/guarantees.md 11-14).


@subscriber("t.keyed", name="keyed.one", ordered="key", max_attempts=3, backoff={"base": 60})
def keyed_one(message: Message) -> None:
    record(message)


@subscriber(
    "t.keyed.bury", name="keyed.bury", ordered="key", on_dead="dead_letter_key", max_attempts=1
)
def keyed_bury(message: Message) -> None:
    record(message)


@subscriber("t.keyed.kill", name="keyed.kill", ordered="key", lease=3.0)
def keyed_kill(message: Message) -> None:
    record(message)


# The batches each batch handler got, as lists of message ids (in-process dispatchers only).
BATCHES: list[list[int]] = []


def record_batch(messages: list[Message]) -> None:
    from django_pubsub import BatchFailure

    BATCHES.append([message.id for message in messages])
    for message in messages:
        record_only(message)
    failing = [
        message
        for message in messages
        if isinstance(message.payload, dict)
        and message.attempt <= message.payload.get("fail_in_batch", 0)
    ]
    if any(isinstance(m.payload, dict) and m.payload.get("fail_batch") for m in messages):
        raise Planned("the whole batch failed")
    if failing:
        raise BatchFailure(
            {message.id: Planned(f"planned {message.offset}") for message in failing}
        )


def record_only(message: Message, started: float | None = None) -> HandlerRun:
    """The run's row, and nothing else."""
    payload = message.payload if not isinstance(message.payload, bytes) else None
    return HandlerRun.objects.create(
        subscription=message.subscription,
        message_id=message.id,
        offset=message.offset,
        attempt=message.attempt,
        pid=os.getpid(),
        payload=payload,
        started=started,
    )


@subscriber("t.batch", name="batch.one", batch_size=10, batch_wait=0, max_attempts=3)
def batch_one(messages: list[Message]) -> None:
    record_batch(messages)


@subscriber("t.batch", name="batch.keyed", batch_size=4, ordered="key", max_attempts=3)
def batch_keyed(messages: list[Message]) -> None:
    record_batch(messages)


@subscriber("t.tx", name="tx.one", delivery="transactional", max_attempts=3, lease=3.0)
def tx_one(message: Message) -> None:
    """Writes its row, then fails (after the write) as the payload asks: a transactional
    delivery keeps one row per message."""
    record_only(message)
    _act_on(message, message.payload)


@subscriber("t.tx", name="tx.batch", delivery="transactional", batch_size=5, max_attempts=3)
def tx_batch(messages: list[Message]) -> None:
    record_batch(messages)


@subscriber("t.amo", name="amo.one", delivery="at_most_once")
def amo_one(message: Message) -> None:
    record(message)


@subscriber("t.async", name="async.one", timeout=0.5, max_attempts=2)
async def async_one(message: Message) -> None:
    import asyncio

    from asgiref.sync import sync_to_async

    payload = message.payload if isinstance(message.payload, dict) else {}
    await sync_to_async(record_only)(message)
    if payload.get("sleep") and message.attempt == 1:
        await asyncio.sleep(payload["sleep"])
    if payload.get("sync_orm"):
        HandlerRun.objects.count()  # not allowed in async code: SynchronousOnlyOperation
    if message.attempt <= payload.get("fail_times", 0):
        raise Planned(f"planned failure {message.attempt}")


@subscriber("t.async", name="async.batch", batch_size=5, ordered="key")
async def async_batch(messages: list[Message]) -> None:
    from asgiref.sync import sync_to_async

    await sync_to_async(record_batch)(messages)


@subscriber("t.batch.wait", name="batch.wait", batch_size=100, batch_wait=0.3)
def batch_wait(messages: list[Message]) -> None:
    record_batch(messages)


@subscriber("t.tx.kill", name="tx.kill", delivery="transactional", lease=3.0)
def tx_kill(message: Message) -> None:
    """One row per message, written in the transaction its ack commits in."""
    record_only(message)
    time.sleep(message.payload.get("sleep", 0) if isinstance(message.payload, dict) else 0)


@subscriber("t.keyed.hang", name="keyed.hang", ordered="key", timeout=0.3, backoff={"base": 0.1})
def keyed_hang(message: Message) -> None:
    record(message)


@subscriber(
    "t.breaker",
    name="breaker.one",
    circuit_breaker={"failures": 3, "pause": 60},
    max_attempts=1,
    max_inflight=1,
)
def breaker_one(message: Message) -> None:
    record(message)
    payload = message.payload if isinstance(message.payload, dict) else {}
    if payload.get("error") == "value":
        raise ValueError("the partner's API said no")
    if payload.get("error") == "key":
        raise KeyError("missing")
    if payload.get("error") == "awkward":
        raise ValueError("bad \ud800 and \x00 text")


@subscriber(
    "t.breaker.batch",
    name="breaker.batch",
    batch_size=10,
    max_attempts=5,
    circuit_breaker={"failures": 3, "pause": 60},
)
def breaker_batch(messages: list[Message]) -> None:
    record_batch(messages)
    raise ValueError("the whole batch fails")


@subscriber("t.filter", name="filter.eu", filter={"headers": {"region": "eu"}})
def filter_eu(message: Message) -> None:
    record(message)


@subscriber("t.filter", name="filter.key", filter={"key": "vip", "headers": {"tier": "gold"}})
def filter_key(message: Message) -> None:
    record(message)


@subscriber("t.filter", name="filter.keyed", ordered="key", filter={"headers": {"region": "eu"}})
def filter_keyed(message: Message) -> None:
    record(message)


@subscriber("t.rate", name="rate.one", rate="20/s")
def rate_one(message: Message) -> None:
    record_only(message, started=time.time())
