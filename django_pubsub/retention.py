"""Retention: prune() removes ended deliveries and the messages nothing needs any more,
topic by topic, a batch at a time, never what a subscription has not finished.

A delivery goes once it has been acked, discarded, dead, expired or filtered for longer
than its kind's retention. A message goes once it is older than the messages retention, every
subscription of its topic (inactive and paused ones included) has fanned it out, and no
delivery of it remains. Settings: PUBSUB["RETENTION"], read per topic at each prune.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.db import IntegrityError
from django.utils import timezone

from . import backends
from .backends import pruning
from .conf import pubsub_settings
from .exceptions import ActionRefused
from .models import Delivery, Subscription, Topic

logger = logging.getLogger("django_pubsub.retention")

# The key one pruning process at a time holds (an arbitrary constant, "prun").
PRUNE_KEY = 0x7072756E


@dataclass
class Pruned:
    """What a prune removed (or, dry, would remove): rows by topic and kind (acked,
    discarded, dead deliveries; messages)."""

    rows: dict[tuple[str, str], int] = field(default_factory=dict)
    complete: bool = True  # False when it stopped before the end (asked to)

    def add(self, topic: str, kind: str, count: int) -> None:
        if count:
            self.rows[(topic, kind)] = self.rows.get((topic, kind), 0) + count

    @property
    def total(self) -> int:
        return sum(self.rows.values())

    def by_kind(self) -> dict[str, int]:
        kinds: dict[str, int] = {}
        for (_, kind), count in self.rows.items():
            kinds[kind] = kinds.get(kind, 0) + count
        return kinds


@contextmanager
def exclusive(using: str = "default") -> Iterator[bool]:
    """Hold the pruning for this process (True), unless another holds it (False)."""
    backend = backends.get(using)
    held = backend.try_hold(PRUNE_KEY)
    try:
        yield held
    finally:
        if held:
            backend.let_go(PRUNE_KEY)


def prune(
    now: datetime | None = None,
    *,
    dry_run: bool = False,
    should_stop: Callable[[], bool] = lambda: False,
    using: str = "default",
) -> Pruned:
    """Remove (or, ``dry_run``, count) what retention lets go. Each statement is its own
    short transaction of at most BATCH_SIZE rows, so no claim, ack or publish waits on it
    for long; ``should_stop`` is asked between them. Run it outside a transaction (or it
    is one long transaction) and, but for a dry run, in one process at a time
    (exclusive())."""
    now = now or timezone.now()
    backend = backends.get(using)
    adapt = backend.connection.ops.adapt_datetimefield_value
    with backend.connection.cursor() as cursor:
        run = _Run(cursor, backend, pubsub_settings.batch_size, dry_run, should_stop)
        for topic in Topic.objects.using(using).order_by("pk"):
            cutoffs = {
                kind: None if seconds is None else adapt(now - timedelta(seconds=seconds))
                for kind, seconds in pubsub_settings.retention(topic.name).items()
            }
            subs = Subscription.objects.using(using).filter(topic=topic).order_by("pk")
            finished = all(
                run.deliveries(topic.name, sub_id, cutoffs)
                for sub_id in subs.values_list("pk", flat=True)
            )
            if not finished or not run.messages(topic, cutoffs):
                run.done.complete = False
                break
    return run.done


@dataclass
class _Run:
    """One prune's cursor, sizes and tally."""

    cursor: Any
    backend: backends.Backend
    batch: int
    dry_run: bool
    should_stop: Callable[[], bool]
    done: Pruned = field(default_factory=Pruned)

    @contextmanager
    def breathing(self) -> Iterator[None]:
        """Run a removing statement, then leave the database to other writers a while."""
        started = time.monotonic()
        yield
        if not self.dry_run:
            time.sleep(self.backend.pause_after(time.monotonic() - started))

    def deliveries(self, topic: str, sub_id: int, cutoffs: dict[str, Any]) -> bool:
        """A subscription's ended deliveries, a window of BATCH_SIZE at a time in message
        order, up to the first window that began after the latest cutoff; False if
        stopped."""
        kept = [cutoffs[kind] for kind in pruning.KINDS if cutoffs[kind] is not None]
        if not kept:
            return True
        latest = max(kept)  # adapted datetimes compare as the datetimes do
        low = pruning.lowest_message_id(self.cursor, sub_id)
        while low is not None:
            if self.should_stop():
                return False
            old_enough, high = pruning.delivery_window(self.cursor, sub_id, low, self.batch, latest)
            if not old_enough:
                break
            with self.breathing():
                counts = pruning.delete_deliveries(
                    self.cursor, sub_id, low, high, cutoffs, dry_run=self.dry_run
                )
            for kind, count in counts.items():
                self.done.add(topic, kind, count)
            low = high
        return True

    def messages(self, topic: Topic, cutoffs: dict[str, Any]) -> bool:
        """The topic's messages every subscription is past, BATCH_SIZE offsets at a time
        from the lowest stored, up to the first that is too young; False if stopped."""
        cutoff = cutoffs["messages"]
        if cutoff is None:
            return True
        low, below = pruning.message_bounds(self.cursor, topic.pk)
        while low is not None and low < below:
            if self.should_stop():
                return False
            if not pruning.published_before(self.cursor, topic.pk, low, cutoff):
                break
            high = min(low + self.batch, below)
            try:
                with self.breathing():
                    removed = pruning.delete_messages(
                        self.cursor, topic.pk, low, high, cutoff, cutoffs, dry_run=self.dry_run
                    )
            except IntegrityError:
                # A delivery of one was created meanwhile (a seek inside a caller's
                # transaction, say): nothing was removed; the next prune looks again.
                logger.warning("prune of topic %s: a message is in use again; later", topic)
                return True
            self.done.add(topic.name, "messages", removed)
            low = high
        return True


