"""The admin's actions: read-only model admins, and the one way every action changes
rows (in slices, logged, reported to the operator)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from datetime import datetime
from typing import Any

from django.contrib import admin, messages
from django.contrib.admin.models import CHANGE, LogEntry
from django.contrib.auth import get_permission_codename
from django.db import transaction
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils import timezone

from .conf import pubsub_settings
from .exceptions import ActionRefused
from .models import Delivery, Subscription


class ReadOnlyAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class ActionsAdmin(ReadOnlyAdmin):
    """Read-only rows, with actions for those who may change them."""

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # Without an object Django asks whether actions may run; with one, whether a form
        # may save. Actions: with the change permission. Forms: never.
        return obj is None and super(ReadOnlyAdmin, self).has_change_permission(request)

    def act(
        self,
        request: HttpRequest,
        targets: QuerySet[Any],
        change: Callable[[Any, datetime], int],
        done: str,
        *,
        selected: int,
        noun: tuple[str, str],
        skipped: str,
        hold: Callable[[Any, datetime], AbstractContextManager[None]] | None = None,
    ) -> None:
        """Run ``change`` on ``targets`` (the selected rows it applies to), log each row it
        changed, and tell the operator how many of the ``selected`` (``noun``: singular,
        plural) it changed, and why it skipped the others (``skipped``; a row may also have
        changed meanwhile).

        It works in slices of ids, each in a transaction of its own with its log entries:
        below SQLite's limit of parameters a statement however many rows were selected,
        and holding up no dispatcher for longer than a slice. A row it changed carries the
        action's time in ``updated_at`` (and stays locked until its slice commits): that is
        how the log knows which rows it changed, and not those a dispatcher moved on
        meanwhile. ``hold`` (deliveries only): what holds their subscriptions for the
        length of the action (DeliveryQuerySet.holding), where a claim between two slices
        would run part of its work before the rest is done.
        """
        now = timezone.now()
        ids = list(targets.order_by("pk").values_list("pk", flat=True))
        count = 0
        try:
            with hold(targets, now) if hold else nullcontext():
                for part in _slices(ids, ACT_SLICE):
                    with transaction.atomic():
                        rows = targets.model.objects.filter(pk__in=part)
                        change(rows, now)
                        changed = list(_named(rows.filter(updated_at=now)))
                        if changed:
                            LogEntry.objects.log_actions(
                                user_id(request), changed, CHANGE, change_message=done
                            )
                    count += len(changed)
        except ActionRefused as refused:
            self.message_user(request, str(refused), messages.ERROR)
            return
        level = messages.SUCCESS if count else messages.WARNING
        self.message_user(request, report(done, count, selected, noun, skipped), level)

    def has_change_deliveries_permission(self, request: HttpRequest) -> bool:
        """For actions that change deliveries from another model's page."""
        return self.has_change_permission(request) and request.user.has_perm(
            f"{Delivery._meta.app_label}.{get_permission_codename('change', Delivery._meta)}"
        )


# Rows changed a transaction: below SQLite's 32,766 parameters a statement, and small
# enough to log and to hold no dispatcher up for long.
ACT_SLICE = 10_000


def _slices(rows: list[int], size: int) -> Iterator[list[int]]:
    return (rows[i : i + size] for i in range(0, len(rows), size))


def user_id(request: HttpRequest) -> int:
    user_id = request.user.pk
    assert user_id is not None  # actions need a logged-in user with permissions
    return int(user_id)


def replay(rows: QuerySet[Delivery], now: datetime) -> int:
    return rows.replay(now)  # type: ignore[attr-defined,no-any-return]


def discard(rows: QuerySet[Delivery], now: datetime) -> int:
    return rows.discard(now)  # type: ignore[attr-defined,no-any-return]


def holding_replay(rows: Any, now: datetime) -> AbstractContextManager[None]:
    return rows.holding("replay", now, size=_transaction_rows())  # type: ignore[no-any-return]


def holding_discard(rows: Any, now: datetime) -> AbstractContextManager[None]:
    waiting = rows.filter(state__in=Delivery.WAITING)  # what a claim could take meanwhile
    held = waiting.holding(
        "discard", now, refuse=False, every=True, beside=rows, size=_transaction_rows()
    )
    return held  # type: ignore[no-any-return]


def _transaction_rows() -> int:
    """Most rows an action changes in one transaction: its slice, or a batch of the model
    method it calls."""
    return min(ACT_SLICE, pubsub_settings.batch_size)


def report(done: str, changed: int, selected: int, noun: tuple[str, str], skipped: str) -> str:
    """What an action tells the operator: "Discarded 3 of 5 selected deliveries. 2
    skipped: ..." """
    text = f"{done} {changed} of {selected} selected {noun[0] if selected == 1 else noun[1]}."
    if selected > changed:
        text += f" {selected - changed} skipped: {skipped}, or changed meanwhile."
    return text


def _named(rows: QuerySet[Any]) -> QuerySet[Any]:
    """Rows with what their names (the log's and the titles') are made of."""
    if rows.model is Delivery:
        return rows.select_related("subscription__topic")
    if rows.model is Subscription:
        return rows.select_related("topic")
    return rows


def each(
    method: Callable[[Subscription, datetime], bool],
) -> Callable[[QuerySet[Subscription], datetime], int]:
    # In id order, as the fan-out and every hold lock them: another order deadlocks.
    return lambda rows, now: sum(method(row, now) for row in rows.order_by("pk"))
