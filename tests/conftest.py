from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from django.db import connection, transaction

from django_pubsub import publish
from django_pubsub.dispatcher import Counts, DispatchLoop
from django_pubsub.models import Delivery
from django_pubsub.testing import Clock
from tests.pubsub_app.models import HandlerRun
from tests.pubsub_app.subscribers import GATE, Gate

ROOT = Path(__file__).resolve().parent.parent


def pytest_report_header(config: pytest.Config) -> str:
    from django.conf import settings

    return f"django_pubsub database: {settings.DATABASES['default']['ENGINE']}"


# The clock the suite moves by hand is the one the package gives every project's tests.
FakeClock = Clock


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def gate() -> Iterator[Gate]:
    """The test app's gate, closed: handlers of messages published with ``"gate": True``
    wait at it until the test opens it (it opens at the end of the test whatever happens)."""
    GATE.reset()
    try:
        yield GATE
    finally:
        GATE.open()


@pytest.fixture
def dispatch() -> Callable[..., Counts]:
    """Run the dispatcher in-process until idle, for the named subscriptions only."""

    def run(*subscriptions: str, **options: Any) -> Counts:
        options.setdefault("poll_interval", 0.01)
        options.setdefault("until_idle", True)
        options.setdefault("handle_signals", False)
        return DispatchLoop(subscriptions=list(subscriptions) or None, **options).run()

    return run


def connection_lost(*args: Any, **kwargs: Any) -> Any:
    """Stands in for a database call whose connection was lost."""
    from django.db import OperationalError

    raise OperationalError("server closed the connection unexpectedly")


@contextmanager
def claims_lost(loop: DispatchLoop, *, give_back_fails: bool = False) -> Iterator[None]:
    """Inside the block, the loop's claims (and fan-out leases) commit, and then the
    connection is lost before their rows are read; ``give_back_fails``: giving those
    leases back fails the same way. Through the public names the claimer and the model
    offer: Claimer.jobs and DeliveryQuerySet.give_back."""
    from django_pubsub.models import DeliveryQuerySet

    assert loop.parts is not None
    claimer = loop.parts.claimer
    real_give_back = DeliveryQuerySet.give_back
    claimer.jobs = connection_lost  # type: ignore[method-assign]
    if give_back_fails:
        DeliveryQuerySet.give_back = connection_lost  # type: ignore[method-assign]
    try:
        yield
    finally:
        DeliveryQuerySet.give_back = real_give_back  # type: ignore[method-assign]
        del claimer.jobs  # the class's own again