@dataclass(frozen=True)
class Retiring:
    """What retiring a subscription takes with it."""

    deliveries: int  # every delivery of it
    unfinished: int  # of those, the ones that never ran to an end (pending, retry, dead)
    messages: int  # messages only it keeps, which retention then prunes once old enough


def retiring(sub: Subscription, using: str = "default") -> Retiring:
    """What retire() would take, counted now."""
    mine = Delivery.objects.using(using).filter(subscription=sub)
    with backends.get(using).connection.cursor() as cursor:
        messages = pruning.held_only_by(cursor, sub.pk, sub.topic_id)
    unfinished = mine.exclude(state__in=["acked", "discarded", "expired", "filtered"]).count()
    return Retiring(mine.count(), unfinished, messages)


def retire(sub: Subscription, using: str = "default") -> Retiring:
    """Delete a subscription no longer declared in code, with every delivery of it, a batch
    at a time; the messages only it kept are pruned by retention from then on. Refused
    (ActionRefused) for one still declared (the next start would create it again, from
    "latest") or with deliveries running."""
    from . import registry

    if sub.name in registry.get_specs() or sub.active:
        raise ActionRefused(
            f"Subscription {sub.name} is still declared in code: remove its @subscriber and "
            f"deploy first (it is then inactive), then retire it."
        )
    if Delivery.objects.using(using).filter(subscription=sub).inflight().exists():
        raise ActionRefused(
            f"Subscription {sub.name} has deliveries running (a dispatcher of an older "
            f"release?): retire it once they have ended."
        )
    gone = retiring(sub, using)
    batch = pubsub_settings.batch_size
    with backends.get(using).connection.cursor() as cursor:
        while pruning.delete_some_deliveries(cursor, sub.pk, batch):
            pass
    Subscription.objects.using(using).filter(pk=sub.pk, active=False).delete()
    logger.warning(
        "subscription %s retired: %s deliveries deleted, %s messages left to retention",
        sub.name,
        gone.deliveries,
        gone.messages,
    )
    return gone
