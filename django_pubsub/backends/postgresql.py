"""PostgreSQL: sequencing by a server-side function, a fan-out that may lease what it
creates, claims that return their messages, lazy commits for what can be worked out again,
parameters sent apart from the SQL, and LISTEN/NOTIFY wake-ups."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from datetime import datetime
from typing import Any

from django.db import transaction

from .base import (
    DELIVERY,
    DELIVERY_COLUMNS,
    FILTERED,
    INFLIGHT,
    MESSAGE,
    NOT_PAUSED_SQL,
    OFFSET,
    PENDING,
    RETRY,
    SUBSCRIPTION,
    TOPIC,
    UNFINISHED_SQL,
    Backend,
)
from .listen import CHANNEL, Listener
from .rows import Claimed, FanOut, Lease

# In a statement: lets its transaction commit without waiting for its WAL to reach the
# disk (see PostgreSQLBackend.may_commit_lazily).
LAZY_COMMIT = "set_config('synchronous_commit', 'off', true)"


class PostgreSQLBackend(Backend):
    vendor = "postgresql"
    leases_at_fan_out = True
    skip_locked = True
    in_picked = "= ANY(ARRAY(SELECT picked_id FROM picked))"

    def __init__(self, connection: Any) -> None:
        super().__init__(connection)
        self._kept: Any = None
        self._tuned: Any = None

    def may_commit_lazily(self) -> bool:
        """Whether a statement here may commit lazily (LAZY_COMMIT): only in a transaction
        of its own, which outside an atomic block a statement is.

        That is only for what the dispatcher can work out again: sequencing, fan-out,
        claims and an ordered run's acks. A server crash may lose such a commit, and the
        work is then done again. It never loses one that anything durable built on,
        because a later synchronous commit (a publish, another ack, a retry, a handler's
        own write) flushes the WAL up to itself, and with it every earlier commit. Inside
        a caller's transaction it would make all of that lazy: so not there.
        """
        return not self.connection.in_atomic_block

    def bound_cursor(self, *, keep: bool = False) -> AbstractContextManager[Any]:
        """A cursor that sends parameters apart from the SQL, as a context manager.

        Django's psycopg cursors bind parameters into the SQL text on the client, which for
        a thousand messages means quoting six thousand values in Python. A plain psycopg
        cursor on the same connection and transaction sends them separately (unnamed
        statements, so poolers such as PgBouncer in transaction mode are fine with it,
        unless the project sets psycopg's ``prepare_threshold``: docs/reference/settings.md).

        ``keep``: a cursor kept for this connection and used again, for statements of one
        small row, where making a cursor was a twentieth of a publish. It holds its last
        parameters and rows until the next such statement, so larger ones get a cursor of
        their own. Callers fetch every row before they execute anything else.
        """
        connection = self.connection
        # As Django's own cursor() does: refuse a transaction that must roll back; connect.
        connection.validate_no_broken_transaction()
        connection.ensure_connection()
        psycopg = _psycopg3(connection)
        if psycopg is None:  # psycopg2: Django's cursor
            return connection.cursor()  # type: ignore[no-any-return]
        if not keep:
            return psycopg.Cursor(connection.connection)  # type: ignore[no-any-return]
        kept = self._kept
        if kept is None or kept.connection is not connection.connection or kept.closed:
            kept = self._kept = psycopg.Cursor(connection.connection)
        return nullcontext(kept)

    # -- publishing ------------------------------------------------------------------------

    def insert_statement(
        self, batch: Sequence[Any], shared: list[Any], topic: str, *, first: bool, dedup: bool
    ) -> tuple[str, list[Any]]:
        """The first batch also notifies the dispatchers' channel, which PostgreSQL
        delivers when the caller's transaction commits (and drops if it rolls back)."""
        payloads = [b if isinstance(b, str) else None for b in batch]
        blobs = [b if isinstance(b, bytes) else None for b in batch]
        params: list[Any]
        if len(batch) == 1:
            params = [payloads[0], blobs[0], *shared, topic]
        else:
            params = [*shared, payloads, blobs, topic]
        if first:
            params.append(CHANNEL)
        # One statement for every batch of two or more: two arrays whatever its size.
        return _insert_sql(min(len(batch), 2), first, dedup), params

    # -- sequencing and fan-out ------------------------------------------------------------

    def sequence(self, *, batch: int, now: datetime, topic_id: int | None = None) -> dict[int, int]:
        """One call of the function that migration 0004 creates (0010 gave it ``now``):
        one round trip whatever the number of topics, and the server keeps the plans of
        the statements inside it. Its migration says why it cannot skip a message."""
        with self.connection.wrap_database_errors, self.bound_cursor() as cursor:
            cursor.execute(
                "SELECT topic_id, sequenced FROM django_pubsub_sequence(%s, %s, %s, %s)",
                [int(batch), self.may_commit_lazily(), topic_id, now],
            )
            return {int(topic): int(count) for topic, count in cursor.fetchall()}

    def fan_out(
        self,
        topic_id: int,
        *,
        now: datetime,
        batch: int,
        leases: Sequence[Lease] = (),
        dispatcher_id: int | None = None,
    ) -> FanOut:
        """One statement for all of a topic's active subscriptions.

        Each subscription row is locked first (in id order, as every fan-out locks them),
        and the lock returns its latest committed position, not the statement's
        snapshot's: a fan-out of the same subscription elsewhere waits for this one, or
        this one for it, and neither creates what the other did. The topic's head comes
        from the snapshot, taken with the messages it covers, which sequencing commits
        together.

        ``leases``: the first deliveries created for each of those subscriptions are
        created leased (inflight, one attempt counted, as a claim leaves them) and come
        back with their messages, unless the subscription already has deliveries waiting
        that are due: a claim would take those first. (As far as the statement's snapshot
        shows: older ones that another dispatcher's fan-out commits meanwhile may be
        overtaken, which only an unordered subscription, the only kind leased here,
        allows.) Their leases run from when the statement holds its locks.
        """
        connection = self.connection
        lazy = f", {LAZY_COMMIT}" if self.may_commit_lazily() else ""
        at = connection.ops.adapt_datetimefield_value(now)
        params: list[Any] = [topic_id, topic_id, batch]
        moved = (
            f"WITH head AS (SELECT next_offset AS h{lazy} FROM {TOPIC} WHERE id = %s), "
            f"subs AS MATERIALIZED (SELECT id, position AS lo FROM {SUBSCRIPTION} "
            f"WHERE topic_id = %s AND active AND position < (SELECT h FROM head) "
            f"ORDER BY id FOR NO KEY UPDATE), "
            f"moved AS (UPDATE {SUBSCRIPTION} s SET position = LEAST((SELECT h FROM head), "
            f"subs.lo + %s) FROM subs WHERE s.id = subs.id RETURNING s.id, subs.lo, "
            f"s.position AS hi, s.keyed, s.message_filter AS f), "
        )
        match = self.filter_match("moved.f")
        if not leases:
            sql = (
                f"{moved}created AS (INSERT INTO {DELIVERY} ({DELIVERY_COLUMNS}, finished_at) "
                f"SELECT moved.id, m.id, m.{OFFSET}, CASE WHEN moved.keyed THEN m.key END, "
                f"CASE WHEN {match} THEN %s ELSE %s END, 0, %s, '[]', '', %s, %s, "
                f"CASE WHEN {match} THEN NULL ELSE %s::timestamptz END "
                f"FROM moved JOIN {MESSAGE} m ON m.topic_id = %s AND m.{OFFSET} >= moved.lo "
                f"AND m.{OFFSET} < moved.hi ON CONFLICT DO NOTHING RETURNING 1) "
                f"SELECT (SELECT count(*) FROM created), (SELECT max(hi) FROM moved)"
            )
            params += [PENDING, FILTERED, at, at, at, at, topic_id]
        else:
            sql = moved + _LEASING_FAN_OUT.format(wanted=_wanted(len(leases)), match=match)
            for lease in leases:
                expires = connection.ops.adapt_datetimefield_value(lease.expires)
                params += [lease.subscription_id, lease.limit, lease.token, expires]
                params += [lease.subscription_id, PENDING, RETRY, at, lease.subscription_id]
            params += [topic_id, INFLIGHT, PENDING, FILTERED, at, at, at, at, dispatcher_id]
        with connection.wrap_database_errors, self.bound_cursor() as cursor:
            cursor.execute(sql, params)
            rows = cursor.fetchall()
        leased: dict[int, list[Claimed]] = {}
        for row in rows if leases else ():
            if row[2] is not None:  # None: nothing leased (the one row of the totals)
                leased.setdefault(row[2], []).append(Claimed.from_row(row[3:]))
        for claimed in leased.values():
            claimed.sort(key=lambda row: row.offset)
        return FanOut(int(rows[0][0]), leased)

    # -- claim and ack ---------------------------------------------------------------------

    def claim_sql(self, ctes: str, update: str) -> str:
        # The messages come back with the claim: one round trip, no ORM per row. Committed
        # lazily where it is its own transaction, like sequencing: a claim that a server
        # crash loses returns its deliveries to where they were, which at-least-once
        # delivery allows, and the ack that follows commits synchronously.
        return (
            f"WITH {ctes}, claimed AS ({update}) SELECT c.id, c.attempts, m.id, m.{OFFSET}, "
            f"m.payload::text, m.payload_bytes, m.key, m.headers::text, m.published_at, "
            f"m.expires_at, {LAZY_COMMIT if self.may_commit_lazily() else 'NULL'} "
            f"FROM claimed c JOIN {MESSAGE} m ON m.id = c.message_id"
        )

    @contextmanager
    def claiming(self, locked: bool) -> Iterator[Any]:
        # An unordered claim is one statement, so its own transaction (outside an atomic
        # block) is enough. An ordered or keyed one takes a lock first: they share one.
        connection = self.connection
        with (
            transaction.atomic(using=connection.alias) if locked else nullcontext(),
            connection.wrap_database_errors,
            self.bound_cursor() as cursor,
        ):
            yield cursor

    def claimed_rows(self, cursor: Any) -> list[Claimed]:
        return [Claimed.from_row(row) for row in cursor.fetchall()]

    def filter_match(self, spec: str) -> str:
        """As the base's, with jsonb containment for the headers."""
        return (
            f"COALESCE({spec} IS NULL OR ((({spec})->>'key' IS NULL OR m.key = ({spec})->>'key') "
            f"AND m.headers @> COALESCE(({spec})->'headers', '{{}}'::jsonb)), false)"
        )

    def id_match(self, ids: Sequence[int]) -> tuple[str, list[Any]]:
        return "id = ANY(%s)", [list(ids)]

    def lazy_ack_sql(self, lazy: bool) -> str:
        """``lazy`` (outside a transaction): commit without waiting for the WAL flush, as
        may_commit_lazily() explains. The ack is visible to every other session at once
        and survives the dispatcher's crash; only a crash of the database server itself
        may lose it, and the message then runs again (guarantees 3). Evaluated for the row
        the primary key finds, before the transaction commits."""
        return f" AND {LAZY_COMMIT} IS NOT NULL" if lazy and self.may_commit_lazily() else ""

    # -- locks -----------------------------------------------------------------------------

    def lock_row(self, cursor: Any, table: str, pk: int, column: str) -> None:
        # NO KEY UPDATE: it serialises us with each other but not with the FOR KEY SHARE
        # locks that foreign key checks take on a row they point at.
        cursor.execute(f"SELECT 1 FROM {table} WHERE id = %s FOR NO KEY UPDATE", [pk])

    def lock_exclusive(self, cursor: Any, key: int) -> None:
        cursor.execute("SELECT pg_advisory_xact_lock(%s)", [key])

    def try_hold(self, key: int) -> bool:
        with self.connection.cursor() as cursor:
            cursor.execute("SELECT pg_try_advisory_lock(%s)", [key])
            return bool(cursor.fetchone()[0])

    def let_go(self, key: int) -> None:
        with self.connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_unlock(%s)", [key])

    # -- the dispatcher's connection, clocks, reads, wake-ups ------------------------------

    def tune_loop_connection(self) -> None:
        """Turn JIT compilation off on the loop's own connection, once per connection.

        Over a long history the planner's estimates for the loop's statements grow past
        jit_above_cost, and compiling one then takes about 0.4 s, where running it takes a
        millisecond. (Only this connection: handlers' and publishers' keep the project's
        setting.)
        """
        connection = self.connection
        connection.ensure_connection()
        if connection.connection is self._tuned:
            return
        with connection.cursor() as cursor:
            cursor.execute("SET jit = off")
        self._tuned = connection.connection

    def clock_skew(self, now: datetime) -> float | None:
        with self.connection.cursor() as cursor:
            cursor.execute("SELECT clock_timestamp()")
            (server_now,) = cursor.fetchone()
        return float((now - server_now).total_seconds())

    @contextmanager
    def consistent_reads(self) -> Iterator[None]:
        """A read-only repeatable-read transaction, unless inside a caller's transaction
        (whose reads are the caller's to arrange)."""
        if self.connection.in_atomic_block:
            yield
            return
        with transaction.atomic(using=self.connection.alias):
            with self.connection.cursor() as cursor:
                cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            yield

    def start_waker(self, wake: Callable[[], None]) -> Listener:
        return Listener.start(wake, self.connection.alias)


def _psycopg3(connection: Any) -> Any:
    """The psycopg module if ``connection`` (Django's) is connected through psycopg 3; None
    for psycopg2."""
    try:
        import psycopg
    except ImportError:
        return None
    return psycopg if isinstance(connection.connection, psycopg.Connection) else None


@functools.lru_cache(maxsize=8)
def _insert_sql(rows: int, notify: bool, dedup: bool = False) -> str:
    """insert_messages()'s statement, built once: a publish is one round trip, and building
    it every time was a tenth of the client's share. Typed, where a NULL parameter would
    otherwise have no type. ``notify``: the statement also notifies a channel, the last
    parameter. ``dedup`` (one row): with a dedup key, writing nothing if the topic has it
    (after waiting for a transaction that is writing it to end)."""
    columns = "topic_id, payload, payload_bytes, key, headers, published_at, deliver_at, expires_at"
    shared_sql = "%s::varchar, %s::jsonb, %s::timestamptz, %s::timestamptz, %s::timestamptz"
    if rows == 1:
        # The common case, in the plainest statement the server can plan.
        conflict = ""
        if dedup:
            columns, shared_sql = f"{columns}, dedup_key", f"{shared_sql}, %s::varchar"
            conflict = " ON CONFLICT DO NOTHING"
        insert = (
            f"INSERT INTO {MESSAGE} ({columns}) SELECT id, %s::jsonb, %s::bytea, {shared_sql} "
            f"FROM {TOPIC} WHERE name = %s{conflict} RETURNING id"
        )
    else:
        # Two arrays whatever the batch's size: no parameter per message to send and parse,
        # and the same statement every time, which psycopg can prepare. The ordinality
        # keeps the call's order, which the ids follow.
        insert = (
            f"INSERT INTO {MESSAGE} ({columns}) SELECT t.id, p.payload, p.bytes, "
            f"{shared_sql} FROM {TOPIC} t CROSS JOIN unnest(%s::jsonb[], %s::bytea[]) "
            f"WITH ORDINALITY AS p(payload, bytes, n) WHERE t.name = %s "
            f"ORDER BY p.n RETURNING id"
        )
    if not notify:
        return insert
    return f"WITH m AS ({insert}) SELECT m.id FROM m CROSS JOIN (SELECT pg_notify(%s, '')) AS woken"


def _wanted(count: int) -> str:
    """The leases asked for, one branch per subscription, each with its own id, and min()
    rather than EXISTS: planned from statistics, a join with a list of ids or an EXISTS
    became a scan of all deliveries when those said there were few to look at (the min of
    the offset index is found by walking it from this subscription's lowest offset)."""
    return " UNION ALL ".join(
        [
            f"SELECT %s::bigint AS sub, %s::int AS lim, %s::varchar AS token, "
            f"%s::timestamptz AS expires WHERE (SELECT min(d.{OFFSET}) FROM {DELIVERY} d "
            f"WHERE d.subscription_id = %s AND d.{UNFINISHED_SQL} AND d.state IN (%s, %s) "
            f"AND d.available_at <= %s) IS NULL AND {NOT_PAUSED_SQL}"
        ]
        * count
    )


# The rest of a fan-out that leases. A lease runs from when the row is made, which is after
# the statement holds its locks on the subscriptions: the time it waited for them (an
# operator's seek, another fan-out) is added to what the dispatcher asked for.
_LEASING_FAN_OUT = (
    "wanted AS MATERIALIZED ({wanted}), "
    # ok: the message matches the subscription's filter (``match``); only those are leased,
    # the first of them, numbered apart from the others.
    f"matched AS (SELECT moved.id AS sub, m.id AS mid, m.{OFFSET} AS o, "
    f"CASE WHEN moved.keyed THEN m.key END AS k, {{match}} AS ok FROM moved JOIN {MESSAGE} m "
    f"ON m.topic_id = %s AND m.{OFFSET} >= moved.lo AND m.{OFFSET} < moved.hi), "
    f"fresh AS (SELECT matched.*, w.token, w.expires, ok AND row_number() OVER "
    f"(PARTITION BY matched.sub, ok ORDER BY o) <= COALESCE(w.lim, 0) AS leased FROM matched "
    f"LEFT JOIN wanted w ON w.sub = matched.sub), "
    f"created AS (INSERT INTO {DELIVERY} ({DELIVERY_COLUMNS}, finished_at, lease_token, "
    f"lease_expires_at, dispatcher_id) SELECT sub, mid, o, k, CASE WHEN leased THEN %s "
    f"WHEN ok THEN %s ELSE %s END, leased::int, %s, '[]', '', %s, %s, "
    f"CASE WHEN ok THEN NULL ELSE %s::timestamptz END, CASE WHEN leased THEN token END, "
    f"CASE WHEN leased THEN expires + (clock_timestamp() - statement_timestamp()) END, "
    f"CASE WHEN leased THEN %s::bigint END "
    f"FROM fresh ON CONFLICT DO NOTHING "
    f"RETURNING id, subscription_id, message_id, attempts, lease_token IS NOT NULL "
    f"AS leased), "
    f"totals AS (SELECT (SELECT count(*) FROM created) AS n, "
    f"(SELECT max(hi) FROM moved) AS position) "
    # The messages of the leased deliveries are read one by primary key each (LIMIT 1 keeps
    # the planner from joining them with the whole log, which a generic plan sized for a
    # batch chose: a scan of a million messages of history per fan-out).
    f"SELECT totals.n, totals.position, c.subscription_id, c.id, c.attempts, m.* "
    f"FROM totals LEFT JOIN (created c CROSS JOIN LATERAL (SELECT m.id, m.{OFFSET}, "
    f"m.payload::text, m.payload_bytes, m.key, m.headers::text, m.published_at, "
    f"m.expires_at FROM {MESSAGE} m WHERE m.id = c.message_id LIMIT 1) m) ON c.leased"
)
