"""The message's topic loses its own index: the unique (topic, offset) index starts with
the topic and serves the same lookups, and every publish and sequencing wrote both.

Only PostgreSQL has that index (on SQLite migration 0005 rebuilt the table without it), so
the database side is one DROP INDEX IF EXISTS, not AlterField's table rebuild on SQLite.
"""

import django.db.models.deletion
from django.db import migrations, models

INDEX = "django_pubsub_message_topic_id_9f9a78d9"


class Migration(migrations.Migration):
    dependencies = [
        ("django_pubsub", "0007_paused_db_default"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.AlterField(
                    model_name="message",
                    name="topic",
                    field=models.ForeignKey(
                        db_constraint=False,
                        db_index=False,
                        on_delete=django.db.models.deletion.PROTECT,
                        related_name="messages",
                        to="django_pubsub.topic",
                    ),
                ),
            ],
            database_operations=[
                migrations.RunSQL(
                    f'DROP INDEX IF EXISTS "{INDEX}"',
                    f'CREATE INDEX IF NOT EXISTS "{INDEX}" ON "django_pubsub_message" ("topic_id")',
                ),
            ],
        ),
    ]
