"""django-pubsub's own figures, one per run, for bench/run.py.

    python bench/ours.py --db postgres|sqlite --figure FIGURE [--n N]

prints one JSON object on its last line of output. Every run starts from an empty database
(PostgreSQL ``bench_ours``, or a SQLite file in the temporary directory), migrated with the
benchmark project (bench/benchproject), whose handlers do nothing.

Figures:
- ``publish_single``: N ``publish()`` calls, each its own transaction (Django's autocommit),
  in blocks of 20 taken in turn with as many plain single-row inserts (bench/raw.py's
  ``insert_single``): ``paired_ratio`` is publish()'s rate over theirs.
- ``publish_many``: N messages through ``publish_many()`` in batches of 1,000.
- ``dispatch``, ``dispatch_fan``, ``dispatch_ordered``: N messages published first, then
  one real ``manage.py runpubsub --until-idle`` process handles them: one subscription,
  ten subscriptions of one topic (N x 10 deliveries), or one ordered subscription. The
  time is the process's wall time less that of the same command with nothing to do
  (start-up and the idle check), measured alongside.
- ``dispatch_history``: ``dispatch`` after 1,000,000 acked messages and deliveries were
  written to the same tables.
- ``latency``: a runpubsub process runs; 600 messages are published one per transaction
  at 20/s; the time from each commit to its handler's start, p50 and p99 in ms.
- ``idle_cpu``: a runpubsub process with nothing to do, after IDLE_WARMUP seconds: the CPU it
  uses over N seconds (default 30), in percent of one core (user and system time).
- ``prune``: 1,000,000 messages of bench.one, each with its acked delivery, all 30 days
  old, are written; then, in turn, ``latency`` (300 messages) and a dispatch of N messages
  of bench.two (no history) are measured alone, and again while ``manage.py pubsub_prune``
  removes those 2,000,000 rows. It reports both, and the prune's own time and rows.
- ``modes``: the delivery strategies against each other, in turn, ROUNDS rounds, each a
  ``dispatch`` of N messages to one no-op subscription: unordered (bench.one), ordered by
  key with 100 keys and with 1 key, ordered=True, a batch handler (100 a call),
  transactional, and async. Keyed messages are published with the keys taking turns. It
  reports each one's median rate and its ratio to unordered.
- ``memory``: runpubsub handles N (default 200,000) messages while its resident memory is
  sampled; growth is the largest sample after warm-up (the first fifth of the run) over
  the sample at the end of warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PG_URL = "postgres://postgres@127.0.0.1:5432/bench_ours"
SQLITE_PATH = Path(tempfile.gettempdir()) / "bench_ours.sqlite3"
HISTORY = 1_000_000
LATENCY_MESSAGES, LATENCY_RATE = 600, 20.0
# prune: the messages of each latency measurement (15 s at LATENCY_RATE).
PRUNE_LATENCY = 300
# publish_single: publishes, then as many plain inserts, in turn (see publish_single()).
PAIR_BLOCK = 20
DEFAULT_N = {
    "publish_single": 2_000,
    "publish_many": 50_000,
    "dispatch": 20_000,
    "dispatch_fan": 20_000,
    "dispatch_ordered": 20_000,
    "dispatch_history": 20_000,
    "latency": LATENCY_MESSAGES,
    "idle_cpu": 30,
    "memory": 200_000,
    "prune": 20_000,
    "modes": 20_000,
}
# The strategies of the modes figure: (subscription and topic, keys its messages take turns
# with; 0: none).
MODES = {
    "unordered": ("bench.one", 0),
    "keyed_100_keys": ("bench.keyed100", 100),
    "keyed_1_key": ("bench.keyed1", 1),
    "ordered": ("bench.ordered", 0),
    "batch_100": ("bench.batch", 0),
    "transactional": ("bench.tx", 0),
    "async": ("bench.async", 0),
}
MODE_ROUNDS = 3
SUBSCRIPTIONS = {
    "dispatch": ("bench.one", ["bench.one"]),
    "dispatch_history": ("bench.one", ["bench.one"]),
    "dispatch_fan": ("bench.fan", [f"bench.fan.{n}" for n in range(10)]),
    "dispatch_ordered": ("bench.ordered", ["bench.ordered"]),
    "memory": ("bench.one", ["bench.one"]),
    "prune": ("bench.two", ["bench.two"]),
}
IDLE_WARMUP = 5.0
# Deadline for any one runpubsub process.
RUN_TIMEOUT = 1800


def database_url(db: str) -> str:
    return PG_URL if db == "postgres" else f"sqlite:///{SQLITE_PATH}"


def environment(db: str, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DJANGO_SETTINGS_MODULE="bench.benchproject.settings",
        DATABASE_URL=database_url(db),
        PYTHONPATH=str(ROOT),
        **extra,
    )
    return env


def fresh_database(db: str) -> None:
    """Drop and recreate the benchmark database, then migrate it (before Django starts)."""
    if db == "postgres":
        import psycopg

        with psycopg.connect("host=127.0.0.1 user=postgres dbname=postgres") as conn:
            conn.autocommit = True
            conn.execute("DROP DATABASE IF EXISTS bench_ours WITH (FORCE)")
            conn.execute("CREATE DATABASE bench_ours")
    else:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{SQLITE_PATH}{suffix}").unlink(missing_ok=True)
    manage("migrate", "--verbosity", "0", db=db)


def manage(*args: str, db: str, timeout: float = RUN_TIMEOUT, **env: str) -> float:
    """Run a manage.py command to completion; return its wall time in seconds."""
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, str(ROOT / "manage.py"), *args],
        env=environment(db, **env),
        cwd=ROOT,
        capture_output=True,
        timeout=timeout,
    )
    seconds = time.perf_counter() - started
    if done.returncode:
        sys.stderr.buffer.write(done.stdout + done.stderr)
        raise SystemExit(f"manage.py {' '.join(args)} exited {done.returncode}")
    return seconds


def setup_django(db: str) -> None:
    os.environ.update(environment(db))
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()


def publish_batches(topic: str, n: int) -> None:
    from django_pubsub import publish_many

    for start in range(0, n, 1000):
        publish_many(topic, [{"n": i} for i in range(start, min(n, start + 1000))])


def runpubsub(subs: list[str], db: str) -> float:
    return manage(
        "runpubsub", "--until-idle", "--subscriptions", ",".join(subs), db=db, timeout=RUN_TIMEOUT
    )


# -- figures ---------------------------------------------------------------------------------


def publish_single(db: str, n: int) -> dict[str, Any]:
    """``publish()`` n times, in blocks of PAIR_BLOCK, each block followed by as many plain
    single-row inserts through bench/raw.py (its own connection, no Django). The disk's
    commit time drifts by a factor of two within a minute here, so a ratio of figures taken
    minutes apart says more about the drift than about publish(); the paired ratio does not.
    """
    setup_django(db)
    from bench import raw
    from django_pubsub import publish

    publish("bench.one", {"n": -1})  # connect, and the topic exists
    plain = raw.Postgres() if db == "postgres" else raw.Sqlite()
    ours = plain_seconds = 0.0
    try:
        plain.reset()
        for start in range(0, n, PAIR_BLOCK):
            block = range(start, min(n, start + PAIR_BLOCK))
            started = time.perf_counter()
            for i in block:
                publish("bench.one", {"n": i})  # autocommit, Django's default: its own transaction
            ours += time.perf_counter() - started
            plain_seconds += raw.insert_single(plain, len(block))[0]
    finally:
        plain.close()
    return {
        "value": n / ours,
        "unit": "messages/s",
        "seconds": ours,
        "raw_paired": n / plain_seconds,
        "paired_ratio": plain_seconds / ours,
        "pair_block": PAIR_BLOCK,
    }


def publish_many_figure(db: str, n: int) -> dict[str, Any]:
    setup_django(db)
    publish_batches("bench.one", 1)  # connect
    started = time.perf_counter()
    publish_batches("bench.one", n)
    seconds = time.perf_counter() - started
    return {"value": n / seconds, "unit": "messages/s", "seconds": seconds, "batch": 1000}


def dispatch(db: str, n: int, figure: str) -> dict[str, Any]:
    topic, subs = SUBSCRIPTIONS[figure]
    if figure == "dispatch_history":
        write_history(db)
    baseline = runpubsub(subs, db)  # nothing to do: start-up and the idle check
    setup_django(db)
    before = acked(subs)  # a history, or an earlier measurement's
    publish_batches(topic, n)
    wall = runpubsub(subs, db)
    if acked(subs) != before + n * len(subs):
        raise SystemExit(f"expected {before + n * len(subs)} acked deliveries")
    seconds = wall - baseline
    deliveries = n * len(subs)
    return {
        "value": deliveries / seconds,
        "unit": "deliveries/s",
        "seconds": seconds,
        "wall": wall,
        "startup": baseline,
        "deliveries": deliveries,
    }


def modes(db: str, n: int) -> dict[str, Any]:
    """Each strategy's dispatch rate, taken in turn, round after round."""
    from django.db import transaction

    baseline = runpubsub(["bench.one"], db)
    setup_django(db)
    from django_pubsub import publish

    rates: dict[str, list[float]] = {name: [] for name in MODES}
    for _ in range(MODE_ROUNDS):
        for name, (sub, keys) in MODES.items():
            before = acked([sub])
            if keys:
                for start in range(0, n, 1000):
                    with transaction.atomic():
                        for i in range(start, min(n, start + 1000)):
                            publish(sub, {"n": i}, key=f"k{i % keys}")
            else:
                publish_batches(sub, n)
            wall = runpubsub([sub], db)
            if acked([sub]) != before + n:
                raise SystemExit(f"{name}: expected {before + n} acked deliveries")
            rates[name].append(n / (wall - baseline))
    medians = {name: statistics.median(values) for name, values in rates.items()}
    plain = medians["unordered"]
    return {
        "value": medians.get("keyed_100_keys", plain) / plain,
        "unit": "keyed (100 keys) over unordered",
        "rates": {name: round(rate) for name, rate in medians.items()},
        "ratios": {name: round(rate / plain, 3) for name, rate in medians.items()},
        "rounds": {name: [round(v) for v in values] for name, values in rates.items()},
        "startup": baseline,
    }


