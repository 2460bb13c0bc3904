"""The fan-out on PostgreSQL: one statement that moves every active subscription of a topic
past the newly sequenced messages, creates their deliveries, and may lease the first of
them to the dispatcher that runs it (Topic.fan_out and Subscription.fan_out call it).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, NamedTuple

from django.db import connections

from .sql import LAZY_COMMIT, UNFINISHED_SQL, bound_cursor, lazily, quoted

if TYPE_CHECKING:
    from .models import Claimed


class Lease(NamedTuple):
    """What a fan-out on PostgreSQL may lease of the deliveries it creates for one
    unordered subscription: up to ``limit`` of them, to ``token`` until ``expires``."""

    subscription_id: int
    limit: int
    token: str
    expires: datetime


class FanOut(NamedTuple):
    # Deliveries created.
    created: int
    # Those leased as they were created (see Topic.fan_out), by subscription id.
    leased: dict[int, list[Claimed]]


def fan_out_postgresql(
    topic_id: int,
    subscription_id: int | None,
    *,
    now: datetime,
    batch: int,
    using: str,
    leases: Sequence[Lease] = (),
    dispatcher_id: int | None = None,
) -> tuple[FanOut, int | None]:
    """Fan-out on PostgreSQL, one statement for all of a topic's active subscriptions (or
    the one given): what it created and leased, and the position of the last one moved.

    Each subscription row is locked first (in id order, as every fan-out locks them), and
    the lock returns its latest committed position, not the statement's snapshot's: a
    fan-out of the same subscription elsewhere waits for this one, or this one for it, and
    neither creates what the other did. The topic's head comes from the snapshot, taken
    with the messages it covers, which sequencing commits together.

    ``leases``: the first deliveries created for each of those subscriptions are created
    leased (inflight, one attempt counted, as a claim leaves them) and come back with
    their messages, unless the subscription already has deliveries waiting that are due:
    a claim would take those first. (As far as the statement's snapshot shows: older ones
    that another dispatcher's fan-out commits meanwhile may be overtaken, which only an
    unordered subscription, the only kind leased here, allows.)
    """
    from .models import Claimed, Delivery, Message, Subscription, Topic

    connection = connections[using]
    delivery, message, topic = quoted(Delivery), quoted(Message), quoted(Topic)
    subscription, offset = quoted(Subscription), quoted(Message, "offset")
    lazy = f", {LAZY_COMMIT}" if lazily(connection) else ""
    only = "" if subscription_id is None else " AND id = %s"
    at = connection.ops.adapt_datetimefield_value(now)
    params: list[Any] = [topic_id, topic_id]
    params += [] if subscription_id is None else [subscription_id]
    params += [batch]
    moved = (
        f"WITH head AS (SELECT next_offset AS h{lazy} FROM {topic} WHERE id = %s), "
        f"subs AS MATERIALIZED (SELECT id, position AS lo FROM {subscription} "
        f"WHERE topic_id = %s AND active{only} AND position < (SELECT h FROM head) "
        f"ORDER BY id FOR NO KEY UPDATE), "
        f"moved AS (UPDATE {subscription} s SET position = LEAST((SELECT h FROM head), "
        f"subs.lo + %s) FROM subs WHERE s.id = subs.id RETURNING s.id, subs.lo, "
        f"s.position AS hi), "
    )
    columns = (
        f"subscription_id, message_id, {offset}, state, attempts, available_at, errors, "
        f"last_error, created_at, updated_at"
    )
    if not leases:
        sql = (
            f"{moved}created AS (INSERT INTO {delivery} ({columns}) "
            f"SELECT moved.id, m.id, m.{offset}, %s, 0, %s, '[]', '', %s, %s "
            f"FROM moved JOIN {message} m ON m.topic_id = %s AND m.{offset} >= moved.lo "
            f"AND m.{offset} < moved.hi ON CONFLICT DO NOTHING RETURNING 1) "
            f"SELECT (SELECT count(*) FROM created), (SELECT max(hi) FROM moved)"
        )
        params += [Delivery.State.PENDING.value, at, at, at, topic_id]
    else:
        pending, retry = Delivery.State.PENDING.value, Delivery.State.RETRY.value
        # One branch per subscription, each with its own id, and min() rather than EXISTS:
        # planned from statistics, a join with a list of ids or an EXISTS became a scan
        # of all deliveries when those said there were few to look at (the min of the
        # offset index is found by walking it from this subscription's lowest offset).
        wanted = " UNION ALL ".join(
            [
                f"SELECT %s::bigint AS sub, %s::int AS lim, %s::varchar AS token, "
                f"%s::timestamptz AS expires WHERE (SELECT min(d.{offset}) FROM {delivery} d "
                f"WHERE d.subscription_id = %s AND d.{UNFINISHED_SQL} AND d.state IN (%s, %s) "
                f"AND d.available_at <= %s) IS NULL AND {Subscription.not_paused_sql()}"
            ]
            * len(leases)
        )
        sql = (
            f"{moved}wanted AS MATERIALIZED ({wanted}), "
            f"fresh AS (SELECT moved.id AS sub, m.id AS mid, m.{offset} AS o, w.token, "
            f"w.expires, row_number() OVER (PARTITION BY moved.id ORDER BY m.{offset}) "
            f"<= COALESCE(w.lim, 0) AS leased FROM moved JOIN {message} m "
            f"ON m.topic_id = %s AND m.{offset} >= moved.lo AND m.{offset} < moved.hi "
            f"LEFT JOIN wanted w ON w.sub = moved.id), "
            f"created AS (INSERT INTO {delivery} ({columns}, lease_token, lease_expires_at, "
            f"dispatcher_id) SELECT sub, mid, o, CASE WHEN leased THEN %s ELSE %s END, "
            f"leased::int, %s, '[]', '', %s, %s, CASE WHEN leased THEN token END, "
            f"CASE WHEN leased THEN expires END, CASE WHEN leased THEN %s::bigint END "
            f"FROM fresh ON CONFLICT DO NOTHING "
            f"RETURNING id, subscription_id, message_id, attempts, lease_token IS NOT NULL "
            f"AS leased), "
            f"totals AS (SELECT (SELECT count(*) FROM created) AS n, "
            f"(SELECT max(hi) FROM moved) AS position) "
            # The messages of the leased deliveries are read one by primary key each (LIMIT
            # 1 keeps the planner from joining them with the whole log, which a generic plan
            # sized for a batch chose: a scan of a million messages of history per fan-out).
            f"SELECT totals.n, totals.position, c.subscription_id, c.id, c.attempts, m.* "
            f"FROM totals LEFT JOIN (created c CROSS JOIN LATERAL (SELECT m.id, m.{offset}, "
            f"m.payload::text, m.payload_bytes, m.key, m.headers::text, m.published_at "
            f"FROM {message} m WHERE m.id = c.message_id LIMIT 1) m) ON c.leased"
        )
        for lease in leases:
            expires = connection.ops.adapt_datetimefield_value(lease.expires)
            params += [lease.subscription_id, lease.limit, lease.token, expires]
            params += [lease.subscription_id, pending, retry, at, lease.subscription_id]
        params += [
            topic_id,
            Delivery.State.INFLIGHT.value,
            pending,
            at,
            at,
            at,
            dispatcher_id,
        ]
    with connection.wrap_database_errors, bound_cursor(connection) as cursor:
        cursor.execute(sql, params)
        rows = cursor.fetchall()
    created, position = rows[0][:2]
    leased: dict[int, list[Claimed]] = {}
    for row in rows if leases else ():
        if row[2] is not None:  # None: nothing leased (the one row of the totals)
            leased.setdefault(row[2], []).append(Claimed.from_row(row[3:]))
    for claimed in leased.values():
        claimed.sort(key=lambda row: row.offset)
    return FanOut(int(created), leased), position
