"""A fixed pool of daemon threads that run handlers.

Not concurrent.futures: its threads are joined at interpreter exit, so one hung handler would
keep a process that was told to exit at once alive. Daemon threads die with the process.
"""

from __future__ import annotations

import queue
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
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
    lease_expires: float = 0.0


@dataclass
class Outcome:
    job: Job
    error: str | None = None
    traceback: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


class WorkerPool:
    def __init__(self, size: int, on_done: Callable[[], None]) -> None:
        self.size = size
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self.outcomes: queue.Queue[Outcome] = queue.Queue()
        self._on_done = on_done
        self._lock = threading.Lock()
        self.running: dict[int, Job] = {}
        self._threads = [
            threading.Thread(target=self._work, name=f"pubsub-worker-{n}", daemon=True)
            for n in range(size)
        ]
        for thread in self._threads:
            thread.start()

    @property
    def busy(self) -> int:
        """Jobs handed over and not yet reported back: started or about to start."""
        with self._lock:
            return len(self.running) + self._jobs.qsize()

    def submit(self, job: Job) -> None:
        self._jobs.put(job)

    def take_unstarted(self) -> list[Job]:
        """Remove and return the jobs no worker has picked up yet."""
        taken = []
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                taken.append(job)
        return taken

    def stop(self) -> None:
        for _ in self._threads:
            self._jobs.put(None)

    def _work(self) -> None:
        try:
            while True:
                job = self._jobs.get()
                if job is None:
                    return
                # A job is either taken here (and runs) or by take_unstarted (and is given
                # back), never both: queue.get() hands each item to one caller.
                with self._lock:
                    self.running[job.delivery_id] = job
                outcome = self._run(job)
                with self._lock:
                    self.running.pop(job.delivery_id, None)
                    self.outcomes.put(outcome)
                self._on_done()
        finally:
            connections.close_all()

    @staticmethod
    def _run(job: Job) -> Outcome:
        # Like a request: a handler gets usable connections and leaves none broken behind.
        close_old_connections()
        try:
            job.handler(job.message)
        except BaseException as exc:
            return Outcome(
                job, error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc()
            )
        finally:
            close_old_connections()
        return Outcome(job)
