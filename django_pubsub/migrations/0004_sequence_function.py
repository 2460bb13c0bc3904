"""PostgreSQL only: sequencing as a server-side function.

A dispatcher sequences on the way from every commit to its handler. As one function call
it is one round trip for all topics, and PostgreSQL keeps the plans of the statements
inside it for the life of the connection, where a query string would be parsed and planned
on every call. On other databases this migration does nothing: they sequence with plain
statements (models.Topic.sequence).
"""

from __future__ import annotations

from typing import Any

from django.db import migrations

# Each statement of a VOLATILE function takes a fresh snapshot (READ COMMITTED): the UPDATE
# that assigns offsets starts after the topic's row lock is granted, so it sees every
# message committed before that and the offsets any sequencer before it assigned. Topics
# are locked in id order, as every sequencer locks them: two cannot deadlock.
CREATE = """
CREATE OR REPLACE FUNCTION django_pubsub_sequence(batch integer, lazy boolean, only_topic bigint)
RETURNS TABLE (topic_id bigint, sequenced bigint)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    topics bigint[];
    topic bigint;
    base bigint;
    n bigint;
BEGIN
    IF lazy THEN
        PERFORM set_config('synchronous_commit', 'off', true);
    END IF;
    IF only_topic IS NOT NULL THEN
        -- Locked even with nothing to sequence: the caller (a new subscription that starts
        -- at "latest") reads next_offset after it, so no sequencer may be half way.
        topics := ARRAY[only_topic];
    ELSE
        topics := ARRAY(
            SELECT DISTINCT m.topic_id FROM django_pubsub_message m
            WHERE m."offset" IS NULL ORDER BY 1
        );
    END IF;
    FOREACH topic IN ARRAY topics LOOP
        SELECT t.next_offset INTO base FROM django_pubsub_topic t
        WHERE t.id = topic FOR NO KEY UPDATE;
        IF NOT FOUND THEN
            CONTINUE;  -- its topic row is gone: nothing to number its messages from
        END IF;
        WITH s AS (
            SELECT m.id, row_number() OVER (ORDER BY m.id) AS rn FROM django_pubsub_message m
            WHERE m.topic_id = topic AND m."offset" IS NULL ORDER BY m.id LIMIT batch
        )
        UPDATE django_pubsub_message m SET "offset" = base + s.rn - 1 FROM s WHERE m.id = s.id;
        GET DIAGNOSTICS n = ROW_COUNT;
        IF n > 0 THEN
            UPDATE django_pubsub_topic t SET next_offset = base + n WHERE t.id = topic;
            topic_id := topic;
            sequenced := n;
            RETURN NEXT;
        END IF;
    END LOOP;
END
$$
"""
DROP = "DROP FUNCTION IF EXISTS django_pubsub_sequence(integer, boolean, bigint)"


def create(apps: Any, schema_editor: Any) -> None:
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(CREATE)


def drop(apps: Any, schema_editor: Any) -> None:
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(DROP)


class Migration(migrations.Migration):
    dependencies = [
        ("django_pubsub", "0003_fewer_delivery_indexes"),
    ]

    operations = [migrations.RunPython(create, drop, elidable=False)]