def wait_for(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    """Poll ``condition`` until true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


def write_with_rollbacks(
    topic: str, plan: list[float], committed: list[int], lock: threading.Lock
) -> None:
    """One transaction per entry of ``plan``: publish two messages, stay open ``roll`` x 10 ms
    (so transactions commit out of id order), roll back when ``roll`` < 0.2. Appends the
    ids that committed to ``committed``."""
    for n, roll in enumerate(plan):
        try:
            with transaction.atomic():
                batch = [publish(topic, {"n": n, "k": k}) for k in range(2)]
                time.sleep(roll * 0.01)
                if roll < 0.2:
                    raise RuntimeError("rollback")
        except RuntimeError:
            continue
        with lock:
            committed.extend(batch)


def log_in_operator(client: Any, *codenames: str) -> Any:
    """A staff user with these django_pubsub permissions, logged in on ``client``."""
    from django.contrib.auth.models import Permission, User

    user = User.objects.create_user("operator", password="pw", is_staff=True)
    user.user_permissions.add(
        *Permission.objects.filter(content_type__app_label="django_pubsub", codename__in=codenames)
    )
    client.force_login(user)
    return user


def runs(subscription: str) -> list[HandlerRun]:
    return list(HandlerRun.objects.filter(subscription=subscription).order_by("id"))


def states(subscription: str) -> dict[str, int]:
    found: dict[str, int] = {}
    for state in Delivery.objects.filter(subscription__name=subscription).values_list(
        "state", flat=True
    ):
        found[state] = found.get(state, 0) + 1
    return found


def is_postgres() -> bool:
    return connection.vendor == "postgresql"


def database_url() -> str:
    """A URL for the test database, for subprocesses."""
    settings = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{settings['NAME']}"
    host = settings.get("HOST") or "127.0.0.1"
    port = settings.get("PORT") or 5432
    user = settings.get("USER") or "postgres"
    password = f":{settings['PASSWORD']}" if settings.get("PASSWORD") else ""
    return f"postgres://{user}{password}@{host}:{port}/{settings['NAME']}"


class PostgresServer:
    """A PostgreSQL server of the test's own, to stop and start for real: initdb into a
    temporary folder, pg_ctl on a free loopback port, the test database pointed at it
    (and migrated) for the length of the test. The shared server the suite runs on is
    never stopped. Run as the ``postgres`` user when the tests run as root (initdb
    refuses root). Skipped where PostgreSQL's programs are missing, except under CI."""

    def __init__(self, folder: Path, port: int, bindir: Path) -> None:
        self.folder, self.port, self.bindir = folder, port, bindir
        self.data = folder / "data"

    @classmethod
    def create(cls, folder: Path) -> PostgresServer:
        if connection.vendor != "postgresql":
            pytest.skip("PostgreSQL only")
        bindir = _pg_bindir()
        if bindir is None:
            reason = "needs PostgreSQL's server programs (pg_config --bindir, initdb, pg_ctl)"
            if os.environ.get("CI"):
                pytest.fail(reason)
            pytest.skip(reason)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        server = cls(folder, port, bindir)
        if os.geteuid() == 0:
            shutil.chown(folder, "postgres")
        server._run("initdb", "-D", str(server.data), "-U", "postgres", "-A", "trust", "--no-sync")
        server.start()
        return server

    def _run(self, program: str, *args: str) -> None:
        command = [str(self.bindir / program), *args]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=120)

    def _ctl(self, action: str, *extra: str) -> None:
        options = f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off"
        log = str(self.folder / "server.log")
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", log, "-w", action, *extra)

    def stop(self) -> None:
        self._ctl("stop", "-m", "fast")
        connection.close()

    def start(self) -> None:
        self._ctl("start")
        connection.close()  # the old one died with the server

    def restart(self) -> None:
        self._ctl("restart", "-m", "fast")
        connection.close()

    def destroy(self) -> None:
        try:
            self._ctl("stop", "-m", "immediate")
        except subprocess.CalledProcessError:
            pass  # stopped already


def _pg_bindir() -> Path | None:
    try:
        found = subprocess.run(
            ["pg_config", "--bindir"], capture_output=True, text=True, timeout=30
        ).stdout.strip()
    except OSError:
        return None
    bindir = Path(found)
    if not all((bindir / name).exists() for name in ("initdb", "pg_ctl")):
        return None
    return bindir


@pytest.fixture
def postgres_server(transactional_db: None) -> Iterator[PostgresServer]:
    """A throwaway PostgreSQL server, migrated, that the default connection (and the
    runpubsub subprocesses) use for the length of the test. Ask for it before runpubsub,
    so the processes stop before the server does."""
    from django.core.management import call_command

    folder = Path(tempfile.mkdtemp(prefix="pubsub-pg-"))
    server = PostgresServer.create(folder)
    saved = dict(connection.settings_dict)
    connection.close()
    connection.settings_dict.update(HOST="127.0.0.1", PORT=str(server.port), NAME="postgres")
    try:
        call_command("migrate", verbosity=0)
        yield server
    finally:
        connection.close()
        connection.settings_dict.clear()
        connection.settings_dict.update(saved)
        server.destroy()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def runpubsub(transactional_db: None) -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """Start `manage.py runpubsub` as a real subprocess on the test database."""
    started: list[subprocess.Popen[str]] = []

    def start(
        *args: str, log: Path | None = None, env: dict[str, str] | None = None
    ) -> subprocess.Popen[str]:
        env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "tests.settings",
            "DATABASE_URL": database_url(),
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
        out = open(log, "w") if log else subprocess.DEVNULL
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "manage.py"), "runpubsub", *args],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
