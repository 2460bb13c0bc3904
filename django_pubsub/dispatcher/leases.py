"""Leases: keeping this dispatcher's own (the lease keeper, on the heartbeat's thread) and
taking back the ones nobody keeps any more (recovery, in the loop).

A lease is its holder's for as long as the holder is alive: heard from (its heartbeat)
within DISPATCHER_TIMEOUT and not known gone from its host. Its lease keeper extends it
while the handler runs; if the keeper was held up (a database lock, a stalled host) and the
lease lapsed, nobody takes it while the holder is alive, or the handler would run twice
without a crash to explain it. Recovery takes back the expired leases of dispatchers that
stopped, went silent, or are unknown, and, at once, every lease of a dispatcher presumed
dead.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable
from datetime import datetime, timedelta

from django.db.models import Q, QuerySet

from ..backends import padded_ids
from ..conf import pubsub_settings
from ..models import Delivery, Dispatcher, Subscription
from .counts import Counts
from .outcomes import signal_failure
from .subscriptions import Subscriptions
from .workers import Job, WorkerPool, by_token, handler_message

logger = logging.getLogger("django_pubsub.dispatcher")

Clock = Callable[[], datetime]
# Seconds between looks for leases to take back (leases last seconds; a look per pass is
# waste).
RECOVERY_INTERVAL = 1.0


class LeaseKeeper:
    """Extends the leases of what this process holds (queued, running, or finished and not
    yet recorded) before they run out. Called from the heartbeat's thread, on its own
    connection: never behind the loop's locks."""

    def __init__(self, subscriptions: Subscriptions, pool: WorkerPool) -> None:
        self.subscriptions = subscriptions
        self.pool = pool

    def extend(self, now: datetime) -> int:
        """Extend the leases with less than half of their length left; how many."""
        soon = time.monotonic()
        due = [job for job in self.pool.held() if job.lease_deadline - soon < self._lease(job) / 2]
        for token, jobs in by_token(due, lambda job: job.token).items():
            lease = self._lease(jobs[0])
            ids = [job.delivery_id for job in jobs]
            Delivery.objects.extend(ids, token=token, until=now + timedelta(seconds=lease))
            for job in jobs:
                job.lease_deadline = soon + lease
        return len(due)

    def _lease(self, job: Job) -> float:
        sub = self.subscriptions.get(job.subscription_id)
        return sub.effective_lease if sub is not None else pubsub_settings.lease

    def shortest_lease(self) -> float:
        leases = [sub.effective_lease for sub in self.subscriptions]
        return min(leases, default=pubsub_settings.lease)


