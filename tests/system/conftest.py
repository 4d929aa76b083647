"""Fixtures of the system tests: databases of their own, gunicorn servers and
``flask orderhooks worker`` processes.

Every PostgreSQL test gets a schema of its own, next to the session's one
from ``postgres_url``, and every MariaDB test a database of its own, next to
the session's one from ``mariadb_url``; each is dropped afterwards, once the
test's servers and workers are stopped: a test that kills workers leaves
nothing behind for the rest of the suite.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import pytest

from tests.conftest import BASE_CONFIG, private_database, private_schema, summary

from . import server_app
from .support import Server, Worker, prepare_database

ServerFactory = Callable[..., Server]
WorkerFactory = Callable[..., Worker]
ReportFn = Callable[[str], None]

#: The database backends of the system tests, as parameters with their marks.
POSTGRESQL = pytest.param("postgresql", marks=pytest.mark.postgres)
MARIADB = pytest.param("mariadb", marks=pytest.mark.mariadb)
SQLITE = "sqlite"
#: Each backend's fixture: a database of the test's own (see ``pg_url``).
URL_FIXTURES = {"postgresql": "pg_url", "mariadb": "mariadb_sys_url", "sqlite": "sqlite_url"}

#: One line per system test: the counts the issue note quotes.
_SUMMARIES = summary("orderhooks system tests: counts")


@pytest.fixture
def report(request: pytest.FixtureRequest) -> ReportFn:
    """Record a test's one-line summary: printed now (``-s``) and again at
    the end of the run, in a section of its own."""

    def write(line: str) -> None:
        text = f"{request.node.nodeid}: {line}"
        print(text)
        _SUMMARIES.append(text)

    return write


@pytest.fixture
def _servers() -> list[Server]:
    """The servers a test started: shared by ``start_server``, which stops
    them, and ``pg_url`` / ``mariadb_sys_url``, which must stop them before
    dropping their schema or database whichever fixture is torn down first."""
    return []


@pytest.fixture
def _workers() -> list[Worker]:
    """The delivery workers a test started: shared like ``_servers``."""
    return []


def _private(
    database: AbstractContextManager[str], servers: list[Server], workers: list[Worker]
) -> Iterator[str]:
    """Yield ``database``'s URL; stop every worker and server of the test
    before it is dropped, whichever fixture is torn down first: a process
    still connected would hold the drop up (or lose its tables under it)."""
    with database as url:
        try:
            yield url
        finally:
            for worker in workers:
                worker.stop()
            for server in servers:
                server.stop()


@pytest.fixture
def pg_url(postgres_url: str, _servers: list[Server], _workers: list[Worker]) -> Iterator[str]:
    """A URL whose ``search_path`` is a fresh schema, dropped after the test."""
    yield from _private(private_schema(postgres_url, "orderhooks_sys"), _servers, _workers)


@pytest.fixture
def mariadb_sys_url(
    mariadb_url: str, _servers: list[Server], _workers: list[Worker]
) -> Iterator[str]:
    """A URL on a fresh MariaDB database, dropped after the test."""
    yield from _private(private_database(mariadb_url, "orderhooks_sys"), _servers, _workers)


@pytest.fixture(params=[POSTGRESQL, MARIADB])
def server_url(request: pytest.FixtureRequest) -> str:
    """A database of the test's own on each database server (not SQLite)."""
    return str(request.getfixturevalue(URL_FIXTURES[request.param]))


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'system.sqlite3'}"


