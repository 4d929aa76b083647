"""What the store-before-dispatch rule costs at the least, on each database.

    .venv/bin/python -m benchmarks.commit_floor                       # all three, 10 rounds
    .venv/bin/python -m benchmarks.commit_floor --backends mariadb --rounds 20

The rule commits a callback's claim before any receiver runs, then commits
the receivers' writes with the done mark: two transactions where a
hand-written endpoint has one. This measures that shape alone, with no Flask,
no SQLAlchemy and no verification, on the driver's own connections:

- ``one``: ``INSERT`` a row, ``COMMIT`` (the naive endpoint's transaction);
- ``two``: ``INSERT`` a row, ``COMMIT`` with the store's relaxed durability
  for a claim (PostgreSQL ``synchronous_commit = off`` for that transaction,
  SQLite ``synchronous = NORMAL`` in WAL mode; MySQL and MariaDB have no
  per-session switch: ``innodb_flush_log_at_trx_commit`` is global), then
  ``UPDATE`` that row and ``COMMIT`` with full durability;
- ``two, one trip``: the same two transactions with the claim, its COMMIT,
  the BEGIN and the UPDATE in one query (PostgreSQL only; what
  ``store/one_trip.py`` sent in session 6, backed out);
- MariaDB also: ``one, pooled`` and ``two, pooled`` with the ``ROLLBACK``
  that SQLAlchemy's pool has PyMySQL send when a connection goes back (the
  naive endpoint's and the shipped store's commands), and ``two, pooled,
  claim in autocommit``: the claim alone on a connection kept in autocommit
  mode with no reset (one command), the dispatch as pooled.

``--threads`` (2, as the benchmarks' 2 sync gunicorn workers) threads each run
batches of ``--batch`` operations; each round runs every shape once, in an
order rotated per round; the ratio of the shapes' rates is computed within a
round. The difference in time per request between ``two`` and ``one`` is
the least the rule adds to a request on that server with its settings: an
endpoint that takes T ms per request (``benchmarks/run`` gives req/s of 2
workers) and an implementation of the rule that adds only that difference D
reach T / (T + D) of the endpoint's rate, before any of the pipeline's own
work. Nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import functools
import os
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from .harness import (
    add_database_urls,
    private_database,
    private_schema,
    pymysql_connect,
)

Connect = Callable[[], Any]
Shape = Callable[[Any, str], None]
_TABLE = "commit_floor"


def _pg_connect(url: str) -> Connect:
    import psycopg  # noqa: PLC0415

    parsed = sa.make_url(url)
    options = parsed.query.get("options")
    conninfo = {
        "host": parsed.host or "127.0.0.1",
        "port": parsed.port or 5432,
        "user": parsed.username or "postgres",
        "dbname": parsed.database or "test",
    }
    if options:
        conninfo["options"] = str(options)
    return lambda: psycopg.connect(**conninfo)  # type: ignore[arg-type]


class _MySQLPair:
    """Two PyMySQL connections of one thread: ``main`` as SQLAlchemy's pool
    hands them out (autocommit off), ``auto`` in autocommit mode from its
    connect on, as a pool of the store's own could keep one."""

    def __init__(self, connect: Callable[..., Any]) -> None:
        self.main = connect(autocommit=False)
        self.auto = connect(autocommit=True)

    def close(self) -> None:
        self.main.close()
        self.auto.close()


def _mysql_connect(url: str) -> Connect:
    return lambda: _MySQLPair(functools.partial(pymysql_connect, url))


def _sqlite_connect(path: Path) -> Connect:
    def connect() -> Any:
        connection = sqlite3.connect(
            path, timeout=10, isolation_level=None, check_same_thread=False
        )
        connection.execute("PRAGMA synchronous = FULL")
        return connection

    return connect


