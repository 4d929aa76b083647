"""Paired in-process comparison: ``orderhooks`` against ``naive``, same process.

    .venv/bin/python -m benchmarks.paired [--backend postgresql|mariadb|sqlite] [--rounds 30]
    .venv/bin/python -m benchmarks.paired --drop-indexes ix_a,ix_b   # what two indexes cost

The server benchmark's req/s ratio moves by ±25 % with whatever else the
machine does. This one is built to show a change of a few per cent: both apps
live in one process on the same database server, and every round sends one
batch of fresh, signed first deliveries through each app's Flask test client,
in alternating order, so slow phases of the machine hit both sides alike.
Each round gives one ratio per measure; the median over the rounds and the
quartiles are printed.

Measures per request: wall time; CPU = this process plus the database
server's, read from ``/proc``: every PostgreSQL process (the backends, and the
WAL writer that flushes their commits), or the whole MariaDB/MySQL server
process (its connection threads and the background threads that flush the
redo log; other clients of a shared server are counted too, so run it on a
quiet one). On SQLite, fsync waits are wall time, not CPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa
from flask import Flask
from flask.testing import FlaskClient

from flask_orderhooks.testing import SignedCallback

from .apps import PATH, Kind, ready_app, signed, stored_count
from .harness import (
    DEFAULT_MARIADB_URL,
    DEFAULT_PG_URL,
    cpu_seconds,
    postgres_problem,
    private_database,
    private_schema,
    thread_group,
)

SIDES: tuple[Kind, Kind] = ("naive", "orderhooks")
BACKENDS = ("sqlite", "postgresql", "mariadb")


def postgres_cpu_seconds() -> float:
    """CPU time of every process named ``postgres`` (needs to read their /proc)."""
    total = 0.0
    for comm in Path("/proc").glob("[0-9]*/comm"):
        try:
            if comm.read_text().strip() == "postgres":
                total += cpu_seconds(int(comm.parent.name))
        except OSError:
            continue
    return total


def mariadb_server_pid(mariadb_url: str) -> int:
    """The MariaDB/MySQL server's process, found from a connection's thread."""
    engine = sa.create_engine(mariadb_url)
    try:
        with engine.connect() as connection:
            tid = connection.exec_driver_sql(
                "SELECT TID FROM information_schema.PROCESSLIST WHERE ID = CONNECTION_ID()"
            ).scalar_one()
    finally:
        engine.dispose()
    pid = thread_group(int(tid))
    if pid is None:
        raise SystemExit(f"The MariaDB server's thread {tid} is not a process of this machine.")
    return pid


def server_cpu_meter(backend: str, urls: dict[str, str]) -> Callable[[], float]:
    """What reads the database server's CPU seconds: every PostgreSQL process,
    the whole MariaDB server (all of its threads), nothing for SQLite."""
    if backend == "postgresql":
        return postgres_cpu_seconds
    if backend == "mariadb":
        pid = mariadb_server_pid(urls[backend])
        return lambda: cpu_seconds(pid)
    return lambda: 0.0


@dataclass
class Side:
    kind: Kind
    uri: str
    app: Flask
    client: FlaskClient
    wall: list[float] = field(default_factory=list)
    own_cpu: list[float] = field(default_factory=list)
    server_cpu: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    sent: int = 0

    def run(self, batch: Sequence[SignedCallback], server_cpu: Callable[[], float]) -> None:
        cpu0, server0 = time.process_time(), server_cpu()
        start = time.perf_counter()
        for cb in batch:
            response = self.client.post(PATH, data=cb.body, headers=cb.headers)
            if response.status_code != 200:
                raise SystemExit(f"{self.kind}: answered {response.status_code}: {response.text}")
        wall = time.perf_counter() - start
        client, server = time.process_time() - cpu0, server_cpu() - server0
        for values, seconds in (
            (self.wall, wall),
            (self.own_cpu, client),
            (self.server_cpu, server),
            (self.cpu, client + server),
        ):
            values.append(seconds / len(batch) * 1e6)
        self.sent += len(batch)


@contextmanager
def database(backend: str, urls: dict[str, str], name: str) -> Iterator[str]:
    if backend == "postgresql":
        with private_schema(urls[backend], f"orderhooks_paired_{name}") as uri:
            yield uri
        return
    if backend == "mariadb":
        with private_database(urls[backend], f"orderhooks_paired_{name}") as uri:
            yield uri
        return
    with tempfile.TemporaryDirectory(prefix="orderhooks-paired-") as tmp:
        yield f"sqlite:///{Path(tmp) / 'bench.db'}"


def quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    q1, median, q3 = statistics.quantiles(values, n=4)
    return q1, median, q3


def drop_indexes(uri: str, names: Sequence[str], table: str) -> None:
    engine = sa.create_engine(uri)
    # MySQL and MariaDB name an index within its table.
    on = f" ON {table}" if engine.dialect.name in ("mysql", "mariadb") else ""
    try:
        with engine.begin() as connection:
            for name in names:
                connection.exec_driver_sql(f"DROP INDEX {name}{on}")
    finally:
        engine.dispose()


def compare(
    backend: str,
    urls: dict[str, str],
    rounds: int,
    batch: int,
    warmup: int,
    drop: Sequence[str] = (),
) -> None:
    """``naive`` against ``orderhooks``; with ``drop``, ``orderhooks`` with its
    whole table against ``orderhooks`` without the indexes named (an
    experiment: what their upkeep costs a first delivery)."""
    server_cpu = server_cpu_meter(backend, urls)
    plan: list[tuple[Kind, str, Sequence[str]]]
    if drop:
        plan = [("orderhooks", "whole table", ()), ("orderhooks", "indexes dropped", drop)]
    else:
        plan = [(kind, kind, ()) for kind in SIDES]
    with ExitStack() as stack:
        sides = []
        for kind, label, dropped in plan:
            uri = stack.enter_context(database(backend, urls, label.replace(" ", "_")))
            app = ready_app(kind, uri)
            if dropped:
                drop_indexes(uri, dropped, "orderhooks_deliveries")
            sides.append(Side(kind, uri, app, app.test_client()))
        for side in sides:
            side.run(signed(warmup), server_cpu)
            for values in (side.wall, side.own_cpu, side.server_cpu, side.cpu):
                values.clear()
        for r in range(rounds):
            # Alternate who goes first: a machine slowing down mid-round
            # would otherwise always charge the same side.
            for side in sides if r % 2 == 0 else reversed(sides):
                side.run(signed(batch), server_cpu)
        baseline, measured = sides
        for side in sides:
            stored = stored_count(side.kind, side.uri)
            if stored != side.sent:
                raise SystemExit(f"{side.kind}: {side.sent} requests answered 200, {stored} rows")
    print(f"\n{backend}: {rounds} rounds x {batch} first deliveries per app (after {warmup})")
    if drop:
        print(f"indexes dropped on the second side: {', '.join(drop)}")
    first, second = (f"{label} us" for _kind, label, _dropped in plan)
    print(f"{'measure':<34} {first:>16} {second:>20} {'ratio (q1-q3)':>20}")
    measures = [("wall per request", "wall"), ("CPU per request: this process", "own_cpu")]
    if backend != "sqlite":
        server = "PostgreSQL" if backend == "postgresql" else "MariaDB"
        measures += [
            (f"CPU per request: {server}", "server_cpu"),
            ("CPU per request: both", "cpu"),
        ]
    for name, attr in measures:
        a, b = getattr(baseline, attr), getattr(measured, attr)
        ratios = [y / x for x, y in zip(a, b, strict=True) if x > 0]
        q1, med, q3 = quartiles(ratios)
        print(
            f"{name:<34} {statistics.median(a):>16.0f} {statistics.median(b):>20.0f} "
            f"{med:>8.3f} ({q1:.3f}-{q3:.3f})"
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.paired",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--backend", choices=BACKENDS, action="append", help="[sqlite and postgresql]"
    )
    parser.add_argument("--rounds", type=int, default=30, help="paired rounds [30]")
    parser.add_argument("--batch", type=int, default=60, help="requests per app per round [60]")
    parser.add_argument("--warmup", type=int, default=200, help="requests per app first [200]")
    parser.add_argument("--pg-url", default=DEFAULT_PG_URL)
    parser.add_argument("--mariadb-url", default=DEFAULT_MARIADB_URL)
    parser.add_argument(
        "--drop-indexes",
        metavar="NAME,NAME",
        default="",
        help="compare orderhooks with its whole table against orderhooks without these "
        "indexes (an experiment: what their upkeep costs) instead of naive against orderhooks",
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    drop = [name for name in args.drop_indexes.split(",") if name]
    backends = args.backend or ["sqlite", "postgresql"]
    urls = {"postgresql": args.pg_url, "mariadb": args.mariadb_url}
    for backend in backends:
        if backend in urls:
            problem = postgres_problem(urls[backend])
            if problem:
                print(f"{backend}: skipped: {problem}")
                continue
        compare(backend, urls, args.rounds, args.batch, args.warmup, drop)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
