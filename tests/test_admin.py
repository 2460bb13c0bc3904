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
        {"action": "discard", "_selected_action": [acked.pk, pending.pk]},
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
