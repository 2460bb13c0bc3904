"""The heartbeat rows of runpubsub processes: who is alive, and who is presumed dead."""

from __future__ import annotations

import logging
import os
import socket
from datetime import datetime, timedelta

from django.db import models

from .. import backends
from ..conf import pubsub_settings

logger = logging.getLogger("django_pubsub.models")


def pid_namespace() -> str:
    """Which PID space our pid belongs to: two containers on one host share no pids."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


class DispatcherQuerySet(models.QuerySet["Dispatcher"]):
    def alive(self) -> DispatcherQuerySet:
        return self.filter(stopped_at__isnull=True)

    def heartbeating(self, now: datetime) -> DispatcherQuerySet:
        """Running, and heard from within DISPATCHER_TIMEOUT: those that deliver."""
        recent = now - timedelta(seconds=pubsub_settings.dispatcher_timeout)
        return self.alive().filter(last_seen__gte=recent).order_by("id")

    def presumed_dead(self, *, silent_before: datetime, me: Dispatcher) -> list[Dispatcher]:
        """Running rows whose process is gone: silent since before ``silent_before``, or
        known gone on this host."""
        host, namespace = socket.gethostname(), pid_namespace()
        dead = []
        for row in self.alive().exclude(pk=me.pk):
            if row.last_seen < silent_before:
                dead.append(row)
            elif row.hostname == host and row.pid_namespace == namespace and namespace:
                # Same pid space: a pid that is ours (reused) or no longer exists is gone.
                if row.pid == me.pid or not _pid_alive(row.pid):
                    dead.append(row)
        return dead


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Dispatcher(models.Model):
    """The heartbeat of one runpubsub process."""

    hostname = models.CharField(max_length=255)
    pid = models.PositiveIntegerField()
    pid_namespace = models.CharField(max_length=64, blank=True)
    started_at = models.DateTimeField()
    last_seen = models.DateTimeField()
    stopped_at = models.DateTimeField(null=True, blank=True)
    inflight = models.PositiveIntegerField(default=0)
    # Handlers that outran their timeout and still hold a thread (Python cannot stop them).
    stuck = models.PositiveIntegerField(default=0)

    objects = DispatcherQuerySet.as_manager()

    class Meta:
        ordering = ["-started_at"]

    def __str__(self) -> str:
        return f"{self.hostname}:{self.pid}"

    @classmethod
    def register(cls, now: datetime) -> Dispatcher:
        return cls.objects.create(
            hostname=socket.gethostname(),
            pid=os.getpid(),
            pid_namespace=pid_namespace(),
            started_at=now,
            last_seen=now,
        )

    def beat(self, now: datetime, *, inflight: int, stuck: int = 0, revive: bool = True) -> bool:
        """Record that we are alive; False if the row says stopped (another dispatcher
        had presumed us dead, or we stopped). ``revive``: then mark it alive again."""
        mine = Dispatcher.objects.filter(pk=self.pk)
        fields = {"last_seen": now, "inflight": inflight, "stuck": stuck}
        alive = bool(mine.filter(stopped_at__isnull=True).update(**fields))
        if not alive and not revive:
            return False
        if not alive:
            # Our leases were taken back: results of handlers running now will be fenced out.
            # Count as alive again so nobody takes the leases we claim from here on.
            logger.warning("dispatcher %s was presumed dead by another; carrying on", self)
            mine.update(stopped_at=None, **fields)
        self.last_seen, self.inflight, self.stuck, self.stopped_at = now, inflight, stuck, None
        return alive

    @staticmethod
    def clock_skew(now: datetime, using: str = "default") -> float | None:
        """Seconds by which ``now`` (this host's clock) is ahead of the database server's;
        None where the database runs in this process (SQLite)."""
        return backends.get(using).clock_skew(now)

    def status(self, now: datetime) -> str:
        """In a word or two: running, stopped (cleanly: its stop() wrote the last beat),
        died (marked dead by another dispatcher after it fell silent, a SIGKILL say), or
        silent (not heard from within DISPATCHER_TIMEOUT, not yet marked)."""
        if self.stopped_at is None:
            silent = now - self.last_seen > timedelta(seconds=pubsub_settings.dispatcher_timeout)
            return "silent: presumed dead" if silent else "running"
        return "stopped" if self.stopped_at <= self.last_seen else "died"

    def mark_dead(self, now: datetime) -> bool:
        """Mark a presumed-dead dispatcher stopped, unless it beat since we looked."""
        updated = Dispatcher.objects.filter(
            pk=self.pk, stopped_at__isnull=True, last_seen=self.last_seen
        ).update(stopped_at=now)
        return bool(updated)

    def stop(self, now: datetime) -> None:
        self.stopped_at = self.last_seen = now
        self.inflight = self.stuck = 0
        Dispatcher.objects.filter(pk=self.pk).update(
            stopped_at=now, last_seen=now, inflight=0, stuck=0
        )
