"""The server benchmark: bare, naive and orderhooks under gunicorn, loaded by wrk.

Run it through ``benchmarks/run`` (see ``benchmarks/README.md``). One run
measures every configuration in rounds: each round starts every
configuration's server afresh (fresh database too), warms it up, loads it
with first deliveries for ``--duration`` seconds, checks that the stored rows
match the 200 answers, then replays the same ids (the duplicate path) for
``--duration`` seconds. Ratios are computed within a round, so that both sides
of a ratio ran minutes apart at most, and the median over the rounds is
quoted with its spread.

The deferred configurations (``orderhooks-deferred/<db>``) add a drain:
once their passes are over and their server is stopped, the pending rows
the passes stored are dispatched by ``--drain-workers`` ``flask orderhooks
worker`` processes, timed from the done marks in the table, and checked (every
row done once, one receiver row each).

Nothing here asserts a timing: the targets are printed with a verdict. The
exit status is non-zero only when a correctness check failed or the run
could not be carried out.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import hmac
import io
import json
import math
import os
import platform
import re
import secrets
import shlex
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any, Literal

import sqlalchemy as sa

from . import sections
from .apps import (
    ORDERHOOKS_KINDS,
    PATH,
    SECRET,
    Kind,
    create_tables,
    drained,
    status_counts,
    stored_count,
    stored_keys,
    stored_status,
    undrained_count,
)

ROOT = Path(__file__).resolve().parent.parent
LUA_SCRIPT = Path(__file__).resolve().parent / "callbacks.lua"
DEFAULT_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
DEFAULT_MARIADB_URL = "mysql+pymysql://root@127.0.0.1:3306/test?charset=utf8mb4"


def add_database_urls(parser: argparse.ArgumentParser) -> None:
    """``--pg-url`` and ``--mariadb-url``, defaulting to the environment's
    ``ORDERHOOKS_BENCH_*_URL`` or the machine's servers."""
    parser.add_argument(
        "--pg-url", default=os.environ.get("ORDERHOOKS_BENCH_POSTGRES_URL", DEFAULT_PG_URL)
    )
    parser.add_argument(
        "--mariadb-url", default=os.environ.get("ORDERHOOKS_BENCH_MARIADB_URL", DEFAULT_MARIADB_URL)
    )


@contextmanager
def private_schema(pg_url: str, prefix: str) -> Iterator[str]:
    """A URL whose connections use a fresh schema, dropped afterwards: the
    server is shared with other runs."""
    schema = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(pg_url)
    with admin.begin() as connection:
        connection.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    try:
        url = sa.make_url(pg_url).update_query_dict({"options": f"-csearch_path={schema}"})
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as connection:
            connection.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@contextmanager
