"""Settings for the benchmark project: the test project's, plus the no-op subscribers.

DATABASE_URL picks the database, as for the test project. Logging is quiet: a benchmark of
the dispatcher must not measure its log lines.
"""

from __future__ import annotations

import os

from testproject.settings import *  # noqa: F403
from testproject.settings import INSTALLED_APPS

INSTALLED_APPS = [*INSTALLED_APPS, "bench.benchapp"]
ROOT_URLCONF = "testproject.urls"
DEBUG = False
# The library's defaults, not the demo's.
PUBSUB: dict[str, object] = {}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"django_pubsub": {"handlers": ["console"], "level": "WARNING"}},
}

# As psycopg defaults to, and as raw.py and procrastinate run: a statement executed five
# times on a connection is prepared. Django leaves this off unless asked, for poolers that
# cannot carry prepared statements (PgBouncer before 1.21): docs/performance.md has the
# figures both ways. BENCH_PREPARE=0 measures Django's default.
PREPARE = os.environ.get("BENCH_PREPARE", "1") == "1"
if DATABASES["default"]["ENGINE"].endswith("postgresql") and PREPARE:  # noqa: F405
    DATABASES["default"].setdefault("OPTIONS", {})["prepare_threshold"] = 5  # noqa: F405
