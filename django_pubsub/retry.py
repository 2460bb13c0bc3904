"""Retry delays: exponential backoff with jitter."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from django.core.exceptions import ImproperlyConfigured

from .validation import MAX_SECONDS

Random = Callable[[], float]


@dataclass(frozen=True)
class Backoff:
    """Delay before attempt ``n + 1`` after attempt ``n`` failed.

    ``base * factor ** (n - 1)``, capped at ``maximum``, then spread by up to
    ``jitter`` (a fraction) either way so that many failing deliveries do not
    retry in lock step.
    """

    base: float = 1.0
    factor: float = 2.0
    maximum: float = 300.0
    jitter: float = 0.1

    def __post_init__(self) -> None:
        for name in ("base", "factor", "maximum", "jitter"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
            ):
                raise ImproperlyConfigured(
                    f"backoff {name} must be a finite number, not {value!r}."
                )
        for name in ("base", "maximum"):
            value = getattr(self, name)
            if not 0 <= value <= MAX_SECONDS:
                raise ImproperlyConfigured(
                    f"backoff {name} must be from 0 to {MAX_SECONDS} seconds, not {value!r}."
                )
        if not 1 <= self.factor <= 1000:
            raise ImproperlyConfigured(
                f"backoff factor must be from 1 to 1000, not {self.factor!r}."
            )
        if not 0 <= self.jitter <= 1:
            raise ImproperlyConfigured(f"backoff jitter must be from 0 to 1, not {self.jitter!r}.")

    @classmethod
    def coerce(cls, value: Backoff | Mapping[str, Any] | None) -> Backoff | None:
        """Accept a Backoff, a dict of its fields, or None."""
        if value is None or isinstance(value, Backoff):
            return value
        if not isinstance(value, Mapping):
            raise ImproperlyConfigured(
                f"backoff must be a Backoff or a dict of base/factor/maximum/jitter, not {value!r}."
            )
        unknown = set(value) - {"base", "factor", "maximum", "jitter"}
        if unknown:
            raise ImproperlyConfigured(
                f"Unknown backoff keys {sorted(unknown)}; use base, factor, maximum, jitter."
            )
        return cls(**value)

    def delay(self, attempt: int, rand: Random = random.random) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        exponent = max(attempt - 1, 0)
        try:
            raw = self.base * self.factor**exponent
        except OverflowError:
            raw = self.maximum
        capped = min(raw, self.maximum)
        spread = capped * self.jitter * (2 * rand() - 1)
        return max(capped + spread, 0.0)

    def as_dict(self) -> dict[str, float]:
        return {
            "base": self.base,
            "factor": self.factor,
            "maximum": self.maximum,
            "jitter": self.jitter,
        }


class ErrorBackoff:
    """How long to wait before trying again something that keeps failing (the database
    away, a lost LISTEN connection): doubling from ``base`` up to ``maximum``, no jitter,
    back to the start after a success. Not tied to the poll interval: a server restart
    should be noticed in well under a second even where the dispatcher polls rarely."""

    def __init__(self, base: float = 0.1, maximum: float = 5.0) -> None:
        self._backoff = Backoff(base=base, factor=2, maximum=maximum, jitter=0)
        self.failures = 0

    def failed(self) -> float:
        """Count a failure; the seconds to wait before the next try."""
        self.failures += 1
        return self._backoff.delay(self.failures + 1)

    def succeeded(self) -> None:
        self.failures = 0
