"""No-op subscribers: the benchmark measures django-pubsub, not handlers.

bench.latency appends "message_id start_time" lines to the file named by BENCH_LATENCY_LOG.
"""

from __future__ import annotations

import os
import time

from django_pubsub import Message, subscriber

FAN_OUT = 10


@subscriber("bench.one", name="bench.one")
def one(message: Message) -> None:
    pass


@subscriber("bench.two", name="bench.two")
def two(message: Message) -> None:
    pass


@subscriber("bench.ordered", name="bench.ordered", ordered=True)
def ordered(message: Message) -> None:
    pass


def _noop(message: Message) -> None:
    pass


for _n in range(FAN_OUT):
    subscriber("bench.fan", name=f"bench.fan.{_n}")(_noop)


@subscriber("bench.latency", name="bench.latency")
def latency(message: Message) -> None:
    started = time.time()
    with open(os.environ["BENCH_LATENCY_LOG"], "a") as log:
        log.write(f"{message.id} {started:.6f}\n")


# The delivery strategies, each a no-op on a topic of its own (bench/ours.py --figure modes).
@subscriber("bench.keyed100", name="bench.keyed100", ordered="key")
def keyed100(message: Message) -> None:
    pass


@subscriber("bench.keyed1", name="bench.keyed1", ordered="key")
def keyed1(message: Message) -> None:
    pass


@subscriber("bench.batch", name="bench.batch", batch_size=100)
def batch(messages: list[Message]) -> None:
    pass


@subscriber("bench.tx", name="bench.tx", delivery="transactional")
def transactional(message: Message) -> None:
    pass


@subscriber("bench.async", name="bench.async")
async def asynchronous(message: Message) -> None:
    pass
