"""The tutorial's testing examples (docs/tutorial.md, section 6), as written there:
``python manage.py test orders`` runs the TestCase, pytest the function."""

from __future__ import annotations

from unittest import mock

from django.test import TestCase

from django_pubsub.testing import PubSubTestMixin

from . import subscribers
from .services import place_order


class PlaceOrderTests(PubSubTestMixin, TestCase):
    def test_an_order_is_charged(self) -> None:
        order = place_order("ada@example.com", 1000)
        self.assertEqual(len(self.pubsub.published("orders.created")), 1)

        drained = self.pubsub.drain(["billing.charge"])

        self.assertEqual(len(drained["billing.charge"].acked), 1)
        order.refresh_from_db()
        self.assertTrue(order.charged)

    def test_a_mail_server_that_stays_down_dead_letters_the_confirmation(self) -> None:
        place_order("ada@example.com", 1000)
        down = mock.patch.object(subscribers, "send_mail", side_effect=ConnectionRefusedError)
        with down:
            for _ in range(2):  # max_attempts=3: two retries, then dead
                drained = self.pubsub.drain(["email.confirmation"])
                self.assertEqual(len(drained["email.confirmation"].retried), 1)
                self.pubsub.advance(minutes=10)  # past the backoff: no sleeping
            drained = self.pubsub.drain(["email.confirmation"])
        self.assertEqual(len(drained["email.confirmation"].dead), 1)


def test_an_order_is_charged_with_pytest(pubsub) -> None:  # type: ignore[no-untyped-def]
    order = place_order("ada@example.com", 1000)
    assert [m.payload["order_id"] for m in pubsub.published("orders.created")] == [order.pk]

    pubsub.drain(["billing.charge"])

    order.refresh_from_db()
    assert order.charged
