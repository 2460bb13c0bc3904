"""python manage.py demo: migrate, place some orders, deliver them, show what happened."""

from __future__ import annotations

from typing import Any

from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandParser
from django.db.models import Count, Q

from django_pubsub.models import Delivery

from ...models import AuditEntry
from ...services import place_order

CUSTOMERS = ["ada@example.com", "grace@example.com", "linus@example.com", "nobody@invalid"]


class Command(BaseCommand):
    help = "Run the django-pubsub demo: publish orders and deliver them until idle."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--orders", type=int, default=12, help="How many orders to place.")

    def handle(self, *args: Any, **options: Any) -> None:
        call_command("migrate", verbosity=0)
        orders = [
            place_order(CUSTOMERS[n % len(CUSTOMERS)], 1000 + n) for n in range(options["orders"])
        ]
        self.stdout.write(f"Published {len(orders)} orders.created messages.\n")
        self.stdout.write(
            "Running the dispatcher until idle (retries back off for a few seconds)..."
        )
        # Long enough for the flaky handler's retries: 0.2 s, then 0.4 s (PUBSUB BACKOFF).
        call_command("runpubsub", until_idle=True, idle_wait=2.0, verbosity=0)

        ids = [order.pk for order in orders]
        deliveries = Delivery.objects.filter(message__payload__order_id__in=ids)
        rows = (
            deliveries.values("subscription__name")
            .annotate(
                delivered=Count("id", filter=Q(state=Delivery.State.ACKED)),
                retried=Count("id", filter=Q(state=Delivery.State.ACKED, attempts__gt=1)),
                dead=Count("id", filter=Q(state=Delivery.State.DEAD)),
                waiting=Count("id", filter=Q(state__in=Delivery.UNFINISHED)),
            )
            .order_by("subscription__name")
        )
        self.stdout.write("")
        self.stdout.write(
            f"{'subscription':<22}{'delivered':>10}{'retried':>9}{'dead':>6}{'waiting':>9}"
        )
        for row in rows:
            self.stdout.write(
                f"{row['subscription__name']:<22}{row['delivered']:>10}{row['retried']:>9}"
                f"{row['dead']:>6}{row['waiting']:>9}"
            )
        for dead in deliveries.filter(state=Delivery.State.DEAD).select_related("subscription"):
            self.stdout.write(
                f"dead letter: delivery {dead.pk} ({dead.subscription.name}) after "
                f"{dead.attempts} attempts: {dead.last_error}"
            )
        audited = list(
            AuditEntry.objects.filter(order_id__in=ids)
            .order_by("id")
            .values_list("offset", flat=True)
        )
        in_order = audited == sorted(audited)
        self.stdout.write(
            f"audit.log (ordered) recorded {len(audited)} orders, in offset order: {in_order}"
        )
        self.stdout.write(
            "Browse them: python manage.py createsuperuser; python manage.py runserver; /admin/"
        )
