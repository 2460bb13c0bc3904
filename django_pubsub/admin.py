"""The admin: the dispatcher owns these rows, so nothing is edited in a form. An operator
acts on them through actions, each a model method, each recorded in the admin log, each
needing the model's change permission (viewing needs the view permission)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from datetime import datetime
from typing import Any

from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.contrib.admin.models import CHANGE, LogEntry
from django.contrib.auth import get_permission_codename
from django.db import transaction
from django.db.models import Count, Q, QuerySet
from django.http import HttpRequest
from django.template.response import TemplateResponse
from django.urls import URLPattern, path
from django.utils import timezone
from django.utils.html import format_html, format_html_join

from .conf import pubsub_settings
from .exceptions import ActionRefused, InvalidSeek
from .forms import SeekForm
from .models import Delivery, Dispatcher, Message, Subscription, Topic


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
        hold: Callable[[Any, datetime], AbstractContextManager[None]] | None = None,
    ) -> None:
        """Run ``change`` on ``targets`` (the selected rows it applies to), log each row it
        changed, and tell the operator how many.

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
                        changed = list(rows.filter(updated_at=now))
                        if changed:
                            LogEntry.objects.log_actions(
                                _user_id(request), changed, CHANGE, change_message=done
                            )
                    count += len(changed)
        except ActionRefused as refused:
            self.message_user(request, str(refused), messages.ERROR)
            return
        level = messages.SUCCESS if count else messages.WARNING
        self.message_user(request, f"{done}: {count} of {len(ids)} selected.", level)

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


def _user_id(request: HttpRequest) -> int:
    user_id = request.user.pk
    assert user_id is not None  # actions need a logged-in user with permissions
    return int(user_id)


@admin.register(Topic)
class TopicAdmin(ReadOnlyAdmin):
    list_display = ["name", "sequenced", "subscribers", "created_at"]
    search_fields = ["name"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Topic]:
        active = Count("subscriptions", filter=Q(subscriptions__active=True))
        topics: QuerySet[Topic] = super().get_queryset(request)
        return topics.annotate(subscribers=active)

    @admin.display(description="messages sequenced", ordering="next_offset")
    def sequenced(self, obj: Topic) -> int:
        return obj.next_offset

    @admin.display(description="active subscriptions", ordering="subscribers")
    def subscribers(self, obj: Any) -> int:
        return int(obj.subscribers)

    def get_urls(self) -> list[URLPattern]:
        from .dashboard import dashboard

        view = self.admin_site.admin_view(dashboard)
        return [path("dashboard/", view, name="django_pubsub_dashboard"), *super().get_urls()]


@admin.register(Message)
class MessageAdmin(ReadOnlyAdmin):
    list_display = ["id", "topic", "offset", "key", "published_at"]
    list_filter = ["topic"]
    search_fields = ["=id", "key"]
    list_select_related = ["topic"]
    exclude = ["payload", "payload_bytes"]
    readonly_fields = ["pretty_payload"]

    @admin.display(description="payload")
    def pretty_payload(self, obj: Message) -> str:
        return _pretty_payload(obj)


def _pretty_payload(message: Message) -> str:
    if message.payload_bytes is not None:
        return f"{len(message.payload_bytes)} bytes"
    return format_html("<pre>{}</pre>", json.dumps(message.payload, indent=2, sort_keys=True))


@admin.register(Subscription)
class SubscriptionAdmin(ActionsAdmin):
    list_display = ["name", "topic", "handler", "ordered", "active", "paused", "position"]
    list_filter = ["active", "paused", "topic"]
    search_fields = ["name", "handler"]
    actions = ["pause", "resume", "replay_dead", "seek"]

    @admin.action(description="Pause: claim nothing more of it", permissions=["change"])
    def pause(self, request: HttpRequest, queryset: QuerySet[Subscription]) -> None:
        # Paused ones too: one held by a seek or replay then stays paused when it ends.
        self.act(request, queryset, _each(Subscription.pause), "Paused")

    @admin.action(description="Resume", permissions=["change"])
    def resume(self, request: HttpRequest, queryset: QuerySet[Subscription]) -> None:
        self.act(request, queryset.filter(paused=True), _each(Subscription.resume), "Resumed")

    @admin.action(description="Replay all dead letters", permissions=["change_deliveries"])
    def replay_dead(self, request: HttpRequest, queryset: QuerySet[Subscription]) -> None:
        dead = Delivery.objects.filter(subscription__in=queryset, state=Delivery.State.DEAD)
        self.act(request, dead, _replay, "Replayed", hold=_holding_replay)

    @admin.action(
        description="Seek to an offset or a time (deliver again from there)",
        permissions=["change_deliveries"],
    )
    def seek(
        self, request: HttpRequest, queryset: QuerySet[Subscription]
    ) -> TemplateResponse | None:
        form = SeekForm(request.POST if "apply" in request.POST else None)
        if not form.is_valid():  # an unbound form is not valid: the first visit
            context = {
                **self.admin_site.each_context(request),
                "title": "Seek subscriptions",
                "opts": self.model._meta,
                "form": form,
                "subscriptions": queryset.select_related("topic"),
                "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
            }
            return TemplateResponse(request, "admin/django_pubsub/subscription/seek.html", context)
        target = {"offset": form.cleaned_data["offset"], "at": form.cleaned_data["at"]}
        for sub in queryset.order_by("pk"):
            try:
                done = sub.seek(**target)
            except (ActionRefused, InvalidSeek) as refused:
                self.message_user(request, f"{sub}: {refused}", messages.ERROR)
                continue
            what = (
                f"Sought to offset {done.offset}: {done.replayed} delivery(ies) to run again, "
                f"{done.skipped} waiting one(s) discarded, {done.passed_over} message(s) "
                f"passed over"
            )
            LogEntry.objects.log_actions(_user_id(request), [sub], CHANGE, change_message=what)
            self.message_user(request, f"{sub}: {what}.", messages.SUCCESS)
        return None


