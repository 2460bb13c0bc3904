"""Wake-ups on SQLite: notice another connection's commit of new messages within
milliseconds, without waiting for the next poll.

SQLite has no notifications. Its ``PRAGMA data_version`` changes, for one connection, when
any other connection has committed since; reading it costs microseconds and no lock. A
thread with its own connection reads it whenever the database's files change (Linux tells
it through inotify, at no cost while nothing happens) or, elsewhere, every few
milliseconds; when it changed, the thread looks for unsequenced messages (through their
partial index) and wakes the dispatcher only if there are some. Commits that publish
nothing (acks, claims) wake nobody. Polling stays the safety net.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import select
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..retry import ErrorBackoff

logger = logging.getLogger("django_pubsub.backends.data_version")

# Seconds between looks where no file events are to be had, and between two looks at most
# (a safety net for a missed event, and how soon stop() is answered). A look costs a few
# microseconds.
POLL = 0.002
IDLE_LOOK = 0.1
# Longest wait before watching again after a failure.
MAX_REOPEN_WAIT = 5.0
# Changes closer together than this are looked at once: under load the files change
# thousands of times a second, and a wake-up is already on its way.
SETTLE = 0.0005
# After a look that found commits but no new message (a busy dispatcher's own acks and
# claims), the next look waits this long: a busy dispatcher's writes cost the watcher a
# few hundred looks a second, not one per commit, and the interpreter's lock is left to
# the handlers.
QUIET = 0.002
_INOTIFY_MASK = 0x2 | 0x100 | 0x80  # IN_MODIFY | IN_CREATE | IN_MOVED_TO
_EVENT = struct.Struct("iIII")


class DataVersionWaker:
    """A thread that calls ``wake`` when another connection commits unsequenced messages."""

    def __init__(self, wake: Callable[[], None], connection: Any) -> None:
        self._wake = wake
        self._wrapper = connection
        self._params = connection.get_connection_params()
        self._stop = threading.Event()
        # Set while it watches.
        self.ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pubsub-waker", daemon=True)

    @classmethod
    def start(cls, wake: Callable[[], None], connection: Any) -> DataVersionWaker | None:
        if connection.is_in_memory_db():
            return None  # no other process can commit to it
        waker = cls(wake, connection)
        waker._thread.start()
        return waker

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        backoff = ErrorBackoff(maximum=MAX_REOPEN_WAIT)
        while not self._stop.is_set():
            wait = 0.0
            try:
                self._watch(backoff)
            except Exception:  # any failure: watch again after a bounded wait
                wait = backoff.failed()
                logger.warning(
                    "watching the SQLite database failed, again in %.1fs", wait, exc_info=True
                )
                # A commit may have gone unnoticed meanwhile.
                self._wake()
            finally:
                self.ready.clear()
            self._stop.wait(wait)

    def _watch(self, backoff: ErrorBackoff) -> None:
        """Until stop(): look at data_version whenever the files change."""
        raw = self._wrapper.get_new_connection(self._params)
        changes = None
        try:
            changes = _FileChanges.watch(Path(str(self._params["database"])))
            cursor = raw.cursor()
            last = _data_version(cursor)
            self.ready.set()
            backoff.succeeded()
            while not self._stop.is_set():
                if changes is not None:
                    changes.wait(IDLE_LOOK)
                    self._stop.wait(SETTLE)
                else:
                    self._stop.wait(POLL)
                version = _data_version(cursor)
                if version != last:
                    last = version
                    if _unsequenced(cursor):
                        self._wake()
                    else:
                        self._stop.wait(QUIET)
        finally:
            if changes is not None:
                changes.close()
            raw.close()


def _data_version(cursor: Any) -> int:
    cursor.execute("PRAGMA data_version")
    return int(cursor.fetchone()[0])


def _unsequenced(cursor: Any) -> bool:
    cursor.execute(
        'SELECT 1 FROM "django_pubsub_message" INDEXED BY pubsub_message_unsequenced '
        'WHERE "offset" IS NULL AND deliver_at IS NULL LIMIT 1'
    )
    return cursor.fetchone() is not None


class _FileChanges:
    """inotify on the database's folder, for changes to its files (Linux only)."""

    def __init__(self, fd: int, prefix: bytes) -> None:
        self._fd = fd
        self._prefix = prefix

    @classmethod
    def watch(cls, database: Path) -> _FileChanges | None:
        name = ctypes.util.find_library("c")
        try:
            libc = ctypes.CDLL(name, use_errno=True)
            init, add = libc.inotify_init1, libc.inotify_add_watch
        except (OSError, AttributeError, TypeError):
            return None  # not Linux: poll
        fd = init(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            return None
        folder = str(database.resolve().parent).encode()
        if add(fd, folder, _INOTIFY_MASK) < 0:
            os.close(fd)
            return None
        return cls(fd, database.name.encode())

    def wait(self, timeout: float) -> None:
        """Until one of the database's files (the database, its -wal or -shm) changes,
        or ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._fd], [], [], left)[0]:
                return
            if self._ours(os.read(self._fd, 65536)):
                return

    def _ours(self, data: bytes) -> bool:
        at = 0
        while at + _EVENT.size <= len(data):
            _, _, _, size = _EVENT.unpack_from(data, at)
            name = data[at + _EVENT.size : at + _EVENT.size + size].rstrip(b"\0")
            at += _EVENT.size + size
            if name.startswith(self._prefix):
                return True
        return False

    def close(self) -> None:
        os.close(self._fd)
