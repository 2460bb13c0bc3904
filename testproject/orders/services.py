"""How the example app publishes: in the same transaction as the order itself."""

from __future__ import annotations

from django.db import transaction

from django_pubsub import publish

from .models import Order


def place_order(customer: str, total_cents: int) -> Order:
    with transaction.atomic():
        order = Order.objects.create(customer=customer, total_cents=total_cents)
        # Rolled back with the order if anything below fails; delivered if it commits.
        publish(
            "orders.created",
            {"order_id": order.pk, "customer": customer, "total_cents": total_cents},
            key=f"customer-{customer}",
            headers={"source": "shop"},
        )
    return order
