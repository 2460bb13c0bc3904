"""The dispatch loop: one polling dispatcher for every subscription, a bounded worker pool.

Each step (a pass): fail handlers past their timeout and record what the workers finished
(ack in one statement per claim, retry or dead-letter), give back what a failed claim left,
sequence new messages, fan them out, claim as many due deliveries as there are idle
workers, then take back leases nobody keeps. The heartbeat and the lease keeper run on
their own thread; wake-ups (a commit of new messages) on another.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.db import DataError, Error, IntegrityError, connections
from django.utils import timezone

from .. import backends, registry
from ..backends import Waker
from ..conf import pubsub_settings
from ..exceptions import PubSubError
from ..models import Dispatcher, Topic
from ..retry import ErrorBackoff, Random
from ..sync import sync_subscriptions
from .backlogs import Backlogs
from .claimer import Claimer
from .counts import Counts
from .heartbeat import Heartbeat, Keeping
from .keywatch import KeyWatch
from .leases import LeaseKeeper, Recovery
from .outcomes import OutcomeRecorder
from .pauses import Pauses
from .pruner import Pruner
from .stopping import drain, on_stop
from .subscriptions import Subscriptions
from .workers import WorkerPool

logger = logging.getLogger("django_pubsub.dispatcher")

Clock = Callable[[], datetime]


@dataclass
class Parts:
    """What a started loop is made of; each part owns its own state."""

    row: Dispatcher
    pool: WorkerPool
    claimer: Claimer
    outcomes: OutcomeRecorder
    recovery: Recovery
    keeping: Keeping
    waker: Waker | None
    pruner: Pruner
    keys: KeyWatch
    pauses: Pauses
    backlogs: Backlogs


class DispatchLoop:
    def __init__(
        self,
        *,
        workers: int | None = None,
        poll_interval: float | None = None,
        subscriptions: Sequence[str] | None = None,
        until_idle: bool = False,
        idle_wait: float = 0.0,
        max_messages: int | None = None,
        shutdown_grace: float | None = None,
        clock: Clock = timezone.now,
        rand: Random = random.random,
        handle_signals: bool = True,
        key_blocked_after: float | object | None = ...,
    ) -> None:
        self.workers = workers or pubsub_settings.workers
        self.poll_interval = poll_interval or pubsub_settings.poll_interval
        self.until_idle = until_idle
        self.idle_wait = idle_wait
        self.max_messages = max_messages
        self.shutdown_grace = (
            pubsub_settings.shutdown_grace if shutdown_grace is None else shutdown_grace
        )
        self.clock = clock
        self.rand = rand
        self.handle_signals = handle_signals
        # Ellipsis: the KEY_BLOCKED_AFTER setting.
        self.key_blocked_after = key_blocked_after
        self.counts = Counts()
        self.subscriptions = Subscriptions(subscriptions)
        self.parts: Parts | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._errors = ErrorBackoff()
        # Whether the last step fanned out only the topics it had just sequenced.
        self._fanned_out_only_sequenced = False
        # time.monotonic() when the loop last began a pass (or a round of draining): the
        # heartbeat stops when the loop stops moving.
        self._progress = time.monotonic()

    @property
    def row(self) -> Dispatcher | None:
        return self.parts.row if self.parts else None

    # -- lifecycle -------------------------------------------------------------------------

    def run(self) -> Counts:
        """Start, step until stopped (or idle, or --max-messages), close."""
        with on_stop(self.stop) if self.handle_signals else nullcontext():
            try:
                if self.start():
                    self._steps()
            finally:
                self.close()
        return self.counts

    def stop(self) -> None:
        """Stop claiming; running handlers get the shutdown grace to finish."""
        self._stop.set()
        self._wake.set()

    def start(self) -> bool:
        """Register and start the parts; False if stopped before the database could be
        reached. The database may be down at first (a host booting, a failover): wait for
        it with bounded backoff, answering stop() meanwhile."""
        if not registry.get_specs():
            raise PubSubError(
                f"no @subscriber declaration was found, so there is nothing to run: each "
                f"installed app's {pubsub_settings.autodiscover_module!r} module (PUBSUB["
                f"'AUTODISCOVER_MODULE']) is imported to find them. The subscriptions in the "
                f"database are left as they are."
            )
        while True:
            try:
                sync_subscriptions()
                self.subscriptions.load()
                row = Dispatcher.register(self.clock())
                break
            except (DataError, IntegrityError) as exc:
                # What it writes is refused, which waiting does not mend: not an outage.
                raise PubSubError(
                    f"the database refused what runpubsub writes at start (the "
                    f"subscriptions' rows, its own): {_one_line(exc)}"
                ) from exc
            except Error as exc:
                delay = self._errors.failed()
                logger.error(
                    "database unavailable at start, retrying in %.1fs failures=%s: %s",
                    delay,
                    self._errors.failures,
                    _one_line(exc),
                )
                _reset_connection()
                if self._stop.wait(delay):
                    return False
        self._errors.succeeded()
        self.parts = self._assemble(row)
        logger.info(
            "dispatcher started id=%s workers=%s subscriptions=%s",
            row.pk,
            self.workers,
            ",".join(sub.name for sub in self.subscriptions),
        )
        return True

    def _assemble(self, row: Dispatcher) -> Parts:
        subs, counts, clock = self.subscriptions, self.counts, self.clock
        self._progress = time.monotonic()  # waiting for the database at start is no stall
        pool = WorkerPool(self.workers, on_done=self._wake.set, clock=clock)
        claimer = Claimer(
            subscriptions=subs,
            pool=pool,
            row=row,
            counts=counts,
            workers=self.workers,
            max_messages=self.max_messages,
            clock=clock,
            stopping=self._stop.is_set,
        )
        pauses = Pauses(subs)
        outcomes = OutcomeRecorder(
            subscriptions=subs,
            pool=pool,
            claimer=claimer,
            counts=counts,
            rand=self.rand,
            clock=clock,
            pauses=pauses,
        )
        heartbeat = Heartbeat(row, pool)
        recovery = Recovery(
            subscriptions=subs,
            pool=pool,
            row=row,
            counts=counts,
            silent_before=heartbeat.silent_before,
        )
        keeping = Keeping(heartbeat, LeaseKeeper(subs, pool), clock, lambda: self._progress)
        keeping.start()
        waker = backends.get().start_waker(self._wake.set)
        pruner = Pruner(clock)
        pruner.start()
        after = self.key_blocked_after
        if after is ...:
            after = pubsub_settings.key_blocked_after
        assert after is None or isinstance(after, int | float)
        keys = KeyWatch(subs, after, clock)
        backlogs = Backlogs()
        return Parts(
            row, pool, claimer, outcomes, recovery, keeping, waker, pruner, keys, pauses, backlogs
        )

    def step(self) -> bool:
        """One pass; True if it did something (so the next should follow at once)."""
        parts = self._parts()
        self._progress = time.monotonic()
        # The loop keeps one connection whatever CONN_MAX_AGE says (closing it every pass
        # would reconnect several times a second); a broken one is replaced after an error.
        backends.get().tune_loop_connection()
        now = self.clock()
        parts.outcomes.time_out()
        progressed = parts.outcomes.record_finished(now) > 0
        if parts.claimer.orphans:
            parts.claimer.give_back_orphans()
        self.subscriptions.retry_imports()
        batch = pubsub_settings.batch_size
        sequenced = Topic.sequence_all(batch=batch, now=now)
        progressed |= bool(sequenced)
        for topic_id in self._topics_to_fan_out(sequenced):
            progressed |= parts.claimer.fan_out(topic_id, now, batch) > 0
        progressed |= parts.claimer.claim(self.clock()) > 0
        # Recovery comes last: first in a pass woken by a commit, it would stand between
        # that commit and its handler.
        progressed |= parts.recovery.run(self.clock()) > 0
        parts.keys.look()
        parts.pauses.look(self.clock())
        parts.backlogs.look(self.clock())
        return progressed

    def _topics_to_fan_out(self, sequenced: dict[int, int]) -> list[int]:
        """The topics just sequenced, or every topic with a subscription behind.

        Looking for every subscription that is behind costs a round trip on the way from a
        commit to its handler, and a pass that sequenced is followed at once by another.
        So such a pass fans out just its topics, and the next one looks; never two passes
        running, or a steady stream of messages would starve a subscription further
        behind (or one whose topic another dispatcher sequenced).
        """
        only = bool(sequenced) and not self._fanned_out_only_sequenced
        self._fanned_out_only_sequenced = only
        return list(sequenced) if only else Topic.behind()

    def idle(self) -> bool:
        """Nothing running here (stuck handlers included), nothing in flight anywhere,
        nothing due within idle_wait."""
        pool = self._parts().pool
        if pool.busy_chunks or pool.has_outcomes() or pool.stuck():
            return False  # a timed-out handler still running counts: it may still finish
        horizon = self.clock() + timedelta(seconds=self.idle_wait)
        return not self.subscriptions.work_due(horizon)

    def _steps(self) -> None:
        while not self._stop.is_set():
            # Cleared before the pass, not after the wait: a wake-up that arrives during the
            # pass makes the next wait return at once instead of being lost.
            self._wake.clear()
            try:
                progressed = self.step()
                idle = self.until_idle and not progressed and self.idle()
            except Error as exc:
                # A lost connection or a restarted server must not end the dispatcher:
                # back off (bounded), reconnect on the next pass, keep what is unrecorded.
                # A line per retry; the traceback at -v 2.
                delay = self._errors.failed()
                logger.error(
                    "database error, retrying in %.1fs failures=%s: %s",
                    delay,
                    self._errors.failures,
                    _one_line(exc),
                )
                logger.debug("the database error's traceback", exc_info=True)
                _reset_connection()
                self._stop.wait(delay)
                continue
            self._errors.succeeded()
            if self._reached_max_messages():
                return
            if idle:
                logger.info("idle, exiting")
                return
            if not progressed:
                gathering = self._parts().claimer.gathering_wait()
                self._wake.wait(min(self.poll_interval, gathering or self.poll_interval))

    def _reached_max_messages(self) -> bool:
        """Claimed --max-messages deliveries and recorded all of them (acked, failed, or
        fenced out because the lease was lost)."""
        if self.max_messages is None or self.counts.claimed < self.max_messages:
            return False
        pool = self._parts().pool
        return not pool.busy_chunks and not pool.has_outcomes()

    def close(self) -> None:
        """Drain and stop: unstarted work goes back, running handlers get the shutdown
        grace, leases are kept until then, the threads stop, the row is marked stopped.
        The threads stop whatever failed before, or a loop used in-process would leave
        its heartbeat keeping leases of a dispatcher that is gone."""
        parts = self.parts
        try:
            if parts is not None:
                try:
                    drain(
                        parts.pool,
                        parts.claimer,
                        parts.outcomes,
                        grace=self.shutdown_grace,
                        pause=self._drain_pause,
                        clock=self.clock,
                    )
                finally:
                    parts.pruner.stop()
                    if parts.waker is not None:
                        parts.waker.stop()
                    parts.keeping.stop()
                parts.row.stop(self.clock())
        except Error:
            logger.exception("database error during shutdown; leases left will expire")
        finally:
            _reset_connection()
        if parts is None:
            return  # it never started: nothing stopped
        logger.info(
            "dispatcher stopped acked=%s retried=%s dead=%s",
            self.counts.acked,
            self.counts.retried,
            self.counts.dead,
        )

    def _drain_pause(self) -> None:
        """While draining: wait a moment, less if a worker finishes meanwhile."""
        self._progress = time.monotonic()
        self._wake.wait(min(0.05, self.poll_interval))
        self._wake.clear()

    def _parts(self) -> Parts:
        if self.parts is None:
            raise RuntimeError("the dispatch loop is not started: call start() first")
        return self.parts


def _reset_connection() -> None:
    try:
        connections["default"].close()
    except Error:
        pass


def _one_line(exc: BaseException) -> str:
    """A database error as one log line: drivers add lines of context."""
    return " ".join(str(exc).split())
