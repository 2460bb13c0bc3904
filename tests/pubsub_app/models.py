from __future__ import annotations

from django.db import models


class HandlerRun(models.Model):
    """One handler start, written by the handler itself as it begins (ids give start order)."""

    subscription = models.CharField(max_length=200)
    message_id = models.BigIntegerField()
    offset = models.BigIntegerField()
    attempt = models.PositiveIntegerField()
    pid = models.PositiveIntegerField()
    payload = models.JSONField(null=True)
    # time.time() when the handler began and ended, for payloads with "span": true (to
    # check that runs which must not overlap did not).
    started = models.FloatField(null=True)
    ended = models.FloatField(null=True)

    def __str__(self) -> str:
        return f"{self.subscription} offset {self.offset} attempt {self.attempt}"