def _replay(rows: QuerySet[Delivery], now: datetime) -> int:
    return rows.replay(now)  # type: ignore[attr-defined,no-any-return]


def _discard(rows: QuerySet[Delivery], now: datetime) -> int:
    return rows.discard(now)  # type: ignore[attr-defined,no-any-return]


def _holding_replay(rows: Any, now: datetime) -> AbstractContextManager[None]:
    return rows.holding("replay", now, size=_transaction_rows())  # type: ignore[no-any-return]


def _holding_discard(rows: Any, now: datetime) -> AbstractContextManager[None]:
    waiting = rows.filter(state__in=Delivery.WAITING)  # what a claim could take meanwhile
    held = waiting.holding(
        "discard", now, refuse=False, every=True, beside=rows, size=_transaction_rows()
    )
    return held  # type: ignore[no-any-return]


def _transaction_rows() -> int:
    """Most rows an action changes in one transaction: its slice, or a batch of the model
    method it calls."""
    return min(ACT_SLICE, pubsub_settings.batch_size)


def _each(
    method: Callable[[Subscription, datetime], bool],
) -> Callable[[QuerySet[Subscription], datetime], int]:
    # In id order, as the fan-out and every hold lock them: another order deadlocks.
    return lambda rows, now: sum(method(row, now) for row in rows.order_by("pk"))


@admin.register(Delivery)
class DeliveryAdmin(ActionsAdmin):
    list_display = [
        "id",
        "subscription",
        "message_id",
        "offset",
        "state",
        "attempts",
        "available_at",
        "lease_expires_at",
    ]
    list_filter = ["state", "subscription", "subscription__topic"]
    search_fields = ["=message__id", "message__key"]
    list_select_related = ["subscription"]
    fields = [
        "why",
        "subscription",
        "message",
        "offset",
        "state",
        "attempts",
        "available_at",
        "dispatcher",
        "lease_token",
        "lease_expires_at",
        "message_payload",
        "message_headers",
        "error_history",
        "created_at",
        "updated_at",
        "finished_at",
    ]
    readonly_fields = ["why", "message_payload", "message_headers", "error_history"]
    actions = ["retry_now", "replay", "discard"]

    @admin.display(description="why")
    def why(self, obj: Delivery) -> str:
        return obj.why(timezone.now())

    @admin.display(description="payload")
    def message_payload(self, obj: Delivery) -> str:
        return _pretty_payload(obj.message)

    @admin.display(description="headers")
    def message_headers(self, obj: Delivery) -> str:
        return format_html("<pre>{}</pre>", json.dumps(obj.message.headers, indent=2))

    @admin.action(description="Retry now (those waiting for a retry)", permissions=["change"])
    def retry_now(self, request: HttpRequest, queryset: QuerySet[Delivery]) -> None:
        retrying = queryset.filter(state=Delivery.State.RETRY)
        self.act(request, retrying, lambda rows, now: rows.retry_now(now), "Due now")

    @admin.action(description="Replay (dead letters)", permissions=["change"])
    def replay(self, request: HttpRequest, queryset: QuerySet[Delivery]) -> None:
        dead = queryset.filter(state=Delivery.State.DEAD)
        self.act(request, dead, _replay, "Replayed", hold=_holding_replay)

    @admin.action(
        description="Discard (pending, retry or dead): do not run them", permissions=["change"]
    )
    def discard(self, request: HttpRequest, queryset: QuerySet[Delivery]) -> None:
        waiting = queryset.filter(state__in=[*Delivery.WAITING, Delivery.State.DEAD])
        self.act(request, waiting, _discard, "Discarded", hold=_holding_discard)

    @admin.display(description="attempts that failed")
    def error_history(self, obj: Delivery) -> str:
        if not obj.errors:
            return "none"
        return format_html_join(
            "",
            "<p><b>attempt {} at {}</b>: {}</p><pre>{}</pre>",
            (
                (e.get("attempt"), e.get("at"), e.get("error"), e.get("traceback") or "")
                for e in obj.errors
            ),
        )


@admin.register(Dispatcher)
class DispatcherAdmin(ReadOnlyAdmin):
    list_display = [
        "id",
        "hostname",
        "pid",
        "started_at",
        "last_seen",
        "stopped_at",
        "inflight",
        "stuck",
    ]
    list_filter = ["hostname"]
