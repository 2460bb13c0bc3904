"""A fixed pool of daemon threads that run handlers, a chunk of deliveries at a time.

Not concurrent.futures: its threads are joined at interpreter exit, so one hung handler would
keep a process that was told to exit at once alive. Daemon threads die with the process.

The dispatcher hands over *chunks*: the deliveries of one claim, for one subscription, which
one thread runs one after the other. Handing over one delivery at a time would cost a thread
wake-up per message. In a chunk of an ordered or keyed subscription each job has an
*order* (the subscription's one order, or its message's key): a job starts only once the
one before it in its order is acked, and a failure hands the rest of its order back
unstarted, so nothing behind a failed message runs first; other orders go on. Jobs of
several keys take turns, so the acks of one turn are written in one statement, and the
last turn's are left to the dispatcher. A batch
subscription's chunk is one call of its handler with every message of the chunk. A
transactional subscription's handler runs in a transaction that its ack commits.

A job is always in one place: queued (in a chunk not yet finished), running, or finished (an
outcome); a timed-out job is both stuck and, as its timeout failure, finished. Jobs move
between them under one lock, so the dispatcher can count, give back and abandon work without
a window where a job is in none of them.

A job that outruns its timeout is *stuck*: Python cannot stop a thread, so the pool reports
the attempt as failed at once, hands back the rest of its chunk unstarted, starts a
replacement thread so the other work keeps its workers, and lets the stuck thread end when
its handler finally returns. Its late result is then reported too (``late=True``); the
dispatcher's lease fencing rejects it.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from types import FrameType
from typing import TYPE_CHECKING, Any, TypeVar

from django.db import close_old_connections, connections, transaction
from django.utils import timezone

from .. import signals
from ..exceptions import BatchFailure
from ..message import Message

logger = logging.getLogger("django_pubsub.dispatcher.workers")

if TYPE_CHECKING:
    from ..models import Claimed, Subscription

T = TypeVar("T")
# Chunk.take_rest(): every order.
ALL = object()


@dataclass(eq=False)
class Job:
    delivery_id: int
    token: str
    subscription_id: int
    message: Message
    handler: Callable[[Any], Any]  # a message, or a batch's list of them
    # time.monotonic() when its lease runs out, as far as this process knows (the row's
    # lease_expires_at is the database's word): the lease keeper extends it before then.
    lease_deadline: float = 0.0
    # Seconds the handler may run (None: no limit), and time.monotonic() when it started.
    timeout: float | None = None
    started: float | None = None
    chunk: Chunk | None = None
    # The order it keeps within its chunk (an ordered subscription's one order, or its
    # message's key): None, none.
    order: str | None = None
    # Its message's expires_at: reached before the job starts, it does not run.
    expires_at: datetime | None = None

    def expired_by(self, now: datetime) -> bool:
        return self.expires_at is not None and now >= self.expires_at


def handler_message(sub: Subscription, row: Claimed) -> Message:
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
        delivery=sub.delivery,
    )


def by_token(items: Iterable[T], token: Callable[[T], str]) -> dict[str, list[T]]:
    """``items`` grouped by the lease token they were claimed under: every statement that
    changes leased rows names one token, which fences out any other holder."""
    groups: dict[str, list[T]] = {}
    for item in items:
        groups.setdefault(token(item), []).append(item)
    return groups


@dataclass(eq=False)
class Chunk:
    """Jobs of one claim that one thread runs: jobs[next:end] are still to start."""

    jobs: list[Job]
    # Writes the acks of jobs whose handler returned; the ids it acked. Set, the worker
    # acks them itself (an ordered or keyed chunk's, before the next job of the same
    # order starts; a transactional one's, inside its transaction). Unset, the dispatcher
    # acks what the chunk finished.
    ack: Callable[[list[Job]], set[int]] | None = None
    # Its jobs keep their orders (Job.order).
    in_order: bool = False
    # The database alias a transactional handler's transaction is on; None: none.
    atomic: str | None = None
    # One call of the handler with every job's message.
    batch: bool = False
    next: int = 0
    end: int = 0
    # Outcomes of handlers that returned, whose ack waits for the turn's end.
    deferred: list[Outcome] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.end = len(self.jobs)
        for job in self.jobs:
            job.chunk = self

    def take_rest(self, order: object = ALL) -> list[Job]:
        """Remove and return the jobs not started: all of them, or those of ``order``."""
        rest = self.jobs[self.next : self.end]
        if order is ALL:
            self.end = self.next
            return rest
        taken = [job for job in rest if job.order == order]
        kept = [job for job in rest if job.order != order]
        self.jobs[self.next : self.end] = kept
        self.end = self.next + len(kept)
        return taken


@dataclass(eq=False)
class Outcome:
    job: Job
    error: str | None = None
    traceback: str = ""
    # Whether the job's slot is free again: not for a timeout whose handler still runs.
    frees_slot: bool = True
    # The result of a handler that had already been reported as timed out.
    late: bool = False
    # Never started (the rest of a chunk that stopped): to be given back, attempt returned.
    unstarted: bool = False
    # Seconds the handler ran.
    duration: float = 0.0
    # Acked: by the worker (Chunk.ack), or once the dispatcher has recorded it.
    acked: bool = False
    # Not run: its message expired while it waited in its chunk (to be ended "expired").
    expired: bool = False

    @property
    def deferrable(self) -> bool:
        """A handler that returned and whose ack is still to write."""
        return self.error is None and not (self.acked or self.unstarted or self.expired)


class WorkerPool:
    def __init__(
        self, size: int, on_done: Callable[[], None], clock: Callable[[], datetime] = timezone.now
    ) -> None:
        self._on_done = on_done
        # What a job's expires_at is compared with, as it is about to start.
        self._clock = clock
        self._lock = threading.Condition()
        self._queued: deque[Chunk] = deque()
        self._active: set[Chunk] = set()
        # Keyed by id(job): a retried delivery can be claimed again while its stuck run
        # still holds a thread.
        self._running: dict[int, tuple[Job, threading.Thread]] = {}
        self._stuck: dict[int, tuple[Job, threading.Thread]] = {}
        # Jobs whose handler returned and whose ack (Chunk.ack) is being written: no longer
        # running, so no timeout fires for them, but still ours.
        self._acking: dict[int, Job] = {}
        self._outcomes: list[Outcome] = []
        self._stopping = False
        self._closed = False
        self._started = 0
        self._missing = 0
        for _ in range(size):
            self._start_thread()

    def _start_thread(self) -> None:
        name = f"pubsub-worker-{self._started}"
        self._started += 1
        try:
            threading.Thread(target=self._work, name=name, daemon=True).start()
        except RuntimeError:
            # Out of threads (each stuck handler keeps one): run short-handed, try again at
            # the next time_out() rather than end the dispatcher.
            self._missing += 1
            logger.exception("could not start a worker thread; %s missing", self._missing)

    @property
    def busy_chunks(self) -> int:
        """Chunks handed over and not yet finished: running or about to run. (A chunk
        holds one worker, so this counts the workers taken.)"""
        with self._lock:
            return len(self._active) + len(self._queued)

    def stuck(self) -> list[tuple[Job, threading.Thread]]:
        with self._lock:
            return list(self._stuck.values())

    def held(self) -> list[Job]:
        """Jobs this process still answers for: queued, running, or finished but not yet
        recorded. Their leases are ours even if the database says they expired."""
        with self._lock:
            held = [job for chunk in self._queued for job in chunk.jobs[chunk.next : chunk.end]]
            for chunk in self._active:
                held += chunk.jobs[chunk.next : chunk.end]
            held += (job for job, _ in self._running.values())
            held += self._acking.values()
            held += (o.job for o in self._outcomes if not o.late)
            return held

    def time_out(self) -> list[Job]:
        """Fail the running jobs that outran their timeout; keep the pool at full strength.

        Each one's outcome is a failure carrying the hung thread's current stack, the rest
        of its chunk comes back unstarted, and its thread is replaced, so the pool still has
        ``size`` threads taking work.
        """
        now = time.monotonic()
        timed_out: list[tuple[Outcome, FrameType | None]] = []
        with self._lock:
            if self._stopping:
                return []
            missing, self._missing = self._missing, 0
            for _ in range(missing):
                self._start_thread()
            frames = sys._current_frames()
            replaced: set[threading.Thread] = set()
            for key, (job, thread) in list(self._running.items()):
                if job.timeout is None or job.started is None:
                    continue
                if now - job.started < job.timeout:
                    continue
                del self._running[key]
                self._stuck[key] = (job, thread)
                error = (
                    f"TimeoutError: handler still running after {job.timeout:g}s; "
                    f"thread {thread.name} left running"
                )
                outcome = Outcome(job, error, frees_slot=False, duration=now - job.started)
                self._outcomes.append(outcome)
                chunk = job.chunk
                if chunk is not None:
                    self._active.discard(chunk)
                    self._outcomes += (Outcome(j, unstarted=True) for j in chunk.take_rest())
                    # Handlers of other orders that returned: the dispatcher acks them.
                    self._outcomes += self._undefer(chunk)
                if thread not in replaced:  # a batch's jobs share one thread
                    replaced.add(thread)
                    self._start_thread()
                timed_out.append((outcome, frames.get(thread.ident or -1)))
        # Formatting reads source files: not under the lock the workers need. Only the
        # dispatcher's thread, which is this one, takes outcomes, so filling this in after
        # the outcome is queued races with nobody.
        for outcome, frame in timed_out:
            outcome.traceback = "".join(traceback.format_stack(frame)) if frame else ""
        return [outcome.job for outcome, _ in timed_out]

    def has_outcomes(self) -> bool:
        with self._lock:
            return bool(self._outcomes)

    def submit(self, chunk: Chunk) -> None:
        with self._lock:
            self._queued.append(chunk)
            self._lock.notify()

    def take_outcomes(self) -> list[Outcome]:
        with self._lock:
            outcomes, self._outcomes = self._outcomes, []
            return outcomes

    def put_back(self, outcomes: list[Outcome]) -> None:
        """Return outcomes the dispatcher could not record yet (the database was away)."""
        with self._lock:
            self._outcomes[:0] = outcomes

    def take_unstarted(self) -> list[Job]:
        """Remove and return the jobs no worker has started; running chunks stop after the
        job they are running."""
        with self._lock:
            taken = [job for chunk in self._queued for job in chunk.take_rest()]
            self._queued.clear()
            for chunk in self._active:
                taken += chunk.take_rest()
            return taken

    def close(self) -> tuple[list[Outcome], list[Job]]:
        """Stop the pool: return what finished and what is still running, at one instant.

        Outcomes of jobs that finish later are dropped: the dispatcher has already recorded
        those jobs as abandoned. Call take_unstarted() first: jobs not started are dropped.
        """
        with self._lock:
            self._closed = self._stopping = True
            for chunk in self._active:
                self._outcomes += self._undefer(chunk)
            outcomes, self._outcomes = self._outcomes, []
            running = [job for job, _ in self._running.values()]
            running += self._acking.values()
            self._queued.clear()
            self._lock.notify_all()
        return outcomes, running

    def _work(self) -> None:
        try:
            while True:
                with self._lock:
                    while not self._queued and not self._stopping:
                        self._lock.wait()
                    if self._stopping:
                        return
                    chunk = self._queued.popleft()
                    self._active.add(chunk)
                stuck = self._run_chunk(chunk)
                self._on_done()
                if stuck:
                    return  # a replacement thread took this one's place
        finally:
            connections.close_all()

    def _undefer(self, chunk: Chunk) -> list[Outcome]:
        """Under the lock: the chunk's handlers that returned and wait for their ack,
        handed over to be acked by the dispatcher."""
        deferred, chunk.deferred = chunk.deferred, []
        for outcome in deferred:
            self._acking.pop(id(outcome.job), None)
        return deferred

    def _run_chunk(self, chunk: Chunk) -> bool:
        """Run the chunk's jobs; True if this thread is left stuck in one."""
        # Like a request: a handler gets usable connections and leaves none broken behind.
        close_old_connections()
        try:
            if chunk.batch:
                return self._run_batch(chunk)
            while True:
                with self._lock:
                    if chunk.next >= chunk.end:
                        break
                    job = chunk.jobs[chunk.next]
                    waits = any(o.job.order == job.order for o in chunk.deferred)
                if waits and job.order is not None:
                    # The one before it in its order returned: ack that turn first.
                    self._flush(chunk)
                    continue
                with self._lock:
                    if chunk.next >= chunk.end or chunk.jobs[chunk.next] is not job:
                        continue  # handed back meanwhile (a timeout, a shutdown)
                    chunk.next += 1
                    job.started = time.monotonic()
                    self._running[id(job)] = (job, threading.current_thread())
                if job.expired_by(self._clock()):
                    outcome = Outcome(job, expired=True)  # it waited too long in its chunk
                else:
                    outcome = self._run(job, chunk)
                if outcome.error is not None:
                    close_old_connections()  # the failure may have broken a connection
                with self._lock:
                    timed_out = self._stuck.pop(id(job), None) is not None
                    self._running.pop(id(job), None)
                    outcome.late = timed_out
                    if self._closed:
                        return timed_out
                    if timed_out:
                        self._outcomes.append(outcome)
                        return True  # time_out() handed the rest of the chunk back
                    if chunk.ack is not None and chunk.in_order and outcome.deferrable:
                        self._acking[id(job)] = job  # still ours until acked
                        chunk.deferred.append(outcome)
                        continue
                    self._outcomes.append(outcome)
                    if chunk.in_order and outcome.error is not None and job.order is not None:
                        self._hand_back(chunk.take_rest(job.order))
            with self._lock:
                # The last of each order: nothing behind it starts in this chunk, and no
                # claim takes what follows it while it is inflight, so the dispatcher acks
                # these with the rest of the claim (no connection of this thread needed).
                self._outcomes += self._undefer(chunk)
                self._active.discard(chunk)
            return False
        finally:
            close_old_connections()

    def _hand_back(self, jobs: list[Job]) -> None:
        """Under the lock: jobs that will not start here, to be given back."""
        self._outcomes += (Outcome(job, unstarted=True) for job in jobs)

    def _flush(self, chunk: Chunk) -> None:
        """Ack the chunk's handlers that returned, in one statement; a job whose ack was
        not recorded hands the rest of its order back (the dispatcher records it)."""
        with self._lock:
            deferred, chunk.deferred = chunk.deferred, []  # kept in _acking meanwhile
        if not deferred:
            return
        assert chunk.ack is not None
        acked = self._ack(chunk.ack, [outcome.job for outcome in deferred])
        with self._lock:
            for outcome in deferred:
                self._acking.pop(id(outcome.job), None)
                outcome.acked = outcome.job.delivery_id in acked
            if self._closed:
                return
            self._outcomes += deferred
            for outcome in deferred:
                if not outcome.acked and outcome.job.order is not None:
                    self._hand_back(chunk.take_rest(outcome.job.order))

    def _run_batch(self, chunk: Chunk) -> bool:
        """One handler call with every message of the chunk; True if it left this thread
        stuck."""
        now = self._clock()
        with self._lock:
            jobs = chunk.jobs[chunk.next : chunk.end]
            chunk.next = chunk.end
            expired = [job for job in jobs if job.expired_by(now)]
            jobs = [job for job in jobs if job not in expired]
            started = time.monotonic()
            for job in jobs:
                job.started = started
                self._running[id(job)] = (job, threading.current_thread())
        outcomes = self._call_batch(jobs, chunk) if jobs else []
        outcomes += (Outcome(job, expired=True) for job in expired)
        if any(outcome.error is not None for outcome in outcomes):
            close_old_connections()
        with self._lock:
            timed_out = False
            for outcome in outcomes:
                late = self._stuck.pop(id(outcome.job), None) is not None
                self._running.pop(id(outcome.job), None)
                outcome.late = late
                timed_out |= late
            if self._closed:
                return timed_out
            self._outcomes += outcomes
            self._active.discard(chunk)
            return timed_out

    def _call_batch(self, jobs: list[Job], chunk: Chunk) -> list[Outcome]:
        from ..models import Subscription

        for job in jobs:
            signals.send(signals.delivery_started, Subscription, message=job.message)
        messages = [job.message for job in jobs]
        started = time.monotonic()
        failed: dict[int, tuple[str, str]] = {}
        acked: set[int] = set()
        try:
            with transaction.atomic(using=chunk.atomic) if chunk.atomic else _nothing():
                jobs[0].handler(messages)
                if chunk.atomic:
                    acked = self._ack_all(chunk, jobs)
        except BatchFailure as exc:
            trace = formatted_traceback()
            for message_id, why in exc.failed.items():
                error = why if isinstance(why, str) else describe(why or exc)  # type: ignore[arg-type]
                failed[message_id] = (error, trace)
            if chunk.atomic:  # rolled back: none of it happened
                failed = {
                    job.message.id: failed.get(job.message.id, (describe(exc), trace))
                    for job in jobs
                }
        except BaseException as exc:  # a handler's failure is data here
            error, trace = describe(exc), formatted_traceback()
            failed = {job.message.id: (error, trace) for job in jobs}
        # Per message: what sizes the next claims (Claimer.ran) is handler time a message.
        duration = (time.monotonic() - started) / len(jobs)
        outcomes = []
        behind: dict[str | None, int] = {}
        for job in jobs:
            own = failed.get(job.message.id)
            if own is None and chunk.in_order and job.order in behind:
                first = behind[job.order]
                own = (f"BatchFailure: behind failed message {first} of its batch", "")
            if own is not None:
                if chunk.in_order and job.order is not None:  # no key: nothing behind it
                    behind.setdefault(job.order, job.message.id)
                outcomes.append(Outcome(job, own[0], own[1], duration=duration))
            else:
                outcomes.append(Outcome(job, duration=duration, acked=job.delivery_id in acked))
        if chunk.ack is not None and not chunk.atomic:
            done = [o for o in outcomes if o.error is None]
            if done:
                acked = self._ack(chunk.ack, [o.job for o in done])
                for outcome in done:
                    outcome.acked = outcome.job.delivery_id in acked
        return outcomes

    @staticmethod
    def _ack_all(chunk: Chunk, jobs: list[Job]) -> set[int]:
        """Inside a transactional handler's transaction: ack its jobs, or roll it all back
        if any lease was lost (another run of it may commit instead)."""
        assert chunk.ack is not None
        acked = chunk.ack(jobs)
        if len(acked) < len(jobs):
            raise LeaseLost("lease lost before the handler's transaction committed; rolled back")
        return acked

    @staticmethod
    def _ack(ack: Callable[[list[Job]], set[int]], jobs: list[Job]) -> set[int]:
        try:
            return ack(jobs)
        except Exception:
            # The dispatcher records it instead (and retries while the database is away).
            logger.warning(
                "deliveries id=%s: ack from the worker failed; the dispatcher records it",
                ",".join(str(job.delivery_id) for job in jobs),
                exc_info=logger.isEnabledFor(logging.DEBUG),
            )
            close_old_connections()
            return set()

    @classmethod
    def _run(cls, job: Job, chunk: Chunk) -> Outcome:
        from ..models import Subscription

        signals.send(signals.delivery_started, Subscription, message=job.message)
        started = time.monotonic()
        acked = False
        try:
            if chunk.atomic:
                with transaction.atomic(using=chunk.atomic):
                    job.handler(job.message)
                    acked = bool(cls._ack_all(chunk, [job]))
            else:
                job.handler(job.message)
        except BaseException as exc:  # a handler's failure is data here
            outcome = Outcome(job, error=describe(exc), traceback=formatted_traceback())
        else:
            outcome = Outcome(job, acked=acked)
        outcome.duration = time.monotonic() - started
        return outcome


class LeaseLost(Exception):
    """A transactional handler's ack found its lease gone: its transaction rolls back."""


def _nothing() -> Any:
    from contextlib import nullcontext

    return nullcontext()


def describe(exc: BaseException) -> str:
    """``Type: text`` of a handler's exception, whatever its __str__ does (raise, say)."""
    try:
        text = str(exc)
    except BaseException as failed:  # nothing a handler raised may escape
        text = f"<str() of the exception raised {type(failed).__name__}>"
    return f"{type(exc).__name__}: {text}"


def formatted_traceback() -> str:
    """The traceback of the exception being handled, whatever formatting it raises."""
    try:
        return traceback.format_exc()
    except BaseException:  # as describe()
        return "<the traceback could not be formatted>"
