"""Monitoring endpoints; include them where you like:

path("pubsub/", include("django_pubsub.urls"))
"""

from __future__ import annotations

from django.urls import path

from . import views

app_name = "django_pubsub"
urlpatterns = [
    path("health/", views.health, name="health"),
    path("stats/", views.stats_view, name="stats"),
    path("metrics/", views.metrics, name="metrics"),
]
