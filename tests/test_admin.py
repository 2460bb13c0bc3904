"""The read-only admin: every page renders for staff, nothing can be added or changed."""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.test import Client

from django_pubsub import publish
from django_pubsub.models import Delivery, Dispatcher, Message, Subscription, Topic

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def staff(client: Client) -> Client:
    user = User.objects.create_superuser("admin", "admin@example.com", "pw")
    client.force_login(user)
    return client


def test_lists_filters_and_detail_pages_render(staff: Client, dispatch: Any) -> None:
    publish("t.basic", {"n": 1, "fail_times": 99})
    dispatch("basic.one", idle_wait=1)
    for model in (Topic, Message, Subscription, Delivery, Dispatcher):
        url = f"/admin/django_pubsub/{model._meta.model_name}/"
        assert staff.get(url).status_code == 200, url
    page = staff.get("/admin/django_pubsub/delivery/?state__exact=dead")
    assert page.status_code == 200 and b"basic.one" in page.content
    dead = Delivery.objects.get(subscription__name="basic.one")
    detail = staff.get(f"/admin/django_pubsub/delivery/{dead.pk}/change/")
    assert detail.status_code == 200
    assert b"planned failure 3" in detail.content  # the error history is shown
    message = staff.get(f"/admin/django_pubsub/message/{dead.message_id}/change/")
    assert b"fail_times" in message.content  # the payload, pretty-printed


def test_nothing_can_be_added_or_changed(staff: Client) -> None:
    publish("t.basic", {"n": 1})
    assert staff.get("/admin/django_pubsub/message/add/").status_code == 403
    row = Message.objects.get()
    response = staff.post(f"/admin/django_pubsub/message/{row.pk}/change/", {"key": "x"})
    assert response.status_code == 403
    row.refresh_from_db()
    assert row.key is None


def test_topics_list_their_counts(staff: Client, dispatch: Any) -> None:
    publish("t.basic", {"n": 1})
    dispatch("basic.one")
    page = staff.get("/admin/django_pubsub/topic/?q=t.basic")
    assert page.status_code == 200
    html = page.content.decode()
    assert '<td class="field-sequenced">1</td>' in html
    assert '<td class="field-subscribers">2</td>' in html


def test_payloads_and_headers_show_as_written_and_rows_by_their_names(
    staff: Client, dispatch: Any
) -> None:
    publish("t.basic", {"name": "Zoë", "city": "Łódź"}, headers={"who": "Zoë"})
    dispatch("basic.one")
    message = Message.objects.get()
    page = staff.get(f"/admin/django_pubsub/message/{message.pk}/change/").content.decode()
    assert "Zoë" in page and "Łódź" in page and "\\u00eb" not in page
    assert f"message #{message.pk} of t.basic (offset 0)" in page  # the title
    delivery = Delivery.objects.get(subscription__name="basic.one")
    page = staff.get(f"/admin/django_pubsub/delivery/{delivery.pk}/change/").content.decode()
    assert f"basic.one: message #{message.pk} of t.basic (offset 0)" in page
    assert page.count("Zoë") >= 2  # payload and headers


def test_a_large_payload_is_cut_on_the_page_and_downloads_whole(staff: Client) -> None:
    big = {"text": "x" * 200_000}
    publish("t.basic", big)
    publish("t.basic", b"\x00\x01binary")
    json_row, bytes_row = Message.objects.order_by("id")
    page = staff.get(f"/admin/django_pubsub/message/{json_row.pk}/change/")
    assert len(page.content) < 100_000  # not the whole 200 kB
    assert b"download the whole payload" in page.content
    whole = staff.get(f"/admin/django_pubsub/message/{json_row.pk}/payload/")
    assert whole["Content-Type"] == "application/json"
    assert "attachment" in whole["Content-Disposition"]
    assert json.loads(whole.content) == big
    raw = staff.get(f"/admin/django_pubsub/message/{bytes_row.pk}/payload/")
    assert raw.content == b"\x00\x01binary"
    assert raw["Content-Type"] == "application/octet-stream"


def test_the_payload_download_needs_the_view_permission(client: Client) -> None:
    publish("t.basic", {"secret": 1})
    row = Message.objects.get()
    nobody = User.objects.create_user("nobody", password="pw", is_staff=True)
    client.force_login(nobody)
    assert client.get(f"/admin/django_pubsub/message/{row.pk}/payload/").status_code == 403


