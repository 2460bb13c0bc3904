"""Settings of the peers' project: procrastinate, django-tasks (django-tasks-db) and django-q2.

Environment:
- BENCH_DB=postgres|sqlite: PostgreSQL database bench_peers on 127.0.0.1:5432 as postgres, or
  the SQLite file /tmp/django_pubsub_bench_peers.sqlite3 (WAL, IMMEDIATE, timeout 20 s, as
  django-pubsub's test project). procrastinate is installed on PostgreSQL only.
- BENCH_CONCURRENCY: django-q2's worker processes (its cluster reads them from settings).
- BENCH_CONN_MAX_AGE: Django's CONN_MAX_AGE, default 600 (persistent connections, as Django's
  deployment checklist suggests); "0" closes the connection at every close_old_connections().
- BENCH_LATENCY_LOG: where the tasks append "mark start_time" (see peerapp.tasks).

Logging is quiet (WARNING) for every peer, as in django-pubsub's own benchmark project.
"""

from __future__ import annotations

import os
from typing import Any

BENCH_DB = os.environ.get("BENCH_DB", "postgres")
CONCURRENCY = int(os.environ.get("BENCH_CONCURRENCY", "1"))
PG_DATABASE = "bench_peers"
SQLITE_PATH = "/tmp/django_pubsub_bench_peers.sqlite3"

SECRET_KEY = "bench-peers-not-secret"
DEBUG = False
ALLOWED_HOSTS: list[str] = []
USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

_conn: dict[str, Any] = {
    "CONN_MAX_AGE": int(os.environ.get("BENCH_CONN_MAX_AGE", "600")),
    "CONN_HEALTH_CHECKS": True,
}
if BENCH_DB == "postgres":
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": PG_DATABASE,
            "USER": "postgres",
            "HOST": "127.0.0.1",
            "PORT": "5432",
            # As for django-pubsub's own figures (bench/benchproject/settings.py).
            "OPTIONS": {"prepare_threshold": 5},
            **_conn,
        }
    }
elif BENCH_DB == "sqlite":
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": SQLITE_PATH,
            "OPTIONS": {
                "init_command": "PRAGMA journal_mode=WAL;",
                "transaction_mode": "IMMEDIATE",
                "timeout": 20,
            },
            **_conn,
        }
    }
else:
    raise RuntimeError(f"BENCH_DB must be postgres or sqlite, not {BENCH_DB!r}")

INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django_tasks",
    "django_tasks_db",
    "django_q",
    "peerapp",
]
if BENCH_DB == "postgres":
    INSTALLED_APPS.insert(1, "procrastinate.contrib.django")

# procrastinate: its task lives in peerapp/procrastinate_tasks.py, so that peerapp.tasks
# imports on SQLite, where procrastinate is not installed. Worker options come from the CLI.
PROCRASTINATE_AUTODISCOVER_MODULE_NAME = "procrastinate_tasks"

# django-tasks: the database backend, which moved from django-tasks to django-tasks-db.
TASKS = {"default": {"BACKEND": "django_tasks_db.DatabaseBackend", "QUEUES": ["default"]}}

# django-q2: the Django ORM broker example of its documentation (Brokers > Django ORM),
# with the worker count from BENCH_CONCURRENCY.
Q_CLUSTER = {
    "name": "DjangORM",
    "workers": CONCURRENCY,
    "timeout": 90,
    "retry": 120,
    "queue_limit": 50,
    "bulk": 10,
    "orm": "default",
    "log_level": "WARNING",
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": "WARNING"},
}
