from django.db import migrations, models


class Migration(migrations.Migration):
    """A database default for Subscription.paused: during a rolling deploy, processes still
    running the code from before 0006 insert subscriptions without the column."""

    dependencies = [
        ("django_pubsub", "0006_operator_actions"),
    ]

    operations = [
        migrations.AlterField(
            model_name="subscription",
            name="paused",
            field=models.BooleanField(db_default=False, default=False),
        ),
    ]
