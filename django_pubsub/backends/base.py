"""The interface every database backend offers, and what the backends share: the tables'
names and the statements that read the same on every database (the claim, the ack, a
new delivery).

Nothing here imports the models (they import this): the tables are named as the
migrations create them, and a test holds those names against the models.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from datetime import datetime, timedelta
from typing import Any

from django.db import transaction

from ..states import ENDED, DeliveryState
from .rows import Claimed, FanOut, Lease, Waker, in_list

# Quoted as PostgreSQL and SQLite both quote names.
TOPIC = '"django_pubsub_topic"'
MESSAGE = '"django_pubsub_message"'
SUBSCRIPTION = '"django_pubsub_subscription"'
DELIVERY = '"django_pubsub_delivery"'
# A column whose name is a keyword on both.
OFFSET = '"offset"'

# The conditions of the partial indexes on deliveries, as literal SQL. SQLite uses a partial
# index only for a query whose WHERE repeats the index's condition term for term, and a
# bound parameter never matches a literal; so queries that need one add these.
UNFINISHED_SQL = "state IN ('pending', 'retry', 'inflight')"
INFLIGHT_SQL = "state = 'inflight'"
# The keyed deliveries' index (pubsub_delivery_keys): only the rows that can hold a key
# back (running, waiting for a retry, dead), so that asking whether one does costs the
# same however many messages of the key are pending.
KEYS_SQL = "key IS NOT NULL AND state IN ('inflight', 'retry', 'dead')"
# True unless the subscription (a parameter) is paused. Read in each claim and fan-out
# lease statement itself: an operator's pause holds from the next one on, in every
# dispatcher, at no cost of a round trip.
NOT_PAUSED_SQL = f"NOT (SELECT paused FROM {SUBSCRIPTION} WHERE id = %s)"
# Rows per INSERT of messages: well under both databases' limits on parameters.
INSERT_BATCH = 1000
# What a new delivery row is made of, in fan-out and seek alike.
DELIVERY_COLUMNS = (
    f"subscription_id, message_id, {OFFSET}, key, state, attempts, available_at, errors, "
    f"last_error, created_at, updated_at"
)

PENDING, RETRY = DeliveryState.PENDING.value, DeliveryState.RETRY.value
FILTERED = DeliveryState.FILTERED.value
INFLIGHT, DEAD = DeliveryState.INFLIGHT.value, DeliveryState.DEAD.value
# Every state a delivery may have reached since the snapshot that picked it for a claim:
# an operator's discard included, or an ordered claim could run what was discarded.
TAKEN = (INFLIGHT, *(state.value for state in ENDED))
TAKEN_SQL = ", ".join(["%s"] * len(TAKEN))


class Backend:
    """What differs per database, for one Django connection (``for_connection()`` keeps
    one per connection, so per thread). The models call it; nothing else decides by the
    database's vendor."""

    vendor = ""
    # Whether fan_out() can lease the deliveries it creates (a claim's round trip saved).
    leases_at_fan_out = False
    # Whether an unordered claim skips rows other claims hold (rather than wait for them).
    skip_locked = False
    # How the claim's UPDATE finds the picked rows by primary key.
    in_picked = "IN (SELECT picked_id FROM picked)"

    def __init__(self, connection: Any) -> None:
        self.connection = connection

    # -- publishing ------------------------------------------------------------------------

    def insert_messages(
        self,
        topic: str,
        bodies: Sequence[str | bytes | None],
        *,
        key: str | None,
        headers: dict[str, str],
        now: datetime,
        schedule: tuple[datetime | None, datetime | None] = (None, None),
        dedup_key: str | None = None,
    ) -> list[int] | None:
        """Insert messages into the topic named ``topic``, in order, in the caller's
        transaction; their ids, or None (nothing written) when the topic does not exist
        yet. A commit of them wakes the dispatchers where the database can.

        ``dedup_key`` (one message): nothing is written either if the topic has a message
        with that key; then the result is None too.

        One statement per INSERT_BATCH messages, the topic looked up inside it: a publish
        is one round trip. A function of the connection rather than a queryset method: a
        publish is a few hundred microseconds, and making a queryset and looking the
        connection up again for each was a measurable part of what is Python's in it.
        """
        connection = self.connection
        adapt = connection.ops.adapt_datetimefield_value
        # The same for every message of the call, so sent once: key, headers, published
        # at, deliver at, expires at.
        shared = [
            key,
            json.dumps(headers) if headers else "{}",
            adapt(now),
            None if schedule[0] is None else adapt(schedule[0]),
            None if schedule[1] is None else adapt(schedule[1]),
        ]
        dedup = dedup_key is not None
        if dedup:
            shared.append(dedup_key)
        ids: list[int] = []
        for start in range(0, len(bodies), INSERT_BATCH):
            batch = bodies[start : start + INSERT_BATCH]
            sql, params = self.insert_statement(batch, shared, topic, first=start == 0, dedup=dedup)
            keep = len(batch) == 1
            with connection.wrap_database_errors, self.bound_cursor(keep=keep) as cursor:
                cursor.execute(sql, params)
                found = [row[0] for row in cursor.fetchall()]
            found.sort()
            if not found:
                return None
            ids += found
        return ids

    def insert_statement(
        self, batch: Sequence[Any], shared: list[Any], topic: str, *, first: bool, dedup: bool
    ) -> tuple[str, list[Any]]:
        """The INSERT of one batch of message bodies (JSON text, bytes or None, as
        validation.check_payload() returns them), with its parameters: ``shared`` (key,
        headers, the published, deliver and expiry times; the dedup key if ``dedup``) are
        the same for every message, and ``first`` says whether it is the call's first
        batch. ``dedup`` (a batch of one): nothing is inserted if the topic has a message
        with the same dedup key."""
        raise NotImplementedError

    # -- sequencing and fan-out ------------------------------------------------------------

    def sequence(self, *, batch: int, now: datetime, topic_id: int | None = None) -> dict[int, int]:
        """Give committed unsequenced messages of every topic (or the one given) that are
        due by ``now`` the next offsets, up to ``batch`` a topic, under the topic's row
        lock: first those published for later whose time has come, in the order it came,
        then the others in id order (any order among committed messages keeps every offset
        behind what is visible; this one runs what came due in a pass as it came due).
        Each kind is read through its own partial index, so messages due later are never
        read. {topic id: messages sequenced} for those that got any."""
        raise NotImplementedError

    def subscriptions_behind(self, topic_id: int | None = None) -> list[tuple[int, int]]:
        """(subscription id, topic id) of each active subscription (of the topic given)
        that has sequenced messages not yet fanned out, in id order."""
        only, params = ("", []) if topic_id is None else (" AND s.topic_id = %s", [topic_id])
        with self.connection.cursor() as cursor:
            cursor.execute(
                f"SELECT s.id, s.topic_id FROM {SUBSCRIPTION} s "
                f"JOIN {TOPIC} t ON t.id = s.topic_id "
                f"WHERE s.active AND s.position < t.next_offset{only} ORDER BY s.id",
                params,
            )
            return [(row[0], row[1]) for row in cursor.fetchall()]

    def fan_out(
        self,
        topic_id: int,
        *,
        now: datetime,
        batch: int,
        leases: Sequence[Lease] = (),
        dispatcher_id: int | None = None,
    ) -> FanOut:
        """Move each active subscription of the topic past up to ``batch`` sequenced
        messages and create their pending deliveries; where ``leases_at_fan_out``, lease
        the first of them as ``leases`` ask."""
        raise NotImplementedError

    def create_deliveries(
        self,
        cursor: Any,
        subscription_id: int,
        topic_id: int,
        low: int,
        high: int,
        now: datetime,
        *,
        keyed: bool,
    ) -> int:
        """Pending deliveries of the messages at offsets low to high (not included), but
        for those the subscription has already; how many it created. ``keyed``: the
        subscription is ordered by key, and its deliveries carry their messages' keys."""
        match = self.filter_match("sf.f")
        ends = [subscription_id, topic_id, low, high]
        cursor.execute(
            f"INSERT INTO {DELIVERY} ({DELIVERY_COLUMNS}, finished_at) "
            f"SELECT %s, m.id, m.{OFFSET}, CASE WHEN %s THEN m.key END, "
            f"CASE WHEN {match} THEN %s ELSE %s END, 0, %s, %s, '', %s, %s, "
            f"CASE WHEN {match} THEN NULL ELSE %s END "
            f"FROM {MESSAGE} m, (SELECT message_filter AS f FROM {SUBSCRIPTION} WHERE id = %s) sf "
            f"WHERE m.topic_id = %s AND m.{OFFSET} >= %s AND m.{OFFSET} < %s "
            f"ON CONFLICT DO NOTHING",
            [subscription_id, keyed, PENDING, FILTERED, now, "[]", now, now, now, *ends],
        )
        return int(cursor.rowcount)

    def filter_match(self, spec: str) -> str:
        """SQL true if message ``m`` matches the subscription filter that the SQL
        expression ``spec`` gives (JSON: {"headers": {name: value}, "key": key}), or that
        is NULL; never NULL itself (a message without a key). Here: SQLite's JSON
        functions."""
        return (
            f"COALESCE({spec} IS NULL OR ((json_extract({spec}, '$.key') IS NULL "
            f"OR m.key = json_extract({spec}, '$.key')) AND NOT EXISTS (SELECT 1 FROM "
            f"json_each({spec}, '$.headers') w WHERE NOT EXISTS (SELECT 1 FROM "
            f"json_each(m.headers) h WHERE h.key = w.key AND h.value = w.value))), 0)"
        )

    # -- claim and ack ---------------------------------------------------------------------

    def claim(
        self,
        subscription_id: int,
        *,
        ordered: bool,
        limit: int,
        now: datetime,
        lease: float,
        token: str,
        dispatcher_id: int | None,
        keyed: bool = False,
        hung_keys: Sequence[str] = (),
        buries: bool = False,
        batch: tuple[int, float] | None = None,
    ) -> list[Claimed]:
        """Lease up to ``limit`` due deliveries of the subscription for ``lease`` seconds
        from when the claim holds its locks; return them with their messages, in offset
        order.

        Ordered: a run from the head of the log, the lowest unfinished offsets up to the
        first one that is inflight or not yet due, under the subscription's row lock, so
        two claimers never lease parts of one run. Keyed: the same for each key, every key
        at once (rows without a key are held behind nothing), under the same lock.
        Unordered: the due ones, skipping rows another claim holds.

        ``buries`` (keyed): rows of a key that has a dead letter before them end dead
        instead, unrun, and come back marked ``buried``. ``batch``: (size, wait): lease
        nothing unless ``size`` rows are due, or one has been due for ``wait`` seconds.
        ``hung_keys`` (keyed): keys whose handler hangs in this process: none of them.
        """
        started = time.monotonic()
        locked = ordered or keyed
        ctes, cte_params = _picked(
            subscription_id, ordered, keyed, limit, now, self.skip_locked, hung_keys
        )
        update_params: list[Any] = []
        ready = ""
        if batch is not None:
            ready = (
                " AND ((SELECT count(*) FROM picked) >= %s OR (SELECT min(due) FROM picked) <= %s)"
            )
            update_params = [batch[0], now - timedelta(seconds=batch[1])]
        sql = self.claim_sql(ctes, _claim_update(self.in_picked, ready, keyed))
        with self.claiming(locked) as cursor:
            if locked:
                self.lock_row(cursor, SUBSCRIPTION, subscription_id, "position")
            # The lease runs from here: a claim that waited for its locks (another
            # claimer's, an operator's) does not hand out a lease already partly spent.
            waited = time.monotonic() - started
            expires = now + timedelta(seconds=lease + waited)
            params = [*cte_params, INFLIGHT, token, expires, dispatcher_id, now, *TAKEN, now]
            cursor.execute(sql, [*params, *update_params])
            claimed = self.claimed_rows(cursor)
            if buries and claimed:
                buried = self.bury(
                    cursor, subscription_id, [row.delivery_id for row in claimed], now
                )
                claimed = [row._replace(buried=row.delivery_id in buried) for row in claimed]
        claimed.sort(key=lambda row: row.offset)
        return claimed

    def bury(self, cursor: Any, subscription_id: int, ids: list[int], now: datetime) -> set[int]:
        """Of the deliveries just leased (``ids``), end dead, unrun and their attempt
        returned, those whose key has a dead letter at a lower offset; their ids."""
        match, params = self.id_match(ids)
        error = (
            "dead-lettered unrun: an earlier message of key ' || key || ' is dead "
            "(on_dead=dead_letter_key)"
        )
        cursor.execute(
            f"UPDATE {DELIVERY} SET state = %s, attempts = attempts - 1, lease_token = NULL, "
            f"lease_expires_at = NULL, dispatcher_id = NULL, finished_at = %s, updated_at = %s, "
            f"last_error = '{error}' WHERE {match} AND state = %s AND EXISTS (SELECT 1 FROM "
            f"{DELIVERY} e WHERE e.subscription_id = %s AND e.key = {DELIVERY}.key AND "
            f"{KEYS_SQL} AND e.state = %s AND e.{OFFSET} < {DELIVERY}.{OFFSET}) RETURNING id",
            [DEAD, now, now, *params, INFLIGHT, subscription_id, DEAD],
        )
        return {row[0] for row in cursor.fetchall()}

    def claim_sql(self, ctes: str, update: str) -> str:
        return f"WITH {ctes} {update}"

    def claiming(self, locked: bool) -> AbstractContextManager[Any]:
        """The cursor (and transaction) a claim's statements run in; ``locked``: it takes
        the subscription's row lock first."""
        return self._in_transaction()

    @contextmanager
    def _in_transaction(self) -> Iterator[Any]:
        with transaction.atomic(using=self.connection.alias), self.connection.cursor() as cursor:
            yield cursor

    def claimed_rows(self, cursor: Any) -> list[Claimed]:
        """What the claim statement leased, with the messages."""
        raise NotImplementedError

    def ack(
        self, ids: Sequence[int], *, token: str, now: datetime, lazy: bool = False
    ) -> list[int]:
        """Mark handled deliveries acked; the lease token fences out late workers. Returns
        the ids it acked: those whose lease was taken back meanwhile are not among them.

        Plain SQL: it runs once per message of an ordered run, where the ORM's cost of
        building the statement would be most of the ack's. ``lazy``: see the backend.
        """
        at = self.connection.ops.adapt_datetimefield_value(now)
        params: list[Any]
        if len(ids) == 1:
            # An ordered run's ack: the plainest statement (no array to build and parse).
            match, params = "id = %s", list(ids)
        else:
            match, params = self.id_match(ids)
        match += self.lazy_ack_sql(lazy)
        with self.connection.wrap_database_errors, self.bound_cursor() as cursor:
            cursor.execute(
                f"UPDATE {DELIVERY} SET state = %s, lease_token = NULL, "
                f"lease_expires_at = NULL, dispatcher_id = NULL, finished_at = %s, "
                f"updated_at = %s WHERE {match} AND state = %s AND lease_token = %s "
                f"RETURNING id",
                [DeliveryState.ACKED, at, at, *params, INFLIGHT, token],
            )
            return [row[0] for row in cursor.fetchall()]

    def id_match(self, ids: Sequence[int]) -> tuple[str, list[Any]]:
        """SQL true for rows whose id is among ``ids``, and its parameters."""
        match, params = in_list(ids)
        return f"id {match}", params

    def lazy_ack_sql(self, lazy: bool) -> str:
        return ""

    # -- locks -----------------------------------------------------------------------------

    def lock_row(self, cursor: Any, table: str, pk: int, column: str) -> None:
        """Take the row's write lock for the rest of the transaction (``column``: one
        that no foreign key points at, for databases that lock by writing)."""
        raise NotImplementedError

    def locked_value(self, cursor: Any, table: str, pk: int, column: str) -> int | None:
        """Take the row's write lock for the rest of the transaction; return ``column``
        as of then (the latest committed value, not the transaction's snapshot's), or
        None if there is no such row."""
        self.lock_row(cursor, table, pk, column)
        name = self.connection.ops.quote_name(column)
        cursor.execute(f"SELECT {name} FROM {table} WHERE id = %s", [pk])
        row = cursor.fetchone()
        return None if row is None else int(row[0])

    def lock_exclusive(self, cursor: Any, key: int) -> None:
        """Inside a transaction: wait until no other transaction holds ``key``, then hold
        it until this one ends. One process at a time does what it guards."""
        raise NotImplementedError

    def pause_after(self, took: float) -> float:
        """Seconds a long background writer (the pruner) leaves the database alone after a
        statement that took ``took`` seconds, so that other writers are not held up."""
        return 0.0

    def try_hold(self, key: int) -> bool:
        """Outside transactions, across them: hold ``key`` for this connection unless
        another holds it (False, at once). Released by let_go(), or when the connection
        or its process ends. One process at a time prunes."""
        raise NotImplementedError

    def let_go(self, key: int) -> None:
        raise NotImplementedError

    # -- the dispatcher's connection, clocks, reads, wake-ups ------------------------------

    def tune_loop_connection(self) -> None:
        """Set up the dispatcher loop's own connection, once per connection."""

    def clock_skew(self, now: datetime) -> float | None:
        """Seconds by which ``now`` (this host's clock) is ahead of the database server's;
        None where the database runs in this process."""
        return None

    def consistent_reads(self) -> AbstractContextManager[None]:
        """Where the database can: one snapshot for every statement inside, so figures
        read one after the other agree with each other."""
        return nullcontext()

    def start_waker(self, wake: Callable[[], None]) -> Waker | None:
        """A started thread that calls ``wake`` when another connection commits new
        messages; None where the database offers no way."""
        return None

    def bound_cursor(self, *, keep: bool = False) -> AbstractContextManager[Any]:
        """A cursor that sends parameters apart from the SQL where the driver can."""
        return self.connection.cursor()  # type: ignore[no-any-return]


