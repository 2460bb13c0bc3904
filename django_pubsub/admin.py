"""The admin: the dispatcher owns these rows, so nothing is edited in a form. An operator
acts on them through actions, each a model method, each recorded in the admin log, each
needing the model's change permission (viewing needs the view permission)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.contrib.admin.models import CHANGE, DELETION, LogEntry
from django.core.exceptions import PermissionDenied
from django.db.models import Count, Q, QuerySet
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.text import Truncator

from . import retention
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
from .admin_display import as_json, count, effective, to_the_second
from .admin_display import pretty_payload as payload_html
from .exceptions import ActionRefused, InvalidSeek
from .forms import SeekForm
from .models import Delivery, Dispatcher, Message, Subscription, Topic

SUBS = ("subscription", "subscriptions")


DELIVERIES: dict[str, Any] = {"noun": ("delivery", "deliveries")}


@admin.register(Topic)
class TopicAdmin(ReadOnlyAdmin):
    list_display = [
        *("name", "sequenced", "subscribers", "backlog", "backlog_of"),
        *(to_the_second("backlog_at"), to_the_second("created_at")),
    ]
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


class ScheduledFilter(admin.SimpleListFilter):
    title = "schedule"
    parameter_name = "schedule"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("later", "published for later, not in the log yet"), ("expiring", "expiring")]

    def queryset(self, request: HttpRequest, queryset: Any) -> Any:
        if self.value() == "later":
            return queryset.filter(offset__isnull=True, deliver_at__isnull=False)
        if self.value() == "expiring":
            return queryset.filter(expires_at__isnull=False)
        return queryset


@admin.register(Message)
class MessageAdmin(ReadOnlyAdmin):
    list_display = [
        "id",
        "topic",
        "offset",
        "key",
        to_the_second("published_at"),
        to_the_second("deliver_at"),
        to_the_second("expires_at"),
    ]
    list_filter = ["topic", ScheduledFilter]
    search_fields = ["=id", "key", "=dedup_key"]
    list_select_related = ["topic"]
    exclude = ["payload", "payload_bytes"]
    readonly_fields = ["pretty_payload", "dedup_key", "deliveries"]

    @admin.display(description="deliveries")
    def deliveries(self, obj: Message) -> str:
        url = reverse("admin:django_pubsub_delivery_changelist")
        n = Delivery.objects.filter(message_id=obj.pk).count()
        return format_html(
            '<a href="{}?message__id__exact={}">{}</a>', url, obj.pk, count(n, "delivery")
        )

    @admin.display(description="payload")
    def pretty_payload(self, obj: Message) -> str:
        return payload_html(obj)

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
            body, kind, suffix = as_json(message.payload).encode(), "application/json", "json"
        response = HttpResponse(body, content_type=kind)
        response["Content-Disposition"] = f'attachment; filename="message-{pk}.{suffix}"'
        return response


@admin.register(Subscription)
class SubscriptionAdmin(ActionsAdmin):
    list_display = [
        *("name", "topic", "handler", "in_order", "delivery_mode"),
        *("batches", "active", "pause_state", "position"),
    ]
    # Each option as it applies (methods below), then the row's own times.
    readonly_fields = [
        *("in_order", "dead_head", "delivery_mode", "batches", "attempts", "lease_seconds"),
        *("timeout_seconds", "inflight_bound", "retry_backoff", "breaker", "message_filter"),
        "rate",
        *("paused_until", "paused_reason", "created_at", "updated_at"),
    ]
    fields = ["name", "topic", "handler", "active", "paused", "position", "start", *readonly_fields]

    # What applies, declared or from the PUBSUB setting (instead of the admin's "?" for a
    # NULL that means "the setting").
    @admin.display(description="ordered")
    def in_order(self, obj: Subscription) -> str:
        if obj.keyed:
            return "by message key"
        return effective("yes" if obj.effective_ordered else "no", obj.ordered)

    @admin.display(description="a dead head of a key")
    def dead_head(self, obj: Subscription) -> str:
        if not obj.keyed:
            return "-"
        if obj.buries_keys:
            return "dead-letters the rest of its key"
        return "lets its key go on"

    @admin.display(description="delivery")
    def delivery_mode(self, obj: Subscription) -> str:
        return obj.delivery.replace("_", " ")

    @admin.display(description="batches")
    def batches(self, obj: Subscription) -> str:
        if not obj.batch_size:
            return "one message a call"
        return f"up to {obj.batch_size}, gathered up to {obj.effective_batch_wait:g} s"

    @admin.display(description="paused", ordering="paused")
    def pause_state(self, obj: Subscription) -> str:
        if not obj.paused:
            return "no"
        text = "yes"
        if obj.paused_until is not None:
            text += f", until {to_the_second('paused_until')(obj)}"
        return f"{text}: {obj.paused_reason}" if obj.paused_reason else text

    @admin.display(description="circuit breaker")
    def breaker(self, obj: Subscription) -> str:
        if not obj.breaker_failures:
            return "none"
        pause = "until resumed" if obj.breaker_pause is None else f"for {obj.breaker_pause:g} s"
        return f"pauses it {pause} after {obj.breaker_failures} failures in a row of one type"

    @admin.display(description="max attempts")
    def attempts(self, obj: Subscription) -> str:
        if obj.delivery == "at_most_once":
            return "1 (at most once)"
        return effective(obj.effective_max_attempts, obj.max_attempts)

    @admin.display(description="lease (s)")
    def lease_seconds(self, obj: Subscription) -> str:
        return effective(f"{obj.effective_lease:g}", obj.lease)

    @admin.display(description="timeout (s)")
    def timeout_seconds(self, obj: Subscription) -> str:
        timeout = obj.effective_timeout
        return effective("none" if timeout is None else f"{timeout:g}", obj.timeout)

    @admin.display(description="max in flight")
    def inflight_bound(self, obj: Subscription) -> str:
        bound = obj.effective_max_inflight
        return effective("the worker pool's" if bound is None else bound, obj.max_inflight)

    @admin.display(description="backoff")
    def retry_backoff(self, obj: Subscription) -> str:
        b = obj.effective_backoff
        text = f"{b.base:g} s x{b.factor:g}, at most {b.maximum:g} s, jitter {b.jitter:g}"
        return effective(text, obj.backoff)

    list_filter = ["active", "paused", "topic"]
    search_fields = ["name", "handler"]
    actions = [
        "pause",
        "pause_15_minutes",
        "pause_1_hour",
        "resume",
        "replay_dead",
        "seek",
        "retire",
    ]

    @admin.action(description="Pause: claim nothing more of it", permissions=["change"])
    def pause(self, request: HttpRequest, queryset: QuerySet[Subscription]) -> None:
        # Paused ones too: one held by a seek or replay then stays paused when it ends.
        n, pause = queryset.count(), each(Subscription.pause)
        self.act(request, queryset, pause, "Paused", selected=n, noun=SUBS, skipped="")

    @admin.action(description="Pause for 15 minutes (resumes by itself)", permissions=["change"])
    def pause_15_minutes(self, request: HttpRequest, queryset: QuerySet[Subscription]) -> None:
        self._pause_for(request, queryset, timedelta(minutes=15))

    @admin.action(description="Pause for 1 hour (resumes by itself)", permissions=["change"])
    def pause_1_hour(self, request: HttpRequest, queryset: QuerySet[Subscription]) -> None:
        self._pause_for(request, queryset, timedelta(hours=1))

    def _pause_for(
        self, request: HttpRequest, queryset: QuerySet[Subscription], span: timedelta
    ) -> None:
        n = queryset.count()

        def pause(sub: Subscription, now: datetime) -> bool:
            # Paused already too: from now on it ends at that time.
            sub.pause(now, until=now + span)
            return True

        done = f"Paused until {span} from now"
        self.act(request, queryset, each(pause), done, selected=n, noun=SUBS, skipped="")

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
        description="Seek to an offset, a time or the last messages (deliver again from there)",
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
        target = {name: form.cleaned_data[name] for name in ("offset", "at", "last")}
        for sub in queryset.order_by("pk"):
            try:
                done = sub.seek(**target)
            except (ActionRefused, InvalidSeek) as refused:
                # "Subscription ..." first: the admin capitalises a message's first letter.
                self.message_user(request, f"Subscription {sub}: {refused}", messages.ERROR)
                continue
            what = (
                f"sought to offset {done.offset}: {count(done.replayed, 'delivery')} "
                f"to run again, {count(done.skipped, 'waiting delivery')} discarded, "
                f"{count(done.passed_over, 'message')} passed over"
            )
            logged = what[0].upper() + what[1:]
            LogEntry.objects.log_actions(user_id(request), [sub], CHANGE, change_message=logged)
            self.message_user(request, f"Subscription {sub} {what}.", messages.SUCCESS)
        return None

    @admin.action(
        description="Retire for good (no longer declared in code)",
        permissions=["change_deliveries"],
    )
    def retire(
        self, request: HttpRequest, queryset: QuerySet[Subscription]
    ) -> TemplateResponse | None:
        subs = list(queryset.select_related("topic").order_by("pk"))
        if request.POST.get("confirmed") != "yes":  # nothing brings it back: ask first
            context = {
                **self.admin_site.each_context(request),
                "title": "Retire subscriptions?",
                "opts": self.model._meta,
                "retiring": [(sub, retention.retiring(sub)) for sub in subs],
                "selected": [sub.pk for sub in subs],
                "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
            }
            return TemplateResponse(
                request, "admin/django_pubsub/subscription/retire.html", context
            )
        for sub in subs:
            try:
                gone = retention.retire(sub)
            except ActionRefused as refused:
                self.message_user(request, str(refused), messages.ERROR)
                continue
            what = f"Retired: {count(gone.deliveries, 'delivery')} deleted"
            LogEntry.objects.log_actions(user_id(request), [sub], DELETION, change_message=what)
            self.message_user(request, f"Subscription {sub} retired.", messages.SUCCESS)
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
        to_the_second("available_at"),
        to_the_second("lease_expires_at"),
        "error",
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
        "available_at_",
        "dispatcher",
        "lease_token",
        "lease_expires_at_",
        "message_payload",
        "message_headers",
        "error_history",
        "created_at_",
        "updated_at_",
        "finished_at_",
    ]
    readonly_fields = [
        *("why", "message_payload", "message_headers", "error_history", "available_at_"),
        *("lease_expires_at_", "created_at_", "updated_at_", "finished_at_"),
    ]
    # The page's times in the lists' format, to the second.
    available_at_ = staticmethod(to_the_second("available_at"))
    lease_expires_at_ = staticmethod(to_the_second("lease_expires_at"))
    created_at_ = staticmethod(to_the_second("created_at"))
    updated_at_ = staticmethod(to_the_second("updated_at"))
    finished_at_ = staticmethod(to_the_second("finished_at"))
    actions = ["retry_now", "replay", "discard"]

    @admin.display(description="last error")
    def error(self, obj: Delivery) -> str:
        return Truncator(obj.last_error).chars(80)

    @admin.display(description="why")
    def why(self, obj: Delivery) -> str:
        return obj.why(timezone.now())

    @admin.display(description="payload")
    def message_payload(self, obj: Delivery) -> str:
        return payload_html(obj.message)

    @admin.display(description="headers")
    def message_headers(self, obj: Delivery) -> str:
        return format_html("<pre>{}</pre>", as_json(obj.message.headers))

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
    def discard(
        self, request: HttpRequest, queryset: QuerySet[Delivery]
    ) -> TemplateResponse | None:
        waiting = queryset.filter(state__in=[*Delivery.WAITING, Delivery.State.DEAD])
        if request.POST.get("confirmed") != "yes":  # nothing runs them again: ask first
            context = {
                **self.admin_site.each_context(request),
                "title": "Discard deliveries?",
                "opts": self.model._meta,
                "selected": request.POST.getlist(helpers.ACTION_CHECKBOX_NAME),
                "select_across": request.POST.get("select_across"),
                "selected_count": queryset.count(),
                "discardable": waiting.count(),
                "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
            }
            return TemplateResponse(request, "admin/django_pubsub/delivery/discard.html", context)
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
        return None

    def change_view(
        self,
        request: HttpRequest,
        object_id: str,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        """Buttons for the actions that apply to this delivery as it is now."""
        row = Delivery.objects.filter(pk=object_id).first()
        offered = []
        if row is not None and self.has_change_permission(request):
            if row.state == Delivery.State.RETRY:
                offered.append(("retry_now", "Retry now"))
            if row.state == Delivery.State.DEAD:
                offered.append(("replay", "Replay"))
            if row.state in (*Delivery.WAITING, Delivery.State.DEAD):
                offered.append(("discard", "Discard…"))
        context = {**(extra_context or {}), "pubsub_actions": offered}
        return super().change_view(request, object_id, form_url, context)

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
        "status",
        to_the_second("started_at"),
        to_the_second("last_seen"),
        to_the_second("stopped_at"),
        "inflight",
        "stuck",
    ]
    list_filter = ["hostname"]
    readonly_fields = ["status"]

    @admin.display(description="status")
    def status(self, obj: Dispatcher) -> str:
        return obj.status(timezone.now())
