"""python manage.py runpubsub: parse, set up logging, run the dispatch loop."""

from __future__ import annotations

import argparse
import logging
import math
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DEFAULT_DB_ALIAS, connections

from django_pubsub.conf import MAX_WORKERS
from django_pubsub.dispatcher import DispatchLoop
from django_pubsub.exceptions import PubSubError
from django_pubsub.validation import MAX_COUNT, MAX_SECONDS, is_positive_int

LEVELS = {0: logging.WARNING, 1: logging.INFO, 2: logging.DEBUG, 3: logging.DEBUG}


def positive_int(maximum: int) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if not is_positive_int(value, maximum):
            raise argparse.ArgumentTypeError(f"must be from 1 to {maximum}, got {value}")
        return value

    return parse


def seconds(minimum: float, inclusive: bool) -> Any:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a number of seconds, got {text!r}"
            ) from None
        low_enough = value >= minimum if inclusive else value > minimum
        if not (math.isfinite(value) and low_enough and value <= MAX_SECONDS):
            bound = ">=" if inclusive else ">"
            raise argparse.ArgumentTypeError(
                f"must be {bound} {minimum:g} and at most {MAX_SECONDS}, got {text}"
            )
        return value

    return parse


def names(text: str) -> list[str]:
    parts = [part.strip() for part in text.split(",")]
    if not all(parts):
        raise argparse.ArgumentTypeError(
            f"expected comma-separated subscription names, got {text!r}"
        )
    return parts


class Command(BaseCommand):
    help = "Run the pub/sub dispatcher: deliver published messages to every subscription."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--workers", type=positive_int(MAX_WORKERS), help="Handler threads (PUBSUB WORKERS)."
        )
        parser.add_argument(
            "--poll-interval", type=seconds(0, inclusive=False), help="Seconds between polls."
        )
        parser.add_argument(
            "--subscriptions", type=names, help="Only these subscriptions, comma-separated."
        )
        parser.add_argument(
            "--until-idle",
            action="store_true",
            help="Exit once nothing is in flight and nothing is due within --idle-wait.",
        )
        parser.add_argument(
            "--idle-wait",
            type=seconds(0, inclusive=True),
            default=None,
            help="With --until-idle: also wait for work due within this many seconds.",
        )
        parser.add_argument(
            "--max-messages",
            type=positive_int(MAX_COUNT),
            help="Exit after handling this many deliveries.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if options["idle_wait"] is not None and not options["until_idle"]:
            raise CommandError("--idle-wait only applies with --until-idle.")
        default = connections[DEFAULT_DB_ALIAS]
        # Without connecting (get_autocommit() would): the database may be down at start,
        # which runpubsub waits out. Autocommit is off only on a connection made already.
        manual = default.connection is not None and not default.autocommit
        if default.in_atomic_block or manual:
            raise CommandError(
                "runpubsub cannot run inside a transaction (an atomic block, or a test of "
                "Django's TestCase): it commits as it goes, and would not see what the "
                "transaction wrote. In tests, run the deliveries with "
                "django_pubsub.testing.drain() instead (docs/testing.md)."
            )
        self._configure_logging(options["verbosity"])
        try:
            loop = DispatchLoop(
                workers=options["workers"],
                poll_interval=options["poll_interval"],
                subscriptions=options["subscriptions"],
                until_idle=options["until_idle"],
                idle_wait=options["idle_wait"] or 0.0,
                max_messages=options["max_messages"],
            )
            counts = loop.run()
        except (PubSubError, ValueError) as exc:
            raise CommandError(str(exc)) from exc
        if options["verbosity"] >= 1:
            self.stdout.write(
                f"delivered={counts.acked} retried={counts.retried} dead={counts.dead} "
                f"given_back={counts.given_back} expired={counts.expired}"
            )

    @staticmethod
    def _configure_logging(verbosity: int) -> None:
        logger = logging.getLogger("django_pubsub")
        logger.setLevel(LEVELS.get(verbosity, logging.DEBUG))
        if not logger.handlers and not logging.getLogger().handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(
                logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s")
            )
            logger.addHandler(handler)
