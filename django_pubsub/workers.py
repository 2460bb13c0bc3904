"""A fixed pool of daemon threads that run handlers.

Not concurrent.futures: its threads are joined at interpreter exit, so one hung handler would
keep a process that was told to exit at once alive. Daemon threads die with the process.

A job is always in one place: queued, running, or finished (an outcome); a timed-out job is
both stuck and, as its timeout failure, finished. It moves between them under one lock, so the
dispatcher can count, give back and abandon work without a window where a job is in none of
them.

A job that outruns its timeout is *stuck*: Python cannot stop a thread, so the pool reports
the attempt as failed at once, starts a replacement thread so the other jobs keep their
workers, and lets the stuck thread end when its handler finally returns. Its late result is
then reported too (``late=True``); the dispatcher's lease fencing rejects it.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import Any

from django.db import close_old_connections, connections

from .message import Message

logger = logging.getLogger("django_pubsub.workers")


@dataclass
class Job:
    delivery_id: int
    token: str
    subscription_id: int
    message: Message
    handler: Callable[[Message], Any]
    # time.monotonic() by which the dispatcher extends the lease again.
    lease_expires: float = 0.0
    # Seconds the handler may run (None: no limit), and time.monotonic() when it started.
    timeout: float | None = None
    started: float | None = None


@dataclass
class Outcome:
    job: Job
    error: str | None = None
    traceback: str = ""
    # Whether the job's slot is free again: not for a timeout whose handler still runs.
    frees_slot: bool = True
    # The result of a handler that had already been reported as timed out.
    late: bool = False


class WorkerPool:
    def __init__(self, size: int, on_done: Callable[[], None]) -> None:
        self.size = size
        self._on_done = on_done
        self._lock = threading.Condition()
        self._queued: deque[Job] = deque()
        # Keyed by id(job): a retried delivery can be claimed again while its stuck run
        # still holds a thread.
        self._running: dict[int, tuple[Job, threading.Thread]] = {}
        self._stuck: dict[int, tuple[Job, threading.Thread]] = {}
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
    def busy(self) -> int:
        """Jobs handed over and not yet finished: running or about to run."""
        with self._lock:
            return len(self._running) + len(self._queued)

    def running(self) -> list[Job]:
        with self._lock:
            return [job for job, _ in self._running.values()]

    def stuck(self) -> list[tuple[Job, threading.Thread]]:
        with self._lock:
            return list(self._stuck.values())

    def held(self) -> list[int]:
        """Delivery ids this process still answers for: queued, running, or finished but
        not yet recorded. Their leases are ours even if the database says they expired."""
        with self._lock:
            running = (job for job, _ in self._running.values())
            finished = (o.job for o in self._outcomes if not o.late)
            return [job.delivery_id for job in (*self._queued, *running, *finished)]

    def time_out(self) -> list[Job]:
        """Fail the running jobs that outran their timeout; keep the pool at full strength.

        Each one's outcome is a failure carrying the hung thread's current stack, and its
        thread is replaced, so the pool still has ``size`` threads taking work.
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
                outcome = Outcome(job, error, frees_slot=False)
                self._outcomes.append(outcome)
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

    def submit(self, job: Job) -> None:
        with self._lock:
            self._queued.append(job)
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
        """Remove and return the jobs no worker has started."""
        with self._lock:
            taken = list(self._queued)
            self._queued.clear()
            return taken

    def close(self) -> tuple[list[Outcome], list[Job]]:
        """Stop the pool: return what finished and what is still running, at one instant.

        Outcomes of jobs that finish later are dropped: the dispatcher has already recorded
        those jobs as abandoned.
        """
        with self._lock:
            self._closed = self._stopping = True
            outcomes, self._outcomes = self._outcomes, []
            running = [job for job, _ in self._running.values()]
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
                    job = self._queued.popleft()
                    job.started = time.monotonic()
                    self._running[id(job)] = (job, threading.current_thread())
                outcome = self._run(job)
                with self._lock:
                    timed_out = self._stuck.pop(id(job), None) is not None
                    self._running.pop(id(job), None)
                    outcome.late = timed_out
                    if not self._closed:
                        self._outcomes.append(outcome)
                self._on_done()
                if timed_out:
                    return  # a replacement thread took this one's place
        finally:
            connections.close_all()

    @staticmethod
    def _run(job: Job) -> Outcome:
        # Like a request: a handler gets usable connections and leaves none broken behind.
        close_old_connections()
        try:
            job.handler(job.message)
        except BaseException as exc:  # a handler's failure is data here
            error = f"{type(exc).__name__}: {exc}"
            return Outcome(job, error=error, traceback=traceback.format_exc())
        finally:
            close_old_connections()
        return Outcome(job)
