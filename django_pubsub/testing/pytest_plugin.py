"""The ``pubsub`` fixture, installed with the package (a ``pytest11`` entry point): a
django_pubsub.testing.PubSub for the test, with database access as the test asks for it
(``db`` unless it uses ``transactional_db`` or ``django_db(transaction=True)``)."""

from __future__ import annotations

from typing import Any

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that uses the fixture needs the database: marked so, pytest-django creates
    the test database for it even when no other test of the run asks for one (it looks at
    markers and fixture names when it sets the databases up, not at what a fixture asks
    for later)."""
    for item in items:
        if "pubsub" in getattr(item, "fixturenames", ()) and not item.get_closest_marker(
            "django_db"
        ):
            item.add_marker(pytest.mark.django_db)


@pytest.fixture
def pubsub(request: pytest.FixtureRequest) -> Any:
    """``pubsub.drain()``, ``pubsub.published()``, ``pubsub.clock`` and
    ``pubsub.advance(seconds)``: see django_pubsub.testing."""
    request.getfixturevalue("db")  # pytest-django's; it honours the test's marker
    from django_pubsub.testing import PubSub, mark

    mark()
    return PubSub()


@pytest.fixture(autouse=True)
def _pubsub_published_since_this_test() -> None:
    """published() counts from this test's start even without the fixture: a mark left by
    an earlier test could hide this one's messages (SQLite reuses ids rolled back)."""
    from django_pubsub import testing

    testing.forget_mark()
