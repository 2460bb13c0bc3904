"""The statements that prune: ended deliveries and the messages nothing needs any more, a
window at a time, each statement its own short transaction. They read the same on
PostgreSQL and SQLite; the backends add how one process at a time holds the pruning.

Each DELETE names its conditions in its own WHERE (no IN-subquery of ids): PostgreSQL
re-checks them on a row another transaction changed meanwhile (an operator's seek running
an acked delivery again), so a row that no longer qualifies is left alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .base import DELIVERY, MESSAGE, OFFSET, SUBSCRIPTION, TOPIC

# The ended states retention removes.
KINDS = ("acked", "discarded", "dead", "expired", "filtered")


def ended_before(cutoffs: Mapping[str, Any]) -> tuple[str, list[Any]]:
    """SQL true for a delivery ended (in one of KINDS) before its kind's cutoff (adapted
    datetimes, as every datetime parameter here); kinds kept for ever (None) are left
    out. ("1 = 0" when every kind is kept.)"""
    parts, params = [], []
    for kind in KINDS:
        cutoff = cutoffs.get(kind)
        if cutoff is not None:
            parts.append("(state = %s AND finished_at < %s)")
            params += [kind, cutoff]
    return (f"({' OR '.join(parts)})" if parts else "1 = 0"), params


def delivery_window(
    cursor: Any, subscription_id: int, low: int, size: int, before: Any
) -> tuple[bool, int | None]:
    """The window of a subscription's deliveries from message id ``low``: whether its first
    one was created before ``before`` (an adapted datetime; False too when there is none
    from there on: nothing created later can have ended before it), and the message id
    after its ``size``-th (None: the window reaches the end). Through the unique
    (subscription, message) index."""
    base = f"SELECT {{}} FROM {DELIVERY} WHERE subscription_id = %s AND message_id >= %s"
    cursor.execute(
        base.format("CASE WHEN created_at < %s THEN 1 ELSE 0 END") + " ORDER BY message_id LIMIT 1",
        [before, subscription_id, low],
    )
    first = cursor.fetchone()
    if first is None or not first[0]:
        return False, None
    cursor.execute(
        base.format("message_id") + " ORDER BY message_id LIMIT 1 OFFSET %s",
        [subscription_id, low, size],
    )
    after = cursor.fetchone()
    return True, (None if after is None else int(after[0]))


def lowest_message_id(cursor: Any, subscription_id: int) -> int | None:
    cursor.execute(
        f"SELECT MIN(message_id) FROM {DELIVERY} WHERE subscription_id = %s", [subscription_id]
    )
    row = cursor.fetchone()
    return None if row is None or row[0] is None else int(row[0])


def delete_deliveries(
    cursor: Any,
    subscription_id: int,
    low: int,
    high: int | None,
    cutoffs: Mapping[str, Any],
    *,
    dry_run: bool,
) -> dict[str, int]:
    """Remove (or count) the subscription's deliveries of message ids [low, high) that
    ended before their kind's cutoff; how many of each kind."""
    ended, ended_params = ended_before(cutoffs)
    where = "subscription_id = %s AND message_id >= %s"
    params: list[Any] = [subscription_id, low]
    if high is not None:
        where += " AND message_id < %s"
        params.append(high)
    where += f" AND {ended}"
    params += ended_params
    if dry_run:
        cursor.execute(
            f"SELECT state, COUNT(*) FROM {DELIVERY} WHERE {where} GROUP BY state", params
        )
        return {state: int(n) for state, n in cursor.fetchall()}
    cursor.execute(f"DELETE FROM {DELIVERY} WHERE {where} RETURNING state", params)
    counts: dict[str, int] = {}
    for (state,) in cursor.fetchall():
        counts[state] = counts.get(state, 0) + 1
    return counts


def message_bounds(cursor: Any, topic_id: int) -> tuple[int | None, int]:
    """The topic's lowest sequenced offset still stored (None: none), and the offset below
    which every subscription of the topic, inactive and paused ones included, has fanned
    its messages out (the topic's end when it has no subscription)."""
    cursor.execute(
        f"SELECT MIN({OFFSET}) FROM {MESSAGE} WHERE topic_id = %s AND {OFFSET} IS NOT NULL",
        [topic_id],
    )
    low = cursor.fetchone()[0]
    cursor.execute(
        f"SELECT COALESCE((SELECT MIN(position) FROM {SUBSCRIPTION} WHERE topic_id = %s), "
        f"(SELECT next_offset FROM {TOPIC} WHERE id = %s))",
        [topic_id, topic_id],
    )
    return (None if low is None else int(low)), int(cursor.fetchone()[0])