def _picked(
    subscription_id: int,
    ordered: bool,
    keyed: bool,
    limit: int,
    now: datetime,
    skip_locked: bool,
    hung_keys: Sequence[str] = (),
) -> tuple[str, list[Any]]:
    """The CTE that picks what a claim leases (``picked``: picked_id, and due, when it
    became due), and its parameters."""
    if ordered:
        # A run from the head of the log: the lowest unfinished offsets, up to the first
        # one that is inflight or not yet due. While the head is inflight or waiting for a
        # retry, nothing behind it starts.
        ctes = (
            f"head AS MATERIALIZED (SELECT id, {OFFSET} AS o, state, available_at "
            f"FROM {DELIVERY} WHERE subscription_id = %s AND {UNFINISHED_SQL} "
            f"AND state IN (%s, %s, %s) ORDER BY {OFFSET} LIMIT %s), "
            f"picked AS MATERIALIZED (SELECT id AS picked_id, available_at AS due FROM head "
            f"WHERE o < COALESCE((SELECT MIN(o) FROM head WHERE state = %s OR available_at > %s), "
            f"o + 1) AND {NOT_PAUSED_SQL})"
        )
        params: list[Any] = [subscription_id, PENDING, RETRY, INFLIGHT, limit]
        return ctes, [*params, INFLIGHT, now, subscription_id]
    held = ""
    held_back = ""
    held_params: list[Any] = []
    if keyed:
        # Each key's run from its head: a row goes unless its key is held, by a row of it
        # that runs or waits for a retry not yet due (found in the keys' index, which holds
        # only such rows and dead ones: a short list, read once). A row earlier than a
        # held key's running one is held too: it waits, never overtakes. Rows without a
        # key wait for nothing. The subscription's row lock, not SKIP LOCKED, keeps two
        # claims from leasing parts of one key's run. (A probe of that index per row, the
        # first way, walked every waiting row of a running key: 60 ms behind 10,000.)
        held = (
            f"held AS MATERIALIZED (SELECT DISTINCT key FROM {DELIVERY} WHERE "
            f"subscription_id = %s AND {KEYS_SQL} AND (state = %s OR (state = %s AND "
            f"available_at > %s))), "
        )
        held_params = [subscription_id, INFLIGHT, RETRY, now]
        held_back = " AND (key IS NULL OR key NOT IN (SELECT key FROM held))"
        if hung_keys:
            held_back += f" AND (key IS NULL OR key NOT IN ({', '.join(['%s'] * len(hung_keys))}))"
        skip_locked = False
    skip = " FOR UPDATE SKIP LOCKED" if skip_locked else ""
    # MATERIALIZED: PostgreSQL may otherwise rescan a LIMIT ... SKIP LOCKED subquery as part
    # of a join and lease more rows than asked for.
    ctes = (
        f"{held}picked AS MATERIALIZED (SELECT id AS picked_id, available_at AS due FROM "
        f"{DELIVERY} d WHERE subscription_id = %s AND {UNFINISHED_SQL} AND state IN (%s, %s) "
        f"AND {_due(keyed)} AND {NOT_PAUSED_SQL}{held_back} "
        f"ORDER BY {OFFSET} LIMIT %s{skip})"
    )
    return ctes, [
        *held_params,
        *[subscription_id, PENDING, RETRY, now, subscription_id],
        *hung_keys,
        limit,
    ]


