"""The example app's subscribers, found by autodiscovery (PUBSUB AUTODISCOVER_MODULE)."""

from __future__ import annotations

import logging

from django.core.mail import send_mail

from django_pubsub import Message, subscriber

from .models import AuditEntry, Order

logger = logging.getLogger(__name__)


class MailServerBusy(Exception):
    pass


@subscriber("orders.created", name="billing.charge")
def charge(message: Message) -> None:
    Order.objects.filter(pk=message.payload["order_id"]).update(charged=True)


@subscriber("orders.created", name="email.confirmation", max_attempts=3, timeout=30)
def send_confirmation(message: Message) -> None:
    # Flaky on purpose: every third order's first attempt fails, as a busy mail server would.
    if message.payload["order_id"] % 3 == 0 and message.attempt == 1:
        raise MailServerBusy("mail server busy, try later")
    # An address the mail server always refuses: retried, then dead-lettered.
    if message.payload["customer"] == "nobody@invalid":
        raise ValueError("mailbox nobody@invalid does not exist")
    send_mail(
        "Your order", f"Order {message.payload['order_id']} is placed.",
        None, [message.payload["customer"]],
    )  # fmt: skip
    logger.info("confirmation sent order=%s", message.payload["order_id"])


@subscriber("orders.created", name="audit.log", ordered=True, start="earliest")
def audit(message: Message) -> None:
    AuditEntry.objects.create(order_id=message.payload["order_id"], offset=message.offset)
