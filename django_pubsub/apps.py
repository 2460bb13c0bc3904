from __future__ import annotations

from django.apps import AppConfig
from django.db.models.signals import post_migrate
from django.utils.module_loading import autodiscover_modules


class PubSubConfig(AppConfig):
    name = "django_pubsub"
    label = "django_pubsub"
    verbose_name = "Pub/sub"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from . import checks  # noqa: F401  (registers the system checks)
        from .conf import pubsub_settings
        from .receivers import sync_after_migrate

        post_migrate.connect(sync_after_migrate, sender=self)
        autodiscover_modules(pubsub_settings.autodiscover_module)
