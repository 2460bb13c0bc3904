"""The heartbeat: this dispatcher's row says it is alive, how much it holds, and whether
this host's clock agrees with the database's. It runs on a thread of its own, with its own
database connection, beside the lease keeper: a pass that waits for a lock (an operator's
seek, an application's long write on SQLite) holds up neither, so other dispatchers never
see a live dispatcher's leases lapse or its heartbeat go silent because of it."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from datetime import datetime, timedelta

from django.db import Error, connections

from ..conf import pubsub_settings
from ..models import Dispatcher
from ..retry import ErrorBackoff
from .leases import LeaseKeeper
from .workers import WorkerPool

logger = logging.getLogger("django_pubsub.dispatcher")

Clock = Callable[[], datetime]
# Host clock ahead of or behind the database's by more than this: warn (leases, due times
# and heartbeats are written with the host's clock). Checked at most every CLOCK_CHECK s.
MAX_CLOCK_SKEW = 1.0
CLOCK_CHECK_INTERVAL = 600.0
# Shortest wait between two ticks of the thread.
MIN_TICK = 0.05
# Own beats remembered, to tell silence from a database nobody could write to: enough for
# DISPATCHER_TIMEOUT at the shortest heartbeat interval that setting allows it to cover.
BEATS_KEPT = 4096


class Heartbeat:
    def __init__(self, row: Dispatcher, pool: WorkerPool) -> None:
        self.row = row
        self.pool = pool
        self._next_beat: datetime | None = None
        self._next_clock_check = 0.0
        # When this dispatcher's own beats were written (its row's too, at registration).
        self._beats: deque[datetime] = deque([row.last_seen], maxlen=BEATS_KEPT)
        self._lock = threading.Lock()
        # Set when the dispatcher stops: a beat then must not mark its row alive again.
        self.stopping = False

    def beat(self, now: datetime) -> None:
        """Write the row when a beat is due (every HEARTBEAT_INTERVAL)."""
        if self._next_beat is not None and now < self._next_beat:
            return
        self._check_clock(now)
        inflight, stuck = len(self.pool.held()), len(self.pool.stuck())
        alive = self.row.beat(now, inflight=inflight, stuck=stuck, revive=not self.stopping)
        if not alive and self.stopping:
            return  # stopped meanwhile: left stopped
        with self._lock:
            self._beats.append(now)
        self._next_beat = now + timedelta(seconds=pubsub_settings.heartbeat_interval)

    def silent_before(self, now: datetime) -> datetime:
        """Another dispatcher whose last beat is older than this is silent (presumed
        dead): DISPATCHER_TIMEOUT back from ``now``, counting only time in which this
        dispatcher could write its own beats.

        A database that lets nobody write for a while (SQLite behind an application's
        long write, a stalled host) silences every dispatcher alike: that is no sign that
        any of them died, and taking their leases would run their handlers twice. A gap
        between two of our own beats counts for at most two heartbeat intervals.
        """
        with self._lock:
            beats = list(self._beats)
        need = pubsub_settings.dispatcher_timeout
        cap = 2 * pubsub_settings.heartbeat_interval
        later = now
        for earlier in reversed(beats):
            counted = min(max((later - earlier).total_seconds(), 0.0), cap)
            if counted >= need:
                # The gap's writable part is taken to be its start: the later bound.
                return earlier + timedelta(seconds=counted - need)
            need -= counted
            later = earlier
        return later - timedelta(seconds=need)

    def _check_clock(self, now: datetime) -> None:
        if time.monotonic() < self._next_clock_check:
            return
        self._next_clock_check = time.monotonic() + CLOCK_CHECK_INTERVAL
        skew = Dispatcher.clock_skew(now)
        if skew is not None and abs(skew) > MAX_CLOCK_SKEW:
            logger.warning(
                "this host's clock is %.1fs %s the database server's; leases, retry times and "
                "heartbeats use it, so dispatchers on several hosts need synchronised clocks "
                "(NTP)",
                abs(skew),
                "ahead of" if skew > 0 else "behind",
            )


class Keeping:
    """The thread that runs the heartbeat and the lease keeper, each tick: often enough to
    extend the shortest lease in time, at least every HEARTBEAT_INTERVAL.

    It keeps them up whatever the loop does, so that a pass waiting for a lock, however
    long, never costs running handlers their leases. A loop that has not begun a pass for
    DISPATCHER_TIMEOUT (``progress`` returns the time.monotonic() of its last) is
    reported as an error, and again when it moves: its work waits meanwhile, neither lost
    nor run twice, until it moves or the process is restarted."""

    def __init__(
        self,
        heartbeat: Heartbeat,
        keeper: LeaseKeeper,
        clock: Clock,
        progress: Callable[[], float],
    ) -> None:
        self.heartbeat = heartbeat
        self.keeper = keeper
        self.clock = clock
        self.progress = progress
        self._stop = threading.Event()
        self._stuck_since: float | None = None
        self._thread = threading.Thread(target=self._run, name="pubsub-heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop after the current tick (a beat written after it does not make the row
        alive again); the thread closes its connection."""
        self.heartbeat.stopping = True
        self._stop.set()
        self._thread.join(timeout=30)

    def tick(self) -> None:
        self._watch_loop()
        # Leases first: they are what other dispatchers would take.
        self.keeper.extend(self.clock())
        self.heartbeat.beat(self.clock())

    def _watch_loop(self) -> None:
        stalled = time.monotonic() - self.progress()
        if stalled < pubsub_settings.dispatcher_timeout:
            if self._stuck_since is not None:
                logger.warning("the dispatch loop moves again")
                self._stuck_since = None
            return
        if self._stuck_since is None:
            self._stuck_since = time.monotonic()
            logger.error(
                "the dispatch loop has not begun a pass for %.0fs: it waits for a lock, or a "
                "signal receiver has not returned; its deliveries wait with it (restart the "
                "process if it never moves again)",
                stalled,
            )

    def _interval(self) -> float:
        lease = self.keeper.shortest_lease() / 4
        return max(MIN_TICK, min(lease, pubsub_settings.heartbeat_interval))

    def _run(self) -> None:
        backoff = ErrorBackoff()
        try:
            wait = 0.0
            while not self._stop.wait(wait):
                try:
                    self.tick()
                    wait = self._interval()
                except Exception as exc:  # the thread must live on, whatever went wrong
                    wait = backoff.failed()
                    logger.warning(
                        "heartbeat failed, retrying in %.1fs failures=%s: %s",
                        wait,
                        backoff.failures,
                        exc,
                        exc_info=not isinstance(exc, Error),
                    )
                    _close_quietly()
                    continue
                backoff.succeeded()
        finally:
            connections.close_all()  # this thread's own


def _close_quietly() -> None:
    try:
        connections["default"].close()
    except Error:
        pass
