"""runpubsub's arguments and the demo command, driven the way a user drives them."""

from __future__ import annotations

from io import StringIO
from typing import Any

import pytest
from django.core.management import CommandError, call_command

from django_pubsub import publish_many
from django_pubsub.models import Delivery, Dispatcher
from tests.conftest import states

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--workers", "0"], "must be from 1 to 1024"),
        (["--workers", "100000"], "must be from 1 to 1024"),
        (["--workers", "many"], "expected a whole number"),
        (["--poll-interval", "0"], "must be > 0"),
        (["--poll-interval", "nan"], "must be > 0"),
        (["--poll-interval", "inf"], "must be > 0"),
        (["--poll-interval", "1e12"], "at most 31536000"),
        (["--idle-wait", "-1", "--until-idle"], "must be >= 0"),
        (["--idle-wait", "1"], "only applies with --until-idle"),
        (["--subscriptions", "basic.one,,x"], "comma-separated"),
        (["--subscriptions", "nope", "--until-idle"], "Unknown or inactive subscriptions: nope"),
        (["--max-messages", "-3"], "must be from 1 to"),
    ],
)
def test_bad_arguments_get_a_clear_error_and_write_nothing(
    args: list[str], message: str, caplog: pytest.LogCaptureFixture
) -> None:
    publish_many("t.basic", [{"n": 1}])
    with pytest.raises(CommandError, match=message):
        call_command("runpubsub", *args)
    assert "dispatcher stopped" not in caplog.text  # it never started
    assert Dispatcher.objects.count() == 0
    assert Delivery.objects.count() == 0


def test_until_idle_handles_everything_and_reports() -> None:
    publish_many("t.basic", [{"n": n} for n in range(10)])
    out = StringIO()
    call_command("runpubsub", "--subscriptions", "basic.one,basic.two", "--until-idle", stdout=out)
    assert "delivered=20 retried=0 dead=0" in out.getvalue()
    assert states("basic.one") == states("basic.two") == {"acked": 10}


def test_max_messages_stops_after_that_many() -> None:
    publish_many("t.basic", [{"n": n} for n in range(10)])
    call_command(
        "runpubsub", "--subscriptions", "basic.one", "--max-messages", "3", "--workers", "1"
    )
    assert states("basic.one") == {"acked": 3, "pending": 7}


def test_demo_runs_and_says_what_happened(settings: Any) -> None:
    settings.PUBSUB = {
        **settings.PUBSUB,
        "BACKOFF": {"base": 0.05, "factor": 2, "maximum": 0.2, "jitter": 0},
    }
    out = StringIO()
    call_command("demo", "--orders", "8", stdout=out)
    text = out.getvalue()
    assert "Published 8 orders.created messages." in text
    assert "billing.charge                 8        0     0        0" in text
    # Two of eight orders go to the address that always fails: dead after 3 attempts.
    email = Delivery.objects.filter(subscription__name="email.confirmation")
    assert email.filter(state="dead", attempts=3).count() == 2
    flaky = email.filter(state="acked", attempts=2).count()
    assert flaky >= 1
    assert f"email.confirmation             6{flaky:>9}     2        0" in text
    assert "in offset order: True" in text