def _due(keyed: bool) -> str:
    """SQL true for a waiting delivery that is due by the claim's time (a parameter).

    A keyed claim takes every pending one as due: pending deliveries are made due at once
    (a fan-out's, a seek's, one given back), and only a host whose clock runs ahead of the
    claimer's makes one "due later". A pending row that such a claim passed over would not
    hold its key back (the keys' index holds only rows that can), and the messages behind
    it would run first.
    """
    return "(state = 'pending' OR available_at <= %s)" if keyed else "available_at <= %s"


def _claim_update(in_picked: str, ready: str = "", keyed: bool = False) -> str:
    """The claim's UPDATE of the picked rows, each found by its primary key (``in_picked``).

    Statistics of a table of acked rows say "about one unfinished row", so a join with the
    picked rows, or a state test the partial index answers, gets planned as a scan of all
    unfinished rows compared with each picked one: quadratic, 0.5 s a claim behind a
    backlog of 20,000. The state is re-checked (a concurrent ack or claim may have changed
    it) in a form that index cannot answer. ``ready``: more SQL the update needs (a
    batch's readiness).
    """
    return (
        f"UPDATE {DELIVERY} SET state = %s, attempts = attempts + 1, lease_token = %s, "
        f"lease_expires_at = %s, dispatcher_id = %s, updated_at = %s "
        f"WHERE id {in_picked} AND state NOT IN ({TAKEN_SQL}) AND {_due(keyed)}{ready} "
        f"RETURNING id, attempts, message_id"
    )