def acked(subs: list[str]) -> int:
    from django_pubsub.models import Delivery

    return Delivery.objects.filter(subscription__name__in=subs, state="acked").count()


def write_history(db: str, days_old: float = 0.0) -> None:
    """1,000,000 messages of bench.one, each with its acked delivery, in plain SQL,
    published and acked ``days_old`` days ago."""
    manage("shell", "-c", HISTORY_SQL, db=db, BENCH_HISTORY=str(HISTORY), BENCH_AGE=str(days_old))


HISTORY_SQL = """
import os
from datetime import timedelta
from django.db import connection, transaction
from django.utils import timezone
from django_pubsub.models import Subscription, Topic
n = int(os.environ["BENCH_HISTORY"])
now = timezone.now() - timedelta(days=float(os.environ["BENCH_AGE"]))
at = connection.ops.adapt_datetimefield_value(now)
topic = Topic.objects.get(name="bench.one")
sub = Subscription.objects.get(name="bench.one")
if connection.vendor == "postgresql":
    series = "SELECT g - 1 AS i FROM generate_series(1, %s) AS g"
else:
    series = (
        "WITH RECURSIVE s(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM s WHERE i + 1 < %s) "
        "SELECT i FROM s"
    )
with transaction.atomic(), connection.cursor() as cursor:
    cursor.execute(
        "INSERT INTO django_pubsub_message (topic_id, \\"offset\\", payload, headers, "
        f"published_at) SELECT %s, i, '{{}}', '{{}}', %s FROM ({series}) AS s",
        [topic.pk, at, n],
    )
    cursor.execute(
        "INSERT INTO django_pubsub_delivery (subscription_id, message_id, \\"offset\\", state, "
        "attempts, available_at, errors, last_error, created_at, updated_at, finished_at) "
        "SELECT %s, id, \\"offset\\", 'acked', 1, %s, '[]', '', %s, %s, %s "
        "FROM django_pubsub_message WHERE topic_id = %s",
        [sub.pk, at, at, at, at, topic.pk],
    )
    Topic.objects.filter(pk=topic.pk).update(next_offset=n)
    Subscription.objects.filter(pk=sub.pk).update(position=n)
if connection.vendor == "postgresql":
    with connection.cursor() as cursor:
        cursor.execute("VACUUM ANALYZE django_pubsub_message")
        cursor.execute("VACUUM ANALYZE django_pubsub_delivery")
"""


