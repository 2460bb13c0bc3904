"""What differs between the databases django-pubsub runs on, behind one small interface.

The models ask ``for_connection(connection)`` (or ``get(using)``) for the backend of a
connection and call it for every statement whose SQL depends on the database: inserting
messages, sequencing, fan-out, claim, ack, row locks, the one-at-a-time lock, wake-ups,
the dispatcher connection's tuning, clock skew and consistent reads. Nothing outside this
package tests a connection's vendor. A new database is one more module here, a subclass
of ``base.Backend``, named in ``BACKENDS``.
"""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.db import connections
from django.utils.module_loading import import_string

from .base import Backend
from .rows import Claimed, FanOut, Lease, Waker, padded_ids

__all__ = [
    "BACKENDS",
    "Backend",
    "Claimed",
    "FanOut",
    "Lease",
    "Waker",
    "for_connection",
    "get",
    "padded_ids",
]

BACKENDS = {
    "postgresql": "django_pubsub.backends.postgresql.PostgreSQLBackend",
    "sqlite": "django_pubsub.backends.sqlite.SQLiteBackend",
}


def for_connection(connection: Any) -> Backend:
    """The backend of a Django connection: one per connection (so per thread), made on
    first use. Cheap enough for every publish()."""
    try:
        return connection._pubsub_backend  # type: ignore[no-any-return]
    except AttributeError:
        pass
    path = BACKENDS.get(connection.vendor)
    if path is None:
        raise ImproperlyConfigured(
            f"django-pubsub runs on PostgreSQL and SQLite; the database {connection.alias!r} "
            f"is {connection.display_name}."
        )
    backend: Backend = import_string(path)(connection)
    connection._pubsub_backend = backend
    return backend


def get(using: str = "default") -> Backend:
    return for_connection(connections[using])


def missing_options(database: dict[str, Any]) -> list[str]:
    """What a database's settings (an entry of DATABASES) lack for a dispatcher and
    handlers to write at the same time, as the options to add; read from the settings
    alone, without connecting (for check W001)."""
    if "sqlite3" in str(database.get("ENGINE", "")):
        from .sqlite import SQLiteBackend

        return SQLiteBackend.missing_options(database.get("OPTIONS", {}))
    return []
