import os

from django.apps import AppConfig


class PubSubTestAppConfig(AppConfig):
    name = "tests.pubsub_app"
    label = "pubsub_app"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        step = os.environ.get("PUBSUB_TEST_FAULT")
        if step:
            from . import faults

            faults.install(step)