def start_runpubsub(subs: list[str], db: str, log: Path, **env: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "manage.py"), "runpubsub", "--subscriptions", ",".join(subs)],
        env=environment(db, **env),
        cwd=ROOT,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def latency(db: str, n: int) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="bench-latency-"))
    starts = work / "starts.log"
    starts.touch()
    proc = start_runpubsub(
        ["bench.latency"], db, work / "runpubsub.log", BENCH_LATENCY_LOG=str(starts)
    )
    try:
        setup_django(db)
        from django.db import transaction

        from django_pubsub import publish
        from django_pubsub.models import Dispatcher

        wait_until(lambda: Dispatcher.objects.filter(stopped_at__isnull=True).exists(), 60)
        time.sleep(1.0)  # its first passes are done
        committed: dict[int, float] = {}
        interval = 1.0 / LATENCY_RATE
        next_at = time.perf_counter()
        for i in range(n):
            next_at += interval
            with transaction.atomic():
                message_id = publish("bench.latency", {"n": i})
            committed[message_id] = time.time()
            time.sleep(max(0.0, next_at - time.perf_counter()))
        wait_until(lambda: len(starts.read_text().splitlines()) >= n, 60)
    finally:
        stop(proc)
    delays = []
    for line in starts.read_text().splitlines():
        message_id, started = line.split()
        delays.append((float(started) - committed[int(message_id)]) * 1000)
    shutil.rmtree(work, ignore_errors=True)
    cuts = statistics.quantiles(delays, n=100, method="inclusive")
    return {"value": cuts[49], "unit": "ms", "p50": cuts[49], "p99": cuts[98], "max": max(delays)}


