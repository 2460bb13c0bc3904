"""python manage.py pubsub_retire NAME [NAME ...] [--yes]: delete subscriptions no longer
declared in code, with their deliveries, for good."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from django_pubsub import retention
from django_pubsub.exceptions import ActionRefused
from django_pubsub.models import Subscription


class Command(BaseCommand):
    help = (
        "Retire subscriptions no longer declared in code: delete them and every delivery of "
        "them; the messages only they kept are then pruned by retention."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("names", nargs="+", help="subscription names")
        parser.add_argument("--yes", action="store_true", help="do not ask for confirmation")

    def handle(self, *args: Any, **options: Any) -> None:
        names: list[str] = options["names"]
        found = {sub.name: sub for sub in Subscription.objects.filter(name__in=names)}
        unknown = [name for name in names if name not in found]
        if unknown:
            raise CommandError(f"No such subscription: {', '.join(unknown)}.")
        for name in names:
            gone = retention.retiring(found[name])
            self.stdout.write(
                f"{name} (topic {found[name].topic}): {gone.deliveries:,} deliveries go with "
                f"it ({gone.unfinished:,} of them never finished), and {gone.messages:,} "
                f"messages only it keeps become prunable."
            )
        if not options["yes"]:
            answer = input("Retire them for good? Nothing brings them back. Type 'yes': ")
            if answer.strip().lower() != "yes":
                raise CommandError("Nothing retired.")
        for name in names:
            try:
                retention.retire(found[name])
            except ActionRefused as refused:
                raise CommandError(str(refused)) from None
            self.stdout.write(f"Retired {name}.")
