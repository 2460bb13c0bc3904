"""procrastinate's no-op task, found by its autodiscovery (PostgreSQL only)."""

from __future__ import annotations

from procrastinate.contrib.django import app

from peerapp.tasks import record


@app.task(name="noop")
def procrastinate_noop(mark: str | None = None) -> None:
    record(mark)