def private_database(mariadb_url: str, prefix: str) -> Iterator[str]:
    """``mariadb_url`` on a fresh MariaDB/MySQL database of our own, dropped
    afterwards (the server is shared with other runs)."""
    base = sa.make_url(mariadb_url)
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(base)
    with admin.begin() as connection:
        connection.exec_driver_sql(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
    try:
        yield base.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.begin() as connection:
            connection.exec_driver_sql("SET SESSION lock_wait_timeout = 20")
            connection.exec_driver_sql(f"DROP DATABASE IF EXISTS `{name}`")
        admin.dispose()


def pymysql_connect(url: str, **options: Any) -> Any:
    """A PyMySQL connection to the database ``url`` names (utf8mb4), on the
    driver alone: no SQLAlchemy pool, no reset on return."""
    import pymysql  # noqa: PLC0415

    parsed = sa.make_url(url)
    return pymysql.connect(
        host=parsed.host or "127.0.0.1",
        port=parsed.port or 3306,
        user=parsed.username or "root",
        password=parsed.password or "",
        database=parsed.database,
        charset="utf8mb4",
        **options,
    )


WRK_INSTALL_HINT = (
    "wrk is not installed. Install it with `apt-get install -y wrk` (Debian/Ubuntu; run "
    "`apt-get update` first), `brew install wrk` (macOS), or build it from "
    "https://github.com/wg/wrk, then run this command again."
)
# The iGV body is not signed, so every request can carry the same one.
BODY = (
    '{"createdAt":"2025-12-17T13:44:16","orderId":1689644928115784,'
    '"orderNum":"SO1689644928115784","sellerOrderStatus":1,"buyerId":"1907369850568257537"}'
)
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# First passes run again, each time with more ids, when the ids ran out.
ID_ATTEMPTS = 3

Backend = Literal["none", "sqlite", "postgresql", "mariadb"]
#: Backends whose server runs the SQL in processes (PostgreSQL) or threads
#: (MariaDB) of its own, whose CPU time is counted as the request's.
SERVER_BACKENDS = ("postgresql", "mariadb")


def source_env(env: dict[str, str], source: Path | None) -> dict[str, str]:
    """``env`` for a subprocess that must import ``source``'s flask_orderhooks
    (a variant's, or ``--package``) and this checkout's ``benchmarks``.

    ``source`` comes first on PYTHONPATH, ahead of the editable install: the
    ``flask`` command imports its plugin commands (``flask_orderhooks.cli``)
    before it loads the app, so a working directory alone would not do.
    """
    paths = [str(source)] if source is not None else []
    paths += [str(ROOT), env.get("PYTHONPATH", "")]
    return dict(env, PYTHONPATH=os.pathsep.join(p for p in paths if p))


class BenchError(Exception):
    """The run cannot go on (a tool is missing, a server did not start...)."""


@dataclass(frozen=True)
class Config:
    kind: Kind
    backend: Backend
    #: ``--variant NAME=DIR``: the orderhooks app with flask_orderhooks from DIR.
    variant: str | None = None
    source: Path | None = None

    @property
    def label(self) -> str:
        return self.kind if self.variant is None else f"{self.kind}[{self.variant}]"

    @property
    def name(self) -> str:
        return self.label if self.backend == "none" else f"{self.label}/{self.backend}"


@dataclass
class PassResult:
    """One wrk run against one server."""

    requests: int
    seconds: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    statuses: dict[int, int]
    socket_errors: int
    sent: int
    received: int
    ok: int
    exhausted: int
    wrk_cpu: float
    workers_cpu: float
    db_cpu: float | None
    #: CPU seconds the server side (workers + PostgreSQL backends) spent.
    server_cpu_seconds: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    @property
    def cpu_ms_per_request(self) -> float:
        # CPU time is what other load on the machine disturbs least: a process
        # waiting for a core is not charged for the wait.
        return self.server_cpu_seconds / max(1, self.requests) * 1000

    @property
    def non_2xx(self) -> int:
        return sum(n for status, n in self.statuses.items() if not 200 <= status < 300)

    @property
    def in_flight(self) -> int:
        # Requests written when wrk stopped whose answer it never read: the
        # server may still have processed (and stored) them.
        return self.sent - self.received


@dataclass
class DrainResult:
    """Pending deliveries dispatched by worker processes, until none is left."""

    workers: int
    #: Pending rows when the workers started.
    deliveries: int
    #: Done marks while every worker was running, and that window's length
    #: (from the last worker's start line to the last done mark).
    window_deliveries: int
    window_seconds: float
    #: From spawning the workers until all of them printed their start line.
    startup_seconds: float
    #: From spawning the workers to the last done mark.
    total_seconds: float
    #: CPU seconds over the window: the worker processes, their PostgreSQL backends.
    workers_cpu_seconds: float
    db_cpu_seconds: float | None
    #: Done rows that took more than one attempt.
    retried: int
    #: Lines the workers wrote to stderr (warnings: a busy store...).
    stderr_lines: int

    @property
    def rate(self) -> float:
        """Deliveries per second with every worker running: the drain rate."""
        return self.window_deliveries / self.window_seconds if self.window_seconds > 0 else 0.0

    @property
    def wall_rate(self) -> float:
        """Deliveries per second from the workers' spawn, start-up included."""
        return self.deliveries / self.total_seconds if self.total_seconds > 0 else 0.0

    @property
    def cpu_ms_per_delivery(self) -> float:
        seconds = self.workers_cpu_seconds + (self.db_cpu_seconds or 0.0)
        return seconds / max(1, self.window_deliveries) * 1000

    @property
    def workers_cpu(self) -> float:
        return self.workers_cpu_seconds / self.window_seconds if self.window_seconds else 0.0

    @property
    def db_cpu(self) -> float | None:
        if self.db_cpu_seconds is None or not self.window_seconds:
            return None
        return self.db_cpu_seconds / self.window_seconds


@dataclass
class Measurement:
    config: Config
    round: int
    first: PassResult
    duplicate: PassResult | None
    rss_mb: list[float]
    checks: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    drain: DrainResult | None = None

    @property
    def peak_rss_mb(self) -> float:
        return max(self.rss_mb)


# -- databases ---------------------------------------------------------------------


class Database:
    """A fresh database for one measurement: a SQLite file in the run's temp
    dir, a PostgreSQL schema of our own or a MariaDB database of our own
    (dropped afterwards)."""

    def __init__(
        self, backend: Backend, workdir: Path, pg_url: str, mariadb_url: str = DEFAULT_MARIADB_URL
    ) -> None:
        self.backend = backend
        tag = uuid.uuid4().hex[:10]
        self.schema: str | None = None
        self.application_name: str | None = None
        self._admin: sa.Engine | None = None
        #: MariaDB: the harness's own connections (their threads are not the app's).
        self._harness_ids: set[int] = set()
        self._server_pid: int | None = None
        self.uri: str | None = None
        if backend == "mariadb":
            self.schema = f"orderhooks_bench_{tag}"
            base = sa.make_url(mariadb_url)
            self._admin = sa.create_engine(base)
            with self._admin.begin() as connection:
                connection.exec_driver_sql(f"CREATE DATABASE `{self.schema}` CHARACTER SET utf8mb4")
                tid = connection.exec_driver_sql(
                    "SELECT TID FROM information_schema.PROCESSLIST WHERE ID = CONNECTION_ID()"
                ).scalar_one()
            self._server_pid = thread_group(int(tid))
            self.uri = base.set(database=self.schema).render_as_string(hide_password=False)
        elif backend == "sqlite":
            self.uri = f"sqlite:///{workdir / f'bench-{tag}.sqlite3'}"
        elif backend == "postgresql":
            self.schema = f"orderhooks_bench_{tag}"
            # Names the server's backends so their CPU time can be read from /proc.
            self.application_name = self.schema
            self._admin = sa.create_engine(pg_url)
            with self._admin.begin() as connection:
                connection.execute(sa.text(f'CREATE SCHEMA "{self.schema}"'))
            url = sa.make_url(pg_url).update_query_dict(
                {"options": f"-csearch_path={self.schema}", "application_name": self.schema}
            )
            self.uri = url.render_as_string(hide_password=False)
        else:
            self.uri = None

    def backend_pids(self) -> list[int]:
        """The server processes (PostgreSQL) or threads (MariaDB, one per
        connection) serving the app's connections; /proc/<id>/stat is either's."""
        if self._admin is None:
            return []
        if self.backend == "mariadb":
            with self._admin.connect() as connection:
                threads = connection.exec_driver_sql(
                    "SELECT ID, TID FROM information_schema.PROCESSLIST WHERE DB = %s",
                    (self.schema,),
                ).all()
            return [int(tid) for id_, tid in threads if int(id_) not in self._harness_ids]
        with self._admin.connect() as connection:
            rows = connection.execute(
                sa.text("SELECT pid FROM pg_stat_activity WHERE application_name = :name"),
                {"name": self.application_name},
            )
            return [int(row[0]) for row in rows]

    def baseline_pids(self) -> list[int]:
        """What to read CPU times from before a measured window: the app's
        backends, and on MariaDB every server thread (a connection opened in
        the window may get a cached thread that already ran other sessions)."""
        if self._server_pid is not None:
            try:
                return [int(t.name) for t in Path(f"/proc/{self._server_pid}/task").iterdir()]
            except OSError:
                return []
        return self.backend_pids()

    def reader(self) -> sa.Engine:
        """An engine for the harness's own reads during a measurement; on
        PostgreSQL and MariaDB its backends are not counted as the app's."""
        assert self.uri is not None
        url = sa.make_url(self.uri)
        if self.backend == "postgresql":
            url = url.update_query_dict({"application_name": "orderhooks_bench_harness"})
        engine = sa.create_engine(url)
        if self.backend == "mariadb":

            def remember(dbapi_connection: Any, record: Any) -> None:
                cursor = dbapi_connection.cursor()
                cursor.execute("SELECT CONNECTION_ID()")
                self._harness_ids.add(int(cursor.fetchone()[0]))
                cursor.close()

            sa.event.listen(engine, "connect", remember)
        return engine

    def drop(self) -> None:
        if self._admin is not None and self.schema is not None and self.backend == "mariadb":
            with self._admin.begin() as connection:
                connection.exec_driver_sql("SET SESSION lock_wait_timeout = 20")
                connection.exec_driver_sql(f"DROP DATABASE IF EXISTS `{self.schema}`")
            self._admin.dispose()
            self._admin = None
        if self._admin is not None and self.schema is not None:
            with self._admin.begin() as connection:
                connection.execute(sa.text(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE'))
            self._admin.dispose()
            self._admin = None


def postgres_problem(pg_url: str) -> str | None:
    try:
        engine = sa.create_engine(pg_url)
        with engine.connect() as connection:
            connection.execute(sa.text("SELECT 1"))
        engine.dispose()
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
    return None


def mariadb_version(mariadb_url: str) -> str:
    engine = sa.create_engine(mariadb_url)
    try:
        with engine.connect() as connection:
            return str(connection.exec_driver_sql("SELECT VERSION()").scalar_one())
    finally:
        engine.dispose()


def thread_group(tid: int) -> int | None:
    """The process a thread belongs to (the MariaDB server, for a connection's thread)."""
    try:
        for line in Path(f"/proc/{tid}/status").read_text().splitlines():
            if line.startswith("Tgid:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def postgres_version(pg_url: str) -> str:
    engine = sa.create_engine(pg_url)
    try:
        with engine.connect() as connection:
            return str(connection.execute(sa.text("SHOW server_version")).scalar_one())
    finally:
        engine.dispose()


# -- processes -----------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of a live process, 0 if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()
    # Fields 14 and 15 of stat(5); the slice starts at field 3.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise BenchError(f"/proc/{pid}/status has no VmHWM.")


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2 :].split()[1]) == pid:
            found.append(int(entry.name))
    return sorted(found)


class Server:
    """gunicorn with sync workers on a free loopback port.

    The harness opens the listening socket itself and hands it to gunicorn
    (``fd://``): no race for the port between choosing and binding it.
    """

    def __init__(self, config: Config, uri: str | None, workers: int, workdir: Path) -> None:
        self.config = config
        self.workers = workers
        self.log_path = workdir / f"gunicorn-{config.name.replace('/', '-')}.log"
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(2048)
        self.port = int(self.sock.getsockname()[1])
        env = dict(os.environ, BENCH_APP=config.kind)
        if uri is not None:
            env["BENCH_DATABASE_URI"] = uri
        cwd = ROOT
        if config.source is not None:
            # The variant's flask_orderhooks wins, benchmarks.apps comes from here.
            cwd = config.source
            env = source_env(env, config.source)
        gunicorn = Path(sys.executable).parent / "gunicorn"
        fd = self.sock.fileno()
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    str(gunicorn),
                    "--workers",
                    str(workers),
                    "--worker-class",
                    "sync",
                    "--bind",
                    f"fd://{fd}",
                    "--log-level",
                    "warning",
                    "--timeout",
                    "60",
                    "benchmarks.apps:create_app()",
                ],
                cwd=cwd,
                env=env,
                pass_fds=(fd,),
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{PATH}"

    def wait_ready(self, timeout: float = 60.0) -> list[int]:
        """Wait until a worker answers and all workers exist; their pids."""
        deadline = time.monotonic() + timeout
        answered = False
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BenchError(f"gunicorn exited ({self.process.returncode}):\n{self.log_tail()}")
            if not answered:
                answered = self._answers()
            pids = children(self.process.pid)
            if answered and len(pids) == self.workers:
                return pids
            time.sleep(0.1)
        raise BenchError(f"gunicorn did not become ready in {timeout:g} s:\n{self.log_tail()}")

    def _answers(self) -> bool:
        probe = urllib.request.Request(self.url, data=b"{}", method="POST")
        probe.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(probe, timeout=2):
                return True
        except urllib.error.HTTPError:
            return True  # any HTTP answer means a worker has loaded the app
        except OSError:
            return False

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text().splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.sock.close()


class WorkerProcess:
    """``flask orderhooks worker`` on the benchmarked app, as an operator runs it."""

    def __init__(self, config: Config, uri: str, workdir: Path, number: int) -> None:
        self.log_path = workdir / f"worker-{config.name.replace('/', '-')}-{number}.log"
        env = dict(os.environ, BENCH_APP=config.kind, BENCH_DATABASE_URI=uri)
        env.pop("FLASK_DEBUG", None)
        cwd = ROOT
        if config.source is not None:
            cwd = config.source
            env = source_env(env, config.source)
        flask = Path(sys.executable).parent / "flask"
        self.spawned = time.time()
        #: Unix time of the worker's "Worker <pid> started" line.
        self.started: float | None = None
        self.lines: list[str] = []
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [str(flask), "--app", "benchmarks.apps:create_app()", "orderhooks", "worker"],
                cwd=cwd,
                env=env,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
            )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if self.started is None and line.startswith("Worker ") and " started" in line:
                self.started = time.time()
            self.lines.append(line.rstrip("\n"))

    def stop(self) -> int:
        """SIGTERM, as a deployment stops it; its exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._reader.join(timeout=5)
        return self.process.returncode

    def stderr_lines(self) -> list[str]:
        try:
            return self.log_path.read_text().splitlines()
        except OSError:
            return []


def drain(
    config: Config,
    database: Database,
    workers: int,
    timeout: float,
    workdir: Path,
    m: Measurement,
) -> DrainResult | None:
    """Start ``workers`` worker processes on the pending rows the passes
    stored, wait until none is pending or processing, stop them, check the
    table. The rate comes from the done marks' ``updated_at``."""
    uri = database.uri
    assert uri is not None
    name = config.name
    counts = status_counts(uri)
    deliveries = counts.get("pending", 0)
    if deliveries != sum(counts.values()):
        m.failures.append(f"{name}: drain: the table is not all pending before it: {counts}")
        return None
    reader = database.reader()
    procs: list[WorkerProcess] = []
    try:
        procs = [WorkerProcess(config, uri, workdir, i) for i in range(workers)]
        deadline = time.monotonic() + 60
        while any(p.started is None for p in procs):
            gone = [p for p in procs if p.process.poll() is not None]
            if gone or time.monotonic() > deadline:
                tail = "\n".join(gone[0].stderr_lines()[-20:]) if gone else "(timed out)"
                raise BenchError(f"{name}: a worker did not start:\n{tail}")
            time.sleep(0.01)
        both = max(p.started for p in procs if p.started is not None)
        pids = [p.process.pid for p in procs]
        cpu_before = sum(cpu_seconds(pid) for pid in pids)
        db_before = {pid: cpu_seconds(pid) for pid in database.baseline_pids()}
        deadline = time.monotonic() + timeout
        left = deliveries
        with reader.connect() as connection:
            while left and time.monotonic() < deadline:
                if any(p.process.poll() is not None for p in procs):
                    break
                time.sleep(0.2)
                left = undrained_count(connection)
        workers_cpu = sum(cpu_seconds(pid) for pid in pids) - cpu_before
        db_cpu: float | None = None
        if config.backend in SERVER_BACKENDS:
            db_cpu = sum(
                cpu_seconds(pid) - db_before.get(pid, 0.0) for pid in database.backend_pids()
            )
    finally:
        statuses = [p.stop() for p in procs]
        reader.dispose()
    startup = both - min(p.spawned for p in procs)
    if left:
        m.failures.append(
            f"{name}: drain: {left} of {deliveries} deliveries still pending or processing "
            f"after {timeout:g} s (or a worker exited)"
        )
    for p, status in zip(procs, statuses, strict=True):
        if status != 0:
            m.failures.append(f"{name}: drain: a worker exited with {status}; see {p.log_path}")
    after = drained(uri)
    final = status_counts(uri)
    done = len(after.done_at)
    problems = []
    if final != {"done": deliveries}:
        problems.append(f"statuses after the drain {final}, expected {deliveries} done")
    if after.receiver_rows != deliveries or after.missing_receiver_rows:
        problems.append(
            f"{after.receiver_rows} receiver rows for {deliveries} deliveries "
            f"({after.missing_receiver_rows} done without one)"
        )
    if problems:
        m.failures.append(f"{name}: drain: " + "; ".join(problems))
    stderr = [line for p in procs for line in p.stderr_lines()]
    dispatched = sum(
        int(line.split("dispatched ")[1].split()[0])
        for p in procs
        for line in p.lines
        if " stopped: dispatched " in line
    )
    last = after.done_at[-1] if after.done_at else both
    window = [t for t in after.done_at if t >= both]
    result = DrainResult(
        workers=workers,
        deliveries=deliveries,
        window_deliveries=len(window),
        window_seconds=max(0.0, last - both),
        startup_seconds=startup,
        total_seconds=max(0.0, last - min(p.spawned for p in procs)),
        workers_cpu_seconds=workers_cpu,
        db_cpu_seconds=db_cpu,
        retried=after.retried,
        stderr_lines=len(stderr),
    )
    if not problems:
        m.checks.append(
            f"{name}: drain: {done} of {deliveries} deliveries done by {workers} workers "
            f"(their own count: {dispatched}), one receiver row each, "
            f"{after.retried} retried, {len(stderr)} stderr lines: OK"
        )
    if len(window) < deliveries / 2:
        m.failures.append(
            f"{name}: drain: only {len(window)} of {deliveries} done marks fell in the window "
            "with every worker running; the drain rate means little (use a longer --duration)"
        )
    return result


