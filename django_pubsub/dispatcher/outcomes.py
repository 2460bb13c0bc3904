"""The outcome recorder: what the workers finished, written down: acks in one statement
per claim, failures one by one (a retry or a dead letter), unstarted work given back."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta

from django.db import DataError, IntegrityError, ProgrammingError

from .. import signals
from ..message import Message
from ..models import Delivery, Subscription
from ..retry import Random
from .claimer import Claimer
from .counts import Counts
from .pauses import Pauses
from .subscriptions import Subscriptions
from .workers import Job, Outcome, WorkerPool, by_token

logger = logging.getLogger("django_pubsub.dispatcher")

Clock = Callable[[], datetime]


class OutcomeRecorder:
    def __init__(
        self,
        *,
        subscriptions: Subscriptions,
        pool: WorkerPool,
        claimer: Claimer,
        counts: Counts,
        rand: Random,
        clock: Clock,
        pauses: Pauses | None = None,
    ) -> None:
        self.subscriptions = subscriptions
        self.pauses = pauses
        self.pool = pool
        self.claimer = claimer
        self.counts = counts
        self.rand = rand
        self.clock = clock

    def time_out(self) -> None:
        """Fail handlers that outran their subscription's timeout (their failures are
        recorded with what the workers finished); report their threads."""
        for job in self.pool.time_out():
            self.counts.timed_out += 1
            logger.error(
                "delivery id=%s subscription=%s attempt=%s timed out after %gs; its worker "
                "thread stays busy until the handler returns, a new thread takes its place "
                "stuck=%s",
                job.delivery_id,
                job.message.subscription,
                job.message.attempt,
                job.timeout,
                len(self.pool.stuck()),
            )

    def record_finished(self, now: datetime) -> int:
        """Record what the workers finished; keep what could not be, for the next pass.
        Returns how much of it is a reason to pass again at once."""
        outcomes = self.pool.take_outcomes()
        # Acks a worker recorded itself (an ordered run) are no reason to pass again at once:
        # the dispatcher would spin beside the run, costing it the CPU and the database.
        progress = sum(1 for outcome in outcomes if not outcome.acked)
        self.record(outcomes, now, keep=self.pool.put_back)
        return progress

    def record(
        self,
        outcomes: list[Outcome],
        now: datetime,
        keep: Callable[[list[Outcome]], None] | None = None,
    ) -> None:
        """Record outcomes. If the database fails part way, what was recorded counts once,
        and ``keep`` gets the rest to record later."""
        done: list[Outcome] = []
        try:
            self._write(outcomes, now, done)
        except BaseException:
            if keep is not None:
                recorded = {id(outcome) for outcome in done}
                keep([outcome for outcome in outcomes if id(outcome) not in recorded])
            raise
        finally:
            self._settle(done)

    def _write(self, outcomes: list[Outcome], now: datetime, done: list[Outcome]) -> None:
        """Write outcomes to the database, adding each to ``done`` once it is written."""
        acks: list[Outcome] = []
        unstarted: list[Outcome] = []
        expired: list[Outcome] = []
        for outcome in outcomes:
            if outcome.unstarted:
                unstarted.append(outcome)
            elif outcome.expired:
                expired.append(outcome)
            elif outcome.acked:
                self.counts.acked += 1
                done.append(outcome)
            elif outcome.error is None:
                acks.append(outcome)
            else:
                self._record_failure_anyhow(outcome, now)
                done.append(outcome)
        self.claimer.give_back_leases(((o.job.delivery_id, o.job.token) for o in unstarted), now)
        done += unstarted
        for token, group in by_token(expired, lambda outcome: outcome.job.token).items():
            ids = [outcome.job.delivery_id for outcome in group]
            self.counts.expired += Delivery.objects.expire(ids, token=token, now=now)
            done += group
        for token, group in by_token(acks, lambda outcome: outcome.job.token).items():
            ids = [outcome.job.delivery_id for outcome in group]
            acked = set(Delivery.objects.ack(ids, token=token, now=now))
            for outcome in group:
                outcome.acked = outcome.job.delivery_id in acked
            done += group
            self.counts.acked += len(acked)
            if len(acked) < len(ids):
                self.counts.fenced += len(ids) - len(acked)
                logger.warning(
                    "ack rejected, lease no longer held deliveries=%s",
                    ",".join(str(i) for i in ids if i not in acked),
                )

    def _settle(self, outcomes: list[Outcome]) -> None:
        """Free the slots of recorded outcomes and size the next chunks from them. A
        timed-out handler keeps its subscription's slot until its thread is free again."""
        ran: dict[int, list[float]] = {}
        for outcome in outcomes:
            if not outcome.late:
                self.claimer.settled(outcome.job)
            if outcome.frees_slot:
                self.claimer.in_flight[outcome.job.subscription_id] -= 1
            if not (outcome.unstarted or outcome.late or outcome.expired):
                ran.setdefault(outcome.job.subscription_id, []).append(outcome.duration)
                if outcome.acked:  # not if its ack was fenced out
                    if self.pauses is not None:
                        self.pauses.succeeded(outcome.job.subscription_id)
                    message, duration = outcome.job.message, outcome.duration
                    signals.send(
                        signals.delivery_succeeded, Subscription, message=message, duration=duration
                    )
        for sub_id, durations in ran.items():
            self.claimer.ran(sub_id, durations)

    def _record_failure_anyhow(self, outcome: Outcome, now: datetime) -> None:
        """record_failure(), and if the database refuses what it writes (not an outage),
        the failure without its text; if that is refused too, nothing: the lease lapses
        and the delivery runs again. One unrecordable outcome never stops the others."""
        for _ in range(2):
            try:
                self.record_failure(outcome, now)
                return
            except (DataError, IntegrityError, ProgrammingError):
                logger.exception(
                    "delivery id=%s: the database refused its failure's record",
                    outcome.job.delivery_id,
                )
                outcome.error, outcome.traceback = "(the error could not be recorded)", ""

    def record_failure(self, outcome: Outcome, now: datetime) -> None:
        job = outcome.job
        sub = self.subscriptions[job.subscription_id]
        attempt = job.message.attempt
        delay = sub.effective_backoff.delay(attempt, self.rand)
        due = now + timedelta(seconds=delay)
        state = Delivery.objects.fail(
            job.delivery_id,
            token=job.token,
            now=now,
            error=outcome.error or "",
            traceback=outcome.traceback,
            max_attempts=sub.effective_max_attempts,
            delay=delay,
        )
        if state is None:
            self.counts.fenced += 1
            logger.warning(
                "delivery id=%s subscription=%s attempt=%s failed, but its lease is gone: "
                "result ignored",
                job.delivery_id,
                sub.name,
                attempt,
            )
        else:
            # Only recorded failures count (like acks): a timed-out run's late failure was
            # counted at its timeout, and --max-messages counts each attempt once.
            self.counts.failed += 1
            signal_failure(job.message, outcome.error or "", outcome.traceback, state, due)
            if self.pauses is not None:
                # A batch's messages fail by one call: the breaker counts calls.
                chunk = job.chunk
                batch = chunk is not None and chunk.batch
                call = (job.token, chunk.jobs[0].delivery_id) if chunk and batch else None
                self.pauses.failed(job.subscription_id, outcome.error or "", now, call)
        if state == Delivery.State.DEAD:
            self.counts.dead += 1
            logger.error(
                "delivery id=%s subscription=%s attempt=%s failed, dead-lettered: %s",
                job.delivery_id,
                sub.name,
                attempt,
                outcome.error,
            )
        elif state is not None:
            self.counts.retried += 1
            logger.warning(
                "delivery id=%s subscription=%s attempt=%s failed, will retry in %.1fs at %s: %s",
                job.delivery_id,
                sub.name,
                attempt,
                delay,
                due.isoformat(timespec="seconds"),
                outcome.error,
            )
        logger.debug("delivery id=%s traceback:\n%s", job.delivery_id, outcome.traceback)

    def abandon(self, jobs: list[Job]) -> None:
        """Handlers still running when the shutdown grace ran out: their attempt failed."""
        now = self.clock()
        for job in jobs:
            error = "still running when the dispatcher shut down"
            self.record_failure(Outcome(job, error=error), now)
            self.claimer.in_flight[job.subscription_id] -= 1


def signal_failure(
    message: Message, error: str, traceback: str, state: str, available_at: datetime
) -> None:
    """delivery_failed, then dead_lettered or retry_scheduled, for a recorded failure."""
    signals.send(
        signals.delivery_failed,
        Subscription,
        message=message,
        error=error,
        traceback=traceback,
        state=state,
    )
    if state == Delivery.State.DEAD:
        signals.send(signals.dead_lettered, Subscription, message=message, error=error)
    else:
        signals.send(
            signals.retry_scheduled, Subscription, message=message, available_at=available_at
        )
