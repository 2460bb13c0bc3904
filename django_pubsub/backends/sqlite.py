"""SQLite: one writer at a time, plain statements, and the messages read after a claim."""

from __future__ import annotations

import fcntl
import functools
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import IO, Any

from django.db import transaction

from .base import (
    MESSAGE,
    OFFSET,
    SUBSCRIPTION,
    TOPIC,
    Backend,
)
from .data_version import DataVersionWaker
from .rows import Claimed, FanOut, Lease, in_list

# The message columns a claim's handlers get, as the ORM would read them.
_MESSAGE_FIELDS = (
    "id",
    "offset",
    "payload",
    "payload_bytes",
    "key",
    "headers",
    "published_at",
    "expires_at",
)
_READ_MESSAGES = 'SELECT {} FROM {} WHERE {}."id" '.format(
    ", ".join(f'{MESSAGE}."{name}" AS "{name}"' for name in _MESSAGE_FIELDS), MESSAGE, MESSAGE
)


# One topic's messages to sequence next (parameters: topic, time, batch, topic, batch),
# as (id, rn), their order: those published for later whose time has come, by when it
# came, then the others in id order; each part through its own partial index.
_PICK = (
    f"SELECT id, row_number() OVER (ORDER BY part, at, id) AS rn FROM ("
    f"SELECT * FROM (SELECT id, 0 AS part, deliver_at AS at FROM {MESSAGE} "
    f"INDEXED BY pubsub_message_scheduled WHERE topic_id = %s AND {OFFSET} IS NULL "
    f"AND deliver_at IS NOT NULL AND deliver_at <= %s ORDER BY deliver_at, id LIMIT %s) "
    f"UNION ALL SELECT * FROM (SELECT id, 1 AS part, NULL AS at FROM {MESSAGE} "
    f"INDEXED BY pubsub_message_unsequenced WHERE topic_id = %s AND {OFFSET} IS NULL "
    f"AND deliver_at IS NULL ORDER BY id LIMIT %s))"
)

# The least a background writer leaves the lock free (pause_after()).
PAUSE_AFTER_WRITE = 0.02


