"""A fixed pool of daemon threads that run handlers.

Not concurrent.futures: its threads are joined at interpreter exit, so one hung handler would
keep a process that was told to exit at once alive. Daemon threads die with the process.

A job is always in exactly one place: queued, running, or finished (an outcome). It moves
between them under one lock, so the dispatcher can count, give back and abandon work
without a window where a job is in none of them.
"""

from __future__ import annotations

import threading
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django.db import close_old_connections, connections

from .message import Message


@dataclass
class Job:
    delivery_id: int
    token: str
    subscription_id: int
    message: Message
    handler: Callable[[Message], Any]
    # time.monotonic() by which the dispatcher extends the lease again.
    lease_expires: float = 0.0


@dataclass
class Outcome:
    job: Job
    error: str | None = None
    traceback: str = ""


class WorkerPool:
    def __init__(self, size: int, on_done: Callable[[], None]) -> None:
        self.size = size
        self._on_done = on_done
        self._lock = threading.Condition()
        self._queued: deque[Job] = deque()
        self._running: dict[int, Job] = {}
        self._outcomes: list[Outcome] = []
        self._stopping = False
        self._closed = False
        self._threads = [
            threading.Thread(target=self._work, name=f"pubsub-worker-{n}", daemon=True)
            for n in range(size)
        ]
        for thread in self._threads:
            thread.start()

    @property
    def busy(self) -> int:
        """Jobs handed over and not yet finished: running or about to run."""
        with self._lock:
            return len(self._running) + len(self._queued)

    def running(self) -> list[Job]:
        with self._lock:
            return list(self._running.values())

    def held(self) -> list[int]:
        """Delivery ids this process still answers for: queued, running, or finished but
        not yet recorded. Their leases are ours even if the database says they expired."""
        with self._lock:
            jobs = [*self._queued, *self._running.values(), *(o.job for o in self._outcomes)]
            return [job.delivery_id for job in jobs]

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
            running = list(self._running.values())
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
                    self._running[job.delivery_id] = job
                outcome = self._run(job)
                with self._lock:
                    self._running.pop(job.delivery_id, None)
                    if not self._closed:
                        self._outcomes.append(outcome)
                self._on_done()
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
