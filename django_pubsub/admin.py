"""The admin: the dispatcher owns these rows, so nothing is edited in a form. An operator
acts on them through actions, each a model method, each recorded in the admin log, each
needing the model's change permission (viewing needs the view permission)."""

from __future__ import annotations

import json
from typing import Any

from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.contrib.admin.models import CHANGE, LogEntry
from django.core.exceptions import PermissionDenied
from django.db.models import Count, Q, QuerySet
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join

from .admin_actions import (
    ActionsAdmin,
    ReadOnlyAdmin,
    discard,
    each,
    holding_discard,
    holding_replay,
    replay,
    user_id,
)
from .exceptions import ActionRefused, InvalidSeek
from .forms import SeekForm
from .models import Delivery, Dispatcher, Message, Subscription, Topic

SUBS = ("subscription", "subscriptions")


def _count(n: int, noun: str) -> str:
    plural = noun[:-1] + "ies" if noun.endswith("y") else noun + "s"
    return f"{n:,} {noun if n == 1 else plural}"


DELIVERIES: dict[str, Any] = {"noun": ("delivery", "deliveries")}


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

    def get_urls(self) -> list[URLPattern]:
        view = self.admin_site.admin_view(self.payload_view)
        name = "django_pubsub_message_payload"
        return [path("<int:pk>/payload/", view, name=name), *super().get_urls()]

    def payload_view(self, request: HttpRequest, pk: int) -> HttpResponse:
        """The whole payload as a download: JSON as published, bytes as they are."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        message = get_object_or_404(Message, pk=pk)
        if message.payload_bytes is not None:
            body, kind, suffix = bytes(message.payload_bytes), "application/octet-stream", "bin"
        else:
            body, kind, suffix = _json(message.payload).encode(), "application/json", "json"
        response = HttpResponse(body, content_type=kind)
        response["Content-Disposition"] = f'attachment; filename="message-{pk}.{suffix}"'
        return response


# Characters of a payload a page shows; the whole of it is a download away.
PAYLOAD_SHOWN = 10_000


def _json(value: Any) -> str:
    # As written: "Zoë", not "Zo\u00eb".
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False)


def _pretty_payload(message: Message) -> str:
    download = reverse("admin:django_pubsub_message_payload", args=[message.pk])
    if message.payload_bytes is not None:
        size = len(message.payload_bytes)
        return format_html('{} bytes (<a href="{}">download</a>)', f"{size:,}", download)
    text = _json(message.payload)
    if len(text) <= PAYLOAD_SHOWN:
        return format_html("<pre>{}</pre>", text)
    return format_html(
        '<pre>{}</pre><p>The first {} of {} characters: <a href="{}">download the whole '
        "payload</a>.</p>",
        text[:PAYLOAD_SHOWN],
        f"{PAYLOAD_SHOWN:,}",
        f"{len(text):,}",
        download,
    )


@admin.register(Subscription)
class SubscriptionAdmin(ActionsAdmin):
    list_display = ["name", "topic", "handler", "ordered", "active", "paused", "position"]
    list_filter = ["active", "paused", "topic"]
    search_fields = ["name", "handler"]
    actions = ["pause", "resume", "replay_dead", "seek"]

    @admin.action(description="Pause: claim nothing more of it", permissions=["change"])
    def pause(self, request: HttpRequest, queryset: QuerySet[Subscription]) -> None:
        # Paused ones too: one held by a seek or replay then stays paused when it ends.
        n, pause = queryset.count(), each(Subscription.pause)
        self.act(request, queryset, pause, "Paused", selected=n, noun=SUBS, skipped="")

    @admin.action(description="Resume", permissions=["change"])
    def resume(self, request: HttpRequest, queryset: QuerySet[Subscription]) -> None:
        paused, n = queryset.filter(paused=True), queryset.count()
        resume = each(Subscription.resume)
        self.act(request, paused, resume, "Resumed", selected=n, noun=SUBS, skipped="not paused")

    @admin.action(description="Replay all dead letters", permissions=["change_deliveries"])
    def replay_dead(self, request: HttpRequest, queryset: QuerySet[Subscription]) -> None:
        dead = Delivery.objects.filter(subscription__in=queryset, state=Delivery.State.DEAD)
        self.act(
            request,
            dead,
            replay,
            "Replayed",
            selected=dead.count(),
            noun=("dead letter", "dead letters"),
            skipped="replayed by another operator",
            hold=holding_replay,
        )

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
                # "Subscription ..." first: the admin capitalises a message's first letter.
                self.message_user(request, f"Subscription {sub}: {refused}", messages.ERROR)
                continue
            what = (
                f"sought to offset {done.offset}: {_count(done.replayed, 'delivery')} "
                f"to run again, {_count(done.skipped, 'waiting delivery')} discarded, "
                f"{_count(done.passed_over, 'message')} passed over"
            )
            logged = what[0].upper() + what[1:]
            LogEntry.objects.log_actions(user_id(request), [sub], CHANGE, change_message=logged)
            self.message_user(request, f"Subscription {sub} {what}.", messages.SUCCESS)
        return None


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
    list_select_related = ["subscription__topic"]
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
        return format_html("<pre>{}</pre>", _json(obj.message.headers))

    @admin.action(description="Retry now (those waiting for a retry)", permissions=["change"])
    def retry_now(self, request: HttpRequest, queryset: QuerySet[Delivery]) -> None:
        retrying = queryset.filter(state=Delivery.State.RETRY)
        self.act(
            request,
            retrying,
            lambda rows, now: rows.retry_now(now),
            "Made due now",
            selected=queryset.count(),
            **DELIVERIES,
            skipped="only those waiting for a retry can be made due now",
        )

    @admin.action(description="Replay (dead letters)", permissions=["change"])
    def replay(self, request: HttpRequest, queryset: QuerySet[Delivery]) -> None:
        dead = queryset.filter(state=Delivery.State.DEAD)
        self.act(
            request,
            dead,
            replay,
            "Replayed",
            selected=queryset.count(),
            **DELIVERIES,
            skipped="only dead letters can be replayed",
            hold=holding_replay,
        )

    @admin.action(
        description="Discard (pending, retry or dead): do not run them", permissions=["change"]
    )
    def discard(self, request: HttpRequest, queryset: QuerySet[Delivery]) -> None:
        waiting = queryset.filter(state__in=[*Delivery.WAITING, Delivery.State.DEAD])
        self.act(
            request,
            waiting,
            discard,
            "Discarded",
            selected=queryset.count(),
            **DELIVERIES,
            skipped="only pending, retrying or dead ones can be discarded (the others are "
            "running or ended)",
            hold=holding_discard,
        )

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