@pytest.fixture
def start_server(tmp_path: Path, _servers: list[Server]) -> Iterator[ServerFactory]:
    """Start a gunicorn server; every server started is stopped afterwards.

    The factory takes the database URL, the receiver behaviour, the worker
    layout and optional ``claim_timeout``, ``duplicate_wait`` and
    ``receiver_delay`` and ``dispatch_delay`` seconds and the host's ``sqlite_timeout``.
    For deferred dispatch: ``dispatch="deferred"``, ``retry_delays`` (a list
    of seconds), the workers' ``poll_interval``, and ``clock=True`` for a
    clock file (``server.settings[server_app.CLOCK_FILE]``, offset 0) that
    every process of the server and its workers runs on.
    """
    servers = _servers

    def start(
        database_url: str,
        *,
        receiver: str = "record",
        workers: int = 4,
        threads: int = 1,
        claim_timeout: float | None = None,
        duplicate_wait: float | None = None,
        receiver_delay: float | None = None,
        sqlite_timeout: float | None = None,
        dispatch_delay: float | None = None,
        dispatch: str | None = None,
        retry_delays: list[float] | None = None,
        poll_interval: float | None = None,
        clock: bool = False,
    ) -> Server:
        number = len(servers)
        control = tmp_path / f"control-{number}"
        control.mkdir()
        settings = {
            server_app.DATABASE_URL: database_url,
            server_app.RECEIVER: receiver,
            server_app.CONTROL_DIR: str(control),
            "ORDERHOOKS_IGV_SECRET": json.dumps(BASE_CONFIG["ORDERHOOKS_IGV_SECRET"]),
            "ORDERHOOKS_GATEWAY_KEY": json.dumps(BASE_CONFIG["ORDERHOOKS_GATEWAY_KEY"]),
            "ORDERHOOKS_SUD_APPS": json.dumps(BASE_CONFIG["ORDERHOOKS_SUD_APPS"]),
        }
        if claim_timeout is not None:
            settings["ORDERHOOKS_CLAIM_TIMEOUT"] = json.dumps(claim_timeout)
        if duplicate_wait is not None:
            settings["ORDERHOOKS_DUPLICATE_WAIT"] = json.dumps(duplicate_wait)
        if receiver_delay is not None:
            settings[server_app.RECEIVER_DELAY] = str(receiver_delay)
        if sqlite_timeout is not None:
            settings[server_app.SQLITE_TIMEOUT] = str(sqlite_timeout)
        if dispatch_delay is not None:
            settings[server_app.DISPATCH_DELAY] = str(dispatch_delay)
        if dispatch is not None:
            settings["ORDERHOOKS_DISPATCH"] = json.dumps(dispatch)
        if retry_delays is not None:
            settings["ORDERHOOKS_RETRY_DELAYS"] = json.dumps(retry_delays)
        if poll_interval is not None:
            settings["ORDERHOOKS_WORKER_POLL_INTERVAL"] = json.dumps(poll_interval)
        if clock:
            clock_file = control / "clock-offset"
            server_app.set_clock_offset(clock_file, 0.0)
            settings[server_app.CLOCK_FILE] = str(clock_file)
        prepare_database(settings)
        server = Server(
            settings=settings,
            control=control,
            log_path=tmp_path / f"gunicorn-{number}.log",
            workers=workers,
            threads=threads,
        )
        servers.append(server)
        server.start()
        return server

    try:
        yield start
    finally:
        for server in servers:
            server.stop()


@pytest.fixture
def start_worker(tmp_path: Path, _workers: list[Worker]) -> Iterator[WorkerFactory]:
    """Start ``flask orderhooks worker`` with a server's settings; every
    worker started is stopped afterwards (SIGTERM, a bounded wait, SIGKILL).

    The factory takes the :class:`Server` and an optional ``poll_interval``
    (the ``--poll-interval`` option); it returns once the worker printed its
    start line.
    """
    workers = _workers

    def start(server: Server, *, poll_interval: float | None = None) -> Worker:
        worker = Worker(
            settings=server.settings,
            log_path=tmp_path / f"worker-{len(workers)}.log",
            poll_interval=poll_interval,
        )
        workers.append(worker)
        worker.start()
        return worker

    try:
        yield start
    finally:
        for worker in workers:
            worker.stop()