def shapes(backend: str) -> dict[str, Shape]:
    """The transactions of one request, per shape, on a driver connection."""
    if backend == "postgresql":

        def one(c: Any, key: str) -> None:
            c.execute(f"INSERT INTO {_TABLE} (k, v) VALUES (%s, 0)", (key,))
            c.commit()

        def two(c: Any, key: str) -> None:
            c.execute("SELECT set_config('synchronous_commit', 'off', true)")
            c.execute(f"INSERT INTO {_TABLE} (k, v) VALUES (%s, 0)", (key,))
            c.commit()
            c.execute(f"UPDATE {_TABLE} SET v = 1 WHERE k = %s", (key,))
            c.commit()

        def one_trip(c: Any, key: str) -> None:
            import psycopg  # noqa: PLC0415

            c.autocommit = True
            cursor = psycopg.ClientCursor(c)
            cursor.execute(
                f"INSERT INTO {_TABLE} (k, v) SELECT %(k)s, 0"
                " FROM (SELECT set_config('synchronous_commit', 'off', true)) s;"
                f" COMMIT; BEGIN; UPDATE {_TABLE} SET v = 1 WHERE k = %(k)s",
                {"k": key},
            )
            c.commit()
            c.autocommit = False

        return {"one": one, "two": two, "two, one trip": one_trip}
    if backend == "mariadb":

        def one(c: Any, key: str) -> None:
            c = c.main
            with c.cursor() as cursor:
                cursor.execute(f"INSERT INTO {_TABLE} (k, v) VALUES (%s, 0)", (key,))
            c.commit()

        def two(c: Any, key: str) -> None:
            c = c.main
            with c.cursor() as cursor:
                cursor.execute(f"INSERT INTO {_TABLE} (k, v) VALUES (%s, 0)", (key,))
                c.commit()
                cursor.execute(f"UPDATE {_TABLE} SET v = 1 WHERE k = %s", (key,))
            c.commit()

        # As SQLAlchemy's pool runs them: PyMySQL answers the pool's reset
        # with a ROLLBACK command whatever the connection's state.
        def one_pooled(pair: _MySQLPair, key: str) -> None:
            one(pair, key)
            pair.main.rollback()

        def two_pooled(pair: _MySQLPair, key: str) -> None:
            c = pair.main
            with c.cursor() as cursor:
                cursor.execute(f"INSERT INTO {_TABLE} (k, v) VALUES (%s, 0)", (key,))
                c.commit()
                c.rollback()
                cursor.execute(f"UPDATE {_TABLE} SET v = 1 WHERE k = %s", (key,))
            c.commit()
            c.rollback()

        # The claim alone on an autocommit connection with no reset (one
        # command: it commits itself), the dispatch as pooled.
        def two_autocommit_claim(pair: _MySQLPair, key: str) -> None:
            with pair.auto.cursor() as cursor:
                cursor.execute(f"INSERT INTO {_TABLE} (k, v) VALUES (%s, 0)", (key,))
            c = pair.main
            with c.cursor() as cursor:
                cursor.execute(f"UPDATE {_TABLE} SET v = 1 WHERE k = %s", (key,))
            c.commit()
            c.rollback()

        return {
            "one": one,
            "two": two,
            "one, pooled (naive)": one_pooled,
            "two, pooled (shipped)": two_pooled,
            "two, pooled, claim in autocommit": two_autocommit_claim,
        }

    def one_sqlite(c: Any, key: str) -> None:
        c.execute("BEGIN IMMEDIATE")
        c.execute(f"INSERT INTO {_TABLE} (k, v) VALUES (?, 0)", (key,))
        c.execute("COMMIT")

    def two_sqlite(c: Any, key: str) -> None:
        c.execute("PRAGMA synchronous = NORMAL")
        c.execute("BEGIN IMMEDIATE")
        c.execute(f"INSERT INTO {_TABLE} (k, v) VALUES (?, 0)", (key,))
        c.execute("COMMIT")
        c.execute("PRAGMA synchronous = FULL")
        c.execute("BEGIN IMMEDIATE")
        c.execute(f"UPDATE {_TABLE} SET v = 1 WHERE k = ?", (key,))
        c.execute("COMMIT")

    return {"one": one_sqlite, "two": two_sqlite}


