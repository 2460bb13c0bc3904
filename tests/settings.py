"""The test project's settings plus a test app whose handlers record every run.

DATABASE_URL picks the database as for the test project; runtests.py runs the suite once on
SQLite and once on PostgreSQL.
"""

from __future__ import annotations

import json
import os

from testproject.settings import *  # noqa: F403
from testproject.settings import BASE_DIR, DATABASES, INSTALLED_APPS

INSTALLED_APPS = [*INSTALLED_APPS, "tests.pubsub_app"]

_default = DATABASES["default"]
if _default["ENGINE"].endswith("sqlite3"):
    # A file, not memory: handler threads and runpubsub subprocesses share it.
    (BASE_DIR / ".test-results").mkdir(exist_ok=True)
    _default["TEST"] = {
        "NAME": os.environ.get(
            "PUBSUB_TEST_SQLITE", str(BASE_DIR / ".test-results" / "test_pubsub.sqlite3")
        )
    }
else:
    # runtests.py gives each run a name of its own, so runs can share the server.
    _default["TEST"] = {"NAME": os.environ.get("PUBSUB_TEST_PG_NAME", "test_django_pubsub")}

PUBSUB = {
    "POLL_INTERVAL": 0.02,
    "WORKERS": 4,
    "MAX_ATTEMPTS": 3,
    "HEARTBEAT_INTERVAL": 0.5,
    "DISPATCHER_TIMEOUT": 10.0,
    "SHUTDOWN_GRACE": 5.0,
    "BACKOFF": {"base": 0.01, "factor": 2.0, "maximum": 0.1, "jitter": 0.0},
    # The suite's dispatchers prune only where a test asks (the two variables below, for
    # runpubsub subprocesses): a test's fake clock years ahead would prune what it checks.
    "PRUNE_INTERVAL": float(os.environ.get("PUBSUB_TEST_PRUNE_INTERVAL", "0")) or None,
    "RETENTION": json.loads(os.environ.get("PUBSUB_TEST_RETENTION", "{}")),
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "loggers": {"django_pubsub": {"level": "INFO"}},
}