# -- load ---------------------------------------------------------------------------


_id_counter = 0


def write_ids(path: Path, count: int) -> list[tuple[str, str, str]]:
    """Write ``count`` correctly signed, never-used iGV (id, timestamp, signature)."""
    global _id_counter  # noqa: PLW0603 - ids stay unique across the whole run
    secret = SECRET.encode()
    timestamp = str(int(time.time() * 1000))
    prefix = secrets.randbelow(9 * 10**6) + 10**6
    triples = []
    for _ in range(count):
        _id_counter += 1
        request_id = f"{prefix}{_id_counter:012d}"
        signature = hmac.new(
            secret, (timestamp + request_id).encode() + secret, hashlib.sha256
        ).hexdigest()
        triples.append((request_id, timestamp, signature))
    write_triples(path, triples)
    return triples


def write_triples(path: Path, triples: Sequence[tuple[str, str, str]]) -> None:
    with path.open("w") as file:
        file.write(BODY + "\n")
        file.writelines(f"{i} {t} {s}\n" for i, t, s in triples)


def run_wrk(
    url: str,
    ids_file: Path,
    mode: str,
    *,
    seconds: int,
    threads: int,
    connections: int,
    worker_pids: Sequence[int],
    db_pids: Callable[[], list[int]] | None,
    workdir: Path,
    db_baseline: Callable[[], list[int]] | None = None,
) -> tuple[PassResult, str]:
    out_path = workdir / "wrk.out"
    wrk = shutil.which("wrk")
    if wrk is None:
        raise BenchError(WRK_INSTALL_HINT)
    command = [
        wrk,
        f"-t{threads}",
        f"-c{connections}",
        f"-d{seconds}s",
        "--latency",
        "--timeout",
        "10s",
        "-s",
        str(LUA_SCRIPT),
        url,
        "--",
        str(ids_file),
        mode,
        str(threads),
    ]
    baseline = db_baseline or db_pids
    db_before = {pid: cpu_seconds(pid) for pid in (baseline() if baseline else [])}
    workers_before = sum(cpu_seconds(pid) for pid in worker_pids)
    started = time.monotonic()
    with out_path.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        # wait4 gives the CPU time of wrk itself, the proof that the load
        # generator was not what limited the rate.
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
    wall = time.monotonic() - started
    workers_cpu = sum(cpu_seconds(pid) for pid in worker_pids) - workers_before
    db_cpu: float | None = None
    if db_pids is not None:
        # Backends opened during the run count from zero.
        db_cpu = sum(cpu_seconds(pid) - db_before.get(pid, 0.0) for pid in db_pids())
    output = out_path.read_text()
    if process.returncode != 0:
        raise BenchError(f"wrk failed ({process.returncode}):\n{output}")
    line = next((x for x in output.splitlines() if x.startswith("BENCH-RESULT ")), None)
    if line is None:
        raise BenchError(f"wrk printed no BENCH-RESULT line:\n{output}")
    data: dict[str, Any] = json.loads(line.removeprefix("BENCH-RESULT "))
    errors = data["errors"]
    latency = data["latency_us"]
    result = PassResult(
        requests=int(data["requests"]),
        seconds=data["duration_us"] / 1e6,
        p50_ms=latency["p50"] / 1000,
        p90_ms=latency["p90"] / 1000,
        p99_ms=latency["p99"] / 1000,
        max_ms=latency["max"] / 1000,
        statuses={int(k): int(v) for k, v in data["statuses"].items()},
        socket_errors=sum(int(errors[k]) for k in ("connect", "read", "write", "timeout")),
        sent=int(data["sent"]),
        received=int(data["received"]),
        ok=int(data["ok"]),
        exhausted=int(data["exhausted"]),
        wrk_cpu=(usage.ru_utime + usage.ru_stime) / wall,
        workers_cpu=workers_cpu / wall,
        db_cpu=None if db_cpu is None else db_cpu / wall,
        server_cpu_seconds=workers_cpu + (db_cpu or 0.0),
    )
    return result, output


def settle(count: Callable[[], int], timeout: float = 10.0) -> int:
    """The row count once the requests in flight at wrk's stop have finished."""
    last = count()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.3)
        now = count()
        if now == last:
            return now
        last = now
    return last


# -- one measurement ------------------------------------------------------------------


@dataclass
class Options:
    duration: int
    warmup: int
    repeats: int
    connections: int
    threads: int
    workers: int
    id_margin: float
    pg_url: str
    verbose: bool
    mariadb_url: str = DEFAULT_MARIADB_URL
    drain_workers: int = 2
    drain_timeout: float = 300.0


