from __future__ import annotations

from django.db import models


class Order(models.Model):
    customer = models.CharField(max_length=100)
    total_cents = models.PositiveIntegerField()
    charged = models.BooleanField(default=False)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"order {self.pk} for {self.customer}"


class AuditEntry(models.Model):
    """Written by the ordered audit subscriber: its ids follow the topic's offsets."""

    order_id = models.BigIntegerField()
    offset = models.BigIntegerField()
    recorded_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"order {self.order_id} at offset {self.offset}"