@contextmanager
def database(backend: str, args: argparse.Namespace) -> Iterator[Connect]:
    ddl = f"CREATE TABLE {_TABLE} (k VARCHAR(64) PRIMARY KEY, v INTEGER NOT NULL)"
    if backend == "postgresql":
        with private_schema(args.pg_url, "orderhooks_floor") as url:
            connect = _pg_connect(url)
            with connect() as c:
                c.execute(ddl)
                c.commit()
            yield connect
        return
    if backend == "mariadb":
        with private_database(args.mariadb_url, "orderhooks_floor") as url:
            connect = _mysql_connect(url)
            pair = connect()
            with pair.main.cursor() as cursor:
                cursor.execute(ddl + " ENGINE=InnoDB")
            pair.main.commit()
            pair.close()
            yield connect
        return
    with tempfile.TemporaryDirectory(prefix="orderhooks-floor-") as tmp:
        path = Path(tmp) / "floor.sqlite3"
        c = sqlite3.connect(path, isolation_level=None)
        c.execute("PRAGMA journal_mode = WAL")
        c.execute(ddl)
        c.close()
        yield _sqlite_connect(path)


def rate(connect: Connect, shape: Shape, threads: int, batch: int) -> float:
    """Requests per second of ``threads`` threads running ``batch`` each."""
    connections = [connect() for _ in range(threads)]
    prefix = uuid.uuid4().hex[:12]
    start = threading.Barrier(threads + 1)

    errors: list[BaseException] = []

    def work(i: int) -> None:
        start.wait()
        try:
            for n in range(batch):
                shape(connections[i], f"{prefix}-{i}-{n}")
        except BaseException as exc:  # reported below: a rate of errors means nothing
            errors.append(exc)

    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    start.wait()
    began = time.perf_counter()
    for worker in workers:
        worker.join()
    elapsed = time.perf_counter() - began
    for connection in connections:
        connection.close()
    if errors:
        raise errors[0]
    return threads * batch / elapsed


def measure(backend: str, args: argparse.Namespace) -> str:
    lines = [f"**{backend}**", ""]
    with database(backend, args) as connect:
        named = shapes(backend)
        rates: dict[str, list[float]] = {name: [] for name in named}
        for shape in named.values():  # warm-up
            rate(connect, shape, args.threads, max(10, args.batch // 5))
        order = list(named)
        for r in range(args.rounds):
            for name in order[r % len(order) :] + order[: r % len(order)]:
                rates[name].append(rate(connect, named[name], args.threads, args.batch))
    lines.append(
        "| shape | req/s, median (min-max) | ms per request and thread | "
        "ratio to `one` within rounds |"
    )
    lines.append("|---|---|---|---|")
    for name, values in rates.items():
        ratios = [v / o for v, o in zip(values, rates["one"], strict=True)]
        median = statistics.median(values)
        lines.append(
            f"| {name} | {median:.0f} ({min(values):.0f}-{max(values):.0f}) "
            f"| {1000 * args.threads / median:.3f} "
            f"| {statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}) |"
        )
    lines.append("")
    lines.append(
        "The difference between two shapes' ms per request is what the second costs "
        "more per request at this concurrency; against an endpoint that takes T ms per "
        "request and thread, a rule that adds D ms can reach at most T / (T + D)."
    )
    return "\n".join(lines)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.commit_floor",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--backends", default="sqlite,postgresql,mariadb")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--batch", type=int, default=500, help="operations per thread [500]")
    parser.add_argument("--threads", type=int, default=2)
    add_database_urls(parser)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    print(
        f"Command: python -m benchmarks.commit_floor {' '.join(sys.argv[1:])}".rstrip()
        + f" (load average {os.getloadavg()[0]:.1f} before)\n"
    )
    for backend in args.backends.split(","):
        print(measure(backend.strip(), args))
        print()
    print(f"Load average after: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
