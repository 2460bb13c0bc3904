"""Health, stats and Prometheus metrics views (django_pubsub.urls).

None of them is open: a request needs a logged-in user with the ``view_delivery``
permission, or ``Authorization: Bearer <PUBSUB["MONITORING_TOKEN"]>``.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from functools import wraps
from typing import Any

from django.core.serializers.json import DjangoJSONEncoder
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.utils import timezone
from django.views.decorators.cache import never_cache
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_safe

from . import stats
from .conf import pubsub_settings

View = Callable[[HttpRequest], HttpResponse]
PERMISSION = "django_pubsub.view_delivery"


def monitoring(view: View) -> View:
    """Allow a user with PERMISSION or the bearer of MONITORING_TOKEN; 403 otherwise."""

    @wraps(view)
    def allowed(request: HttpRequest) -> HttpResponse:
        token = pubsub_settings.monitoring_token
        # The scheme is case-insensitive (RFC 9110): "bearer" is as good as "Bearer".
        scheme, _, given = request.headers.get("Authorization", "").strip().partition(" ")
        if (
            token
            and scheme.lower() == "bearer"
            and hmac.compare_digest(given.strip().encode(), token.encode())
        ):
            return view(request)
        if request.user.is_authenticated and request.user.has_perm(PERMISSION):
            return view(request)
        return JsonResponse({"error": "forbidden"}, status=403)

    # GET and HEAD: some load balancers' health checks send HEAD. Read-only, so exempt
    # from CSRF: another method gets require_safe's 405, not the CSRF failure page.
    return csrf_exempt(never_cache(require_safe(allowed)))


@monitoring
def health(request: HttpRequest) -> HttpResponse:
    """200 when a dispatcher is alive (and the oldest unhandled message is younger than
    HEALTH_MAX_AGE, where set); 503 otherwise, with the reasons."""
    now = timezone.now()
    found = stats.health(now)
    oldest = found.oldest_age
    problems = []
    if not found.dispatchers:
        problems.append("no dispatcher is alive")
    limit = pubsub_settings.health_max_age
    if limit is not None and oldest is not None and oldest > limit:
        problems.append(f"the oldest unhandled message has waited {oldest:.0f}s (> {limit:g}s)")
    body: dict[str, Any] = {
        "healthy": not problems,
        "problems": problems,
        "oldest_unhandled_age": oldest,
        "dispatchers": [
            {"id": row.id, "hostname": row.hostname, "pid": row.pid, "last_seen": row.last_seen}
            for row in found.dispatchers
        ],
    }
    return JsonResponse(body, status=200 if not problems else 503, encoder=DjangoJSONEncoder)


@monitoring
def stats_view(request: HttpRequest) -> HttpResponse:
    figures = stats.collect()
    return JsonResponse(figures.as_json(), encoder=DjangoJSONEncoder)


@monitoring
def metrics(request: HttpRequest) -> HttpResponse:
    """Prometheus text format; 404 unless prometheus-client is installed."""
    try:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    except ImportError:
        return JsonResponse({"error": "pip install prometheus-client to serve metrics"}, status=404)
    from .prometheus import registry_for

    return HttpResponse(
        generate_latest(registry_for(stats.collect())), content_type=CONTENT_TYPE_LATEST
    )