def prune(db: str, n: int) -> dict[str, Any]:
    """Latency and dispatch throughput alone, then while a prune of 2,000,000 rows runs."""
    write_history(db, days_old=30)
    alone = {"latency": latency(db, PRUNE_LATENCY), "dispatch": dispatch(db, n, "prune")}
    work = Path(tempfile.mkdtemp(prefix="bench-prune-"))
    started = time.perf_counter()
    pruner = subprocess.Popen(
        [sys.executable, str(ROOT / "manage.py"), "pubsub_prune"],
        env=environment(db),
        cwd=ROOT,
        stdout=(work / "prune.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    time.sleep(1.0)  # under way
    during = {"latency": latency(db, PRUNE_LATENCY), "dispatch": dispatch(db, n, "prune")}
    throughout = pruner.poll() is None
    if pruner.wait(timeout=RUN_TIMEOUT):
        raise SystemExit(f"pubsub_prune exited {pruner.returncode}")
    prune_seconds = time.perf_counter() - started
    report = (work / "prune.log").read_text().strip().splitlines()[-1]
    shutil.rmtree(work, ignore_errors=True)

    def figures(side: dict[str, Any]) -> dict[str, float]:
        return {
            "p50_ms": side["latency"]["p50"],
            "p99_ms": side["latency"]["p99"],
            "dispatch_per_s": side["dispatch"]["value"],
        }

    a, b = figures(alone), figures(during)
    return {
        "value": b["dispatch_per_s"] / a["dispatch_per_s"],
        "unit": "dispatch throughput while pruning / alone",
        "alone": a,
        "while_pruning": b,
        "prune_seconds": prune_seconds,
        "prune_ran_throughout": throughout,
        "prune_report": report,
    }


def idle_cpu(db: str, n: int) -> dict[str, Any]:
    """The CPU an idle dispatcher uses: polls, heartbeats, wake-up watching."""
    work = Path(tempfile.mkdtemp(prefix="bench-idle-"))
    proc = start_runpubsub(["bench.latency"], db, work / "runpubsub.log")
    try:
        time.sleep(IDLE_WARMUP)
        before, started = cpu_seconds(proc.pid), time.monotonic()
        time.sleep(n)
        used, elapsed = cpu_seconds(proc.pid) - before, time.monotonic() - started
    finally:
        stop(proc)
    shutil.rmtree(work, ignore_errors=True)
    return {"value": used / elapsed * 100, "unit": "% of one core", "seconds": elapsed}


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process so far (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_until(condition: Any, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit("timed out waiting")
        time.sleep(0.05)


def memory(db: str, n: int) -> dict[str, Any]:
    setup_django(db)
    publish_batches("bench.one", n)
    work = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "manage.py"),
            "runpubsub",
            "--until-idle",
            "--subscriptions",
            "bench.one",
        ],
        env=environment(db),
        cwd=ROOT,
        stdout=(work / "runpubsub.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    samples: list[tuple[float, int]] = []
    started = time.monotonic()
    try:
        while proc.poll() is None and time.monotonic() - started < RUN_TIMEOUT:
            rss = resident_kib(proc.pid)
            if rss:
                samples.append((time.monotonic() - started, rss))
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            stop(proc)
    shutil.rmtree(work, ignore_errors=True)
    total = samples[-1][0]
    warm = [rss for at, rss in samples if at <= total / 5]
    after = [rss for at, rss in samples if at > total / 5]
    growth = (max(after) - warm[-1]) / warm[-1] * 100
    return {
        "value": growth,
        "unit": "% growth after warm-up",
        "rss_warm_kib": warm[-1],
        "rss_max_kib": max(rss for _, rss in samples),
        "seconds": total,
        "samples": len(samples),
    }


def resident_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", choices=["postgres", "sqlite"], required=True)
    parser.add_argument("--figure", choices=sorted(DEFAULT_N), required=True)
    parser.add_argument("--n", type=int)
    args = parser.parse_args()
    n = args.n or DEFAULT_N[args.figure]
    fresh_database(args.db)
    if args.figure == "publish_single":
        result = publish_single(args.db, n)
    elif args.figure == "publish_many":
        result = publish_many_figure(args.db, n)
    elif args.figure == "latency":
        result = latency(args.db, n)
    elif args.figure == "memory":
        result = memory(args.db, n)
    elif args.figure == "idle_cpu":
        result = idle_cpu(args.db, n)
    elif args.figure == "modes":
        result = modes(args.db, n)
    elif args.figure == "prune":
        result = prune(args.db, n)
    else:
        result = dispatch(args.db, n, args.figure)
    print(json.dumps({"figure": args.figure, "db": args.db, "n": n, **result}))


if __name__ == "__main__":
    main()
