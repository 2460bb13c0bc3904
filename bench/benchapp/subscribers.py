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
