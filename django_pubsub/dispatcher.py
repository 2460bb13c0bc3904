"""The runpubsub loop: one polling dispatcher for every subscription, a bounded worker pool.

Each pass: heartbeat, take back leases of dead dispatchers and expired leases, record what
the workers finished (ack in one statement per claim, retry or dead-letter), sequence new
messages, fan them out, claim as many due deliveries as there are idle workers.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from types import FrameType
from typing import Any

from django.db import DatabaseError, Error, connections
from django.db.models import F, Min, Q
from django.utils import timezone
from django.utils.module_loading import import_string

from . import backends, signals
from .backends import Lease, Waker, padded_ids
from .conf import pubsub_settings
from .exceptions import HandlerImportError
from .message import Message
from .models import Claimed, Delivery, Dispatcher, Subscription, Topic
from .models import Message as MessageRow
from .retry import Backoff, Random
from .sync import sync_subscriptions
from .workers import Chunk, Job, Outcome, WorkerPool

logger = logging.getLogger("django_pubsub.dispatcher")

Clock = Callable[[], datetime]
# First and longest waits between retries while the database is unreachable.
ERROR_BACKOFF_BASE = 0.1
MAX_ERROR_BACKOFF = 5.0
# Seconds between attempts to import handlers that did not import.
IMPORT_RETRY_INTERVAL = 60.0
# Host clock ahead of or behind the database's by more than this: warn (leases, due times
# and heartbeats are written with the host's clock). Checked at most every CLOCK_CHECK s.
MAX_CLOCK_SKEW = 1.0
CLOCK_CHECK_INTERVAL = 600.0
# Seconds between looks for expired leases (leases last seconds; a look per pass is waste).
RECOVERY_INTERVAL = 1.0
# A chunk (the deliveries one worker runs in a row) grows, doubling from one, until it is
# about this many seconds of handler time, and at most BATCH_SIZE deliveries.
CHUNK_SECONDS = 0.05
# Deliveries one process holds at most (all chunks of all workers): keeps every list of ids
# in one statement under SQLite's default limit of 32,766 parameters.
MAX_HELD = 20_000


@dataclass
class Stats:
    claimed: int = 0
    acked: int = 0
    failed: int = 0
    retried: int = 0
    dead: int = 0
    given_back: int = 0
    fenced: int = 0
    recovered: int = 0
    timed_out: int = 0

    @property
    def handled(self) -> int:
        return self.acked + self.failed


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
    ) -> None:
        self.workers = workers or pubsub_settings.workers
        self.poll_interval = poll_interval or pubsub_settings.poll_interval
        self.only = list(subscriptions) if subscriptions else None
        self.until_idle = until_idle
        self.idle_wait = idle_wait
        self.max_messages = max_messages
        self.shutdown_grace = (
            pubsub_settings.shutdown_grace if shutdown_grace is None else shutdown_grace
        )
        self.clock = clock
        self.rand = rand
        self.handle_signals = handle_signals
        self.stats = Stats()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._signals_seen = 0
        self._previous_handlers: dict[int, Any] = {}
        self._subs: dict[int, Subscription] = {}
        self._handlers: dict[int, Callable[[Message], Any]] = {}
        self._unloaded: dict[int, Subscription] = {}
        self._next_import = 0.0
        self._next_clock_check = 0.0
        # Deliveries of each subscription in flight here, stuck ones included.
        self._inflight: dict[int, int] = defaultdict(int)
        self._chunk_size: dict[int, int] = defaultdict(lambda: 1)
        self._next_recovery: datetime | None = None
        self._rotation = 0
        self._skipped_behind = False
        # A claim failed: deliveries may be leased here that no worker holds.
        self._orphans = False
        self._pool: WorkerPool | None = None
        self._listener: Waker | None = None
        # Not tied to the poll interval: a server restart should be noticed in well under a
        # second even where the dispatcher polls rarely.
        self._error_backoff = Backoff(
            base=ERROR_BACKOFF_BASE, factor=2, maximum=MAX_ERROR_BACKOFF, jitter=0
        )
        self.row: Dispatcher | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def run(self) -> Stats:
        try:
            if self._prepare():
                self._loop()
        finally:
            self._shutdown()
        return self.stats

    def stop(self) -> None:
        """Stop claiming; running handlers get the shutdown grace to finish."""
        self._stop.set()
        self._wake.set()

    def _prepare(self) -> bool:
        """Set up; False if stopped before the database could be reached."""
        if self.handle_signals and threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous_handlers[signum] = signal.signal(signum, self._on_signal)
        failures = 0
        while True:
            try:
                self._register()
                break
            except Error as exc:
                # The database may be down at first (a host booting, a failover): wait for
                # it with bounded backoff, answering SIGTERM meanwhile.
                failures += 1
                delay = self._error_backoff.delay(failures + 1)
                logger.error(
                    "database unavailable at start, retrying in %.1fs failures=%s: %s",
                    delay,
                    failures,
                    exc,
                )
                self._reset_connection()
                if self._stop.wait(delay):
                    return False
        assert self.row is not None
        self._pool = WorkerPool(self.workers, on_done=self._wake.set)
        self._listener = backends.get().start_waker(self._wake.set)
        logger.info(
            "dispatcher started id=%s workers=%s subscriptions=%s",
            self.row.pk,
            self.workers,
            ",".join(sub.name for sub in self._subs.values()),
        )
        return True

    def _register(self) -> None:
        sync_subscriptions()
        self._subs.clear()
        self._unloaded.clear()
        self._load_subscriptions()
        now = self.clock()
        self.row = Dispatcher.register(now)
        self._next_beat = now

    def _load_subscriptions(self) -> None:
        active = Subscription.objects.filter(active=True).select_related("topic")
        by_name = {sub.name: sub for sub in active}
        if self.only is not None:
            unknown = [name for name in self.only if name not in by_name]
            if unknown:
                raise ValueError(
                    f"Unknown or inactive subscriptions: {', '.join(unknown)}. "
                    f"Active ones: {', '.join(sorted(by_name)) or '(none)'}."
                )
            by_name = {name: by_name[name] for name in self.only}
        for sub in by_name.values():
            try:
                self._load(sub)
            except HandlerImportError as exc:
                if self.only is not None:
                    raise  # asked for by name: refuse to start
                # Declared by other code (a newer release, say) or a module that broke:
                # the other subscriptions run; this one's deliveries wait, never acked.
                logger.error("%s", exc)
                self._unloaded[sub.pk] = sub
        self._next_import = time.monotonic() + IMPORT_RETRY_INTERVAL

    def _load(self, sub: Subscription) -> None:
        try:
            handler = import_string(sub.handler)
        except Exception as exc:  # a module may raise anything at import, not just ImportError
            raise HandlerImportError(
                f"Subscription {sub.name!r}: its handler {sub.handler!r} does not import "
                f"({type(exc).__name__}: {exc}). Its deliveries wait until a dispatcher can "
                "import it."
            ) from exc
        self._subs[sub.pk] = sub
        self._handlers[sub.pk] = handler

    def _retry_imports(self) -> None:
        """Try the handlers that did not import again, now and then (a deploy may fix them)."""
        if not self._unloaded or time.monotonic() < self._next_import:
            return
        self._next_import = time.monotonic() + IMPORT_RETRY_INTERVAL
        for pk, sub in list(self._unloaded.items()):
            try:
                sub.refresh_from_db()
            except Subscription.DoesNotExist:
                sub.active = False
            if not sub.active:
                # Removed or deactivated meanwhile (a later deploy dropped it): stop trying.
                del self._unloaded[pk]
                logger.info("subscription %s is no longer active; not importing it", sub.name)
                continue
            try:
                self._load(sub)
            except HandlerImportError as exc:
                logger.error("%s", exc)
            else:
                del self._unloaded[pk]
                logger.info("subscription %s: its handler imports now, delivering", sub.name)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals_seen += 1
        if self._signals_seen > 1:
            logger.warning("second signal, exiting at once signal=%s", signum)
            os._exit(128 + signum)
        logger.info("signal received, draining signal=%s", signum)
        self.stop()

    def _shutdown(self) -> None:
        pool = self._pool
        try:
            if pool is not None:
                self._drain(pool)
            if self._listener is not None:
                self._listener.stop()
            if self.row is not None:
                self.row.stop(self.clock())
        except DatabaseError:
            logger.exception("database error during shutdown; leases left will expire")
        finally:
            for signum, previous in self._previous_handlers.items():
                signal.signal(signum, previous)
            self._previous_handlers.clear()
            self._reset_connection()
        logger.info(
            "dispatcher stopped acked=%s retried=%s dead=%s",
            self.stats.acked,
            self.stats.retried,
            self.stats.dead,
        )

    def _drain(self, pool: WorkerPool) -> None:
        """Give back unstarted work; let running handlers finish within the grace."""
        self._give_back(pool.take_unstarted())
        deadline = time.monotonic() + self.shutdown_grace
        while (pool.busy or self._orphans) and time.monotonic() < deadline:
            if self._orphans:
                self._give_back_orphans(quietly=True)  # a failed claim's, if the database is back
            if not (pool.busy or self._orphans):
                break
            self._wake.wait(min(0.05, self.poll_interval))
            self._wake.clear()
            try:
                # Draining handlers keep their leases, or another dispatcher would start
                # them a second time while they finish here.
                now = self.clock()
                self._upkeep(now)
                self._housekeeping(now, recover=False)
            except Error:
                logger.exception("database error while draining; retrying")
                self._reset_connection()
        outcomes, still_running = pool.close()
        now = self.clock()
        self._record(outcomes, now)
        self._abandon(still_running)

    # -- the loop ----------------------------------------------------------------------------

    def _loop(self) -> None:
        failures = 0
        while not self._stop.is_set():
            # Cleared before the pass, not after the wait: a wake-up that arrives during the
            # pass makes the next wait return at once instead of being lost.
            self._wake.clear()
            try:
                progressed = self._pass()
                idle = self.until_idle and not progressed and self._idle()
            except Error:
                # A lost connection or a restarted server must not end the dispatcher:
                # back off (bounded), reconnect on the next pass, keep what is unrecorded.
                failures += 1
                delay = self._error_backoff.delay(failures + 1)
                logger.exception("database error, retrying in %.1fs failures=%s", delay, failures)
                self._reset_connection()
                self._stop.wait(delay)
                continue
            failures = 0
            if self._reached_max_messages():
                return
            if idle:
                logger.info("idle, exiting")
                return
            if not progressed:
                self._wake.wait(self.poll_interval)

    def _reached_max_messages(self) -> bool:
        """Claimed --max-messages deliveries and recorded all of them (acked, failed, or
        fenced out because the lease was lost)."""
        if self.max_messages is None or self.stats.claimed < self.max_messages:
            return False
        assert self._pool is not None
        return not self._pool.busy and not self._pool.has_outcomes()

    @staticmethod
    def _reset_connection() -> None:
        try:
            connections["default"].close()
        except Error:
            pass

    def _pass(self) -> bool:
        # The loop keeps one connection whatever CONN_MAX_AGE says (closing it every pass
        # would reconnect several times a second); a broken one is replaced after an error.
        backends.get().tune_loop_connection()
        now = self.clock()
        progressed = self._upkeep(now) > 0
        if self._orphans:
            self._give_back_orphans()
        self._retry_imports()
        batch = pubsub_settings.batch_size
        try:
            sequenced = Topic.sequence_all(batch=batch)
            progressed |= bool(sequenced)
            topics = list(sequenced) if self._skip_behind(sequenced) else Topic.behind()
            for topic_id in topics:
                progressed |= self._fan_out(topic_id, now, batch) > 0
            progressed |= self._claim(self.clock()) > 0
        except Error:
            # Passes that keep failing while the database answers (a lock, a timeout) must
            # not make this process look dead to the others, who would take back the
            # leases of the handlers it is running.
            self._beat_quietly()
            raise
        # Heartbeat and recovery come last: first in a pass woken by a commit, they would
        # stand between that commit and its handler.
        progressed |= self._housekeeping(self.clock()) > 0
        return progressed

    def _beat_quietly(self) -> None:
        now = self.clock()
        if now < self._next_beat:
            return
        try:
            self._heartbeat(now)
        except Error:
            logger.debug("heartbeat failed too", exc_info=True)

    def _skip_behind(self, sequenced: dict[int, int]) -> bool:
        """Whether this pass fans out only the topics it just sequenced.

        Looking for every subscription that is behind costs a round trip on the way from
        a commit to its handler, and a pass that sequenced is followed at once by another.
        So such a pass fans out just its topics, and the next one looks; never two passes
        running, or a steady stream of messages would starve a subscription further
        behind (or one whose topic another dispatcher sequenced).
        """
        self._skipped_behind = bool(sequenced) and not self._skipped_behind
        return self._skipped_behind

    def _upkeep(self, now: datetime) -> int:
        """Keep our leases fresh, record finished work; return how much was recorded.

        Leases are extended first: a slow pass must not let this process's own running
        handlers' leases look expired to the recovery that follows in a pass.
        """
        self._extend_leases(now)
        self._time_out()
        return self._collect(now)

    def _housekeeping(self, now: datetime, *, recover: bool = True) -> int:
        """Heartbeat and take back expired leases, each when due; return how many
        deliveries were taken back."""
        if now >= self._next_beat:
            self._heartbeat(now)
        if recover and (self._next_recovery is None or now >= self._next_recovery):
            self._next_recovery = now + timedelta(seconds=RECOVERY_INTERVAL)
            return self._recover_expired(now)
        return 0

    def _time_out(self) -> None:
        """Fail handlers that outran their subscription's timeout; report their threads."""
        assert self._pool is not None
        for job in self._pool.time_out():
            self.stats.timed_out += 1
            logger.error(
                "delivery id=%s subscription=%s attempt=%s timed out after %gs; its worker "
                "thread stays busy until the handler returns, a new thread takes its place "
                "stuck=%s",
                job.delivery_id,
                job.message.subscription,
                job.message.attempt,
                job.timeout,
                len(self._pool.stuck()),
            )

    def _check_clock(self) -> None:
        if time.monotonic() < self._next_clock_check:
            return
        self._next_clock_check = time.monotonic() + CLOCK_CHECK_INTERVAL
        # Read right before the query: the pass's own start time may be a slow pass old.
        skew = Dispatcher.clock_skew(self.clock())
        if skew is not None and abs(skew) > MAX_CLOCK_SKEW:
            logger.warning(
                "this host's clock is %.1fs %s the database server's; leases, retry times and "
                "heartbeats use it, so dispatchers on several hosts need synchronised clocks "
                "(NTP)",
                abs(skew),
                "ahead of" if skew > 0 else "behind",
            )

    def _heartbeat(self, now: datetime) -> None:
        assert self.row is not None and self._pool is not None
        self._check_clock()
        inflight = len(self._pool.held_jobs())
        self.row.beat(now, inflight=inflight, stuck=len(self._pool.stuck()))
        self._next_beat = now + timedelta(seconds=pubsub_settings.heartbeat_interval)
        timeout = pubsub_settings.dispatcher_timeout
        for dead in Dispatcher.objects.presumed_dead(now, timeout=timeout, me=self.row):
            if not dead.mark_dead(now):
                continue  # it beat in the meantime, or another dispatcher got there first
            held = Delivery.objects.inflight().filter(dispatcher=dead)
            reason = f"dispatcher {dead} stopped; lease taken back"
            taken = self._release(held, now, reason, Q(dispatcher=dead))
            logger.warning("dispatcher presumed dead dispatcher=%s taken_back=%s", dead, taken)

    def _recover_expired(self, now: datetime) -> int:
        assert self._pool is not None
        expired = Delivery.objects.expired(now).exclude(id__in=padded_ids(self._pool.held()))
        return self._release(
            expired, now, "lease expired before an ack", Q(lease_expires_at__lt=now)
        )

    def _release(self, deliveries: Any, now: datetime, reason: str, still: Q) -> int:
        """Fail the given inflight deliveries (their attempt started) so they run again.

        ``still`` re-checks, in the fenced UPDATE itself, why we may take the lease: a holder
        that extended its lease a moment ago keeps it.

        An ordered run is an exception: its worker ran it in offset order and acked each
        message before starting the next, so only the subscription's lowest unfinished
        offset can have started. That one is failed; the rest are given back with their
        attempt returned, so crashes do not use up the attempts of messages that never ran.
        """
        count = 0
        rows = deliveries.values_list("id", "lease_token", "subscription_id", "attempts", "offset")
        heads: dict[int, int | None] = {}
        unstarted: dict[str, list[int]] = defaultdict(list)
        for delivery_id, token, sub_id, attempt, offset in rows[: pubsub_settings.batch_size]:
            sub = self._subs.get(sub_id) or Subscription.objects.get(pk=sub_id)
            if sub.effective_ordered:
                if sub_id not in heads:
                    # From the database, not from these rows: they may be part of a run.
                    lowest = Delivery.objects.unfinished().filter(subscription_id=sub_id)
                    heads[sub_id] = lowest.aggregate(head=Min("offset"))["head"]
                if offset != heads[sub_id]:
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
                self.stats.recovered += 1
                logger.warning(
                    "delivery id=%s subscription=%s attempt=%s %s, now %s",
                    delivery_id,
                    sub.name,
                    attempt,
                    reason,
                    state,
                )
                self._signal_taken_back(delivery_id, sub, attempt, reason, state)
        for token, ids in unstarted.items():
            given = Delivery.objects.filter(still).give_back(ids, token=token, now=now)
            count += given
            self.stats.given_back += given
        return count

    def _signal_taken_back(
        self, delivery_id: int, sub: Subscription, attempt: int, reason: str, state: str
    ) -> None:
        """The failure signals for a lease taken back: the process that ran it died or
        stalled."""
        watched = (signals.delivery_failed, signals.dead_lettered, signals.retry_scheduled)
        if not any(signal.has_listeners(Subscription) for signal in watched):
            return  # no need to read the message back
        row = Delivery.objects.select_related("message").get(pk=delivery_id)
        m = row.message
        claimed = Claimed(
            delivery_id, attempt, m.pk, row.offset, m.body, m.key, m.headers or {}, m.published_at
        )
        _signal_failure(_message(sub, claimed), reason, "", state, row.available_at)

    def _extend_leases(self, now: datetime) -> None:
        """Keep the leases of handlers still running from expiring under them."""
        assert self._pool is not None
        soon = time.monotonic()
        by_token: dict[str, list[Job]] = defaultdict(list)
        for job in self._pool.held_jobs():
            lease = self._subs[job.subscription_id].effective_lease
            if job.lease_expires - soon < lease / 2:
                by_token[job.token].append(job)
        for token, jobs in by_token.items():
            lease = self._subs[jobs[0].subscription_id].effective_lease
            Delivery.objects.filter(
                id__in=padded_ids(job.delivery_id for job in jobs),
                state=Delivery.State.INFLIGHT,
                lease_token=token,
            ).update(lease_expires_at=now + timedelta(seconds=lease))
            for job in jobs:
                job.lease_expires = soon + lease

    def _collect(self, now: datetime) -> int:
        """Record what the workers finished; keep what could not be, for the next pass."""
        assert self._pool is not None
        outcomes = self._pool.take_outcomes()
        # Acks a worker recorded itself (an ordered run) are no reason to pass again at once:
        # the dispatcher would spin beside the run, costing it the CPU and the database.
        progress = sum(1 for outcome in outcomes if not outcome.acked)
        self._record(outcomes, now, keep=self._pool.put_back)
        return progress

    def _record(
        self,
        outcomes: list[Outcome],
        now: datetime,
        keep: Callable[[list[Outcome]], None] | None = None,
    ) -> None:
        """Record outcomes: acks and give-backs in one statement per claim token, failures
        one by one. If the database fails part way, what was recorded counts once, and
        ``keep`` gets the rest to record later."""
        done: list[Outcome] = []
        try:
            self._write_outcomes(outcomes, now, done)
        except BaseException:
            if keep is not None:
                recorded = {id(outcome) for outcome in done}
                keep([outcome for outcome in outcomes if id(outcome) not in recorded])
            raise
        finally:
            self._settle(done)

    def _write_outcomes(self, outcomes: list[Outcome], now: datetime, done: list[Outcome]) -> None:
        """Write outcomes to the database, adding each to ``done`` once it is written."""
        acks: dict[str, list[Outcome]] = defaultdict(list)
        unstarted: list[Outcome] = []
        for outcome in outcomes:
            if outcome.unstarted:
                unstarted.append(outcome)
            elif outcome.acked:
                self.stats.acked += 1
                done.append(outcome)
            elif outcome.error is None:
                acks[outcome.job.token].append(outcome)
            else:
                self._record_failure(outcome, now)
                done.append(outcome)
        self._give_back_rows(((o.job.delivery_id, o.job.token) for o in unstarted), now)
        done += unstarted
        for token, group in acks.items():
            ids = [outcome.job.delivery_id for outcome in group]
            acked = set(Delivery.objects.ack(ids, token=token, now=now))
            for outcome in group:
                outcome.acked = outcome.job.delivery_id in acked
            done += group
            self.stats.acked += len(acked)
            if len(acked) < len(ids):
                self.stats.fenced += len(ids) - len(acked)
                logger.warning(
                    "ack rejected, lease no longer held deliveries=%s",
                    ",".join(str(i) for i in ids if i not in acked),
                )

    def _settle(self, outcomes: list[Outcome]) -> None:
        """Free the slots of recorded outcomes and size the next chunks from them. A
        timed-out handler keeps its subscription's slot until its thread is free again."""
        ran: dict[int, list[float]] = defaultdict(list)
        for outcome in outcomes:
            if outcome.frees_slot:
                self._inflight[outcome.job.subscription_id] -= 1
            if not outcome.unstarted and not outcome.late:
                ran[outcome.job.subscription_id].append(outcome.duration)
                if outcome.acked:  # not if its ack was fenced out
                    message, duration = outcome.job.message, outcome.duration
                    signals.send(
                        signals.delivery_succeeded, Subscription, message=message, duration=duration
                    )
        for sub_id, durations in ran.items():
            self._resize_chunks(sub_id, durations)

    def _resize_chunks(self, sub_id: int, durations: list[float]) -> None:
        """Double the chunk while it stays under CHUNK_SECONDS of handler time.

        Chunks start at one delivery: a fresh process (after a crash, say) claims little at
        a time, so a delivery that kills the process is soon alone in its claim.
        """
        per_message = max(sum(durations) / len(durations), 1e-6)
        fits = max(1, int(CHUNK_SECONDS / per_message))
        cap = max(1, MAX_HELD // self.workers)
        size = min(2 * self._chunk_size[sub_id], fits, pubsub_settings.batch_size, cap)
        self._chunk_size[sub_id] = max(1, size)

    def _record_failure(self, outcome: Outcome, now: datetime) -> None:
        job = outcome.job
        sub = self._subs[job.subscription_id]
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
            self.stats.fenced += 1
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
            self.stats.failed += 1
        if state is not None:
            _signal_failure(job.message, outcome.error or "", outcome.traceback, state, due)
        if state == Delivery.State.DEAD:
            self.stats.dead += 1
            logger.error(
                "delivery id=%s subscription=%s attempt=%s failed, dead-lettered: %s",
                job.delivery_id,
                sub.name,
                attempt,
                outcome.error,
            )
        elif state is not None:
            self.stats.retried += 1
            logger.warning(
                "delivery id=%s subscription=%s attempt=%s failed, will retry: %s",
                job.delivery_id,
                sub.name,
                attempt,
                outcome.error,
            )
        logger.debug("delivery id=%s traceback:\n%s", job.delivery_id, outcome.traceback)

    def _budget(self) -> Budget | None:
        """What this pass may claim; None if nothing."""
        assert self._pool is not None
        free = self.workers - self._pool.busy
        left = None if self.max_messages is None else self.max_messages - self.stats.claimed
        if free <= 0 or not self._subs or left == 0 or self._stop.is_set():
            return None
        stuck: dict[int, int] = defaultdict(int)
        for job, _ in self._pool.stuck():
            stuck[job.subscription_id] += 1
        return Budget(free, left, stuck)

    def _limit(self, sub: Subscription, budget: Budget, chunks: int) -> int:
        """How many deliveries of ``sub`` to claim now for ``chunks`` workers; 0: none."""
        if sub.effective_ordered and self._inflight[sub.pk]:
            # Its head is running here, or a timed-out run of it is still stuck in a
            # thread: nothing behind it (nor its own retry) may start until that ends.
            return 0
        limit = chunks * self._chunk_size[sub.pk]
        bound = sub.effective_max_inflight
        if bound is not None:
            limit = min(limit, bound - self._inflight[sub.pk])
        elif budget.stuck[sub.pk] >= self.workers:
            return 0  # hung runs already hold a pool's worth of threads: no more
        if budget.left is not None:
            limit = min(limit, budget.left - budget.claimed)
        return max(0, limit)

    def _rotated(self, *, advance: bool = True) -> list[Subscription]:
        """The subscriptions, starting one further at each claim: each gets idle workers
        first in turn. Fan-outs look in the same order without moving it on, or a pass
        could move it by two and start every claim at the same subscription."""
        subs = list(self._subs.values())
        if advance:
            self._rotation = (self._rotation + 1) % len(subs)
        return subs[self._rotation :] + subs[: self._rotation]

    def _fan_out(self, topic_id: int, now: datetime, batch: int) -> int:
        """Fan the topic out; on PostgreSQL lease the first new deliveries of its unordered
        subscriptions in the same statement, a chunk for each idle worker. Returns how many
        deliveries were created."""
        assert self.row is not None
        budget = self._budget()
        leases: list[Lease] = []
        promised = 0
        if budget is not None and Topic.leases_at_fan_out():
            for sub in self._rotated(advance=False):
                if sub.topic_id != topic_id or sub.effective_ordered:
                    continue  # an ordered run is claimed under its subscription's lock
                limit = self._limit(sub, budget, 1)
                if budget.left is not None:
                    limit = min(limit, budget.left - promised)
                if limit > 0 and len(leases) < budget.free:
                    expires = self.clock() + timedelta(seconds=sub.effective_lease)
                    leases.append(Lease(sub.pk, limit, uuid.uuid4().hex, expires))
                    promised += limit
        try:
            fanned = Topic.fan_out(
                topic_id, now=now, batch=batch, leases=leases, dispatcher_id=self.row.pk
            )
            jobs = [
                self._jobs(self._subs[lease.subscription_id], lease.token, rows)
                for lease in leases
                if (rows := fanned.leased.get(lease.subscription_id))
            ]
        except BaseException:
            self._failed_claim()
            raise
        for sub_jobs in jobs:
            assert budget is not None  # leased only with a budget
            self._hand_out(sub_jobs, 1, budget)
        return fanned.created

    def _claim(self, now: datetime) -> int:
        """Claim for the idle workers, round robin over the subscriptions."""
        assert self.row is not None
        budget = self._budget()
        if budget is None:
            return 0
        for sub in self._rotated():
            ordered = sub.effective_ordered
            chunks = 1 if ordered else budget.free  # an ordered run goes to one thread
            limit = self._limit(sub, budget, chunks)
            if limit <= 0:
                continue
            token = uuid.uuid4().hex
            try:
                rows = Delivery.objects.claim(
                    sub, limit=limit, now=now, token=token, dispatcher_id=self.row.pk
                )
                jobs = self._jobs(sub, token, rows)
            except BaseException:
                self._failed_claim()
                raise
            self._hand_out(jobs, chunks, budget)
            if budget.spent:
                break
        return budget.claimed

    def _failed_claim(self) -> None:
        """A claim commits on its own: if it, or reading what it leased, failed (a lost
        connection, even after the statement ran), deliveries may be leased to this live
        dispatcher that no worker here will run. Give them back now, or in the next pass."""
        self._orphans = True
        self._give_back_orphans(quietly=True)

    def _hand_out(self, jobs: list[Job], chunks: int, budget: Budget) -> None:
        """Hand claimed jobs to the pool, spread over as many idle workers as there are
        deliveries, up to ``chunks``; an ordered run goes to one worker whole.

        Only after the claim committed: none runs on a lease that rolled back."""
        if not jobs:
            return
        if self._subs[jobs[0].subscription_id].effective_ordered:
            parts = 1
            self._submit(jobs)
        else:
            parts = min(chunks, len(jobs))
            for part in range(parts):
                self._submit(jobs[part::parts])
        budget.free -= parts
        budget.claimed += len(jobs)
        # Let the workers start now. They need the interpreter's lock to run a handler,
        # and would otherwise wait for this thread's next query to release it.
        time.sleep(0)

    def _jobs(self, sub: Subscription, token: str, rows: list[Claimed]) -> list[Job]:
        """Build the handlers' jobs for the claimed deliveries."""
        expires = time.monotonic() + sub.effective_lease
        handler, timeout = self._handlers[sub.pk], sub.effective_timeout
        return [
            Job(row.delivery_id, token, sub.pk, _message(sub, row), handler, expires, timeout)
            for row in rows
        ]

    def _submit(self, jobs: list[Job]) -> None:
        """Hand one chunk to the pool: one thread runs these jobs one after the other, and
        for an ordered subscription stops at the first failure."""
        assert self._pool is not None
        if not jobs:
            return
        sub_id = jobs[0].subscription_id
        self._inflight[sub_id] += len(jobs)
        self.stats.claimed += len(jobs)
        if self._subs[sub_id].effective_ordered:
            # Message n is acked before n + 1 starts, even across a crash (guarantees 3).
            self._pool.submit(Chunk(jobs, ack=self._ack_one))
        else:
            self._pool.submit(Chunk(jobs))

    def _ack_one(self, job: Job) -> bool:
        """Ack one delivery from its worker thread, on that thread's connection."""
        ids, token, now = [job.delivery_id], job.token, self.clock()
        return bool(Delivery.objects.ack(ids, token=token, now=now, lazy=True))

    def _give_back_orphans(self, *, quietly: bool = False) -> None:
        """Give back, attempt and all, what is leased to this dispatcher and held by no
        worker here: what a failed claim may have left. ``quietly``: a database error
        leaves that for the next pass instead of raising."""
        assert self._pool is not None and self.row is not None
        try:
            held = {(job.delivery_id, job.token) for job in self._pool.held_jobs()}
            leased = Delivery.objects.inflight().filter(dispatcher=self.row)
            rows = leased.values_list("id", "lease_token")
            orphans = [
                (delivery_id, token)
                for delivery_id, token in rows
                if token is not None and (delivery_id, token) not in held
            ]
            self._give_back_rows(orphans, self.clock())
        except Error:
            if not quietly:
                raise
            logger.warning("could not give back a failed claim's leases yet", exc_info=True)
            return
        self._orphans = False

    def _give_back(self, jobs: list[Job]) -> None:
        self._give_back_rows(((job.delivery_id, job.token) for job in jobs), self.clock())
        for job in jobs:
            self._inflight[job.subscription_id] -= 1

    def _give_back_rows(self, leases: Iterable[tuple[int, str]], now: datetime) -> None:
        """Return claimed deliveries, given as (delivery id, lease token), whose handler
        never started, attempt and all."""
        by_token: dict[str, list[int]] = defaultdict(list)
        for delivery_id, token in leases:
            by_token[token].append(delivery_id)
        for token, ids in by_token.items():
            self.stats.given_back += Delivery.objects.give_back(ids, token=token, now=now)

    def _abandon(self, jobs: list[Job]) -> None:
        """Handlers still running when the grace ran out: their attempt failed."""
        now = self.clock()
        for job in jobs:
            error = "still running when the dispatcher shut down"
            self._record_failure(Outcome(job, error=error), now)
            self._inflight[job.subscription_id] -= 1

    def _idle(self) -> bool:
        """Nothing running (stuck handlers included), nothing in flight anywhere, nothing due
        within idle_wait."""
        assert self._pool is not None
        if self._pool.busy or self._pool.has_outcomes() or self._pool.stuck():
            return False  # a timed-out handler still running counts: it may still finish
        # A paused subscription's deliveries wait for an operator, not for this process.
        paused = set(
            Subscription.objects.filter(pk__in=list(self._subs), paused=True).values_list(
                "pk", flat=True
            )
        )
        pks = list(self._subs)
        topics = {sub.topic_id for sub in self._subs.values()}
        # Rows of still-open transactions are invisible here, so this sees committed work only.
        if MessageRow.objects.unsequenced().filter(topic_id__in=topics).exists():
            return False
        if Subscription.objects.filter(pk__in=pks, position__lt=F("topic__next_offset")).exists():
            return False
        horizon = self.clock() + timedelta(seconds=self.idle_wait)
        unordered = [
            pk for pk, sub in self._subs.items() if not sub.effective_ordered and pk not in paused
        ]
        if (
            Delivery.objects.unfinished()
            .filter(subscription_id__in=unordered)
            .filter(
                Q(state=Delivery.State.INFLIGHT)
                | Q(state__in=Delivery.WAITING, available_at__lte=horizon)
            )
            .exists()
        ):
            return False
        for pk, sub in self._subs.items():
            if not sub.effective_ordered or pk in paused:
                continue
            head = (
                Delivery.objects.unfinished()
                .filter(subscription_id=pk)
                .order_by("offset")
                .values_list("state", "available_at")
                .first()
            )
            if head and (head[0] == Delivery.State.INFLIGHT or head[1] <= horizon):
                return False
        return True


def _message(sub: Subscription, row: Claimed) -> Message:
    """What the handler gets for a leased delivery of ``sub``."""
    return Message(
        id=row.message_id,
        offset=row.offset,
        topic=sub.topic.name,
        payload=row.payload,
        key=row.key,
        headers=row.headers,
        published_at=row.published_at,
        attempt=row.attempt,
        subscription=sub.name,
        delivery_id=row.delivery_id,
    )


def _signal_failure(
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
