"""The admin dashboard: figures per topic and subscription, and the last hour as a chart
the page draws itself (inline SVG: no script, no CDN)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from django.apps import apps
from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils import timezone

from . import stats
from .views import PERMISSION

WIDTH, HEIGHT, PAD = 600, 140, 4


def dashboard(request: HttpRequest) -> HttpResponse:
    if not request.user.has_perm(PERMISSION):
        raise PermissionDenied
    now = timezone.now()
    figures = stats.collect(now)
    hour = stats.last_hour(now, figures)
    context: dict[str, Any] = {
        **admin.site.each_context(request),
        "title": "Pub/sub dashboard",
        "app_name": apps.get_app_config("django_pubsub").verbose_name,
        "sidebar_request": SimpleNamespace(path=reverse("admin:app_list", args=["django_pubsub"])),
        "figures": figures,
        "subscriptions": [
            {"figures": sub, "status": stats.status(sub)} for sub in figures.subscriptions
        ],
        "throughput": chart([m.acked for m in hour], "acked per minute"),
        "lag": chart([m.lag for m in hour], "messages not yet handled"),
        "handled_last_minute": hour[-2].acked if len(hour) > 1 else 0,
        "handled_last_hour": sum(m.acked for m in hour),
    }
    return TemplateResponse(request, "admin/django_pubsub/dashboard.html", context)


def chart(values: list[int], label: str) -> dict[str, Any]:
    """An SVG polyline of ``values`` (one a minute), scaled to its largest value."""
    top = max(values, default=0) or 1
    step = (WIDTH - 2 * PAD) / max(len(values) - 1, 1)
    points = " ".join(
        f"{PAD + n * step:.1f},{HEIGHT - PAD - (HEIGHT - 2 * PAD) * v / top:.1f}"
        for n, v in enumerate(values)
    )
    return {
        "points": points,
        "label": label,
        "top": max(values, default=0),
        "last": values[-1] if values else 0,
        "width": WIDTH,
        "height": HEIGHT,
    }