class Recovery:
    """Takes back leases nobody keeps, so their deliveries run again."""

    def __init__(
        self,
        *,
        subscriptions: Subscriptions,
        pool: WorkerPool,
        row: Dispatcher,
        counts: Counts,
        silent_before: Callable[[datetime], datetime],
    ) -> None:
        self.subscriptions = subscriptions
        self.pool = pool
        self.row = row
        self.counts = counts
        # Heartbeat.silent_before: when another dispatcher's last beat means it is gone.
        self.silent_before = silent_before
        self._next: datetime | None = None

    def run(self, now: datetime) -> int:
        """Every RECOVERY_INTERVAL: take back expired leases of holders that are not alive,
        then every lease of dispatchers presumed dead; how many deliveries."""
        if self._next is not None and now < self._next:
            return 0
        self._next = now + timedelta(seconds=RECOVERY_INTERVAL)
        return self.recover_expired(now) + self.take_back_from_dead(now)

    def recover_expired(self, now: datetime) -> int:
        silent = self.silent_before(now)
        held = padded_ids(job.delivery_id for job in self.pool.held())
        expired = (
            Delivery.objects.expired(now)
            .exclude(id__in=held)
            .filter(
                Q(dispatcher__isnull=True)
                | Q(dispatcher=self.row)
                | Q(dispatcher__stopped_at__isnull=False)
                | Q(dispatcher__last_seen__lt=silent)
            )
        )
        return self.take_back(
            expired, now, "lease expired before an ack", Q(lease_expires_at__lt=now)
        )

    def take_back_from_dead(self, now: datetime) -> int:
        taken = 0
        silent = self.silent_before(now)
        for dead in Dispatcher.objects.presumed_dead(silent_before=silent, me=self.row):
            if not dead.mark_dead(now):
                continue  # it beat in the meantime, or another dispatcher got there first
            held = Delivery.objects.inflight().filter(dispatcher=dead)
            reason = f"dispatcher {dead} stopped; lease taken back"
            count = self.take_back(held, now, reason, Q(dispatcher=dead))
            logger.warning("dispatcher presumed dead dispatcher=%s taken_back=%s", dead, count)
            taken += count
        return taken

    def take_back(
        self, deliveries: QuerySet[Delivery], now: datetime, reason: str, still: Q
    ) -> int:
        """Fail the given inflight deliveries (their attempt started) so they run again,
        up to BATCH_SIZE of them; how many.

        ``still`` re-checks, in the fenced UPDATE itself, why we may take the lease: a holder
        that extended its lease a moment ago keeps it.

        An ordered run is an exception: its worker ran it in offset order and acked each
        message before starting the next, so only the subscription's lowest unfinished
        offset can have started (of a keyed one: each key's lowest). That one is failed;
        the rest are given back with their attempt returned, so crashes do not use up the
        attempts of messages that never ran. (A batch ran all of its messages at once: all
        of them are failed.)
        """
        count = 0
        columns = ("id", "lease_token", "subscription_id", "attempts", "offset", "key")
        rows = deliveries.values_list(*columns)
        heads: dict[tuple[int, str | None], int | None] = {}
        unstarted: dict[str, list[int]] = defaultdict(list)
        for delivery_id, leased_to, sub_id, attempt, offset, key in rows[
            : pubsub_settings.batch_size
        ]:
            token = leased_to or ""  # inflight: always leased
            sub = self.subscriptions.get(sub_id) or Subscription.objects.get(pk=sub_id)
            in_order = sub.order_of(key) is not None
            if in_order and not sub.batch_size:
                order = (sub_id, key if sub.keyed else None)
                if order not in heads:
                    # From the database, not from these rows: they may be part of a run.
                    head = Delivery.objects.heads(sub_id)
                    if sub.keyed:
                        head = head.filter(key=key)
                    heads[order] = head.values_list("offset", flat=True).first()
                if offset != heads[order]:
                    unstarted[token].append(delivery_id)
                    continue
            state = Delivery.objects.filter(still).fail(
                delivery_id,
                token=token,
                now=now,
                error=reason,
                traceback="",
                max_attempts=sub.effective_max_attempts,
                delay=0.0,
            )
            if state is not None:
                count += 1
                self.counts.recovered += 1
                logger.warning(
                    "delivery id=%s subscription=%s attempt=%s %s, now %s",
                    delivery_id,
                    sub.name,
                    attempt,
                    reason,
                    state,
                )
                _signal_taken_back(delivery_id, sub, reason, state)
        for token, ids in unstarted.items():
            given = Delivery.objects.filter(still).give_back(ids, token=token, now=now)
            count += given
            self.counts.given_back += given
        return count


def _signal_taken_back(delivery_id: int, sub: Subscription, reason: str, state: str) -> None:
    """The failure signals for a lease taken back: the process that ran it died or
    stalled."""
    from .. import signals

    watched = (signals.delivery_failed, signals.dead_lettered, signals.retry_scheduled)
    if not any(signal.has_listeners(Subscription) for signal in watched):
        return  # no need to read the message back
    row = Delivery.objects.select_related("message").get(pk=delivery_id)
    signal_failure(handler_message(sub, row.claimed()), reason, "", state, row.available_at)