def measure(
    config: Config, round_number: int, options: Options, workdir: Path, rates: dict[str, float]
) -> Measurement:
    database = Database(config.backend, workdir, options.pg_url, options.mariadb_url)
    server: Server | None = None
    try:
        uri = database.uri
        if uri is not None:
            make_tables(config, uri)
        server = Server(config, uri, options.workers, workdir)
        pids = server.wait_ready()
        db_pids = database.backend_pids if config.backend in SERVER_BACKENDS else None

        def load(ids: Path, mode: str, seconds: int) -> tuple[PassResult, str]:
            assert server is not None
            return run_wrk(
                server.url,
                ids,
                mode,
                seconds=seconds,
                threads=options.threads,
                connections=options.connections,
                worker_pids=pids,
                db_pids=db_pids,
                workdir=workdir,
                db_baseline=database.baseline_pids if db_pids is not None else None,
            )

        # Warm-up: imports, connection pools, prepared statements, both workers.
        warm_ids = max(2000, math.ceil(10000 * options.warmup))
        write_ids(workdir / "warmup.ids", warm_ids)
        warm, _ = load(workdir / "warmup.ids", "first", options.warmup)
        warm_rate = warm.rps if not warm.exhausted else warm_ids / options.warmup
        rate = max(warm_rate, rates.get(config.name, 0.0))
        count: Callable[[], int] = (
            (lambda: stored_count(config.kind, uri)) if uri is not None else (lambda: 0)
        )
        for attempt in range(1, ID_ATTEMPTS + 1):
            needed = math.ceil(rate * options.duration * options.id_margin * attempt) + 1000
            before = settle(count)
            triples = write_ids(workdir / "first.ids", needed)
            first, first_output = load(workdir / "first.ids", "first", options.duration)
            if options.verbose:
                print(first_output)
            if not first.exhausted:
                break
            # Never wrap around: that would measure duplicates as first
            # deliveries. The pass is thrown away and run again with more ids.
            print(
                f"    IDS RAN OUT: {config.name} used all {needed} pre-signed ids "
                f"(estimated {rate:.0f} req/s); this pass is DISCARDED"
                + ("; running it again with more ids" if attempt < ID_ATTEMPTS else ""),
                flush=True,
            )
        else:
            raise BenchError(
                f"{config.name}: the pre-signed ids ran out {ID_ATTEMPTS} times in a row; "
                "rerun with a larger --id-margin."
            )
        rates[config.name] = max(rates.get(config.name, 0.0), first.rps)
        measurement = Measurement(config, round_number, first, None, [])
        check_first(measurement, count, before, triples, uri)

        if config.kind != "bare" and uri is not None:
            sent = {request_id for request_id, _, _ in triples}
            stored = set(stored_keys(config.kind, uri)) & sent
            replay = [t for t in triples if t[0] in stored]
            if not replay:
                raise BenchError(f"{config.name}: nothing was stored, nothing to replay.")
            write_triples(workdir / "replay.ids", replay)
            rows = count()
            duplicate, duplicate_output = load(workdir / "replay.ids", "replay", options.duration)
            if options.verbose:
                print(duplicate_output)
            measurement.duplicate = duplicate
            check_duplicates(measurement, count, rows)

        if children(server.process.pid) != pids:
            measurement.failures.append(
                f"{config.name}: a worker was restarted during the run; see {server.log_path}"
            )
        measurement.rss_mb = [peak_rss_mb(pid) for pid in pids]
        if config.kind == "orderhooks-deferred" and uri is not None:
            # The server is stopped first: the workers get the machine the
            # request path had, and nothing else writes the table.
            server.stop()
            settle(count)
            measurement.drain = drain(
                config, database, options.drain_workers, options.drain_timeout, workdir, measurement
            )
        return measurement
    finally:
        if server is not None:
            server.stop()
        database.drop()