class SQLiteBackend(Backend):
    vendor = "sqlite"

    def __init__(self, connection: Any) -> None:
        super().__init__(connection)
        # The files whose locks try_hold() holds, by key (None: an in-memory database's).
        self._held: dict[int, IO[str] | None] = {}

    @staticmethod
    def missing_options(options: dict[str, Any]) -> list[str]:
        """The OPTIONS without which writers can fail with "database is locked": each
        transaction takes the write lock up front (IMMEDIATE), readers do not block the
        writer (WAL), and a writer waits its turn long enough (timeout)."""
        missing = []
        if str(options.get("transaction_mode", "")).upper() != "IMMEDIATE":
            missing.append('"transaction_mode": "IMMEDIATE"')
        init = str(options.get("init_command", "")).lower().replace(" ", "")
        if "journal_mode=wal" not in init:
            missing.append('"init_command": "PRAGMA journal_mode=WAL;"')
        # Unset, Python's 5 s applies: too short when a handler's transaction and the
        # dispatcher's pass meet under load, so the hint asks for it outright.
        if float(options.get("timeout", 0)) < 5:
            missing.append('"timeout": 20')
        return missing

    # -- publishing ------------------------------------------------------------------------

    def insert_statement(
        self, batch: Sequence[Any], shared: list[Any], topic: str, *, first: bool, dedup: bool
    ) -> tuple[str, list[Any]]:
        params: list[Any]
        if len(batch) == 1:
            params = [*_columns(batch[0]), *shared]
        else:
            params = [*shared]
            for n, body in enumerate(batch):
                params += [n, *_columns(body)]
        params.append(topic)
        return _insert_sql(len(batch), dedup), params

    # -- sequencing and fan-out ------------------------------------------------------------

    def sequence(self, *, batch: int, now: datetime, topic_id: int | None = None) -> dict[int, int]:
        at = self.connection.ops.adapt_datetimefield_value(now)
        if topic_id is not None:
            count = self._sequence_topic(topic_id, batch, at)
            return {topic_id: count} if count else {}
        # This runs every pass, and on the way from a commit to its handler. SQLite,
        # without statistics, would rather scan the whole (topic, offset) index.
        with self.connection.cursor() as cursor:
            cursor.execute(
                f'SELECT DISTINCT "topic_id" FROM {MESSAGE} INDEXED BY pubsub_message_unsequenced '
                f"WHERE {OFFSET} IS NULL AND deliver_at IS NULL UNION "
                f'SELECT DISTINCT "topic_id" FROM {MESSAGE} INDEXED BY pubsub_message_scheduled '
                f"WHERE {OFFSET} IS NULL AND deliver_at IS NOT NULL AND deliver_at <= %s",
                [at],
            )
            topic_ids = sorted(row[0] for row in cursor.fetchall())
        counts = {topic: self._sequence_topic(topic, batch, at) for topic in topic_ids}
        return {topic: count for topic, count in counts.items() if count}

    def _sequence_topic(self, topic_id: int, batch: int, at: Any) -> int:
        with transaction.atomic(using=self.connection.alias), self.connection.cursor() as cursor:
            base = self.locked_value(cursor, TOPIC, topic_id, "next_offset")
            if base is None:
                return 0  # its topic row is gone: nothing to number its messages from
            # A new statement after the lock: it sees every message committed so far,
            # including the offsets a sequencer that held the lock before us assigned.
            cursor.execute(
                f"UPDATE {MESSAGE} SET {OFFSET} = %s + s.rn - 1 FROM ({_PICK}) AS s "
                f"WHERE {MESSAGE}.id = s.id AND s.rn <= %s",
                [base, topic_id, at, batch, topic_id, batch, batch],
            )
            count = cursor.rowcount
            if count:
                cursor.execute(
                    f"UPDATE {TOPIC} SET next_offset = %s WHERE id = %s", [base + count, topic_id]
                )
        return int(count)

    def fan_out(
        self,
        topic_id: int,
        *,
        now: datetime,
        batch: int,
        leases: Sequence[Lease] = (),
        dispatcher_id: int | None = None,
    ) -> FanOut:
        """One transaction per subscription behind: nothing is leased here (a claim takes
        the deliveries as usual)."""
        behind = self.subscriptions_behind(topic_id)
        created = sum(self._fan_out_one(sub, topic_id, now, batch) for sub, _ in behind)
        return FanOut(created, {})

    def _fan_out_one(self, subscription_id: int, topic_id: int, now: datetime, batch: int) -> int:
        with transaction.atomic(using=self.connection.alias), self.connection.cursor() as cursor:
            low = self.locked_value(cursor, SUBSCRIPTION, subscription_id, "position")
            if low is None:
                return 0  # deleted meanwhile
            cursor.execute(
                f"SELECT t.next_offset, s.keyed FROM {TOPIC} t, {SUBSCRIPTION} s "
                f"WHERE t.id = %s AND s.id = %s",
                [topic_id, subscription_id],
            )
            head, keyed = cursor.fetchone()
            high = min(head, low + batch)
            if high <= low:
                return 0
            created = self.create_deliveries(
                cursor, subscription_id, topic_id, low, high, now, keyed=bool(keyed)
            )
            cursor.execute(
                f"UPDATE {SUBSCRIPTION} SET position = %s WHERE id = %s", [high, subscription_id]
            )
        return created

    # -- claim -----------------------------------------------------------------------------

    def claimed_rows(self, cursor: Any) -> list[Claimed]:
        """The claim's rows, then their messages, in the claim's transaction."""
        rows = cursor.fetchall()
        if not rows:
            return []
        match, params = in_list([row[2] for row in rows])
        cursor.execute(_READ_MESSAGES + match, params)
        convert = self.connection.ops.convert_datetimefield_value
        messages = {row[0]: row for row in cursor.fetchall()}
        claimed = []
        for delivery_id, attempt, message_id in rows:
            _, offset, payload, payload_bytes, key, headers, published_at, expires_at = messages[
                message_id
            ]
            # As the ORM would give them: the payload's JSON decoded, the times made aware.
            at = convert(published_at, None, self.connection)
            expires = convert(expires_at, None, self.connection)
            row = (
                delivery_id,
                attempt,
                message_id,
                offset,
                payload,
                payload_bytes,
                key,
                headers,
                at,
                expires,
            )
            claimed.append(Claimed.from_row(row))
        return claimed

    # -- locks -----------------------------------------------------------------------------

    def lock_row(self, cursor: Any, table: str, pk: int, column: str) -> None:
        """SQLite has one writer: a write that changes nothing takes the database's write
        lock up front, instead of upgrading a read lock later (which fails at once with
        "database is locked" rather than waiting). One lock for every row."""
        _write_lock(cursor)

    def lock_exclusive(self, cursor: Any, key: int) -> None:
        _write_lock(cursor)

    def pause_after(self, took: float) -> float:
        """One writer at a time, and a writer kept waiting retries only every few tens of
        milliseconds: statements back to back would take the lock again before a waiting
        publish or ack got it (p99 1.6 s beside a prune of 2,000,000 rows). So leave it
        free for longer than the statement held it, and long enough for a retry."""
        return max(PAUSE_AFTER_WRITE, 2 * took)

    def try_hold(self, key: int) -> bool:
        """A lock on a file beside the database (SQLite has no lock that outlives a
        transaction): the processes that share a database file share its folder."""
        if key in self._held:
            return False  # this connection holds it already
        if self.connection.is_in_memory_db():
            self._held[key] = None  # no other process can share this database
            return True
        name = str(self.connection.settings_dict["NAME"])
        handle = open(f"{name}.pubsub-{key:x}.lock", "a")  # held until let_go()
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            return False
        self._held[key] = handle
        return True

    def let_go(self, key: int) -> None:
        handle = self._held.pop(key, None)
        if handle is not None:
            handle.close()  # closing the file releases its lock

    def start_waker(self, wake: Callable[[], None]) -> DataVersionWaker | None:
        return DataVersionWaker.start(wake, self.connection)


