"""pubsub_stats, and the health, stats and metrics views: figures, and who may read them."""

from __future__ import annotations

import json
from datetime import timedelta
from io import StringIO
from typing import Any

import pytest
from django.contrib.auth.models import Permission, User
from django.core.management import call_command
from django.test import Client, override_settings
from django.utils import timezone

from django_pubsub import publish, publish_many, stats
from django_pubsub.models import Dispatcher, Message

pytestmark = pytest.mark.django_db(transaction=True)
TOKEN = "s3cret-monitoring-token"


def test_the_figures_of_topics_and_subscriptions(dispatch: Any) -> None:
    publish_many("t.basic", [{"n": 0}, {"n": 1, "fail_times": 99}])
    dispatch("basic.one", idle_wait=1)  # basic.one: one acked, one dead; basic.two idle
    publish("t.basic", {"n": 2})  # not yet sequenced
    figures = stats.collect()
    one = next(sub for sub in figures.subscriptions if sub.name == "basic.one")
    two = next(sub for sub in figures.subscriptions if sub.name == "basic.two")
    assert (one.states["acked"], one.states["dead"], one.failed) == (1, 1, 1)
    assert one.lag == 1 and one.oldest_age is not None  # the unsequenced message
    assert two.states["pending"] == 2 and two.lag == 3 and two.queue == 2
    topic = next(topic for topic in figures.topics if topic.name == "t.basic")
    assert (topic.published, topic.subscribers, topic.delivered, topic.dead) == (3, 2, 1, 1)
    assert topic.lag == 3


def test_pubsub_stats_prints_tables_and_json(dispatch: Any) -> None:
    publish("t.basic", {"n": 0})
    dispatch("basic.one")
    out = StringIO()
    call_command("pubsub_stats", stdout=out)
    text = out.getvalue()
    assert "t.basic" in text and "basic.one" in text and "dispatchers alive: 0" in text
    out = StringIO()
    call_command("pubsub_stats", "--json", stdout=out)
    data = json.loads(out.getvalue())
    one = next(sub for sub in data["subscriptions"] if sub["name"] == "basic.one")
    assert one["states"]["acked"] == 1 and one["lag"] == 0 and one["queue"] == 0


def _beating() -> Dispatcher:
    now = timezone.now()
    return Dispatcher.objects.create(hostname="here", pid=1, started_at=now, last_seen=now)


