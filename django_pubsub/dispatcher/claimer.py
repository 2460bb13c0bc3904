"""The claimer: what one dispatcher may take on (idle workers, each subscription's bound,
--max-messages), how much at a time (chunks sized by handler time), and handing what it
leased to the worker pool."""

from __future__ import annotations

import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.db import Error, router

from .. import signals
from ..backends import Lease
from ..calling import pool_timeout
from ..conf import pubsub_settings
from ..models import Claimed, Delivery, Dispatcher, Subscription, Topic
from .counts import Counts
from .subscriptions import Subscriptions
from .workers import Chunk, Job, WorkerPool, by_token, handler_message

logger = logging.getLogger("django_pubsub.dispatcher")

Clock = Callable[[], datetime]
# A chunk (the deliveries one worker runs in a row) grows, doubling from one, until it is
# about this many seconds of handler time, and at most BATCH_SIZE deliveries.
CHUNK_SECONDS = 0.05
# Deliveries one process holds at most (all chunks of all workers): keeps every list of ids
# in one statement under SQLite's default limit of 32,766 parameters.
MAX_HELD = 20_000
# Seconds a keyed subscription whose claim found less than it asked for is not claimed
# again, unless a chunk of it ends here or new deliveries of it are made first: each such
# claim reads its waiting rows, and while its keys run here nothing more can be found. (What
# other processes finish, and retries that become due, are found within this time.)
KEYED_RECHECK = 0.5


@dataclass
class Budget:
    """What one pass may still claim: idle workers, and deliveries left under
    --max-messages (None: no such bound)."""

    free: int
    left: int | None
    stuck: dict[int, int]
    claimed: int = 0

    @property
    def spent(self) -> bool:
        return self.free <= 0 or (self.left is not None and self.claimed >= self.left)


