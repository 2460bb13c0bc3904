"""The admin in a real browser: headless Chromium (Debian's package) driven by Playwright
logs in, opens the dashboard, finds a dead letter, replays it, and sees it delivered.

Skipped where Chromium or Playwright is missing, unless PUBSUB_REQUIRE_BROWSER=1, which
.ci/run sets. PUBSUB_SCREENSHOTS=<folder> saves the dashboard and the delivery page there
(the docs' pictures: PUBSUB_SCREENSHOTS=docs/images).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import User

from django_pubsub import publish
from django_pubsub.models import Delivery

pytestmark = pytest.mark.django_db(transaction=True)
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture
def page(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if CHROMIUM is None or sync_playwright is None:
        missing = "Debian's chromium" if CHROMIUM is None else "playwright"
        if os.environ.get("PUBSUB_REQUIRE_BROWSER") == "1":
            pytest.fail(f"PUBSUB_REQUIRE_BROWSER=1 but {missing} is not installed")
        pytest.skip(f"{missing} is not installed")
    # Playwright's sync API keeps an event loop in this thread; the test's own database
    # calls stay synchronous, which Django would otherwise refuse next to a loop.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield browser.new_page(viewport={"width": 1280, "height": 860})
        finally:
            browser.close()


def screenshot(page: Any, name: str) -> None:
    folder = os.environ.get("PUBSUB_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(folder) / name), full_page=True)


def test_an_operator_replays_a_dead_letter_in_a_browser(
    page: Any, live_server: Any, dispatch: Any, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    broken = tmp_path / "payment-provider-down"
    broken.touch()
    publish("t.basic", {"order": 42, "fail_while": str(broken)})
    publish("t.basic", {"order": 43})
    dispatch("basic.one", "basic.two", idle_wait=1)
    dead = Delivery.objects.get(subscription__name="basic.one", state="dead")
    User.objects.create_superuser("operator", "operator@example.com", "a long password")

    page.goto(f"{live_server.url}/admin/login/?next=/admin/django_pubsub/")
    page.fill("#id_username", "operator")
    page.fill("#id_password", "a long password")
    page.click("input[type=submit]")
    page.click("text=Dashboard")
    row = page.locator("tr", has_text="basic.one").first
    expect(row.locator("td").nth(8)).to_have_text("1")  # one dead letter
    screenshot(page, "dashboard.png")

    row.locator("td").nth(8).locator("a").click()  # the dead deliveries of basic.one
    page.click(f"a[href*='/delivery/{dead.pk}/change/']")
    content = page.locator("#content")
    expect(content).to_contain_text("Dead after 3 failed attempt(s)")
    expect(content).to_contain_text("broken while")  # the error of each attempt
    screenshot(page, "delivery.png")

    page.go_back()
    page.check(f"input[name=_selected_action][value='{dead.pk}']")
    page.select_option("select[name=action]", "replay")
    page.click("button[name=index]")
    expect(page.locator(".messagelist")).to_contain_text("Replayed 1 of 1 selected delivery.")

    broken.unlink()  # the cause is fixed
    dispatch("basic.one")
    page.goto(f"{live_server.url}/admin/django_pubsub/delivery/{dead.pk}/change/")
    expect(page.locator("#content")).to_contain_text("Handled at")
    dead.refresh_from_db()
    assert (dead.state, dead.attempts) == ("acked", 1)
