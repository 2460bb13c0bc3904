"""python manage.py pubsub_stats [--json]: figures per topic and subscription."""

from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandParser
from django.core.serializers.json import DjangoJSONEncoder

from django_pubsub import stats


class Command(BaseCommand):
    help = "Print published, delivered, failed and dead-lettered counts, queues and lag."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--json", action="store_true", help="one JSON document instead")

    def handle(self, *args: Any, **options: Any) -> None:
        figures = stats.collect()
        if options["json"]:
            self.stdout.write(json.dumps(figures.as_json(), cls=DjangoJSONEncoder, indent=2))
            return
        self.stdout.write(stats.as_table(figures))
