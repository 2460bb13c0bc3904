#!/usr/bin/env python
"""Run the test suite on SQLite, then on PostgreSQL when one is reachable.

PostgreSQL is used when DATABASE_URL points at one, or when a server answers on
127.0.0.1:5432 (then as postgres://postgres@127.0.0.1:5432/postgres). Extra arguments go to
pytest. --require-postgres, or CI=true in the environment, fails the run when no PostgreSQL
answers, so CI cannot pass on SQLite alone.
Each run writes a JUnit report to .test-results/<database>.xml.

--soak runs the long fault soaks instead of the suite (docs/reliability.md): 1,000 SIGKILLs,
4 dispatchers x 10,000 messages x 5 subscriptions, and 10 minutes of publishing while
runpubsub prunes, on each database; PUBSUB_SOAK_KILLS, PUBSUB_SCALE_MESSAGES and
PUBSUB_SOAK_RETENTION_SECONDS change the sizes. Figures go to .test-results/*.json.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
LOCAL_POSTGRES = "postgres://postgres@127.0.0.1:5432/postgres"
SOAK_TESTS = [
    "tests/test_processes.py::test_sigkill_mid_run_loses_nothing_and_keeps_order",
    "tests/test_scale_out.py::test_dispatchers_share_the_work_exactly_once",
    "tests/test_retention.py::test_tables_stay_flat_while_publishing_and_pruning",
]


def postgres_url() -> str | None:
    url = os.environ.get("DATABASE_URL", "")
    if url.startswith(("postgres://", "postgresql://", "pgsql://")):
        return url
    try:
        with socket.create_connection(("127.0.0.1", 5432), timeout=2):
            return LOCAL_POSTGRES
    except OSError:
        return None


def run(name: str, database_url: str | None, args: list[str], soak: bool = False) -> int:
    env = dict(os.environ)
    if soak:
        env.setdefault("PUBSUB_SOAK_KILLS", "1000")
        env.setdefault("PUBSUB_SCALE_MESSAGES", "10000")
        env.setdefault("PUBSUB_SOAK_RETENTION_SECONDS", "600")
        args = [*SOAK_TESTS, "-s", "--timeout=0", *args]
        name = f"soak-{name}"
    env.pop("DATABASE_URL", None)
    # A test database of this run's own: two runs at once (a soak beside the suite, two
    # checkouts) must not drop or share each other's.
    env.setdefault(
        "PUBSUB_TEST_SQLITE", str(ROOT / ".test-results" / f"test_pubsub_{os.getpid()}.sqlite3")
    )
    if database_url:
        env["DATABASE_URL"] = database_url
        env.setdefault("PUBSUB_TEST_PG_NAME", f"test_django_pubsub_{os.getpid()}")
    report = ROOT / ".test-results" / f"{name}.xml"
    report.parent.mkdir(exist_ok=True)
    report.unlink(missing_ok=True)
    print(f"\n=== django-pubsub {name} ===", flush=True)
    command = [sys.executable, "-m", "pytest", f"--junitxml={report}", *args]
    try:
        return subprocess.call(command, cwd=ROOT, env=env)
    finally:
        # What SQLite leaves beside a test database that was dropped (-wal, -shm).
        for leftover in ROOT.glob(".test-results/test_pubsub_*.sqlite3*"):
            if leftover.name.startswith(f"test_pubsub_{os.getpid()}."):
                leftover.unlink(missing_ok=True)


def main(argv: list[str]) -> int:
    require_postgres = "--require-postgres" in argv or os.environ.get("CI") == "true"
    soak = "--soak" in argv
    args = [arg for arg in argv if arg not in ("--require-postgres", "--soak")]
    results = {"sqlite": run("sqlite", None, args, soak)}
    url = postgres_url()
    if url:
        results["postgresql"] = run("postgresql", url, args, soak)
    elif require_postgres:
        print("PostgreSQL is required (--require-postgres) but none answered.", file=sys.stderr)
        results["postgresql"] = 1
    else:
        print("\nNo PostgreSQL answered on 127.0.0.1:5432 and DATABASE_URL names none: skipped.")
    print("\n" + ", ".join(f"{name}: exit {code}" for name, code in results.items()))
    # pytest exits 5 when no test ran: that is a failure here too.
    return 0 if all(code == 0 for code in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
