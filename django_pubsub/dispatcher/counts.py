"""What one dispatcher did, counted as it goes: what runpubsub prints when it stops."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Counts:
    # Deliveries handed to the workers (claimed, or leased at fan-out).
    claimed: int = 0
    acked: int = 0
    # Failed attempts recorded (retried or dead-lettered).
    failed: int = 0
    retried: int = 0
    dead: int = 0
    # Claimed deliveries returned unstarted, attempt and all.
    given_back: int = 0
    # Results rejected because the lease had been taken back meanwhile.
    fenced: int = 0
    # Other dispatchers' (or lost) leases taken back and failed so they run again.
    recovered: int = 0
    timed_out: int = 0
    # Claimed after their message's expires_at: ended "expired", unrun.
    expired: int = 0