def _write_lock(cursor: Any) -> None:
    # No row matches: nothing is rewritten (a rewritten key would make SQLite look for the
    # rows that refer to it), and the transaction holds the write lock from here on.
    cursor.execute(f"UPDATE {SUBSCRIPTION} SET id = id WHERE 1 = 0")


def _columns(body: str | bytes | None) -> tuple[str | None, bytes | None]:
    if isinstance(body, bytes):
        return None, body
    return body, None


@functools.lru_cache(maxsize=64)
def _insert_sql(rows: int, dedup: bool = False) -> str:
    """insert_messages()'s statement for ``rows`` messages, built once per size; ``dedup``
    (one row): with a dedup key, writing nothing if the topic has it."""
    columns = "topic_id, payload, payload_bytes, key, headers, published_at, deliver_at, expires_at"
    if rows == 1:
        if dedup:
            return (
                f"INSERT INTO {MESSAGE} ({columns}, dedup_key) SELECT id, %s, %s, %s, %s, %s, "
                f"%s, %s, %s FROM {TOPIC} WHERE name = %s ON CONFLICT DO NOTHING RETURNING id"
            )
        return (
            f"INSERT INTO {MESSAGE} ({columns}) SELECT id, %s, %s, %s, %s, %s, %s, %s "
            f"FROM {TOPIC} WHERE name = %s RETURNING id"
        )
    # VALUES columns are column1, column2...; column1 keeps the call's order, which the ids
    # follow.
    return (
        f"INSERT INTO {MESSAGE} ({columns}) SELECT t.id, v.column2, v.column3, "
        f"%s, %s, %s, %s, %s FROM {TOPIC} t CROSS JOIN (VALUES "
        f"{', '.join(['(%s, %s, %s)'] * rows)}) AS v WHERE t.name = %s "
        f"ORDER BY v.column1 RETURNING id"
    )
