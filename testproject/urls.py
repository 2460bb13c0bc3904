from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path("admin/", admin.site.urls),
    # Health, stats and Prometheus metrics: for users with the view_delivery permission,
    # or a request bearing PUBSUB["MONITORING_TOKEN"].
    path("pubsub/", include("django_pubsub.urls")),
]
