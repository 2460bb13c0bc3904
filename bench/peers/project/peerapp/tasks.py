"""The no-op tasks of django-tasks and django-q2 (procrastinate's is in procrastinate_tasks).

Without a mark a task does nothing. With one (the latency figure), it appends
"mark start_time" to the file named by BENCH_LATENCY_LOG, start_time being time.time() taken
first thing in the handler. Lines are short and appended, so processes do not interleave them.
"""

from __future__ import annotations

import os
import time

from django_tasks import task


def record(mark: str | None) -> None:
    if mark is None:
        return
    started = time.time()
    with open(os.environ["BENCH_LATENCY_LOG"], "a") as log:
        log.write(f"{mark} {started:.6f}\n")


@task()
def django_tasks_noop(mark: str | None = None) -> None:
    record(mark)


def django_q2_noop(mark: str | None = None) -> None:
    record(mark)
