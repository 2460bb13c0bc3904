"""The physical limit on this machine: the same rows django-pubsub writes, without Django.

    python bench/raw.py --db postgres|sqlite --figure FIGURE [--n N] [--commits 1|2]

Figures (value in rows/s):

- insert_single: N one-row INSERTs into a message-log table, each its own transaction. The
  connection is in autocommit mode, so each INSERT is one round trip and one durable commit.
- insert_batch: N rows, 500 per multi-row INSERT statement, one transaction per statement.
- claim_batch: N 'pending' rows are preloaded (untimed, with a partial index on id WHERE
  state = 'pending'); the timed loop claims 100 rows with one UPDATE ... WHERE id IN (SELECT
  ... ORDER BY id LIMIT 100 [FOR UPDATE SKIP LOCKED]) RETURNING, then marks them done with one
  UPDATE. By default the claim and the mark commit separately (--commits 2), as a dispatcher
  that runs handlers between them must; --commits 1 does both in one transaction.

PostgreSQL: psycopg 3, database bench_raw on 127.0.0.1:5432 as postgres (created if missing).
SQLite: a file in /tmp, journal_mode=WAL, synchronous left at its default FULL, write
transactions opened with BEGIN IMMEDIATE. Tables are dropped and recreated on every run.

The last line of stdout is one JSON object: figure, db, value, unit, n, seconds, settings; on
failure it has an "error" key instead (exit status 1).
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

PG_DSN = "host=127.0.0.1 port=5432 user=postgres"
PG_DATABASE = "bench_raw"
SQLITE_PATH = "/tmp/django_pubsub_bench_raw.sqlite3"
INSERT_BATCH = 500
CLAIM_BATCH = 100
PRELOAD_BATCH = 5000
DEFAULT_N = {"insert_single": 5000, "insert_batch": 100_000, "claim_batch": 100_000}
TIME_LIMIT = 1200.0  # seconds; every timed loop stops here at the latest

Row = tuple[int, str, str]


class Cursor(Protocol):
    def execute(self, query: Any, params: Any = ..., /) -> Any: ...
    def fetchall(self) -> list[Any]: ...


def rows(n: int) -> Iterator[Row]:
    """Message-log rows: a topic id, a small JSON payload and a timestamp, made by the caller."""
    for i in range(n):
        payload = json.dumps({"i": i, "text": "x" * 64})
        yield (i % 10 + 1, payload, datetime.now(UTC).isoformat())


def chunks(items: Iterator[Row], size: int) -> Iterator[list[Row]]:
    chunk: list[Row] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def check_time(started: float) -> None:
    if time.perf_counter() - started > TIME_LIMIT:
        raise RuntimeError(f"gave up after {TIME_LIMIT:.0f} s")


class Backend:
    """What differs between the databases: SQL text, connections, transactions."""

    name: str
    placeholder: str

    def settings(self) -> dict[str, Any]:
        raise NotImplementedError

    def cursor(self) -> Cursor:
        raise NotImplementedError

    def begin(self) -> None:
        raise NotImplementedError

    def commit(self) -> None:
        raise NotImplementedError

    def reset(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def values(self, count: int, extra: str = "") -> str:
        """VALUES tuples for (topic_id, payload, created_at), plus an SQL literal if given."""
        p = self.placeholder
        return ", ".join([f"({p}, {self.json_cast}, {p}{extra})"] * count)

    json_cast = "?"
    skip_locked = ""

    def id_list(self, ids: Sequence[int]) -> tuple[str, Sequence[Any]]:
        return ", ".join([self.placeholder] * len(ids)), ids


class Postgres(Backend):
    name = "postgres"
    placeholder = "%s"
    json_cast = "%s::jsonb"
    skip_locked = " FOR UPDATE SKIP LOCKED"

    def __init__(self) -> None:
        import psycopg

        with psycopg.connect(f"{PG_DSN} dbname=postgres", autocommit=True) as admin:
            found = admin.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (PG_DATABASE,)
            ).fetchone()
            if not found:
                admin.execute(f"CREATE DATABASE {PG_DATABASE}")
        self.conn = psycopg.connect(f"{PG_DSN} dbname={PG_DATABASE}", autocommit=True)
        self.version = psycopg.__version__

    def settings(self) -> dict[str, Any]:
        show = {
            name: self.conn.execute(f"SHOW {name}").fetchone()[0]  # type: ignore[index]
            for name in ("server_version", "fsync", "synchronous_commit", "wal_sync_method")
        }
        return {**show, "driver": f"psycopg {self.version}", "isolation": "read committed"}

    def cursor(self) -> Cursor:
        return self.conn.cursor()

    def begin(self) -> None:
        self.conn.execute("BEGIN")

    def commit(self) -> None:
        self.conn.execute("COMMIT")

    def reset(self) -> None:
        self.conn.execute("DROP TABLE IF EXISTS raw_message, raw_queue")
        for table, extra in (("raw_message", ""), ("raw_queue", ", state text NOT NULL")):
            self.conn.execute(
                f"CREATE TABLE {table} (id bigserial PRIMARY KEY, topic_id integer NOT NULL, "
                f"payload jsonb NOT NULL, created_at timestamptz NOT NULL{extra})"
            )

    def id_list(self, ids: Sequence[int]) -> tuple[str, Sequence[Any]]:
        return "SELECT unnest(%s::bigint[])", [list(ids)]

    def close(self) -> None:
        self.conn.close()


class Sqlite(Backend):
    name = "sqlite"
    placeholder = "?"

    def __init__(self) -> None:
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(SQLITE_PATH + suffix):
                os.remove(SQLITE_PATH + suffix)
        # isolation_level=None: the module opens no transaction itself; we say BEGIN IMMEDIATE.
        self.conn = sqlite3.connect(SQLITE_PATH, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode=WAL")

    def settings(self) -> dict[str, Any]:
        pragma = {
            name: self.conn.execute(f"PRAGMA {name}").fetchone()[0]
            for name in ("journal_mode", "synchronous")
        }
        return {
            **pragma,
            "synchronous_meaning": "0 OFF, 1 NORMAL, 2 FULL, 3 EXTRA",
            "sqlite_version": sqlite3.sqlite_version,
            "file": SQLITE_PATH,
            "isolation": "BEGIN IMMEDIATE for explicit transactions",
        }

    def cursor(self) -> Cursor:
        return self.conn.cursor()

    def begin(self) -> None:
        self.conn.execute("BEGIN IMMEDIATE")

    def commit(self) -> None:
        self.conn.execute("COMMIT")

    def reset(self) -> None:
        self.conn.execute("DROP TABLE IF EXISTS raw_message")
        self.conn.execute("DROP TABLE IF EXISTS raw_queue")
        for table, extra in (("raw_message", ""), ("raw_queue", ", state text NOT NULL")):
            self.conn.execute(
                f"CREATE TABLE {table} (id integer PRIMARY KEY AUTOINCREMENT, "
                f"topic_id integer NOT NULL, payload text NOT NULL, "
                f"created_at text NOT NULL{extra})"
            )

    def close(self) -> None:
        self.conn.close()


def insert_single(db: Backend, n: int) -> tuple[float, dict[str, Any]]:
    cur = db.cursor()
    sql = f"INSERT INTO raw_message (topic_id, payload, created_at) VALUES {db.values(1)}"
    started = time.perf_counter()
    for row in rows(n):
        cur.execute(sql, row)  # autocommit: the INSERT is its own transaction
        if row[0] == 1:
            check_time(started)
    return time.perf_counter() - started, {"transaction": "autocommit, one INSERT each"}


def insert_many(db: Backend, table: str, items: Iterator[Row], size: int) -> None:
    cur = db.cursor()
    state = ", state" if table == "raw_queue" else ""
    started = time.perf_counter()
    for chunk in chunks(items, size):
        values = db.values(len(chunk), ", 'pending'" if state else "")
        flat = [value for row in chunk for value in row]
        db.begin()
        columns = f"topic_id, payload, created_at{state}"
        cur.execute(f"INSERT INTO {table} ({columns}) VALUES {values}", flat)
        db.commit()
        check_time(started)


def insert_batch(db: Backend, n: int) -> tuple[float, dict[str, Any]]:
    started = time.perf_counter()
    insert_many(db, "raw_message", rows(n), INSERT_BATCH)
    seconds = time.perf_counter() - started
    return seconds, {"batch": INSERT_BATCH, "transaction": "one multi-row INSERT per txn"}


def claim_batch(db: Backend, n: int, commits: int) -> tuple[float, dict[str, Any]]:
    insert_many(db, "raw_queue", rows(n), PRELOAD_BATCH)
    index = "CREATE INDEX raw_queue_pending ON raw_queue (id) WHERE state = 'pending'"
    cur = db.cursor()
    cur.execute(index)
    cur.execute("ANALYZE raw_queue")
    claim = (
        "UPDATE raw_queue SET state = 'claimed' WHERE id IN (SELECT id FROM raw_queue "
        f"WHERE state = 'pending' ORDER BY id LIMIT {CLAIM_BATCH}{db.skip_locked}) "
        "RETURNING id, topic_id, payload"
    )
    done = 0
    started = time.perf_counter()
    for _ in range(n // CLAIM_BATCH + 2):
        db.begin()
        cur.execute(claim)
        claimed = cur.fetchall()
        if commits == 2:
            db.commit()
        if not claimed:
            if commits == 1:
                db.commit()
            break
        ids, params = db.id_list([row[0] for row in claimed])
        if commits == 2:
            db.begin()
        cur.execute(f"UPDATE raw_queue SET state = 'done' WHERE id IN ({ids})", params)
        db.commit()
        done += len(claimed)
        check_time(started)
    seconds = time.perf_counter() - started
    if done != n:
        raise RuntimeError(f"claimed {done} rows, expected {n}")
    return seconds, {
        "claim_batch": CLAIM_BATCH,
        "commits_per_batch": commits,
        "claim_sql": claim,
        "index": index,
        "preload_batch": PRELOAD_BATCH,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--db", choices=("postgres", "sqlite"), required=True)
    parser.add_argument("--figure", choices=tuple(DEFAULT_N), required=True)
    parser.add_argument("--n", type=int)
    parser.add_argument("--commits", type=int, choices=(1, 2), default=2)
    args = parser.parse_args(argv)
    n: int = args.n or DEFAULT_N[args.figure]
    if n <= 0:
        parser.error("--n must be positive")
    head = {"figure": args.figure, "db": args.db}
    try:
        result = {**head, **measure(args.db, args.figure, n, args.commits)}
    except Exception as exc:
        # The traceback goes to stderr; the harness still gets one JSON line, and exit 1.
        traceback.print_exc()
        print(json.dumps({**head, "error": f"{type(exc).__name__}: {exc}"[:500]}))
        sys.exit(1)
    print(json.dumps(result))


def measure(db_name: str, figure: str, n: int, commits: int) -> dict[str, Any]:
    load_before = os.getloadavg()[0]
    db: Backend = Postgres() if db_name == "postgres" else Sqlite()
    try:
        db.reset()
        figures: dict[str, Callable[[], tuple[float, dict[str, Any]]]] = {
            "insert_single": lambda: insert_single(db, n),
            "insert_batch": lambda: insert_batch(db, n),
            "claim_batch": lambda: claim_batch(db, n, commits),
        }
        seconds, settings = figures[figure]()
        settings = {**db.settings(), **settings}
        settings["loadavg_before_after"] = [load_before, os.getloadavg()[0]]
    finally:
        db.close()
    return {
        "value": round(n / seconds, 1),
        "unit": "rows/s",
        "n": n,
        "seconds": round(seconds, 4),
        "settings": settings,
    }


if __name__ == "__main__":
    main()
