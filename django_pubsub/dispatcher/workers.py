"""A fixed pool of daemon threads that run handlers, a chunk of deliveries at a time.

Not concurrent.futures: its threads are joined at interpreter exit, so one hung handler would
keep a process that was told to exit at once alive. Daemon threads die with the process.

The dispatcher hands over *chunks*: the deliveries of one claim, for one subscription, which
one thread runs one after the other. Handing over one delivery at a time would cost a thread
wake-up per message. A chunk of an ordered subscription stops at its first failure; the rest
of it comes back unstarted, so nothing behind a failed message runs first.

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
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING, Any, TypeVar

from django.db import close_old_connections, connections

from .. import signals
from ..message import Message

logger = logging.getLogger("django_pubsub.dispatcher.workers")

if TYPE_CHECKING:
    from ..models import Claimed, Subscription

T = TypeVar("T")


@dataclass(eq=False)
class Job:
    delivery_id: int
    token: str
    subscription_id: int
    message: Message
    handler: Callable[[Message], Any]
    # time.monotonic() when its lease runs out, as far as this process knows (the row's
    # lease_expires_at is the database's word): the lease keeper extends it before then.
    lease_deadline: float = 0.0
    # Seconds the handler may run (None: no limit), and time.monotonic() when it started.
    timeout: float | None = None
    started: float | None = None
    chunk: Chunk | None = None


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
    """Jobs of one claim that one thread runs in order: jobs[next:end] are still to start."""

    jobs: list[Job]
    # An ordered subscription's chunk: called after each successful handler, before the
    # next starts; True if it recorded the ack. The chunk stops at the first failure or
    # failed ack, and the rest of it comes back unstarted.
    ack: Callable[[Job], bool] | None = None
    next: int = 0
    end: int = 0

    def __post_init__(self) -> None:
        self.end = len(self.jobs)
        for job in self.jobs:
            job.chunk = self

    def take_rest(self) -> list[Job]:
        rest = self.jobs[self.next : self.end]
        self.end = self.next
        return rest


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


class WorkerPool:
    def __init__(self, size: int, on_done: Callable[[], None]) -> None:
        self._on_done = on_done
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
                if job.chunk is not None:
                    self._active.discard(job.chunk)
                    self._outcomes += (Outcome(j, unstarted=True) for j in job.chunk.take_rest())
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

    def _run_chunk(self, chunk: Chunk) -> bool:
        """Run the chunk's jobs in order; True if this thread is left stuck in one."""
        # Like a request: a handler gets usable connections and leaves none broken behind.
        close_old_connections()
        try:
            while True:
                with self._lock:
                    if chunk.next >= chunk.end:
                        self._active.discard(chunk)
                        return False
                    job = chunk.jobs[chunk.next]
                    chunk.next += 1
                    job.started = time.monotonic()
                    self._running[id(job)] = (job, threading.current_thread())
                outcome = self._run(job)
                if outcome.error is not None:
                    close_old_connections()  # the failure may have broken a connection
                elif chunk.ack is not None:
                    with self._lock:
                        # Not if it timed out meanwhile: that was reported as a failure.
                        acking = self._running.pop(id(job), None) is not None
                        if acking:
                            self._acking[id(job)] = job
                    if acking:
                        outcome.acked = self._ack(chunk.ack, job)
                with self._lock:
                    timed_out = self._stuck.pop(id(job), None) is not None
                    self._running.pop(id(job), None)
                    self._acking.pop(id(job), None)
                    outcome.late = timed_out
                    if self._closed:
                        return timed_out
                    self._outcomes.append(outcome)
                    if timed_out:
                        return True  # time_out() handed the rest of the chunk back
                    if chunk.ack is not None and not outcome.acked:
                        self._outcomes += (Outcome(j, unstarted=True) for j in chunk.take_rest())
        finally:
            close_old_connections()

    @staticmethod
    def _ack(ack: Callable[[Job], bool], job: Job) -> bool:
        try:
            return ack(job)
        except Exception:
            # The dispatcher records it instead (and retries while the database is away).
            logger.warning(
                "delivery id=%s: ack from the worker failed; the dispatcher records it",
                job.delivery_id,
                exc_info=logger.isEnabledFor(logging.DEBUG),
            )
            close_old_connections()
            return False

    @staticmethod
    def _run(job: Job) -> Outcome:
        from ..models import Subscription

        signals.send(signals.delivery_started, Subscription, message=job.message)
        started = time.monotonic()
        try:
            job.handler(job.message)
        except BaseException as exc:  # a handler's failure is data here
            outcome = Outcome(job, error=describe(exc), traceback=formatted_traceback())
        else:
            outcome = Outcome(job)
        outcome.duration = time.monotonic() - started
        return outcome


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