def test_actions_say_what_was_selected_changed_and_skipped(staff: Client, dispatch: Any) -> None:
    from django.contrib.admin.models import LogEntry

    publish("t.basic", {"n": 1})
    dispatch("basic.one")
    acked = Delivery.objects.get(subscription__name="basic.one")
    pending = Delivery.objects.get(subscription__name="basic.two")
    page = staff.post(
        "/admin/django_pubsub/delivery/",
        {"action": "discard", "_selected_action": [acked.pk, pending.pk], "confirmed": "yes"},
        follow=True,
    ).content.decode()
    assert (
        "Discarded 1 of 2 selected deliveries. 1 skipped: only pending, retrying or dead ones "
        "can be discarded (the others are running or ended), or changed meanwhile."
    ) in page
    (entry,) = LogEntry.objects.all()
    assert entry.object_repr.startswith("basic.two: message #")
    page = staff.post(
        "/admin/django_pubsub/subscription/",
        {"action": "resume", "_selected_action": [pending.subscription_id]},
        follow=True,
    ).content.decode()
    assert "Resumed 0 of 1 selected subscription. 1 skipped: not paused" in page


def test_a_deliverys_page_offers_what_applies_and_discard_asks_first(
    staff: Client, dispatch: Any
) -> None:
    import re

    publish("t.basic", {"n": 1, "fail_times": 99})
    dispatch("basic.one", idle_wait=1)
    dead = Delivery.objects.get(subscription__name="basic.one")
    pending = Delivery.objects.get(subscription__name="basic.two")
    page = staff.get(f"/admin/django_pubsub/delivery/{dead.pk}/change/").content.decode()
    assert 'value="replay"' in page and 'value="discard"' in page
    assert 'value="retry_now"' not in page
    # Its times as in the lists, to the second.
    assert re.search(
        r"Finished at:?</label>\s*<div class=\"readonly\">\d{4}-\d\d-\d\d \d\d:\d\d:\d\d",
        page,
        re.I,
    )
    page = staff.get(f"/admin/django_pubsub/delivery/{pending.pk}/change/").content.decode()
    assert 'value="discard"' in page and 'value="replay"' not in page
    # The list: its last error, times to the second.
    page = staff.get("/admin/django_pubsub/delivery/").content.decode()
    assert "Planned: planned failure 3" in page
    assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", page)
    # Discard: a confirmation page first, nothing changed until "yes".
    asked = staff.post(
        "/admin/django_pubsub/delivery/", {"action": "discard", "_selected_action": [dead.pk]}
    ).content.decode()
    assert "Discard 1 of the 1 selected deliveries?" in asked
    assert Delivery.objects.get(pk=dead.pk).state == "dead"
    staff.post(
        "/admin/django_pubsub/delivery/",
        {"action": "discard", "_selected_action": [dead.pk], "confirmed": "yes"},
    )
    assert Delivery.objects.get(pk=dead.pk).state == "discarded"
    page = staff.get(f"/admin/django_pubsub/delivery/{dead.pk}/change/").content.decode()
    assert 'value="discard"' not in page  # nothing applies to a discarded one


def test_subscriptions_show_what_applies_and_messages_link_their_deliveries(
    staff: Client, dispatch: Any
) -> None:
    publish("t.basic", {"n": 1})
    dispatch("basic.one", "basic.two")
    page = staff.get("/admin/django_pubsub/subscription/").content.decode()
    assert "no (PUBSUB setting)" in page and "yes (declared)" in page  # ordered.one
    flaky = Subscription.objects.get(name="flaky.one")
    page = staff.get(f"/admin/django_pubsub/subscription/{flaky.pk}/change/").content.decode()
    assert "4 (declared)" in page  # max_attempts
    assert "10 s x3, at most 100 s, jitter 0.5 (declared)" in page
    assert "30 (PUBSUB setting)" in page  # the lease
    message = Message.objects.get()
    page = staff.get(f"/admin/django_pubsub/message/{message.pk}/change/").content.decode()
    assert f"?message__id__exact={message.pk}" in page and "2 deliveries" in page


def test_a_dispatcher_killed_shows_as_died_not_stopped(staff: Client) -> None:
    from datetime import timedelta

    from django.utils import timezone

    now = timezone.now()
    old = now - timedelta(minutes=10)
    running = Dispatcher.objects.create(hostname="a", pid=1, started_at=old, last_seen=now)
    silent = Dispatcher.objects.create(hostname="b", pid=2, started_at=old, last_seen=old)
    stopped = Dispatcher.objects.create(hostname="c", pid=3, started_at=old, last_seen=old)
    stopped.stop(now)
    died = Dispatcher.objects.create(hostname="d", pid=4, started_at=old, last_seen=old)
    assert died.mark_dead(now)  # as another dispatcher does once it has fallen silent
    statuses = {row.hostname: row.status(now) for row in Dispatcher.objects.all()}
    assert statuses == {"a": "running", "b": "silent: presumed dead", "c": "stopped", "d": "died"}
    page = staff.get("/admin/django_pubsub/dispatcher/").content.decode()
    assert "died" in page and "silent: presumed dead" in page
    assert running.pk and silent.pk
