from django.apps import AppConfig


class PubSubTestAppConfig(AppConfig):
    name = "tests.pubsub_app"
    label = "pubsub_app"
    default_auto_field = "django.db.models.BigAutoField"
