"""The peers' figures: procrastinate, django-tasks (django-tasks-db) and django-q2.

    bench/.peers/venv/bin/python bench/peers/measure.py --peer procrastinate|django_tasks|django_q2
        --db postgres|sqlite --figure dispatch|latency [--n N] [--concurrency C] [--timeout S]

Every run starts from a fresh database (PostgreSQL: bench_peers dropped and recreated;
SQLite: the file removed), migrated, so runs are independent.

- dispatch: enqueue N no-op jobs one at a time (timed: enqueue_seconds), then start the peer's
  own worker command as subprocesses and time from their start until no job is left, polling
  the peer's tables every 50 ms. value = N / seconds (jobs/s). first_done_seconds is when the
  first completion was seen: the worker's start-up time, roughly.
- latency: start the worker, wait until a probe job has run, then enqueue 600 jobs at 20/s.
  Each handler writes time.time() as it starts; the producer takes time.time() right after the
  enqueue call returned (the job committed). value = p50 of start - commit in ms; also p99.

Workers: procrastinate `manage.py procrastinate worker --concurrency C` (one process);
django-tasks C processes of `manage.py db_worker`; django-q2 `manage.py qcluster` with C
workers. They are killed (their process groups) at the end, on error too.
The last line of stdout is one JSON object; on failure it has an "error" key (exit status 1).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import traceback
from importlib.metadata import version
from pathlib import Path
from typing import IO, Any

PROJECT = Path(__file__).resolve().parent / "project"
POLL = 0.05  # seconds between two looks at the peer's tables
LATENCY_JOBS = 600
LATENCY_RATE = 20.0  # jobs/s
SETTLE = 2.0  # seconds after the probe, for the other worker processes to start too
DEFAULT_N = {"postgres": 20000, "sqlite": 5000}


class Peer:
    """How to enqueue, run and observe one peer."""

    name = ""
    package = ""
    postgres_only = False

    def enqueue(self, mark: str | None) -> None:
        raise NotImplementedError

    def workers(self, concurrency: int) -> list[list[str]]:
        raise NotImplementedError

    def remaining(self) -> int:
        """Jobs not finished yet."""
        raise NotImplementedError

    def failed(self) -> int:
        raise NotImplementedError

    def settings(self) -> dict[str, Any]:
        return {}


def manage(*args: str) -> list[str]:
    return [sys.executable, str(PROJECT / "manage.py"), *args]


class Procrastinate(Peer):
    name, package, postgres_only = "procrastinate", "procrastinate", True

    def enqueue(self, mark: str | None) -> None:
        from peerapp.procrastinate_tasks import procrastinate_noop

        if mark is None:
            procrastinate_noop.defer()
        else:
            procrastinate_noop.defer(mark=mark)

    def workers(self, concurrency: int) -> list[list[str]]:
        return [manage("procrastinate", "worker", "--concurrency", str(concurrency))]

    def remaining(self) -> int:
        from procrastinate.contrib.django.models import ProcrastinateJob

        return ProcrastinateJob.objects.filter(status__in=("todo", "doing")).count()

    def failed(self) -> int:
        from procrastinate.contrib.django.models import ProcrastinateJob

        return ProcrastinateJob.objects.filter(status="failed").count()

    def settings(self) -> dict[str, Any]:
        return {
            "worker": "one process, sync task run in a thread per job slot",
            "defaults_kept": "listen_notify on, fetch_job_polling_interval 5 s, delete_jobs never",
            "enqueue": "task.defer() through Django's connection, autocommit",
            "done_when": "no procrastinate_jobs row in todo/doing",
        }


class DjangoTasks(Peer):
    name, package = "django_tasks", "django-tasks-db"

    def enqueue(self, mark: str | None) -> None:
        from peerapp.tasks import django_tasks_noop

        if mark is None:
            django_tasks_noop.enqueue()
        else:
            django_tasks_noop.enqueue(mark=mark)

    def workers(self, concurrency: int) -> list[list[str]]:
        return [manage("db_worker", "--verbosity", "0") for _ in range(concurrency)]

    def remaining(self) -> int:
        from django_tasks_db.models import DBTaskResult

        return DBTaskResult.objects.filter(status__in=("READY", "RUNNING")).count()

    def failed(self) -> int:
        from django_tasks_db.models import DBTaskResult

        return DBTaskResult.objects.filter(status="FAILED").count()

    def settings(self) -> dict[str, Any]:
        from django.conf import settings

        return {
            "TASKS": settings.TASKS,
            "django_tasks": version("django-tasks"),
            "worker": "C processes of db_worker (it runs one task at a time)",
            "defaults_kept": "--interval 1 s when idle, random start-up delay up to 1 s",
            "verbosity": "0 (no per-task log lines)",
            "enqueue": "task.enqueue(), autocommit",
            "done_when": "no DBTaskResult in READY/RUNNING",
        }


class DjangoQ2(Peer):
    name, package = "django_q2", "django-q2"

    def enqueue(self, mark: str | None) -> None:
        from django_q.tasks import async_task

        if mark is None:
            async_task("peerapp.tasks.django_q2_noop")
        else:
            async_task("peerapp.tasks.django_q2_noop", mark=mark)

    def workers(self, concurrency: int) -> list[list[str]]:
        return [manage("qcluster")]

    def remaining(self) -> int:
        from django_q.models import OrmQ

        return OrmQ.objects.count()

    def failed(self) -> int:
        from django_q.models import Failure

        return Failure.objects.count()

    def settings(self) -> dict[str, Any]:
        from django.conf import settings

        return {
            "Q_CLUSTER": settings.Q_CLUSTER,
            "worker": "one qcluster: sentinel, pusher, monitor and C worker processes",
            "enqueue": "async_task(), ORM broker, autocommit",
            "done_when": "django_q_ormq empty (a row is deleted once its result is saved)",
        }


PEERS: dict[str, type[Peer]] = {p.name: p for p in (Procrastinate, DjangoTasks, DjangoQ2)}


def fresh_database(db: str) -> None:
    """Drop and recreate the database, then migrate it: nothing left from an earlier run."""
    if db == "postgres":
        import psycopg

        with psycopg.connect("host=127.0.0.1 user=postgres dbname=postgres", autocommit=True) as c:
            c.execute("DROP DATABASE IF EXISTS bench_peers WITH (FORCE)")
            c.execute("CREATE DATABASE bench_peers")
    else:
        from peersite.settings import SQLITE_PATH

        for suffix in ("", "-wal", "-shm"):
            Path(SQLITE_PATH + suffix).unlink(missing_ok=True)
    import django
    from django.core.management import call_command

    django.setup()
    call_command("migrate", verbosity=0)


class Workers:
    """The peer's worker subprocesses, each in its own process group, and their log files."""

    def __init__(self, commands: list[list[str]], env: dict[str, str]) -> None:
        self.logs: list[IO[bytes]] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        for i, command in enumerate(commands):
            log = open(f"/tmp/django_pubsub_bench_peer_worker_{i}.log", "wb")
            self.logs.append(log)
            self.procs.append(
                subprocess.Popen(
                    command,
                    cwd=PROJECT,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )

    def check(self) -> None:
        for proc, log in zip(self.procs, self.logs, strict=True):
            if proc.poll() is not None:
                tail = Path(log.name).read_text(errors="replace")[-2000:]
                raise RuntimeError(f"worker exited with {proc.returncode}:\n{tail}")

    def stop(self) -> None:
        for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            for proc in self.procs:
                if proc.poll() is None:
                    try:
                        os.killpg(proc.pid, sig)
                    except ProcessLookupError:
                        pass
            deadline = time.monotonic() + grace
            for proc in self.procs:
                try:
                    proc.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
        for log in self.logs:
            log.close()


def dispatch(
    peer: Peer, n: int, env: dict[str, str], concurrency: int, timeout: float
) -> dict[str, Any]:
    started = time.perf_counter()
    for _ in range(n):
        peer.enqueue(None)
    enqueue_seconds = time.perf_counter() - started
    if peer.remaining() != n:
        raise RuntimeError(f"expected {n} jobs enqueued, found {peer.remaining()}")
    first_done: float | None = None
    left_then = n
    workers = Workers(peer.workers(concurrency), env)
    try:
        started = time.perf_counter()
        while True:
            left = peer.remaining()
            now = time.perf_counter() - started
            if first_done is None and left < n:
                first_done, left_then = now, left
            if left == 0:
                break
            if now > timeout:
                raise RuntimeError(f"timed out after {timeout:.0f} s with {left} jobs left")
            if peer.failed():
                raise RuntimeError(f"{peer.failed()} jobs failed")
            workers.check()
            time.sleep(POLL)
        seconds = now
    finally:
        workers.stop()
    assert first_done is not None
    steady = seconds - first_done
    return {
        "value": round(n / seconds, 1),
        "unit": "jobs/s",
        "seconds": round(seconds, 3),
        "enqueue_seconds": round(enqueue_seconds, 3),
        "enqueue_per_s": round(n / enqueue_seconds, 1),
        "first_done_seconds": round(first_done, 3),
        "steady_jobs_per_s": round((left_then / steady) if steady > 0 else 0.0, 1),
        "failed": peer.failed(),
    }


def read_marks(path: Path) -> dict[str, float]:
    if not path.exists():
        return {}
    marks = {}
    for line in path.read_text().splitlines():
        mark, _, started = line.partition(" ")
        if started:
            marks[mark] = float(started)
    return marks


def wait_for(path: Path, marks: set[str], timeout: float, workers: Workers) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        seen = read_marks(path)
        if marks <= seen.keys():
            return seen
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out: {len(marks - seen.keys())} jobs did not start")
        workers.check()
        time.sleep(POLL)


def latency(peer: Peer, env: dict[str, str], concurrency: int, timeout: float) -> dict[str, Any]:
    log = Path(env["BENCH_LATENCY_LOG"])
    log.unlink(missing_ok=True)
    workers = Workers(peer.workers(concurrency), env)
    try:
        started = time.perf_counter()
        peer.enqueue("probe")
        wait_for(log, {"probe"}, timeout, workers)
        ready = time.perf_counter() - started
        time.sleep(SETTLE)
        committed: dict[str, float] = {}
        begin = time.perf_counter()
        for i in range(LATENCY_JOBS):
            pause = begin + i / LATENCY_RATE - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
            peer.enqueue(f"j{i}")
            committed[f"j{i}"] = time.time()
        seen = wait_for(log, set(committed), timeout, workers)
    finally:
        workers.stop()
    ms = sorted((seen[mark] - at) * 1000 for mark, at in committed.items())
    cuts = statistics.quantiles(ms, n=100, method="inclusive")
    return {
        "value": round(statistics.median(ms), 2),
        "unit": "ms",
        "p99": round(cuts[98], 2),
        "mean": round(statistics.fmean(ms), 2),
        "min": round(ms[0], 2),
        "max": round(ms[-1], 2),
        "ready_seconds": round(ready, 3),
        "rate_per_s": LATENCY_RATE,
        "failed": peer.failed(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A peer's dispatch or latency figure.")
    parser.add_argument("--peer", choices=tuple(PEERS), required=True)
    parser.add_argument("--db", choices=("postgres", "sqlite"), required=True)
    parser.add_argument("--figure", choices=("dispatch", "latency"), required=True)
    parser.add_argument("--n", type=int, help="dispatch jobs (default 20000, SQLite 5000)")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds, per wait")
    args = parser.parse_args(argv)
    peer = PEERS[args.peer]()
    head = {"figure": args.figure, "peer": peer.name, "db": args.db}
    if peer.postgres_only and args.db != "postgres":
        print(json.dumps({**head, "skipped": f"{peer.name} supports PostgreSQL only"}))
        return
    n = LATENCY_JOBS if args.figure == "latency" else args.n or DEFAULT_N[args.db]
    if n <= 0 or args.concurrency <= 0:
        parser.error("--n and --concurrency must be positive")

    # A SIGTERM from the harness unwinds through the finally blocks that stop the workers.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    env = {
        **os.environ,
        "BENCH_DB": args.db,
        "BENCH_CONCURRENCY": str(args.concurrency),
        "BENCH_LATENCY_LOG": "/tmp/django_pubsub_bench_peer_latency.log",
        "DJANGO_SETTINGS_MODULE": "peersite.settings",
        "PYTHONUNBUFFERED": "1",
    }
    os.environ.update(env)
    sys.path.insert(0, str(PROJECT))
    load_before = os.getloadavg()
    try:
        fresh_database(args.db)
        if args.figure == "dispatch":
            figures = dispatch(peer, n, env, args.concurrency, args.timeout)
        else:
            figures = latency(peer, env, args.concurrency, args.timeout)
    except Exception as exc:
        # The traceback goes to stderr; the harness still gets one JSON line, and exit 1.
        traceback.print_exc()
        print(json.dumps({**head, "error": f"{type(exc).__name__}: {exc}"[:500]}))
        sys.exit(1)

    from django import get_version
    from django.db import connection

    commands = [" ".join(["manage.py", *c[2:]]) for c in peer.workers(args.concurrency)]
    settings = {
        "concurrency": args.concurrency,
        "worker_commands": commands,
        "database": {
            key: value
            for key, value in connection.settings_dict.items()
            if key in ("ENGINE", "NAME", "CONN_MAX_AGE", "CONN_HEALTH_CHECKS", "OPTIONS")
        },
        "poll_seconds": POLL,
        "django": get_version(),
        "python": platform.python_version(),
        "loadavg_before_after": [load_before[0], os.getloadavg()[0]],
        **peer.settings(),
    }
    result = {**head, **figures, "n": n, "settings": settings, "version": version(peer.package)}
    print(json.dumps(result, default=str))


if __name__ == "__main__":
    main()
