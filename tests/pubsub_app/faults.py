"""Faults injected into a real ``runpubsub`` subprocess at one step of a delivery.

``PUBSUB_TEST_FAULT=<step>`` in the subprocess's environment makes the process SIGKILL
itself the first time it reaches that step; the test app installs the hook at start. The
library has no test hooks of its own: these wrap its functions from outside.

Steps, in a delivery's order:

- ``sequence``: inside the transaction that gives messages their offsets, before it commits;
- ``fan_out``: inside the transaction that creates deliveries and advances the
  subscription's cursor, before it commits;
- ``after_claim``: after the claim committed, before any handler starts;
- ``handler``: inside a handler (done by the handler itself, on its first attempt, when
  the payload has ``"kill": "<its subscription>"``);
- ``before_ack``: after handlers returned, before their ack is written.
"""

from __future__ import annotations

import functools
import os
import signal
from collections.abc import Callable
from typing import Any

from django.db import transaction

STEPS = ("sequence", "fan_out", "after_claim", "handler", "before_ack")


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _kill_before_commit(
    func: Callable[..., Any], did_work: Callable[[Any], bool] = bool
) -> Callable[..., Any]:
    """Run ``func`` in an outer transaction and die before that commits, once it did work."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with transaction.atomic():
            done = func(*args, **kwargs)
            if did_work(done):
                die()
        return done

    return wrapper


def _kill_before(func: Callable[..., Any], when: Callable[..., bool]) -> Callable[..., Any]:
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if when(*args, **kwargs):
            die()
        return func(*args, **kwargs)

    return wrapper


def install(step: str) -> None:
    from django_pubsub.dispatcher.workers import WorkerPool
    from django_pubsub.models import DeliveryQuerySet, Topic

    if step not in STEPS:
        raise ValueError(f"PUBSUB_TEST_FAULT must be one of {', '.join(STEPS)}, not {step!r}")
    if step == "sequence":
        # sequence_all owns the transaction on PostgreSQL (one function call for every
        # topic); on SQLite it runs one per topic, which the outer transaction here joins.
        Topic.sequence_all = classmethod(_kill_before_commit(Topic.sequence_all.__func__))  # type: ignore[assignment, attr-defined]
    elif step == "fan_out":
        # On PostgreSQL it may lease what it creates, in the same transaction.
        fan_out = _kill_before_commit(Topic.fan_out.__func__, lambda fanned: fanned.created > 0)  # type: ignore[attr-defined]
        Topic.fan_out = classmethod(fan_out)  # type: ignore[assignment]
    elif step == "after_claim":
        # Every claimed chunk reaches the pool through submit(), after its claim committed.
        WorkerPool.submit = _kill_before(  # type: ignore[method-assign]
            WorkerPool.submit, lambda self, chunk: bool(chunk.jobs)
        )
    elif step == "before_ack":
        DeliveryQuerySet.ack = _kill_before(  # type: ignore[method-assign]
            DeliveryQuerySet.ack, lambda self, ids, **kw: bool(ids)
        )
    # "handler": the handler kills the process itself when its payload says so.