def make_tables(config: Config, uri: str) -> None:
    """The app's tables, made by the code under test: a variant's by its own
    package (an older version's table is what that version would run on)."""
    if config.source is None:
        create_tables(config.kind, uri)
        return
    env = source_env(dict(os.environ), config.source)
    script = "import sys; from benchmarks.apps import create_tables; create_tables(*sys.argv[1:])"
    probe = subprocess.run(
        [sys.executable, "-c", script, config.kind, uri],
        cwd=config.source,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode != 0:
        raise BenchError(f"{config.name}: could not create its tables:\n{probe.stderr[-2000:]}")


def check_first(
    m: Measurement,
    count: Callable[[], int],
    before: int,
    triples: Sequence[tuple[str, str, str]],
    uri: str | None,
) -> None:
    first = m.first
    name = m.config.name
    if first.non_2xx or first.socket_errors:
        m.failures.append(
            f"{name}: first pass: {first.non_2xx} non-2xx answers {first.statuses}, "
            f"{first.socket_errors} socket errors"
        )
    if m.config.kind == "bare" or uri is None:
        m.checks.append(f"{name}: {first.ok} answered 200 (no store)")
        return
    new_rows = settle(count) - before
    # Every 200 is a stored row; requests still in flight when wrk stopped
    # may have been stored without wrk reading their answer.
    if first.ok <= new_rows <= first.ok + first.in_flight:
        m.checks.append(
            f"{name}: {new_rows} new rows for {first.ok} answers 200 "
            f"(+{new_rows - first.ok} of {first.in_flight} in flight at stop): OK"
        )
    else:
        m.failures.append(
            f"{name}: {new_rows} new rows but {first.ok} answers 200 and {first.in_flight} "
            "in flight at stop"
        )
    sent = {request_id for request_id, _, _ in triples}
    stored = set(stored_keys(m.config.kind, uri))
    done_new = len(stored & sent)
    if done_new != new_rows:
        status = stored_status(m.config.kind) if m.config.kind in ORDERHOOKS_KINDS else "stored"
        m.failures.append(
            f"{name}: {new_rows} new rows but only {done_new} of them are this pass's ids "
            f"stored as {status}"
        )


def check_duplicates(m: Measurement, count: Callable[[], int], rows: int) -> None:
    duplicate = m.duplicate
    assert duplicate is not None
    name = m.config.name
    after = settle(count)
    if after != rows:
        m.failures.append(f"{name}: the duplicate pass changed the row count {rows} -> {after}")
    if duplicate.non_2xx or duplicate.socket_errors:
        m.failures.append(
            f"{name}: duplicate pass: {duplicate.non_2xx} non-2xx answers "
            f"{duplicate.statuses}, {duplicate.socket_errors} socket errors"
        )
    else:
        m.checks.append(f"{name}: {duplicate.ok} duplicates answered 200, no new rows: OK")


# -- report ---------------------------------------------------------------------------


def spread(values: Sequence[float], fmt: str) -> str:
    if not values:
        return "—"
    median = format(statistics.median(values), fmt)
    if len(values) == 1:
        return median
    return f"{median} ({format(min(values), fmt)}-{format(max(values), fmt)})"


def pct(values: Sequence[float]) -> str:
    return spread([v * 100 for v in values], ".0f") + " %" if values else "—"


def results_table(measurements: Sequence[Measurement], configs: Sequence[Config]) -> list[str]:
    lines = [
        "| configuration | pass | req/s | p50 ms | p99 ms | server CPU ms/req | non-2xx "
        "| socket errors | wrk CPU | workers CPU | database CPU | peak RSS/worker MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for config in configs:
        ms = [m for m in measurements if m.config == config]
        if not ms:
            continue
        passes: list[tuple[str, list[PassResult]]] = [("first", [m.first for m in ms])]
        dups = [m.duplicate for m in ms if m.duplicate is not None]
        if dups:
            passes.append(("duplicate", dups))
        for label, results in passes:
            db = [r.db_cpu for r in results if r.db_cpu is not None]
            rss = spread([m.peak_rss_mb for m in ms], ".1f") if label == "first" else "(same)"
            lines.append(
                f"| {config.name} | {label} | {spread([r.rps for r in results], '.0f')} "
                f"| {spread([r.p50_ms for r in results], '.1f')} "
                f"| {spread([r.p99_ms for r in results], '.1f')} "
                f"| {spread([r.cpu_ms_per_request for r in results], '.2f')} "
                f"| {sum(r.non_2xx for r in results)} "
                f"| {sum(r.socket_errors for r in results)} "
                f"| {pct([r.wrk_cpu for r in results])} "
                f"| {pct([r.workers_cpu for r in results])} "
                f"| {pct(db) if db else '—'} | {rss} |"
            )
    return lines


@dataclass
class Ratio:
    label: str
    values: list[float]
    target: str
    met: Callable[[float], bool] | None
    fmt: str = ".2f"

    def row(self) -> str:
        if not self.values:
            return f"| {self.label} | — | {self.target} | not measured |"
        median = statistics.median(self.values)
        verdict = "—" if self.met is None else ("met" if self.met(median) else "**not met**")
        fmt = self.fmt
        # 1.1996 would read "1.20, not met": one more decimal where rounding
        # would hide which side of the target the median is on.
        while (
            self.met is not None
            and self.met(float(format(median, fmt))) != self.met(median)
            and fmt.endswith("f")
            and int(fmt[1:-1]) < 6
        ):
            fmt = f".{int(fmt[1:-1]) + 1}f"
        return f"| {self.label} | {spread(self.values, fmt)} | {self.target} | {verdict} |"


RoundFn = Callable[["Measurement", "Measurement | None"], "float | None"]
LABEL = {"postgresql": "PostgreSQL", "sqlite": "SQLite", "mariadb": "MariaDB", "none": "-"}


def in_rounds(
    measurements: Sequence[Measurement],
    rounds: int,
    fn: RoundFn,
    name: str,
    other: str | None = None,
) -> list[float]:
    """``fn(measurement of name, measurement of other)`` in every round that has both."""

    def get(config_name: str, r: int) -> Measurement | None:
        return next(
            (m for m in measurements if m.config.name == config_name and m.round == r), None
        )

    values = []
    for r in range(rounds):
        m = get(name, r)
        o = get(other, r) if other is not None else None
        if m is None or (other is not None and o is None):
            continue
        value = fn(m, o)
        if value is not None:
            values.append(value)
    return values


def ratios(
    measurements: Sequence[Measurement], options: Options, configs: Sequence[Config]
) -> list[Ratio]:
    def per_round(fn: RoundFn, name: str, other: str | None = None) -> list[float]:
        return in_rounds(measurements, options.repeats, fn, name, other)

    def rps_ratio(m: Measurement, o: Measurement | None) -> float:
        assert o is not None
        return m.first.rps / o.first.rps

    def cpu_ratio(m: Measurement, o: Measurement | None) -> float:
        assert o is not None
        return m.first.cpu_ms_per_request / o.first.cpu_ms_per_request

    def dup_ratio(m: Measurement, _: Measurement | None) -> float | None:
        return None if m.duplicate is None else m.duplicate.rps / m.first.rps

    def p99(m: Measurement, _: Measurement | None) -> float:
        return m.first.p99_ms

    def rss_delta(m: Measurement, o: Measurement | None) -> float:
        assert o is not None
        return m.peak_rss_mb - o.peak_rss_mb

    hooks = [c for c in configs if c.kind == "orderhooks"]
    label = LABEL
    out: list[Ratio] = []
    for c in hooks:
        out.append(
            Ratio(
                f"{c.label}/naive req/s, {label[c.backend]}, first deliveries",
                per_round(rps_ratio, c.name, f"naive/{c.backend}"),
                ">= 0.9",
                lambda v: v >= 0.9,
            )
        )
    for c in hooks:
        out.append(
            Ratio(
                f"{c.label}/naive server CPU per request, {label[c.backend]}, first deliveries",
                per_round(cpu_ratio, c.name, f"naive/{c.backend}"),
                "(context)",
                None,
            )
        )
    for c in hooks:
        out.append(
            Ratio(
                f"{c.label} duplicates/first deliveries req/s, {label[c.backend]}",
                per_round(dup_ratio, c.name),
                ">= 1.0",
                lambda v: v >= 1.0,
            )
        )
    for c in hooks:
        if c.backend == "postgresql":
            out.append(
                Ratio(
                    f"{c.label} p99 ms, PostgreSQL, first deliveries, "
                    f"{options.connections} connections",
                    per_round(p99, c.name),
                    "< 25 ms",
                    lambda v: v < 25,
                    ".1f",
                )
            )
    for c in hooks:
        out.append(
            Ratio(
                f"{c.label} - bare peak RSS/worker MB, {label[c.backend]}",
                per_round(rss_delta, c.name, "bare"),
                "<= 15 MB",
                lambda v: v <= 15,
                ".1f",
            )
        )
    for c in hooks:
        out.append(
            Ratio(
                f"{c.label} - naive peak RSS/worker MB, {label[c.backend]}",
                per_round(rss_delta, c.name, f"naive/{c.backend}"),
                "(context)",
                None,
                ".1f",
            )
        )
    for c in configs:
        if c.kind != "bare":
            out.append(
                Ratio(
                    f"{c.label}/bare req/s, {label[c.backend]}, first deliveries",
                    per_round(rps_ratio, c.name, "bare"),
                    "(context)",
                    None,
                )
            )
    for c in configs:
        if c.kind == "naive":
            out.append(
                Ratio(
                    f"naive duplicates/first deliveries req/s, {label[c.backend]}",
                    per_round(dup_ratio, c.name),
                    "(context)",
                    None,
                )
            )
    # The checkout's inline path against a variant (an older version, a
    # proposed change), measured in the same rounds.
    for c in hooks:
        if c.variant is None:
            continue
        mine = Config("orderhooks", c.backend).name
        out += [
            Ratio(
                f"orderhooks/{c.label} req/s, {label[c.backend]}, first deliveries",
                per_round(rps_ratio, mine, c.name),
                ">= 0.95 (unchanged or better)",
                lambda v: v >= 0.95,
            ),
            Ratio(
                f"orderhooks/{c.label} req/s, {label[c.backend]}, duplicates",
                per_round(dup_rps_ratio, mine, c.name),
                ">= 0.95 (unchanged or better)",
                lambda v: v >= 0.95,
            ),
            Ratio(
                f"orderhooks/{c.label} server CPU per request, {label[c.backend]}, "
                "first deliveries",
                per_round(cpu_ratio, mine, c.name),
                "<= 1.05 (unchanged or better)",
                lambda v: v <= 1.05,
            ),
        ]
    return out


def dup_rps_ratio(m: Measurement, o: Measurement | None) -> float | None:
    if o is None or m.duplicate is None or o.duplicate is None:
        return None
    return m.duplicate.rps / o.duplicate.rps


def deferred_ratios(
    measurements: Sequence[Measurement], options: Options, configs: Sequence[Config]
) -> list[Ratio]:
    """Deferred dispatch against naive (and inline), and the workers' drain."""

    def per_round(fn: RoundFn, name: str, other: str | None = None) -> list[float]:
        return in_rounds(measurements, options.repeats, fn, name, other)

    def rps_ratio(m: Measurement, o: Measurement | None) -> float:
        assert o is not None
        return m.first.rps / o.first.rps

    def cpu_ratio(m: Measurement, o: Measurement | None) -> float:
        assert o is not None
        return m.first.cpu_ms_per_request / o.first.cpu_ms_per_request

    def drain_ratio(m: Measurement, o: Measurement | None) -> float | None:
        assert o is not None
        return None if m.drain is None else m.drain.rate / o.first.rps

    def drain_wall_ratio(m: Measurement, o: Measurement | None) -> float | None:
        assert o is not None
        return None if m.drain is None else m.drain.wall_rate / o.first.rps

    def drain_cpu_ratio(m: Measurement, o: Measurement | None) -> float | None:
        assert o is not None
        return None if m.drain is None else m.drain.cpu_ms_per_delivery / o.first.cpu_ms_per_request

    def p99(m: Measurement, _: Measurement | None) -> float:
        return m.first.p99_ms

    out: list[Ratio] = []
    deferred = [c for c in configs if c.kind == "orderhooks-deferred"]
    workers = options.drain_workers
    for c in deferred:
        db = LABEL[c.backend]
        naive = f"naive/{c.backend}"
        out += [
            Ratio(
                f"{c.label}/naive req/s, {db}, first deliveries",
                per_round(rps_ratio, c.name, naive),
                ">= 1.2",
                lambda v: v >= 1.2,
            ),
            Ratio(
                f"{c.label}/naive req/s, {db}, duplicates",
                per_round(dup_rps_ratio, c.name, naive),
                ">= 1.2",
                lambda v: v >= 1.2,
            ),
        ]
    for c in deferred:
        out.append(
            Ratio(
                f"{c.label} drain rate, {workers} workers/naive req/s, {LABEL[c.backend]}",
                per_round(drain_ratio, c.name, f"naive/{c.backend}"),
                ">= 0.8",
                lambda v: v >= 0.8,
            )
        )
    for c in deferred:
        db = LABEL[c.backend]
        naive = f"naive/{c.backend}"
        inline = Config("orderhooks", c.backend, c.variant, c.source)
        out += [
            Ratio(
                f"{c.label} drain rate with the workers' start-up/naive req/s, {db}",
                per_round(drain_wall_ratio, c.name, naive),
                "(context)",
                None,
            ),
            Ratio(
                f"{c.label}/naive server CPU per request, {db}, first deliveries",
                per_round(cpu_ratio, c.name, naive),
                "(context)",
                None,
            ),
            Ratio(
                f"{c.label} drain CPU per delivery/naive server CPU per request, {db}",
                per_round(drain_cpu_ratio, c.name, naive),
                "(context)",
                None,
            ),
            Ratio(
                f"{c.label}/{inline.label} (inline) req/s, {db}, first deliveries",
                per_round(rps_ratio, c.name, inline.name),
                "(context)",
                None,
            ),
            Ratio(
                f"{c.label} p99 ms, {db}, first deliveries, {options.connections} connections",
                per_round(p99, c.name),
                "(context)",
                None,
                ".1f",
            ),
        ]

    def drain_vs(m: Measurement, o: Measurement | None) -> float | None:
        if o is None or m.drain is None or o.drain is None or not o.drain.rate:
            return None
        return m.drain.rate / o.drain.rate

    # The checkout against a variant, both deferred, in the same rounds.
    for c in deferred:
        if c.variant is None:
            continue
        db = LABEL[c.backend]
        mine = Config("orderhooks-deferred", c.backend).name
        out += [
            Ratio(
                f"orderhooks-deferred/{c.label} req/s, {db}, first deliveries",
                per_round(rps_ratio, mine, c.name),
                "(context)",
                None,
            ),
            Ratio(
                f"orderhooks-deferred/{c.label} req/s, {db}, duplicates",
                per_round(dup_rps_ratio, mine, c.name),
                "(context)",
                None,
            ),
            Ratio(
                f"orderhooks-deferred/{c.label} drain rate, {db}",
                per_round(drain_vs, mine, c.name),
                "(context)",
                None,
            ),
        ]
    return out


def deferred_section(
    measurements: Sequence[Measurement], options: Options, configs: Sequence[Config]
) -> list[str]:
    if not any(c.kind == "orderhooks-deferred" for c in configs):
        return []
    return [
        "## Deferred dispatch and workers",
        "",
        "`orderhooks-deferred/<db>` rows above: the route verifies, stores the delivery as "
        "pending (synchronous commit) and answers; its duplicate pass replays ids stored as "
        "pending. Then its server is stopped and "
        f"{options.drain_workers} `flask orderhooks worker` processes drain what the passes "
        "stored (warm-up and first pass), each delivery's receiver adding the naive "
        "endpoint's row in the delivery's transaction (`db=`). The drain rate is the done "
        "marks (`updated_at`) from the moment the last worker printed its start line to the "
        "last done mark, divided by that time; 'with start-up' counts every delivery from "
        "the workers' spawn (Python and the app loading). CPU ms/delivery: the workers and "
        "their database server's backends (PostgreSQL processes, MariaDB connection threads) "
        "over the same window.",
        "",
        *drain_table(measurements, configs),
        "",
        "Ratios within each round, median (min-max); the duplicate ratio compares the "
        "duplicate passes of both.",
        "",
        "| measure | value | target | verdict |",
        "|---|---|---|---|",
        *(r.row() for r in deferred_ratios(measurements, options, configs)),
        "",
    ]


def drain_table(measurements: Sequence[Measurement], configs: Sequence[Config]) -> list[str]:
    lines = [
        "| configuration | workers | deliveries drained | drain rate /s (all workers running) "
        "| rate /s with start-up | start-up s | CPU ms/delivery | workers CPU "
        "| database CPU | retried | worker stderr lines |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for config in configs:
        drains = [m.drain for m in measurements if m.config == config and m.drain is not None]
        if not drains:
            continue
        db = [d.db_cpu for d in drains if d.db_cpu is not None]
        lines.append(
            f"| {config.name} | {drains[0].workers} "
            f"| {spread([float(d.deliveries) for d in drains], '.0f')} "
            f"| {spread([d.rate for d in drains], '.0f')} "
            f"| {spread([d.wall_rate for d in drains], '.0f')} "
            f"| {spread([d.startup_seconds for d in drains], '.2f')} "
            f"| {spread([d.cpu_ms_per_delivery for d in drains], '.2f')} "
            f"| {pct([d.workers_cpu for d in drains])} "
            f"| {pct(db) if db else '—'} "
            f"| {sum(d.retried for d in drains)} "
            f"| {sum(d.stderr_lines for d in drains)} |"
        )
    return lines


_VALUE = re.compile(r"^(-?\d+(?:\.\d+)?)(?: \((-?\d+(?:\.\d+)?)-(-?\d+(?:\.\d+)?)\))?")


@dataclass
class ParsedResults:
    """What :func:`compare_previous` reads back from a RESULTS.md."""

    header: dict[str, str]
    #: ``(configuration, pass) -> {column: cell}`` of the results table.
    rows: dict[tuple[str, str], dict[str, str]]
    #: ``measure -> value cell`` of the ratio tables.
    ratios: dict[str, str]


def parse_results(text: str) -> ParsedResults:
    header: dict[str, str] = {}
    rows: dict[tuple[str, str], dict[str, str]] = {}
    ratios: dict[str, str] = {}
    columns: list[str] = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("- ") and ": " in line and not rows and not ratios:
            key, _, value = line[2:].partition(": ")
            header.setdefault(key, value)
        if not line.startswith("| ") or line.startswith("|---"):
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if i + 1 < len(lines) and lines[i + 1].startswith("|---"):
            # A table's header row: it says which table the rows belong to.
            columns = cells
            continue
        if columns[:2] == ["configuration", "pass"]:
            rows[(cells[0], cells[1])] = dict(zip(columns, cells, strict=False))
        elif columns[:1] == ["measure"]:
            ratios[cells[0]] = cells[1]
    return ParsedResults(header, rows, ratios)


def _value(cell: str | None) -> tuple[float, float, float] | None:
    match = _VALUE.match(cell or "")
    if match is None:
        return None
    median = float(match[1])
    low = float(match[2]) if match[2] is not None else median
    high = float(match[3]) if match[3] is not None else median
    return median, low, high


def compare_previous(previous_text: str, current_text: str) -> list[str]:
    """This run's inline numbers against a previous RESULTS.md's.

    Verdict per measure: better / worse when this run's median lies outside
    the previous run's min-max spread (±5 % around a single value), else
    unchanged.
    """
    before, now = parse_results(previous_text), parse_results(current_text)
    # (label, where, key, column, higher is better)
    measures: list[tuple[str, str, Any, str, bool | None]] = []
    for db, backend in (("SQLite", "sqlite"), ("PostgreSQL", "postgresql"), ("MariaDB", "mariadb")):
        measures += [
            (f"orderhooks/naive req/s, {db}, first deliveries", "ratio", None, "", True),
            (
                f"orderhooks/naive server CPU per request, {db}, first deliveries",
                "ratio",
                None,
                "",
                False,
            ),
            (f"orderhooks duplicates/first deliveries req/s, {db}", "ratio", None, "", True),
        ]
        for pass_ in ("first", "duplicate"):
            for column, up in (
                ("req/s", True),
                ("p99 ms", False),
                ("server CPU ms/req", False),
            ):
                measures.append(
                    (
                        f"orderhooks/{backend} {pass_} {column}",
                        "row",
                        (f"orderhooks/{backend}", pass_),
                        column,
                        up,
                    )
                )
        measures.append(
            (
                f"naive/{backend} first req/s (the machine)",
                "row",
                (f"naive/{backend}", "first"),
                "req/s",
                None,
            )
        )
    lines = [
        f"The previous RESULTS.md: {before.header.get('Date', '?')}, "
        f"`{before.header.get('Command', '?').strip('`')}`. Verdict: this run's median against "
        "the previous run's min-max spread (outside it: better or worse; inside: unchanged). "
        "Absolute numbers (req/s, p99, CPU ms/req) follow the machine and its load; when "
        "naive's own req/s or CPU per request moved out of its previous spread they get no "
        "verdict, since they would compare machines. The ratios to naive are the fair "
        "comparison, and a `--variant` of the older package in the same rounds the fairest.",
        "",
        "| inline measure | previous run | this run | verdict |",
        "|---|---|---|---|",
    ]
    # Did the machine itself change? Then absolute numbers compare machines.
    moved: dict[str, bool] = {}
    for backend in ("sqlite", "postgresql", "mariadb"):
        key_ = (f"naive/{backend}", "first")
        for column in ("req/s", "server CPU ms/req"):
            old_gauge = _value(before.rows.get(key_, {}).get(column))
            new_gauge = _value(now.rows.get(key_, {}).get(column))
            if old_gauge is not None and new_gauge is not None:
                low_, high_ = old_gauge[1], old_gauge[2]
                if low_ == high_:
                    low_, high_ = old_gauge[0] * 0.95, old_gauge[0] * 1.05
                if not low_ <= new_gauge[0] <= high_:
                    moved[backend] = True
    for label, where, key, column, higher in measures:
        if where == "ratio":
            old_cell, new_cell = before.ratios.get(label), now.ratios.get(label)
        else:
            old_cell = before.rows.get(key, {}).get(column)
            new_cell = now.rows.get(key, {}).get(column)
        old, new = _value(old_cell), _value(new_cell)
        if old is None or new is None:
            continue
        median, low, high = old
        if low == high:
            low, high = median * 0.95, median * 1.05
        backend = key[0].split("/")[1] if where == "row" else ""
        if higher is None:
            verdict = "(context)"
        elif where == "row" and moved.get(backend):
            verdict = "— (the machine differs: naive moved out of its spread too)"
        elif (new[0] > high) == higher and not low <= new[0] <= high:
            verdict = "better"
        elif low <= new[0] <= high:
            verdict = "unchanged"
        else:
            verdict = "**worse**"
        lines.append(f"| {label} | {old_cell} | {new_cell} | {verdict} |")
    return lines


def wrk_headroom(measurements: Sequence[Measurement]) -> list[str]:
    passes = [m.first for m in measurements] + [
        m.duplicate for m in measurements if m.duplicate is not None
    ]
    if not passes:
        return []
    top = max(p.wrk_cpu for p in passes)
    lines = [
        f"wrk used at most {top * 100:.0f} % of one core (with {len(passes)} runs measured); "
        "a saturated wrk would sit near 100 % per thread."
    ]
    bare = [m.first.rps for m in measurements if m.config.kind == "bare"]
    others = [m.first.rps for m in measurements if m.config.kind != "bare"]
    if bare and others:
        lines.append(
            f"The bare route reached {statistics.median(bare):.0f} req/s (median), "
            f"{statistics.median(bare) / max(others):.1f}x the fastest database configuration: "
            "the load generator could push more than those were able to take."
        )
    return lines


def versions(options: Options, backends: set[str]) -> str:
    wrk = shutil.which("wrk")
    wrk_version = "wrk ?"
    if wrk is not None:
        probe = subprocess.run([wrk, "--version"], capture_output=True, text=True, check=False)
        wrk_version = (probe.stdout or probe.stderr).split("Copyright")[0].strip()
    parts = [f"Python {platform.python_version()}"]
    parts += [
        f"{name} {version(name)}"
        for name in ("Flask", "Flask-SQLAlchemy", "SQLAlchemy", "psycopg", "gunicorn")
    ]
    if "mariadb" in backends:
        parts.append(f"PyMySQL {version('PyMySQL')}")
    parts += [f"SQLite {sqlite3.sqlite_version}", wrk_version]
    if "postgresql" in backends:
        parts.append(f"PostgreSQL {postgres_version(options.pg_url)}")
    if "mariadb" in backends:
        parts.append(f"MariaDB {mariadb_version(options.mariadb_url)}")
    return ", ".join(parts)


def roundtrip_tables(
    configs: Sequence[Config], backends: set[str], options: Options | None = None
) -> list[str]:
    """benchmarks.roundtrips, run for the checkout and for every variant."""
    package = next((c.source for c in configs if c.variant is None and c.source), None)
    runs: list[tuple[Path | None, list[str], set[str]]] = [
        (package, ["--kinds", "naive,orderhooks,orderhooks-deferred"], backends)
    ]
    seen: set[str] = set()
    for c in configs:
        if c.variant is not None and c.source is not None and c.variant not in seen:
            seen.add(c.variant)
            kinds = sorted({v.kind for v in configs if v.variant == c.variant})
            # A variant without MariaDB support is counted where it runs.
            where = {str(v.backend) for v in configs if v.variant == c.variant}
            runs.append((c.source, ["--kinds", ",".join(kinds), "--label", c.variant], where))
    rows: list[str] = []
    problems: list[str] = []
    for source, extra, where in runs:
        cwd = source or ROOT
        env = source_env(dict(os.environ), source)
        if options is not None:
            env["ORDERHOOKS_BENCH_POSTGRES_URL"] = options.pg_url
            env["ORDERHOOKS_BENCH_MARIADB_URL"] = options.mariadb_url
        probe = subprocess.run(
            [
                sys.executable,
                "-m",
                "benchmarks.roundtrips",
                "--markdown",
                "--backends",
                ",".join(sorted(where)),
                *extra,
            ],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        table = probe.stdout.strip().splitlines()
        if probe.returncode != 0 or len(table) < 3:
            problems.append(
                f"(round trips could not be counted in {cwd}: {probe.stderr.strip()[-500:]})"
            )
            continue
        rows += table if not rows else table[2:]
    return rows + ([""] if rows and problems else []) + problems


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def report(
    measurements: Sequence[Measurement],
    configs: Sequence[Config],
    options: Options,
    *,
    command: str,
    started: datetime,
    load_before: tuple[float, float, float],
    load_after: tuple[float, float, float],
    version_line: str,
    note: str | None,
    roundtrips: Sequence[str],
    checkout: str = "",
    previous: str | None = None,
) -> str:
    cpus = os.cpu_count() or 0
    busy = load_before[0] > 0.25 * cpus
    lines = [
        "# flask-orderhooks benchmark results",
        "",
        f"- Date: {started.strftime('%Y-%m-%d %H:%M UTC')}",
        f"- Command: `{command}`",
        f"- Machine: {cpus} CPUs ({cpu_model()}), {platform.system()} {platform.release()}",
        f"- Load average (1/5/15 min) before: {load_before[0]:.2f} / {load_before[1]:.2f} / "
        f"{load_before[2]:.2f}; after: {load_after[0]:.2f} / {load_after[1]:.2f} / "
        f"{load_after[2]:.2f}"
        + (" — **the machine was busy: absolute numbers are noisy**" if busy else ""),
        f"- Software: {version_line}",
        *([f"- Checkout: {checkout}"] if checkout else []),
        f"- Load: wrk, {options.threads} threads, {options.connections} connections, "
        f"{options.duration:g} s per pass after a {options.warmup:g} s warm-up; "
        f"{options.repeats} round(s); gunicorn with {options.workers} sync workers on 127.0.0.1.",
        "- Every first-pass request carries a fresh, correctly signed iGV request id; the "
        "duplicate pass replays the ids the first pass stored.",
    ]
    if note:
        lines.append(f"- Note: {note}")
    lines += [
        "",
        "Values are the median over the rounds, with the min-max spread in brackets. "
        "Server CPU ms/req is the CPU time of both gunicorn workers and their database "
        "backends (PostgreSQL processes; MariaDB connection threads, found by database name "
        "in its processlist) divided by the requests answered: the cost of a request, which "
        "other load on the machine disturbs far less than req/s (SQLite's fsync waits are "
        "not CPU, so it understates SQLite commits; InnoDB's log writes and flushes run in "
        "MariaDB threads of their own, not counted either). The other CPU columns are the "
        "share of one core over the pass (workers: both together; database: the backends of "
        "the workers' connections).",
        "",
        *results_table(measurements, configs),
        "",
        "## Ratios and targets",
        "",
        "Each ratio is computed within one round (both sides measured minutes apart at most); "
        "median (min-max) over the rounds. Targets are evaluated, never asserted.",
        "",
        "| measure | value | target | verdict |",
        "|---|---|---|---|",
        *(r.row() for r in ratios(measurements, options, configs)),
        "",
        *deferred_section(measurements, options, configs),
        "<<previous>>",
        "## SQL per request",
        "",
        "Counted in-process by `python -m benchmarks.roundtrips` (PostgreSQL: libpq protocol "
        "trace, one round trip per ReadyForQuery; MariaDB: every command PyMySQL sends, each "
        "answered before the next; SQLite: statements and transactions). "
        '"dup. among firsts": a duplicate arriving after first deliveries, when psycopg has '
        "prepared statements that a ROLLBACK makes it deallocate.",
        "",
        *(roundtrips or ["(not counted: --no-roundtrips)"]),
        "",
        "## Load generator",
        "",
        *wrk_headroom(measurements),
        "",
        "## Correctness checks",
        "",
    ]
    ordered = sorted(measurements, key=lambda m: (configs.index(m.config), m.round))
    failures = [f"round {m.round + 1}: {f}" for m in ordered for f in m.failures]
    checks = [f"round {m.round + 1}: {c}" for m in ordered for c in m.checks]
    lines += [f"- FAILED: {f}" for f in failures]
    lines += [f"- {c}" for c in checks]
    at = lines.index("<<previous>>")
    comparison: list[str] = []
    if previous is not None:
        # Read back from this report's own tables, as from the previous one's.
        this_run = "\n".join(lines[:at] + lines[at + 1 :])
        comparison = [
            "## Inline dispatch against the previous RESULTS.md",
            "",
            *compare_previous(previous, this_run),
            "",
        ]
    lines[at : at + 1] = comparison
    return "\n".join(lines) + "\n"


# -- main -------------------------------------------------------------------------------


ALL_CONFIGS = (
    Config("bare", "none"),
    Config("naive", "sqlite"),
    Config("orderhooks", "sqlite"),
    Config("orderhooks-deferred", "sqlite"),
    Config("naive", "postgresql"),
    Config("orderhooks", "postgresql"),
    Config("orderhooks-deferred", "postgresql"),
    Config("naive", "mariadb"),
    Config("orderhooks", "mariadb"),
    Config("orderhooks-deferred", "mariadb"),
)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="benchmarks/run",
        description="Benchmark bare Flask, a hand-written iGV callback and flask-orderhooks "
        "under gunicorn with wrk, on SQLite, PostgreSQL and MariaDB.",
    )
    parser.add_argument("--duration", type=int, default=8, help="seconds per pass [8]")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up seconds [2]")
    parser.add_argument("--repeats", type=int, default=3, help="rounds to take medians of [3]")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections [16]")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads [2]")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn sync workers [2]")
    parser.add_argument(
        "--id-margin",
        type=float,
        default=2.0,
        help="pre-signed ids = best rate seen x duration x this, + 1000 [2.0]",
    )
    parser.add_argument(
        "--backends",
        default="sqlite,postgresql,mariadb",
        help="comma-separated backends to run naive and orderhooks on [sqlite,postgresql,mariadb]",
    )
    parser.add_argument(
        "--pg-url",
        default=os.environ.get(
            "ORDERHOOKS_BENCH_POSTGRES_URL",
            os.environ.get("ORDERHOOKS_TEST_POSTGRES_URL", DEFAULT_PG_URL),
        ),
        help="PostgreSQL URL; every measurement uses a schema of its own, dropped afterwards",
    )
    parser.add_argument(
        "--mariadb-url",
        default=os.environ.get(
            "ORDERHOOKS_BENCH_MARIADB_URL",
            os.environ.get("ORDERHOOKS_TEST_MARIADB_URL", DEFAULT_MARIADB_URL),
        ),
        help="MariaDB/MySQL URL; every measurement creates a database of its own "
        "(orderhooks_bench_*) and drops it afterwards",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=Path(__file__).resolve().parent / "RESULTS.md",
        help="where to write the markdown results [benchmarks/RESULTS.md]",
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=DIR|REV",
        help="also run the orderhooks app with the flask_orderhooks package found in DIR "
        "(a checkout with a proposed change), or the one of git revision REV (e.g. an "
        "older release), side by side; repeatable",
    )
    parser.add_argument(
        "--package",
        metavar="REV|DIR",
        help="measure the checkout's configurations with the flask_orderhooks of git revision "
        "REV (or found in DIR) instead of the working tree, e.g. to keep edits in progress "
        "out of a long run [the working tree]",
    )
    parser.add_argument(
        "--drain-workers",
        type=int,
        default=2,
        help="flask orderhooks worker processes draining the deferred store [2]",
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=300.0,
        help="seconds a drain may take before it is reported unfinished [300]",
    )
    parser.add_argument(
        "--previous",
        type=Path,
        help="a RESULTS.md to compare the inline numbers with [the --output file as it was "
        "before this run]",
    )
    parser.add_argument("--no-output", action="store_true", help="print only, write no file")
    parser.add_argument(
        "--no-roundtrips", action="store_true", help="skip counting SQL round trips per request"
    )
    parser.add_argument("--note", help="a line to add to RESULTS.md (e.g. machine conditions)")
    parser.add_argument("--keep-temp", action="store_true", help="keep the temp dir (logs, ids)")
    parser.add_argument("-v", "--verbose", action="store_true", help="print wrk's own output")
    args = parser.parse_args(argv)
    if args.threads > args.connections:
        parser.error("--threads must not exceed --connections (wrk gives each thread connections)")
    if args.repeats < 1 or args.duration < 1 or args.warmup < 1:
        parser.error("--repeats, --duration and --warmup must be at least 1")
    if args.drain_workers < 1:
        parser.error("--drain-workers must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if shutil.which("wrk") is None:
        print(WRK_INSTALL_HINT, file=sys.stderr)
        return 2
    backends = {b.strip() for b in args.backends.split(",") if b.strip()}
    unknown = backends - {"sqlite", "postgresql", "mariadb"}
    if unknown:
        print(f"Unknown backend(s) {', '.join(sorted(unknown))}.", file=sys.stderr)
        return 2
    options = Options(
        duration=args.duration,
        warmup=args.warmup,
        repeats=args.repeats,
        connections=args.connections,
        threads=args.threads,
        workers=args.workers,
        id_margin=args.id_margin,
        pg_url=args.pg_url,
        verbose=args.verbose,
        mariadb_url=args.mariadb_url,
        drain_workers=args.drain_workers,
        drain_timeout=args.drain_timeout,
    )
    if "postgresql" in backends:
        problem = postgres_problem(options.pg_url)
        if problem is not None:
            print(
                f"PostgreSQL is not reachable at {options.pg_url} ({problem}). Start it, set "
                "--pg-url / ORDERHOOKS_BENCH_POSTGRES_URL, or run with --backends sqlite.",
                file=sys.stderr,
            )
            return 2
    if "mariadb" in backends:
        problem = postgres_problem(options.mariadb_url)
        if problem is not None:
            print(
                f"MariaDB is not reachable at {options.mariadb_url} ({problem}). Start it, set "
                "--mariadb-url / ORDERHOOKS_BENCH_MARIADB_URL, or leave it out of --backends.",
                file=sys.stderr,
            )
            return 2
    configs = [c for c in ALL_CONFIGS if c.backend == "none" or c.backend in backends]
    workdir = Path(tempfile.mkdtemp(prefix="orderhooks-bench-"))
    try:
        return run(args, options, backends, configs, workdir, argv)
    finally:
        if args.keep_temp:
            print(f"temp files kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def variant_source(spec: str, workdir: Path) -> tuple[str, Path, str] | None:
    """``NAME=DIR`` or ``NAME=REV``: the name, the directory holding its
    flask_orderhooks, and what it is (for RESULTS.md)."""
    name, _, where = spec.partition("=")
    if not name or not where:
        return None
    source = Path(where).resolve()
    if (source / "flask_orderhooks" / "__init__.py").is_file():
        return name, source, str(source)
    probe = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--verify", "--quiet", f"{where}^{{commit}}"],
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode != 0:
        return None
    commit = probe.stdout.strip()
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", commit, "flask_orderhooks"],
        capture_output=True,
        check=True,
    )
    source = workdir / f"variant-{name}"
    source.mkdir()
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(source, filter="data")
    return name, source, f"git {commit[:10]}"


def checkout_line() -> str:
    head = subprocess.run(
        ["git", "-C", str(ROOT), "log", "-1", "--format=%h %s"],
        capture_output=True,
        text=True,
        check=False,
    )
    status = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--", "flask_orderhooks"],
        capture_output=True,
        text=True,
        check=False,
    )
    if head.returncode != 0:
        return ""
    subject = head.stdout.strip()
    if len(subject) > 90:
        subject = subject[:89] + "…"
    entries = status.stdout.splitlines()
    changed = [e[3:] for e in entries if not e.startswith("??")]
    untracked = [e[3:] for e in entries if e.startswith("??")]
    state = "with uncommitted changes to " + ", ".join(changed) if changed else "as committed"
    if untracked:
        state += "; untracked: " + ", ".join(untracked)
    return f"`{subject}` (flask_orderhooks/ {state})"


def run(
    args: argparse.Namespace,
    options: Options,
    backends: set[str],
    configs: list[Config],
    workdir: Path,
    argv: Sequence[str] | None,
) -> int:
    checkout = checkout_line()
    if args.package:
        found = variant_source(f"package={args.package}", workdir)
        if found is None:
            print(
                f"--package {args.package}: give a git revision or a DIR holding "
                "flask_orderhooks/.",
                file=sys.stderr,
            )
            return 2
        _, package, what = found
        configs = [Config(c.kind, c.backend, None, package) for c in configs]
        subject = subprocess.run(
            ["git", "-C", str(ROOT), "log", "-1", "--format=%h %s", args.package, "--"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        if len(subject) > 90:
            subject = subject[:89] + "…"
        checkout = (
            f"flask_orderhooks of {what}"
            + (f" `{subject}`" if subject and what.startswith("git") else "")
            + f" (--package); working tree: {checkout}"
        )
    variants: list[str] = []
    for spec in args.variant:
        found = variant_source(spec, workdir)
        if found is None:
            print(
                f"--variant {spec}: give NAME=DIR (DIR holding flask_orderhooks/) or "
                "NAME=REV (a git revision of this checkout).",
                file=sys.stderr,
            )
            return 2
        name, source, what = found
        variants.append(f"{name} = {what}")
        # Deferred dispatch too, when the variant's package has it (0.2 on).
        config_py = source / "flask_orderhooks" / "config.py"
        deferred = config_py.is_file() and "ORDERHOOKS_DISPATCH" in config_py.read_text()
        kinds = ("orderhooks", "orderhooks-deferred") if deferred else ("orderhooks",)
        # MariaDB only when the variant's store has its operations (0.2 on).
        mysql = (source / "flask_orderhooks" / "store" / "mysql.py").is_file()
        configs += [
            Config(c.kind, c.backend, name, source)
            for c in ALL_CONFIGS
            if c.kind in kinds and c.backend in backends and (mysql or c.backend != "mariadb")
        ]
    previous_path = args.previous or args.output
    previous = previous_path.read_text() if previous_path.is_file() else None
    entry = os.environ.get("BENCH_ENTRY", "python -m benchmarks.harness")
    command = " ".join([entry, shlex.join(sys.argv[1:] if argv is None else list(argv))]).strip()
    started = datetime.now(UTC)
    load_before = os.getloadavg()
    version_line = versions(options, backends)
    if variants:
        checkout += "; variants: " + ", ".join(variants)
    measurements: list[Measurement] = []
    rates: dict[str, float] = {}
    total = len(configs) * options.repeats
    try:
        for round_number in range(options.repeats):
            # Rotating the order spreads any drift of the machine over every
            # configuration instead of always penalising the last one.
            order = configs[round_number % len(configs) :] + configs[: round_number % len(configs)]
            for config in order:
                step = f"[{len(measurements) + 1}/{total}] round {round_number + 1}"
                print(f"{step}: {config.name} ...", flush=True)
                m = measure(config, round_number, options, workdir, rates)
                measurements.append(m)
                dup = (
                    f"; duplicates {m.duplicate.rps:.0f} req/s p99 {m.duplicate.p99_ms:.1f} ms"
                    if m.duplicate
                    else ""
                )
                print(
                    f"    first {m.first.rps:.0f} req/s p50 {m.first.p50_ms:.1f} ms "
                    f"p99 {m.first.p99_ms:.1f} ms{dup}; wrk CPU {m.first.wrk_cpu * 100:.0f} %; "
                    f"peak RSS {m.peak_rss_mb:.1f} MB"
                    + ("".join(f"\n    FAILED: {f}" for f in m.failures)),
                    flush=True,
                )
                if m.drain is not None:
                    d = m.drain
                    print(
                        f"    drain: {d.deliveries} deliveries, {d.workers} workers: "
                        f"{d.rate:.0f}/s ({d.wall_rate:.0f}/s with start-up), "
                        f"{d.cpu_ms_per_delivery:.2f} CPU ms/delivery",
                        flush=True,
                    )
    except BenchError as exc:
        print(f"\nBENCHMARK ABORTED: {exc}", file=sys.stderr)
        return 2
    roundtrips = [] if args.no_roundtrips else roundtrip_tables(configs, backends, options)
    text = report(
        measurements,
        configs,
        options,
        command=command,
        started=started,
        load_before=load_before,
        load_after=os.getloadavg(),
        version_line=version_line,
        note=args.note,
        roundtrips=roundtrips,
        checkout=checkout,
        previous=previous,
    )
    print()
    print(text)
    if not args.no_output:
        # The sections other tools write (large table, open loop, memory) stay.
        kept = sections.sections(args.output.read_text()) if args.output.exists() else []
        args.output.write_text(text + "".join("\n" + block for block in kept))
        print(f"written to {args.output}")
    failed = any(m.failures for m in measurements)
    if failed:
        print("CORRECTNESS CHECKS FAILED (see above).", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
