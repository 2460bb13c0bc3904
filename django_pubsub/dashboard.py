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
from .keys import blocked_keys
from .models import Subscription
from .views import PERMISSION

WIDTH, HEIGHT, PAD = 600, 140, 4


def dashboard(request: HttpRequest) -> HttpResponse:
    if not request.user.has_perm(PERMISSION):
        raise PermissionDenied
    now = timezone.now()
    figures = stats.collect(now)
    hour = stats.last_hour(now, figures)
    rows = Subscription.objects.in_bulk([sub.id for sub in figures.subscriptions])
    context: dict[str, Any] = {
        **admin.site.each_context(request),
        "title": "Pub/sub dashboard",
        "app_name": apps.get_app_config("django_pubsub").verbose_name,
        "sidebar_request": SimpleNamespace(path=reverse("admin:app_list", args=["django_pubsub"])),
        "figures": figures,
        "subscriptions": [
            {"figures": sub, "status": stats.status(sub), **_modes(rows.get(sub.id), now)}
            for sub in figures.subscriptions
        ],
        "throughput": chart([m.acked for m in hour], "acked per minute"),
        "lag": chart([m.lag for m in hour], "messages not yet handled"),
        "handled_last_minute": hour[-2].acked if len(hour) > 1 else 0,
        "handled_last_hour": sum(m.acked for m in hour),
    }
    return TemplateResponse(request, "admin/django_pubsub/dashboard.html", context)


def _modes(sub: Subscription | None, now: Any) -> dict[str, Any]:
    """How a subscription runs its messages, and for a keyed one the keys held back."""
    if sub is None:
        return {"modes": "", "blocked": None}
    modes = [f"ordered by {sub.ordering}" if sub.ordering != "none" else "unordered"]
    if sub.batch_size:
        modes.append(f"batches of {sub.batch_size}")
    if sub.delivery != "at_least_once":
        modes.append(sub.delivery.replace("_", " "))
    blocked = blocked_keys(sub, now) if sub.keyed else []
    oldest = min(blocked, key=lambda key: key.since) if blocked else None
    return {
        "modes": ", ".join(modes),
        "blocked": len(blocked) if sub.keyed else None,
        "oldest_blocked": oldest,
        "oldest_blocked_for": (now - oldest.since).total_seconds() if oldest else None,
    }


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
