"""python manage.py pubsub_prune [--dry-run]: remove what retention lets go, and say what."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DEFAULT_DB_ALIAS, connections

from django_pubsub import retention

KINDS = ("acked", "discarded", "dead", "expired", "filtered", "messages")


class Command(BaseCommand):
    help = (
        "Remove ended deliveries and messages older than PUBSUB['RETENTION'], never what a "
        "subscription has not finished; print what was removed per topic and kind."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--dry-run", action="store_true", help="count what would go; remove nothing"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if connections[DEFAULT_DB_ALIAS].in_atomic_block:
            raise CommandError("pubsub_prune works in short transactions of its own: run it "
                               "outside a transaction.")  # fmt: skip
        dry = options["dry_run"]
        if dry:
            pruned = retention.prune(dry_run=True)
        else:
            with retention.exclusive() as held:
                if not held:
                    raise CommandError(
                        "another process (a runpubsub, or this command) is pruning now; "
                        "nothing was removed. Try again once it is done."
                    )
                pruned = retention.prune()
        verb = "would remove" if dry else "removed"
        if not pruned.total:
            self.stdout.write(f"Nothing to prune: {verb} 0 rows.")
            return
        topics = sorted({topic for topic, _ in pruned.rows})
        width = max(len("topic"), *(len(topic) for topic in topics))
        self.stdout.write(f"{'topic':<{width}}  " + "  ".join(f"{k:>9}" for k in KINDS))
        for topic in topics:
            counts = "  ".join(f"{pruned.rows.get((topic, kind), 0):>9,}" for kind in KINDS)
            self.stdout.write(f"{topic:<{width}}  {counts}")
        kinds = pruned.by_kind()
        summary = ", ".join(f"{kinds.get(kind, 0):,} {kind}" for kind in KINDS)
        self.stdout.write(f"{verb.capitalize()} {pruned.total:,} rows: {summary}.")
