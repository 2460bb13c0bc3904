"""A read-only admin: the dispatcher owns these rows. Operator actions come later."""

from __future__ import annotations

import json
from typing import Any

from django.contrib import admin
from django.http import HttpRequest
from django.utils.html import format_html

from .models import Delivery, Dispatcher, Message, Subscription, Topic


class ReadOnlyAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Topic)
class TopicAdmin(ReadOnlyAdmin):
    list_display = ["name", "next_offset", "created_at"]
    search_fields = ["name"]


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
        if obj.payload_bytes is not None:
            return f"{len(obj.payload_bytes)} bytes"
        return format_html("<pre>{}</pre>", json.dumps(obj.payload, indent=2, sort_keys=True))


@admin.register(Subscription)
class SubscriptionAdmin(ReadOnlyAdmin):
    list_display = ["name", "topic", "handler", "ordered", "active", "position"]
    list_filter = ["active", "topic"]
    search_fields = ["name", "handler"]


@admin.register(Delivery)
class DeliveryAdmin(ReadOnlyAdmin):
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
    exclude = ["errors"]
    readonly_fields = ["error_history"]

    @admin.display(description="errors")
    def error_history(self, obj: Delivery) -> str:
        return format_html("<pre>{}</pre>", json.dumps(obj.errors, indent=2))


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
