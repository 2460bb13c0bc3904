"""The subscriptions one dispatcher runs, their handlers, and whether any of them has
work to do."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from typing import Any

from django.db.models import Exists, OuterRef, Q
from django.utils.module_loading import import_string

from ..calling import as_sync
from ..exceptions import HandlerImportError
from ..message import Message
from ..models import Delivery, Subscription
from ..models import Message as MessageRow

logger = logging.getLogger("django_pubsub.dispatcher")

# Seconds between attempts to import handlers that did not import.
IMPORT_RETRY_INTERVAL = 60.0

Handler = Callable[[Message], Any]


class Subscriptions:
    """Active subscriptions (or the ones named) with the handlers their rows point at.

    A handler that does not import leaves its subscription *unloaded*: its deliveries wait,
    never acked, and the import is tried again now and then (a deploy may fix it)."""

    def __init__(self, only: Sequence[str] | None = None) -> None:
        self.only = list(only) if only else None
        self._rows: dict[int, Subscription] = {}
        self._handlers: dict[int, Handler] = {}
        self._declared: dict[int, Any] = {}
        self.unloaded: dict[int, Subscription] = {}
        # Imports retried so far, and when the next retry is due (time.monotonic()).
        self.imports_retried = 0
        self._next_import = 0.0
        self._rotation = 0

    def __iter__(self) -> Iterator[Subscription]:
        # A copy, made in one step: the heartbeat's thread iterates while the loop's may
        # load a handler that imports at last.
        return iter(tuple(self._rows.values()))

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, pk: int) -> Subscription:
        return self._rows[pk]

    def get(self, pk: int) -> Subscription | None:
        return self._rows.get(pk)

    def handler(self, pk: int) -> Handler:
        """The subscription's handler as a plain function of one argument (an async one
        wrapped to run to its end, cancelled at its timeout)."""
        return self._handlers[pk]

    def declared(self, pk: int) -> Any:
        """The handler function as declared (a def or an async def)."""
        return self._declared[pk]

    def load(self) -> None:
        """Read the rows (after a sync) and import their handlers. Refuses unknown or
        inactive names, and a named subscription whose handler does not import."""
        self._rows.clear()
        self.unloaded.clear()
        active = Subscription.objects.filter(active=True).select_related("topic")
        by_name = {sub.name: sub for sub in active}
        if self.only is not None:
            unknown = [name for name in self.only if name not in by_name]
            if unknown:
                raise ValueError(
                    f"Unknown or inactive subscriptions: {', '.join(unknown)}. "
                    f"Active ones: {', '.join(sorted(by_name)) or '(none)'}."
                )
            by_name = {name: by_name[name] for name in self.only}
        for sub in by_name.values():
            try:
                self._import(sub)
            except HandlerImportError as exc:
                if self.only is not None:
                    raise  # asked for by name: refuse to start
                # Declared by other code (a newer release, say) or a module that broke:
                # the other subscriptions run; this one's deliveries wait, never acked.
                logger.error("%s", exc)
                self.unloaded[sub.pk] = sub
        self._next_import = time.monotonic() + IMPORT_RETRY_INTERVAL

    def _import(self, sub: Subscription) -> None:
        try:
            handler = import_string(sub.handler)
        except Exception as exc:  # a module may raise anything at import, not just ImportError
            raise HandlerImportError(
                f"Subscription {sub.name!r}: its handler {sub.handler!r} does not import "
                f"({type(exc).__name__}: {exc}). Its deliveries wait until a dispatcher can "
                "import it."
            ) from exc
        self._rows[sub.pk] = sub
        self._declared[sub.pk] = handler
        self._handlers[sub.pk] = as_sync(handler, sub.effective_timeout)

    def retry_imports_soon(self) -> None:
        """Have the next pass try the handlers that did not import (a test, an operator
        who just deployed a fix)."""
        self._next_import = 0.0

    def retry_imports(self) -> None:
        """Try the handlers that did not import again, when due."""
        if not self.unloaded or time.monotonic() < self._next_import:
            return
        self._next_import = time.monotonic() + IMPORT_RETRY_INTERVAL
        self.imports_retried += 1
        for pk, sub in list(self.unloaded.items()):
            try:
                sub.refresh_from_db()
            except Subscription.DoesNotExist:
                sub.active = False
            if not sub.active:
                # Removed or deactivated meanwhile (a later deploy dropped it): stop trying.
                del self.unloaded[pk]
                logger.info("subscription %s is no longer active; not importing it", sub.name)
                continue
            try:
                self._import(sub)
            except HandlerImportError as exc:
                logger.error("%s", exc)
            else:
                del self.unloaded[pk]
                logger.info("subscription %s: its handler imports now, delivering", sub.name)

    def rotated(self, *, advance: bool = True) -> list[Subscription]:
        """The subscriptions, starting one further at each claim: each gets idle workers
        first in turn. Fan-outs look in the same order without moving it on, or a pass
        could move it by two and start every claim at the same subscription."""
        subs = list(self._rows.values())
        if advance:
            self._rotation = (self._rotation + 1) % len(subs)
        return subs[self._rotation :] + subs[: self._rotation]

    def work_due(self, horizon: datetime) -> bool:
        """Whether any of them has committed work: messages to sequence or fan out,
        deliveries in flight anywhere, or due by ``horizon``. A paused subscription's
        deliveries wait for an operator, not for this process. (Rows of still-open
        transactions are invisible here, so this sees committed work only.)"""
        pks = list(self._rows)
        paused = set(
            Subscription.objects.filter(pk__in=pks, paused=True).values_list("pk", flat=True)
        )
        topics = {sub.topic_id for sub in self._rows.values()}
        waiting = MessageRow.objects.filter(topic_id__in=topics, offset__isnull=True)
        # Apart, each through its own partial index: messages due later are not read.
        if waiting.filter(deliver_at__isnull=True).exists():
            return True
        if waiting.filter(deliver_at__isnull=False, deliver_at__lte=horizon).exists():
            return True
        if set(pks) & set(Subscription.behind()):
            return True
        running = [pk for pk in pks if pk not in paused]
        unordered = [pk for pk in running if not self._rows[pk].effective_ordered]
        due_or_running = Q(state=Delivery.State.INFLIGHT) | Q(
            state__in=Delivery.WAITING, available_at__lte=horizon
        )
        unfinished = Delivery.objects.unfinished()
        # A keyed subscription's due row counts only at the head of its key.
        earlier = unfinished.filter(
            subscription_id=OuterRef("subscription_id"),
            key=OuterRef("key"),
            offset__lt=OuterRef("offset"),
        )
        keyed = {pk for pk in unordered if self._rows[pk].keyed}
        not_behind = Q(key__isnull=True) | ~Exists(earlier)
        if (
            unfinished.filter(subscription_id__in=[pk for pk in unordered if pk not in keyed])
            .filter(due_or_running)
            .exists()
            or unfinished.filter(subscription_id__in=keyed)
            .filter(Q(state=Delivery.State.INFLIGHT) | (due_or_running & not_behind))
            .exists()
        ):
            return True
        for pk in running:
            if pk in unordered:
                continue
            head = Delivery.objects.heads(pk).values_list("state", "available_at").first()
            if head and (head[0] == Delivery.State.INFLIGHT or head[1] <= horizon):
                return True
        return False
