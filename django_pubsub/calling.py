"""How a handler is called: a def or an async def, with one message or a batch's list.

An async handler runs on an event loop of its own call, made by asgiref's async_to_sync
from the worker's thread, as Django runs async code from synchronous code: the ORM's
async methods then run their queries back on that thread, on its connection, and a
synchronous ORM call inside the coroutine raises SynchronousOnlyOperation. Its timeout
is enforced by cancelling it (``asyncio.wait_for``), so a timed-out async handler frees
its worker thread, where a def one keeps it until it returns.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from typing import Any

from asgiref.sync import async_to_sync

# Seconds an async handler's worker gets past its timeout to unwind from the cancellation
# before the pool gives the thread up as stuck.
CANCEL_GRACE = 2.0


def is_async(func: Any) -> bool:
    return inspect.iscoroutinefunction(func)


def as_sync(func: Callable[[Any], Any], timeout: float | None) -> Callable[[Any], Any]:
    """``func`` as a plain callable of one argument: itself if it is a def; if an async
    def, a function that runs it to its end (cancelled after ``timeout`` seconds)."""
    if not is_async(func):
        return func

    async def bounded(argument: Any) -> Any:
        coroutine = func(argument)
        if timeout is None:
            return await coroutine
        try:
            return await asyncio.wait_for(coroutine, timeout)
        except TimeoutError:
            raise TimeoutError(f"async handler cancelled after {timeout:g}s") from None

    run = async_to_sync(bounded)

    def call(argument: Any) -> Any:
        return run(argument)

    call.__qualname__ = getattr(func, "__qualname__", "handler")
    return call


def pool_timeout(func: Any, timeout: float | None) -> float | None:
    """When the worker pool gives up on a handler's thread: its timeout, and for an async
    one a grace to unwind from its cancellation."""
    if timeout is None or not is_async(func):
        return timeout
    return timeout + CANCEL_GRACE