def published_before(cursor: Any, topic_id: int, low: int, before: Any) -> bool:
    """Whether the topic's first stored message from offset ``low`` was published before
    ``before`` (an adapted datetime); False when there is none."""
    cursor.execute(
        f"SELECT CASE WHEN published_at < %s THEN 1 ELSE 0 END FROM {MESSAGE} "
        f"WHERE topic_id = %s AND {OFFSET} >= %s ORDER BY {OFFSET} LIMIT 1",
        [before, topic_id, low],
    )
    row = cursor.fetchone()
    return bool(row and row[0])


def delete_messages(
    cursor: Any,
    topic_id: int,
    low: int,
    high: int,
    cutoff: Any,
    delivery_cutoffs: Mapping[str, Any],
    *,
    dry_run: bool,
) -> int:
    """Remove (or count) the topic's messages of offsets [low, high) published before
    ``cutoff`` that every subscription has fanned out (read again in the statement: a
    seek may have moved one back) and that no delivery refers to, unless a subscription
    of the topic is paused. A dry run counts the deliveries this prune would remove as
    gone."""
    # Not while a subscription of the topic is paused: an operator's seek holds it so while
    # it creates deliveries of old messages, which this statement's snapshot may not see.
    where = (
        f"topic_id = %s AND {OFFSET} >= %s AND {OFFSET} < %s AND published_at < %s "
        f"AND {OFFSET} < COALESCE((SELECT MIN(position) FROM {SUBSCRIPTION} "
        f"WHERE topic_id = %s), %s) "
        f"AND NOT EXISTS (SELECT 1 FROM {SUBSCRIPTION} WHERE topic_id = %s AND paused) "
    )
    params: list[Any] = [topic_id, low, high, cutoff, topic_id, high, topic_id]
    referred = f"SELECT 1 FROM {DELIVERY} d WHERE d.message_id = {MESSAGE}.id"
    if dry_run:
        ended, ended_params = ended_before(delivery_cutoffs)
        where += f"AND NOT EXISTS ({referred} AND NOT {ended})"
        cursor.execute(f"SELECT COUNT(*) FROM {MESSAGE} WHERE {where}", [*params, *ended_params])
        return int(cursor.fetchone()[0])
    cursor.execute(f"DELETE FROM {MESSAGE} WHERE {where}AND NOT EXISTS ({referred})", params)
    return int(cursor.rowcount)


def held_only_by(cursor: Any, subscription_id: int, topic_id: int) -> int:
    """How many of the topic's messages only this subscription still keeps: it has not
    fanned them out, or has a delivery of them, while every other subscription is past
    them and has none. Retiring it lets retention prune them."""
    others = f"FROM {SUBSCRIPTION} WHERE topic_id = %s AND id <> %s"
    mine = f"SELECT 1 FROM {DELIVERY} d WHERE d.message_id = {MESSAGE}.id"
    cursor.execute(
        f"SELECT COUNT(*) FROM {MESSAGE} WHERE topic_id = %s AND {OFFSET} IS NOT NULL "
        f"AND {OFFSET} < COALESCE((SELECT MIN(position) {others}), "
        f"(SELECT next_offset FROM {TOPIC} WHERE id = %s)) "
        f"AND NOT EXISTS ({mine} AND d.subscription_id <> %s) "
        f"AND ({OFFSET} >= (SELECT position FROM {SUBSCRIPTION} WHERE id = %s) "
        f"OR EXISTS ({mine} AND d.subscription_id = %s))",
        [topic_id, topic_id, subscription_id, topic_id, subscription_id, subscription_id,
         subscription_id],
    )  # fmt: skip
    return int(cursor.fetchone()[0])


def delete_some_deliveries(cursor: Any, subscription_id: int, size: int) -> int:
    """Remove up to ``size`` of a (retired) subscription's deliveries; how many."""
    cursor.execute(
        f"DELETE FROM {DELIVERY} WHERE id IN (SELECT id FROM {DELIVERY} "
        f"WHERE subscription_id = %s LIMIT %s)",
        [subscription_id, size],
    )
    return int(cursor.rowcount)