def test_the_views_are_closed_by_default(client: Client) -> None:
    for name in ("health", "stats", "metrics"):
        assert client.get(f"/pubsub/{name}/").status_code == 403, name
    staff = User.objects.create_user("staff", password="pw", is_staff=True)
    client.force_login(staff)  # staff, but without the permission
    assert client.get("/pubsub/health/").status_code == 403
    with override_settings(PUBSUB={"MONITORING_TOKEN": TOKEN}):
        wrong = client.get("/pubsub/health/", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 403


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
def test_the_token_opens_them_whatever_the_schemes_case(client: Client, scheme: str) -> None:
    with override_settings(PUBSUB={"MONITORING_TOKEN": TOKEN}):
        auth = {"Authorization": f"{scheme} {TOKEN}"}
        assert client.get("/pubsub/stats/", headers=auth).status_code == 200
        for wrong in (f"{scheme} {TOKEN}x", f"Basic {TOKEN}", TOKEN, f"{scheme}{TOKEN}"):
            answer = client.get("/pubsub/stats/", headers={"Authorization": wrong})
            assert answer.status_code == 403, wrong


def test_other_methods_get_405_not_a_csrf_page() -> None:
    strict = Client(enforce_csrf_checks=True)
    with override_settings(PUBSUB={"MONITORING_TOKEN": TOKEN}):
        auth = {"Authorization": f"Bearer {TOKEN}"}
        for name in ("health", "stats", "metrics"):
            answer = strict.post(f"/pubsub/{name}/", headers=auth)
            assert answer.status_code == 405, name
            assert answer["Allow"] == "GET, HEAD"


def test_health_needs_a_live_dispatcher(client: Client) -> None:
    with override_settings(PUBSUB={"MONITORING_TOKEN": TOKEN}):
        auth = {"Authorization": f"Bearer {TOKEN}"}
        response = client.get("/pubsub/health/", headers=auth)
        assert response.status_code == 503
        assert response.json()["problems"] == ["no dispatcher is alive"]
        _beating()
        response = client.get("/pubsub/health/", headers=auth)
        assert response.status_code == 200 and response.json()["healthy"]
        assert [d["hostname"] for d in response.json()["dispatchers"]] == ["here"]


def test_health_reports_a_message_waiting_too_long(client: Client) -> None:
    user = User.objects.create_user("ops", password="pw")
    user.user_permissions.add(Permission.objects.get(codename="view_delivery"))
    client.force_login(user)
    _beating()
    publish("t.basic", {"n": 0})
    with override_settings(PUBSUB={"HEALTH_MAX_AGE": 60}):
        assert client.get("/pubsub/health/").status_code == 200
        Message.objects.update(published_at=timezone.now() - timedelta(minutes=5))
        response = client.get("/pubsub/health/")
        assert response.status_code == 503
        assert "has waited" in response.json()["problems"][0]


def test_stats_and_metrics_with_the_permission(client: Client, dispatch: Any) -> None:
    user = User.objects.create_user("ops", password="pw")
    user.user_permissions.add(Permission.objects.get(codename="view_delivery"))
    client.force_login(user)
    publish("t.basic", {"n": 0})
    dispatch("basic.one")
    data = client.get("/pubsub/stats/").json()
    assert any(topic["name"] == "t.basic" for topic in data["topics"])
    metrics = client.get("/pubsub/metrics/")
    assert metrics.status_code == 200
    text = metrics.content.decode()
    assert 'pubsub_deliveries{state="acked",subscription="basic.one",topic="t.basic"} 1.0' in text
    assert 'pubsub_topic_published{topic="t.basic"} 1.0' in text


def test_the_dashboard_shows_figures_and_the_last_hour(client: Client, dispatch: Any) -> None:
    user = User.objects.create_user("ops", password="pw", is_staff=True)
    client.force_login(user)
    assert client.get("/admin/django_pubsub/topic/dashboard/").status_code == 403
    user.user_permissions.add(Permission.objects.get(codename="view_delivery"))
    publish_many("t.basic", [{"n": 0}, {"n": 1, "fail_times": 99}])
    dispatch("basic.one", idle_wait=1)
    page = client.get("/admin/django_pubsub/topic/dashboard/")
    assert page.status_code == 200
    html = page.content.decode()
    assert "t.basic" in html and "basic.one" in html and "<polyline" in html
    assert "60 min ago" in html and ">now</text>" in html  # the charts' axes
    assert "Handled in the last hour: 1;" in html  # acked; the dead one is not
    index = client.get("/admin/django_pubsub/")
    assert b"/admin/django_pubsub/topic/dashboard/" in index.content


def test_the_last_hour_works_the_lag_back(dispatch: Any) -> None:
    publish_many("t.basic", [{"n": n} for n in range(3)])
    dispatch("basic.one")  # basic.one handles 3; basic.two has 3 waiting
    now = timezone.now()
    hour = stats.last_hour(now, stats.collect(now))
    assert len(hour) == 61
    assert sum(minute.acked for minute in hour) == 3
    assert hour[-1].lag == 3  # basic.two's three
    assert hour[0].lag == 0  # an hour ago nothing was published


def test_health_answers_head_and_ignores_paused_subscriptions(client: Client) -> None:
    from django_pubsub.models import Subscription

    _beating()
    publish("t.basic", {"n": 0})
    Message.objects.update(published_at=timezone.now() - timedelta(minutes=5))
    with override_settings(PUBSUB={"MONITORING_TOKEN": TOKEN, "HEALTH_MAX_AGE": 60}):
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert client.head("/pubsub/health/", headers=auth).status_code == 503
        for name in ("basic.one", "basic.two"):  # an operator holds them: not the system
            Subscription.objects.get(name=name).pause()
        assert client.head("/pubsub/health/", headers=auth).status_code == 200
        assert client.get("/pubsub/health/", headers=auth).json()["oldest_unhandled_age"] is None


def test_the_dashboards_words_and_navigation(client: Client) -> None:
    admin = User.objects.create_superuser("root", "root@example.com", "pw")
    client.force_login(admin)
    _beating()
    html = client.get("/admin/django_pubsub/topic/dashboard/").content.decode()
    assert "1 dispatcher alive." in html  # not "alive ."
    assert ">Pub/sub</a> &rsaquo; Dashboard" in html  # the app's name, not Django_Pubsub
    assert "current-model" not in html  # the sidebar does not pretend Topics is open
    assert "current-app" in html
