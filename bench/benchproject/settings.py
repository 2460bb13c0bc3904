"""Settings for the benchmark project: the test project's, plus the no-op subscribers.

DATABASE_URL picks the database, as for the test project. Logging is quiet: a benchmark of
the dispatcher must not measure its log lines.
"""

from __future__ import annotations

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
