"""The read-only admin: every page renders for staff, nothing can be added or changed."""

from __future__ import annotations

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