class Claimer:
    def __init__(
        self,
        *,
        subscriptions: Subscriptions,
        pool: WorkerPool,
        row: Dispatcher,
        counts: Counts,
        workers: int,
        max_messages: int | None,
        clock: Clock,
        stopping: Callable[[], bool],
    ) -> None:
        self.subscriptions = subscriptions
        self.pool = pool
        self.row = row
        self.counts = counts
        self.workers = workers
        self.max_messages = max_messages
        self.clock = clock
        self.stopping = stopping
        # Deliveries of each subscription in flight here, stuck ones included.
        self.in_flight: dict[int, int] = defaultdict(int)
        self._chunk_size: dict[int, int] = defaultdict(lambda: 1)
        # A claim failed: deliveries may be leased here that no worker holds.
        self.orphans = False
        # Seconds of handler time a message, as last seen, by subscription.
        self._per_message: dict[int, float] = {}
        # Jobs of each keyed chunk (by id()) whose outcome is not recorded yet.
        self._unsettled: dict[int, int] = {}
        # Keyed subscriptions not to claim before this time.monotonic() (KEYED_RECHECK).
        self._quiet_until: dict[int, float] = {}

    def budget(self) -> Budget | None:
        """What this pass may claim; None if nothing."""
        free = self.workers - self.pool.busy_chunks
        left = None if self.max_messages is None else self.max_messages - self.counts.claimed
        if free <= 0 or not self.subscriptions or left == 0 or self.stopping():
            return None
        stuck: dict[int, int] = defaultdict(int)
        for job, _ in self.pool.stuck():
            stuck[job.subscription_id] += 1
        return Budget(free, left, stuck)

    def limit(self, sub: Subscription, budget: Budget, chunks: int) -> int:
        """How many deliveries of ``sub`` to claim now for ``chunks`` workers; 0: none."""
        if sub.effective_ordered and self.in_flight[sub.pk]:
            # Its head is running here, or a timed-out run of it is still stuck in a
            # thread: nothing behind it (nor its own retry) may start until that ends.
            return 0
        if sub.keyed and time.monotonic() < self._quiet_until.get(sub.pk, 0.0):
            return 0
        if sub.batch_size:
            # A batch is a chunk. A batch of an ordered or keyed subscription is one claim,
            # so that no two batches share an order; otherwise, when batches are quick, a
            # claim takes several for each worker (as many as its chunk size holds).
            if sub.keeps_order or sub.batch_wait:
                # (one that gathers: one batch a claim, each ready by itself)
                limit = sub.batch_size
            else:
                per_worker = max(1, self._chunk_size[sub.pk] // sub.batch_size)
                limit = chunks * per_worker * sub.batch_size
        else:
            limit = chunks * self._chunk_size[sub.pk]
        bound = sub.effective_max_inflight
        if bound is not None:
            limit = min(limit, bound - self.in_flight[sub.pk])
        elif budget.stuck[sub.pk] >= self.workers:
            return 0  # hung runs already hold a pool's worth of threads: no more
        if budget.left is not None:
            limit = min(limit, budget.left - budget.claimed)
        return max(0, limit)

    def fan_out(self, topic_id: int, now: datetime, batch: int) -> int:
        """Fan the topic out; where the database can, lease the first new deliveries of
        its unordered subscriptions in the same statement, a chunk for each idle worker.
        Returns how many deliveries were created."""
        budget = self.budget()
        leases: list[Lease] = []
        promised = 0
        if budget is not None and Topic.leases_at_fan_out():
            for sub in self.subscriptions.rotated(advance=False):
                if sub.topic_id != topic_id or sub.keeps_order:
                    continue  # an ordered run is claimed under its subscription's lock
                if sub.batch_size and sub.batch_wait:
                    continue  # a batch's claim waits until the batch is ready
                if sub.rate:
                    continue  # its starts are counted by its claims
                limit = self.limit(sub, budget, 1 if not sub.batch_size else budget.free)
                if budget.left is not None:
                    limit = min(limit, budget.left - promised)
                if limit > 0 and len(leases) < budget.free:
                    expires = self.clock() + timedelta(seconds=sub.effective_lease)
                    leases.append(Lease(sub.pk, limit, uuid.uuid4().hex, expires))
                    promised += limit
        sent = time.monotonic()
        try:
            fanned = Topic.fan_out(
                topic_id, now=now, batch=batch, leases=leases, dispatcher_id=self.row.pk
            )
            jobs = [
                self.jobs(self.subscriptions[lease.subscription_id], lease.token, rows, sent)
                for lease in leases
                if (rows := fanned.leased.get(lease.subscription_id))
            ]
        except BaseException:
            self._failed_claim()
            raise
        for sub_jobs in jobs:
            assert budget is not None  # leased only with a budget
            self._hand_out(sub_jobs, 1, budget)
        if fanned.created:
            for sub in self.subscriptions:
                if sub.topic_id == topic_id:
                    self.changed(sub.pk)
        return fanned.created

    def claim(self, now: datetime) -> int:
        """Claim for the idle workers, round robin over the subscriptions; how many."""
        budget = self.budget()
        if budget is None:
            return 0
        for sub in self.subscriptions.rotated():
            ordered = sub.effective_ordered
            chunks = 1 if ordered else budget.free  # an ordered run goes to one thread
            limit = self.limit(sub, budget, chunks)
            if sub.rate and limit > 0:
                limit = sub.take_starts(limit, now)
            if limit <= 0:
                continue
            token = uuid.uuid4().hex
            sent = time.monotonic()
            try:
                rows = Delivery.objects.claim(
                    sub,
                    limit=limit,
                    now=now,
                    token=token,
                    dispatcher_id=self.row.pk,
                    hung_keys=self.hung_keys(sub),
                )
                jobs = self.jobs(sub, token, rows, sent)
            except BaseException:
                self._failed_claim()
                raise
            sub.give_back_starts(limit - len(rows))
            if sub.keyed and len(rows) < limit:
                self._quiet_until[sub.pk] = time.monotonic() + KEYED_RECHECK
            self._hand_out(jobs, chunks, budget)
            if budget.spent:
                break
        return budget.claimed

    def hung_keys(self, sub: Subscription) -> list[str]:
        """The keys of a keyed subscription whose handler outran its timeout here and
        still runs: nothing more of those keys starts here until it returns."""
        if not sub.keyed:
            return []
        return sorted(
            {
                job.order
                for job, _ in self.pool.stuck()
                if job.subscription_id == sub.pk and job.order is not None
            }
        )

    def changed(self, sub_id: int) -> None:
        """New deliveries of the subscription were made, or a chunk of it ended here: a
        keyed claim may find more."""
        self._quiet_until.pop(sub_id, None)

    def settled(self, job: Job) -> None:
        """One job's outcome is recorded (its last, for a timed-out one)."""
        chunk = id(job.chunk)
        left = self._unsettled.get(chunk)
        if left is None:
            return
        if left > 1:
            self._unsettled[chunk] = left - 1
            return
        del self._unsettled[chunk]
        self.changed(job.subscription_id)

    def gathering_wait(self) -> float | None:
        """The shortest batch_wait of the batch subscriptions here (None: none): the loop
        looks again at least that often while one gathers."""
        waits = [sub.batch_wait for sub in self.subscriptions if sub.batch_size and sub.batch_wait]
        return min(waits) if waits else None

    def jobs(self, sub: Subscription, token: str, rows: list[Claimed], sent: float) -> list[Job]:
        """The handlers' jobs for deliveries leased by a statement sent at ``sent``
        (time.monotonic()): their leases run out no sooner than a lease after that.
        Deliveries the claim buried (dead unrun) are reported, not run."""
        deadline = sent + sub.effective_lease
        handler = self.subscriptions.handler(sub.pk)
        timeout = pool_timeout(self.subscriptions.declared(sub.pk), sub.effective_timeout)
        now = self.clock()
        expired = [row for row in rows if row.expired_by(now) and not row.buried]
        if expired:
            self._expire(sub, token, expired, now)
        jobs = []
        for row in rows:
            if row.buried:
                self._report_buried(sub, row)
                continue
            if row.expired_by(now):
                continue
            order = sub.order_of(row.key)
            message = handler_message(sub, row)
            job = Job(row.delivery_id, token, sub.pk, message, handler, deadline, timeout)
            job.order = order
            job.expires_at = row.expires_at
            jobs.append(job)
        return jobs

    def _expire(self, sub: Subscription, token: str, rows: list[Claimed], now: datetime) -> None:
        """End leased deliveries whose message expired before they could start. (If this
        fails, or the process dies first, they are given back or recovered, and the next
        claim of them ends them so.)"""
        ids = [row.delivery_id for row in rows]
        self.counts.expired += Delivery.objects.expire(ids, token=token, now=now)
        logger.info(
            "deliveries id=%s subscription=%s expired before they started (expires_at); not run",
            ",".join(str(i) for i in ids),
            sub.name,
        )

    def _report_buried(self, sub: Subscription, row: Claimed) -> None:
        self.counts.dead += 1
        logger.error(
            "delivery id=%s subscription=%s key=%s dead-lettered unrun: an earlier message "
            "of its key is dead (on_dead=dead_letter_key)",
            row.delivery_id,
            sub.name,
            row.key,
        )
        error = f"an earlier message of key {row.key!r} is dead (on_dead=dead_letter_key)"
        message = handler_message(sub, row)
        signals.send(signals.dead_lettered, Subscription, message=message, error=error)

    def _failed_claim(self) -> None:
        """A claim commits on its own: if it, or reading what it leased, failed (a lost
        connection, even after the statement ran), deliveries may be leased to this live
        dispatcher that no worker here will run. Give them back now, or in the next pass."""
        self.orphans = True
        self.give_back_orphans(quietly=True)

    def _hand_out(self, jobs: list[Job], chunks: int, budget: Budget) -> None:
        """Hand claimed jobs to the pool, spread over as many idle workers as there are
        deliveries, up to ``chunks``: an ordered run to one worker whole, each key's run
        to one worker, a batch subscription's jobs a batch per worker.

        Only after the claim committed: none runs on a lease that rolled back."""
        if not jobs:
            return
        sub = self.subscriptions[jobs[0].subscription_id]
        in_order = sub.keeps_order
        atomic = router.db_for_write(Delivery) if sub.delivery == "transactional" else None
        # The worker acks what it ran itself where order needs it, and in a transactional
        # handler's transaction. (Not otherwise: outside a handler's own use of the
        # database, that would cost a connection a chunk, with CONN_MAX_AGE = 0.)
        ack = self._ack_jobs if in_order or atomic else None
        if sub.batch_size:
            parts = [jobs[at : at + sub.batch_size] for at in range(0, len(jobs), sub.batch_size)]
        elif sub.keyed:
            # Over as many workers as the work needs (a chunk's worth of handler time
            # each): the fewer chunks, the more keys take each turn, the fewer acks.
            per_message = self._per_message.get(sub.pk)
            if per_message is not None:
                chunks = min(chunks, 1 + int(len(jobs) * per_message / CHUNK_SECONDS))
            parts = by_key(jobs, chunks)
        else:
            count = 1 if sub.effective_ordered else min(chunks, len(jobs))
            parts = [jobs[part::count] for part in range(count)]
        for part in parts:
            self.in_flight[sub.pk] += len(part)
            self.counts.claimed += len(part)
            chunk = Chunk(
                part, ack=ack, in_order=in_order, atomic=atomic, batch=bool(sub.batch_size)
            )
            if sub.keyed:
                self._unsettled[id(chunk)] = len(part)
            self.pool.submit(chunk)
        budget.free -= len(parts)
        budget.claimed += len(jobs)
        # Let the workers start now. They need the interpreter's lock to run a handler,
        # and would otherwise wait for this thread's next query to release it.
        time.sleep(0)

    def _ack_jobs(self, jobs: list[Job]) -> set[int]:
        """Ack deliveries of one claim from a worker thread, on that thread's connection
        (inside a transactional handler's transaction, in it)."""
        ids, token, now = [job.delivery_id for job in jobs], jobs[0].token, self.clock()
        return set(Delivery.objects.ack(ids, token=token, now=now, lazy=True))

    def give_back_orphans(self, *, quietly: bool = False) -> None:
        """Give back, attempt and all, what is leased to this dispatcher and held by no
        worker here: what a failed claim may have left. ``quietly``: a database error
        leaves that for the next pass instead of raising."""
        try:
            held = {(job.delivery_id, job.token) for job in self.pool.held()}
            leased = Delivery.objects.inflight().filter(dispatcher=self.row)
            rows = leased.values_list("id", "lease_token")
            orphans = [
                (delivery_id, token)
                for delivery_id, token in rows
                if token is not None and (delivery_id, token) not in held
            ]
            self.give_back_leases(orphans, self.clock())
        except Error:
            if not quietly:
                raise
            logger.warning("could not give back a failed claim's leases yet", exc_info=True)
            return
        self.orphans = False

    def give_back(self, jobs: list[Job]) -> None:
        """Return jobs no worker started, attempt and all, and free their slots."""
        self.give_back_leases(((job.delivery_id, job.token) for job in jobs), self.clock())
        for job in jobs:
            self.in_flight[job.subscription_id] -= 1

    def give_back_leases(self, leases: Iterable[tuple[int, str]], now: datetime) -> None:
        """Return claimed deliveries, given as (delivery id, lease token), whose handler
        never started, attempt and all."""
        for token, pairs in by_token(leases, lambda pair: pair[1]).items():
            ids = [delivery_id for delivery_id, _ in pairs]
            self.counts.given_back += Delivery.objects.give_back(ids, token=token, now=now)

    def ran(self, sub_id: int, durations: list[float]) -> None:
        """Size the subscription's next chunks from how long its handlers just took:
        doubling while a chunk stays under CHUNK_SECONDS of handler time.

        Chunks start at one delivery: a fresh process (after a crash, say) claims little at
        a time, so a delivery that kills the process is soon alone in its claim.
        """
        per_message = max(sum(durations) / len(durations), 1e-6)
        self._per_message[sub_id] = per_message
        fits = max(1, int(CHUNK_SECONDS / per_message))
        cap = max(1, MAX_HELD // self.workers)
        size = min(2 * self._chunk_size[sub_id], fits, pubsub_settings.batch_size, cap)
        self._chunk_size[sub_id] = max(1, size)


def by_key(jobs: list[Job], chunks: int) -> list[list[Job]]:
    """A keyed claim's jobs (in offset order) as at most ``chunks`` chunks: each key's run
    whole in one chunk (a job without a key is a run of its own), the runs spread so the
    chunks are about even, and in each chunk the keys take turns (the first of every key,
    then the second...), so one statement acks a turn."""
    runs: dict[object, list[Job]] = {}
    for job in jobs:
        runs.setdefault(job.order if job.order is not None else object(), []).append(job)
    count = max(1, min(chunks, len(runs)))
    parts: list[list[tuple[int, int, Job]]] = [[] for _ in range(count)]
    for run in sorted(runs.values(), key=len, reverse=True):
        part = min(parts, key=len)
        part += ((turn, job.message.offset, job) for turn, job in enumerate(run))
    return [[job for _, _, job in sorted(part, key=lambda t: t[:2])] for part in parts if part]
