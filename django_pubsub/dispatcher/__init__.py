"""The dispatcher that ``runpubsub`` runs, made of parts that each own their state:

- ``loop``: the dispatch loop (start, step, close) that runs the others in a fixed order;
- ``subscriptions``: the subscriptions it runs and their handlers;
- ``claimer``: what it may take on, in chunks sized by handler time, handed to the pool;
- ``outcomes``: the outcome recorder (ack, retry, dead letter, give back);
- ``leases``: the lease keeper (extend) and recovery (take back what nobody keeps);
- ``heartbeat``: liveness and clock skew, on its own thread with the lease keeper;
- ``stopping``: SIGINT and SIGTERM, restoring the handlers that were there before;
- ``workers``: the worker pool, which runs handlers a chunk at a time.
"""

from __future__ import annotations

from .claimer import CHUNK_SECONDS, MAX_HELD
from .counts import Counts
from .loop import DispatchLoop

__all__ = ["CHUNK_SECONDS", "MAX_HELD", "Counts", "DispatchLoop"]
