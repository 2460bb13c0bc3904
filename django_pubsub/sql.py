"""SQL helpers that the models, the fan-out and publish() share: quoted names, id lists of
few shapes, row locks, lazy commits, and psycopg cursors that send parameters apart from
the SQL.

Nothing here imports the models: they pass themselves in.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from contextlib import nullcontext
from typing import Any

from django.db import connections, models


@functools.cache
def quoted(model: type[models.Model], field: str | None = None) -> str:
    """Quoted table name, or quoted column name of ``field`` on it (hot paths build SQL
    on every call: worked out once)."""
    qn = connections["default"].ops.quote_name
    if field is None:
        return qn(model._meta.db_table)
    column = model._meta.get_field(field).column  # type: ignore[union-attr]
    assert column is not None
    return qn(column)


def padded_ids(ids: Iterable[int]) -> list[int]:
    """``ids`` with negative ids (which no row has) added up to the next power of two, or
    past 1,024 to the next multiple of 1,024; an empty list stays empty (no query at all).

    The dispatcher's statements that list ids would otherwise take a new shape for every
    count, and each shape is a statement the database driver prepares and keeps: on
    SQLite a hundred and twenty-eight of them a connection, about 10 MB more memory in a
    busy dispatcher before that cache is full. So a few shapes serve every count, and a
    list of MAX_HELD ids stays under SQLite's 32,766 parameters a statement. (Distinct
    fillers: the ORM drops repeated values from an IN list.)
    """
    found = list(ids)
    count = len(found)
    if count <= 1:
        return found
    size = 1 << (count - 1).bit_length()
    if size > PADDED_STEP:
        size = -(-count // PADDED_STEP) * PADDED_STEP
    return found + list(range(-1, count - size - 1, -1))


PADDED_STEP = 1024


def lock_row(cursor: Any, model: type[models.Model], pk: int, using: str, column: str) -> None:
    """Take the row's write lock for the rest of the transaction.

    PostgreSQL locks the row; SQLite has one writer, so a no-op write takes the database's
    write lock up front instead of upgrading a read lock later (which fails at once with
    "database is locked" rather than waiting).
    """
    table = quoted(model)
    connection = connections[using]
    if connection.vendor == "postgresql":
        # NO KEY UPDATE: it serialises us with each other but not with the FOR KEY SHARE
        # locks that foreign key checks take on a row they point at.
        cursor.execute(f"SELECT 1 FROM {table} WHERE id = %s FOR NO KEY UPDATE", [pk])
    elif connection.features.has_select_for_update:
        cursor.execute(f"SELECT 1 FROM {table} WHERE id = %s FOR UPDATE", [pk])
    else:
        # A column no foreign key points at: rewriting the primary key, even to itself,
        # makes SQLite look for the rows that refer to it (a million deliveries, 0.1 s).
        name = quoted(model, column)
        cursor.execute(f"UPDATE {table} SET {name} = {name} WHERE id = %s", [pk])


def locked_value(
    cursor: Any, model: type[models.Model], pk: int, column: str, using: str
) -> int | None:
    """Take the row's write lock for the rest of the transaction; return ``column`` as of
    then (the latest committed value, not the transaction's snapshot's), or None if there
    is no such row."""
    lock_row(cursor, model, pk, using, column)
    cursor.execute(f"SELECT {quoted(model, column)} FROM {quoted(model)} WHERE id = %s", [pk])
    row = cursor.fetchone()
    return None if row is None else int(row[0])


# In a PostgreSQL statement: lets its transaction commit without waiting for its WAL to
# reach the disk (see lazily).
LAZY_COMMIT = "set_config('synchronous_commit', 'off', true)"


def lazily(connection: Any) -> bool:
    """Whether a statement here may commit lazily (LAZY_COMMIT): only in a transaction of
    its own, which outside an atomic block a statement is.

    That is only for what the dispatcher can work out again: sequencing and fan-out (and
    claims and an ordered run's acks: see DeliveryQuerySet.claim() and .ack() in
    models.py). A server crash may lose such a commit, and the work is then done again.
    It never loses one that anything durable built on, because a later synchronous
    commit (a publish, another ack, a retry, a handler's own write) flushes the WAL up to
    itself, and with it every earlier commit. Inside a caller's transaction it would make
    all of that lazy: so not there.
    """
    return not connection.in_atomic_block


def _psycopg3(connection: Any) -> Any:
    """The psycopg module if ``connection`` (Django's) is connected through psycopg 3; None
    for psycopg2, other databases, or no connection yet."""
    if connection.vendor != "postgresql":
        return None
    try:
        import psycopg
    except ImportError:
        return None
    return psycopg if isinstance(connection.connection, psycopg.Connection) else None


def bound_cursor(connection: Any, *, keep: bool = False) -> Any:
    """A cursor that sends parameters apart from the SQL where the driver can, as a
    context manager.

    Django's psycopg cursors bind parameters into the SQL text on the client, which for a
    thousand messages means quoting six thousand values in Python. A plain psycopg cursor
    on the same connection and transaction sends them separately (unnamed statements, so
    poolers such as PgBouncer in transaction mode are fine with it, unless the project
    sets psycopg's ``prepare_threshold``: docs/reference/settings.md).

    ``keep``: a cursor kept on the connection's wrapper (one per thread, as Django keeps
    its connections) and used again, for statements of one small row, where making a
    cursor was a twentieth of a publish. It holds its last parameters and rows until the
    next such statement, so larger ones get a cursor of their own. Callers fetch every row
    before they execute anything else.
    """
    if connection.vendor == "postgresql":
        # As Django's own cursor() does: refuse a transaction that must roll back; connect.
        connection.validate_no_broken_transaction()
        connection.ensure_connection()
        kept = getattr(connection, "_pubsub_cursor", None) if keep else None
        if kept is not None and kept.connection is connection.connection and not kept.closed:
            return nullcontext(kept)
    psycopg = _psycopg3(connection)
    if psycopg is None:  # SQLite, or psycopg2: Django's cursor
        return connection.cursor()
    if not keep:
        return psycopg.Cursor(connection.connection)
    connection._pubsub_cursor = psycopg.Cursor(connection.connection)
    return nullcontext(connection._pubsub_cursor)


# The conditions of the partial indexes on deliveries, as literal SQL. SQLite uses a partial
# index only for a query whose WHERE repeats the index's condition term for term, and a
# bound parameter never matches a literal; so queries that need one add these.
UNFINISHED_SQL = "state IN ('pending', 'retry', 'inflight')"
INFLIGHT_SQL = "state = 'inflight'"
