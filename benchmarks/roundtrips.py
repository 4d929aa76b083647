"""Count the SQL round trips of one first delivery and one duplicate.

    .venv/bin/python -m benchmarks.roundtrips [--backends postgresql,sqlite]

PostgreSQL: counted on the wire. libpq's protocol trace (``PQtrace``, through
psycopg's ``pgconn.trace()``) records every message; each
``ReadyForQuery`` from the server ends one round trip, whatever the client
sent (a simple ``Query`` such as ``BEGIN``, or ``Parse/Bind/Execute/Sync``).
Transaction control that psycopg skips (a COMMIT with no transaction open)
costs nothing and is not counted. SQLite has no round trips; the statements
the driver runs are counted instead (``sqlite3``'s trace callback). MariaDB:
every command PyMySQL sends (``Connection._execute_command``, wrapped on each
connection: ``COM_QUERY`` for statements, ``COMMIT`` and ``ROLLBACK`` too,
``COM_PING``...); PyMySQL reads each command's answer before it sends the
next, so one command is one round trip. (The server's general log would need
``SET GLOBAL``: not used.) All three are
read from the driver, not from SQLAlchemy's events: the store runs its
statements on the driver's cursor, which those events don't see.

Transactions are counted from the same statements: a ``COMMIT`` or
``ROLLBACK`` that reached the database, and a write run outside ``BEGIN``
(autocommit mode: it commits on its own).

Each path is measured on several requests after a warm-up of the same path
(connections open, statements prepared); the counts must be the same every
time. A third line measures a duplicate that arrives among first deliveries:
psycopg forgets its prepared statements at every ROLLBACK and says so to the
server (``DEALLOCATE ALL``), so a path that ends in ROLLBACK can cost a round
trip more in a mixed workload than alone.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import sqlalchemy as sa
from flask import Flask
from flask_sqlalchemy import SQLAlchemy

from flask_orderhooks.testing import SignedCallback, igv_order_status

from .apps import PATH, SECRET, Kind, ready_app
from .harness import DEFAULT_MARIADB_URL, DEFAULT_PG_URL, private_database, private_schema

# A traced message: direction, length, type, then its fields; SQL text keeps
# its newlines, so a message can span several lines.
# More executions than psycopg's prepare_threshold (5).
PREPARE_WARMUP = 6
_MESSAGE_START = re.compile(r"^[FB]\t\d+\t")
_SQL_MESSAGE = re.compile(r'^F\t\d+\t(Query|Parse)\t (?:"([^"]*)" )?"(.*)"', re.DOTALL)
_BIND_MESSAGE = re.compile(r'^F\t\d+\tBind\t "[^"]*" "([^"]*)"')


def _messages(lines: list[str]) -> Iterator[str]:
    current: list[str] = []
    for line in lines:
        if _MESSAGE_START.match(line) and current:
            yield "\n".join(current)
            current = []
        current.append(line)
    if current:
        yield "\n".join(current)


_CONTROL = ("BEGIN", "COMMIT", "ROLLBACK", "DEALLOCATE")
_WRITES = ("INSERT", "UPDATE", "DELETE")


def transactions(sqls: list[str]) -> str:
    """Commits (autocommitted writes included) and rollbacks in ``sqls``."""
    commits = autocommits = rollbacks = 0
    open_ = False
    for sql in sqls:
        word = sql.removeprefix("(prepared) ").split(maxsplit=1)[0].upper() if sql else ""
        if word == "BEGIN":
            open_ = True
        elif word in ("COMMIT", "ROLLBACK"):
            commits += word == "COMMIT"
            rollbacks += word == "ROLLBACK"
            open_ = False
        elif word in _WRITES and not open_:
            autocommits += 1
    extra = f" ({autocommits} autocommit)" if autocommits else ""
    return f"{commits + autocommits} commit{extra}, {rollbacks} rollback"


def statements_only(sqls: list[str]) -> list[str]:
    """``sqls`` without transaction control."""
    return [sql for sql in sqls if not sql.removeprefix("(prepared) ").upper().startswith(_CONTROL)]


@dataclass
class Recorder:
    """What the driver ran: libpq's trace (PostgreSQL), the trace callback
    (SQLite), PyMySQL's commands (MariaDB)."""

    sqlite_sql: list[str] = field(default_factory=list)
    #: MariaDB: (what was sent, whether the session was in autocommit mode).
    mysql_commands: list[tuple[str, bool]] = field(default_factory=list)
    mysql: bool = False
    trace_path: Path | None = None
    trace_fd: int | None = None
    connections: list[Any] = field(default_factory=list)
    prepared: dict[str, str] = field(default_factory=dict)
    offset: int = 0

    def attach(self, engine: sa.Engine) -> None:
        if engine.dialect.name == "postgresql":
            handle, name = tempfile.mkstemp(prefix="orderhooks-pqtrace-", suffix=".txt")
            self.trace_fd, self.trace_path = handle, Path(name)
            sa.event.listen(engine, "connect", self._on_connect)
        elif engine.dialect.name in ("mysql", "mariadb"):
            self.mysql = True
            sa.event.listen(engine, "connect", self._on_mysql_connect)
        else:
            sa.event.listen(engine, "connect", self._on_sqlite_connect)

    def _on_sqlite_connect(self, dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.set_trace_callback(
            lambda sql: self.sqlite_sql.append(" ".join(sql.split()))
        )

    def _on_mysql_connect(self, dbapi_connection: Any, record: Any) -> None:
        send = dbapi_connection._execute_command
        commands = self.mysql_commands

        def execute_command(command: int, sql: Any) -> Any:
            text = sql.decode(errors="replace") if isinstance(sql, bytes) else str(sql)
            name = " ".join(text.split()) if command == 3 else f"(command {command}) {text}"
            commands.append((name, bool(dbapi_connection.get_autocommit())))
            return send(command, sql)

        # An instance attribute: this connection's commands only.
        dbapi_connection._execute_command = execute_command

    def _on_connect(self, dbapi_connection: Any, record: Any) -> None:
        self.connections.append(dbapi_connection)
        self._trace(dbapi_connection)

    def _trace(self, dbapi_connection: Any) -> None:
        assert self.trace_fd is not None
        # libpq takes a FILE* of its own (fdopen) on a duplicate of our fd.
        dbapi_connection.pgconn.trace(os.dup(self.trace_fd))
        dbapi_connection.pgconn.set_trace_flags(
            psycopg.pq.Trace.SUPPRESS_TIMESTAMPS | psycopg.pq.Trace.REGRESS_MODE
        )

    def _flush(self) -> None:
        # PQuntrace flushes libpq's buffered stream; tracing starts again at once.
        for connection in self.connections:
            if not connection.closed:
                connection.pgconn.untrace()
                self._trace(connection)

    def start(self) -> None:
        self.sqlite_sql.clear()
        self.mysql_commands.clear()
        if self.trace_path is not None:
            self._flush()
            self.offset = self.trace_path.stat().st_size

    def sql(self) -> list[str]:
        """What ran since :meth:`start`: each PostgreSQL round trip named by
        its first SQL, or each statement SQLite ran."""
        if self.mysql:
            return [sql for sql, _ in self.mysql_commands]
        return self.wire() if self.trace_path is not None else list(self.sqlite_sql)

    def mysql_transactions(self) -> str:
        """Commits (writes in autocommit mode included) and rollbacks sent."""
        commits = autocommits = rollbacks = 0
        for sql, autocommit in self.mysql_commands:
            # MariaDB's lock wait rides before the statement it bounds.
            statement = sql.split(" FOR ", 1)[1] if sql.startswith("SET STATEMENT ") else sql
            word = statement.split(maxsplit=1)[0].upper() if statement else ""
            commits += word == "COMMIT"
            rollbacks += word == "ROLLBACK"
            autocommits += word in _WRITES and autocommit
        extra = f" ({autocommits} autocommit)" if autocommits else ""
        return f"{commits + autocommits} commit{extra}, {rollbacks} rollback"

    def wire(self) -> list[str]:
        """The round trips since :meth:`start`, each named by its first SQL."""
        if self.mysql:
            return [sql for sql, _ in self.mysql_commands]
        if self.trace_path is None:
            return []
        self._flush()
        with self.trace_path.open() as file:
            earlier = file.read(self.offset).splitlines()
            lines = file.read().splitlines()
        # A statement prepared earlier is only named in this request's trace.
        for message in _messages(earlier):
            sql = _SQL_MESSAGE.match(message)
            if sql is not None and sql.group(2):
                self.prepared[sql.group(2)] = " ".join(sql.group(3).split())
        trips: list[str] = []
        current: str | None = None
        for message in _messages(lines):
            sql = _SQL_MESSAGE.match(message)
            bind = _BIND_MESSAGE.match(message)
            if sql is not None:
                _, name, text = sql.groups()
                if name:
                    self.prepared[name] = " ".join(text.split())
                current = current or " ".join(text.split())
            elif bind is not None and bind.group(1) and current is None:
                name = bind.group(1)
                current = f"(prepared) {self.prepared.get(name, name)}"
            elif message.startswith("B") and "\tReadyForQuery\t" in message:
                trips.append(current or "?")
                current = None
        return trips

    def close(self) -> None:
        if self.trace_fd is not None:
            os.close(self.trace_fd)
        if self.trace_path is not None:
            self.trace_path.unlink(missing_ok=True)


@contextmanager
def database(backend: str, pg_url: str, mariadb_url: str = DEFAULT_MARIADB_URL) -> Iterator[str]:
    if backend == "sqlite":
        with tempfile.TemporaryDirectory(prefix="orderhooks-roundtrips-") as tmp:
            yield f"sqlite:///{Path(tmp) / 'roundtrips.sqlite3'}"
        return
    if backend == "mariadb":
        with private_database(mariadb_url, "orderhooks_roundtrips") as url:
            yield url
        return
    with private_schema(pg_url, "orderhooks_roundtrips") as url:
        yield url


@dataclass
class PathCount:
    label: str
    round_trips: list[int]
    statements: list[int]
    transactions: list[str]
    example_wire: list[str]
    example_statements: list[str]


def _shorten(sql: str, width: int = 70) -> str:
    return sql if len(sql) <= width else sql[: width - 3] + "..."


def measure(kind: Kind, uri: str, samples: int) -> list[PathCount]:
    app: Flask = ready_app(kind, uri)
    recorder = Recorder()
    with app.app_context():
        db = app.extensions["sqlalchemy"]
        assert isinstance(db, SQLAlchemy)
        recorder.attach(db.engine)
    client = app.test_client()
    prefix = uuid.uuid4().int % 10**6

    def callback(i: int) -> SignedCallback:
        return igv_order_status(SECRET, request_id=f"{prefix:06d}{i:013d}")

    counter = iter(range(10**9))

    def fresh(n: int) -> list[SignedCallback]:
        return [callback(next(counter)) for _ in range(n)]

    def post(cb: SignedCallback) -> None:
        response = client.post(PATH, data=cb.body, headers=cb.headers)
        if response.status_code != 200:
            raise SystemExit(f"{kind}: answered {response.status_code}: {response.text}")

    def record(label: str, batch: list[SignedCallback]) -> PathCount:
        count = PathCount(label, [], [], [], [], [])
        for cb in batch:
            recorder.start()
            post(cb)
            ran = recorder.sql()
            count.example_wire = recorder.wire()
            count.example_statements = ran
            count.round_trips.append(len(count.example_wire))
            count.statements.append(len(statements_only(ran)))
            count.transactions.append(
                recorder.mysql_transactions() if recorder.mysql else transactions(ran)
            )
        return count

    counts = []
    try:
        # Each path is measured in its steady state: psycopg prepares a
        # statement at its 5th execution on a connection, and every ROLLBACK
        # forgets them all (DEALLOCATE ALL), so the warm-up repeats the path.
        done = fresh(PREPARE_WARMUP + samples)
        for cb in done[:PREPARE_WARMUP]:
            post(cb)
        counts.append(record("first delivery", done[PREPARE_WARMUP:]))
        for cb in done[:PREPARE_WARMUP]:
            post(cb)
        counts.append(record("duplicate", done[PREPARE_WARMUP:]))
        # A retry among first deliveries: what a real mix costs.
        mixed = PathCount("dup. among firsts", [], [], [], [], [])
        for cb in done[:samples]:
            for first in fresh(PREPARE_WARMUP):
                post(first)
            one = record("", [cb])
            mixed.round_trips += one.round_trips
            mixed.statements += one.statements
            mixed.transactions += one.transactions
            mixed.example_wire, mixed.example_statements = one.example_wire, one.example_statements
        counts.append(mixed)
    finally:
        recorder.close()
        with app.app_context():
            db.engine.dispose()
    return counts


def _spread(values: list[int]) -> str:
    low, high = min(values), max(values)
    return str(low) if low == high else f"{low}-{high} (UNSTABLE)"


def markdown(results: dict[str, dict[str, list[PathCount]]], kinds: Sequence[str]) -> str:
    """One table: round trips on PostgreSQL and MariaDB, statements and
    transactions on SQLite and MariaDB."""
    lines = [
        "| app | path | PostgreSQL round trips | PostgreSQL statements | MariaDB round trips "
        "| MariaDB statements | MariaDB transactions | SQLite statements | SQLite transactions |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    pg, my, lite = (results.get(b, {}) for b in ("postgresql", "mariadb", "sqlite"))
    for kind in kinds:
        pg_counts, my_counts, lite_counts = pg.get(kind, []), my.get(kind, []), lite.get(kind, [])
        labels = [c.label for c in (pg_counts or my_counts or lite_counts)]
        for i, label in enumerate(labels):
            p = pg_counts[i] if pg_counts else None
            m = my_counts[i] if my_counts else None
            q = lite_counts[i] if lite_counts else None
            lines.append(
                f"| {kind} | {label} "
                f"| {_spread(p.round_trips) if p else '-'} "
                f"| {_spread(p.statements) if p else '-'} "
                f"| {_spread(m.round_trips) if m else '-'} "
                f"| {_spread(m.statements) if m else '-'} "
                f"| {m.transactions[0] if m else '-'} "
                f"| {_spread(q.statements) if q else '-'} "
                f"| {q.transactions[0] if q else '-'} |"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.roundtrips",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--backends", default="postgresql,mariadb,sqlite")
    parser.add_argument(
        "--kinds",
        default="naive,orderhooks,orderhooks-deferred",
        help="apps to count (orderhooks-deferred: the request path only, no worker)",
    )
    parser.add_argument("--samples", type=int, default=5, help="requests per path [5]")
    parser.add_argument(
        "--markdown",
        action="store_true",
        help="print one markdown table instead of the statement listing",
    )
    parser.add_argument("--label", help="name the orderhooks rows (markdown)")
    parser.add_argument(
        "--pg-url",
        default=os.environ.get(
            "ORDERHOOKS_BENCH_POSTGRES_URL",
            os.environ.get("ORDERHOOKS_TEST_POSTGRES_URL", DEFAULT_PG_URL),
        ),
    )
    parser.add_argument(
        "--mariadb-url",
        default=os.environ.get(
            "ORDERHOOKS_BENCH_MARIADB_URL",
            os.environ.get("ORDERHOOKS_TEST_MARIADB_URL", DEFAULT_MARIADB_URL),
        ),
        help="MariaDB URL; each app is counted in a database of its own, dropped afterwards",
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    wanted = args.kinds.split(",")
    kinds: list[Kind] = [k for k in ("naive", "orderhooks", "orderhooks-deferred") if k in wanted]
    results: dict[str, dict[str, list[PathCount]]] = {}
    status = 0
    for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
        title = {
            "postgresql": "PostgreSQL: round trips on the wire (libpq trace)",
            "mariadb": "MariaDB: commands PyMySQL sent, one round trip each",
            "sqlite": "SQLite: statements run by the driver (no network)",
        }[backend]
        if not args.markdown:
            print(f"\n== {title}")
        for kind in kinds:
            with database(backend, args.pg_url, args.mariadb_url) as uri:
                counts = measure(kind, uri, args.samples)
            results.setdefault(backend, {})[kind] = counts
            for c in counts:
                stable = len(set(c.round_trips)) <= 1 and len(set(c.statements)) <= 1
                if not stable:
                    status = 1
                if args.markdown:
                    continue
                if backend in ("postgresql", "mariadb"):
                    print(
                        f"{kind:>10} {c.label:<18} {c.round_trips[0]} round trips, "
                        f"{c.statements[0]} statement(s), {c.transactions[0]}"
                        + ("" if stable else f"  UNSTABLE: {c.round_trips}")
                    )
                    for i, trip in enumerate(c.example_wire, 1):
                        print(f"{'':>30}{i}. {_shorten(trip)}")
                else:
                    print(
                        f"{kind:>10} {c.label:<18} {c.statements[0]} statement(s), "
                        f"{c.transactions[0]}" + ("" if stable else f"  UNSTABLE: {c.statements}")
                    )
                    for i, sql in enumerate(c.example_statements, 1):
                        print(f"{'':>30}{i}. {_shorten(sql)}")
    if args.markdown:
        table = markdown(results, kinds)
        if args.label:
            table = table.replace("| orderhooks |", f"| orderhooks[{args.label}] |")
            table = table.replace(
                "| orderhooks-deferred |", f"| orderhooks-deferred[{args.label}] |"
            )
        print(table)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
