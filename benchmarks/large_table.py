"""Does a delivery cost the same when the table holds 10 million? (issue #15, point 1)

    .venv/bin/python -m benchmarks.large_table --backend postgresql            # 10,000,000 rows
    .venv/bin/python -m benchmarks.large_table --backend sqlite --rows 200000  # a quick check

Per backend (one at a time; each gets a store of its own, dropped afterwards):

1. **Fill.** A fresh table (``deliveries_table()``, the store's real indexes
   in place during the load) is bulk-loaded with ``--rows`` deliveries in the
   proportions of a shop's year: statuses (97.5 % done, 1 % failed, 0.5 %
   dead, 1 % pending, 0.01 % processing), platforms (28 % gateway collect,
   12 % payout, 35 % iGV, 20 % SUD, 5 % SUD batches of 2-6 orders), bodies and
   headers made by ``flask_orderhooks.testing`` (their real sizes and shapes:
   gateway keys ``<id>:<status>``), ``reference`` the order id the provider
   would find, ``created_at`` spread over the year before the load, in time
   order, with ids growing with time as the platforms' do. Rows are built from
   ``deliveries_table(metadata).columns`` at run time: a column the loader
   does not know how to fill stops the run. PostgreSQL: ``COPY`` (psycopg 3),
   then ``VACUUM (ANALYZE)``, as autovacuum would do after a load; MariaDB:
   ``LOAD DATA LOCAL INFILE`` in chunks, then ``ANALYZE TABLE``; SQLite:
   ``executemany`` in 100,000-row transactions (``synchronous=OFF`` on the
   loading connection only), no ``ANALYZE`` (apps on SQLite rarely run it).
   Pending, failed and processing rows are due 6 h to 30 days after the
   load: the due index holds about 2 % of the rows, none of them due.

2. **Paired rounds.** Two stores side by side, one empty, one filled, each
   with the benchmark apps (``benchmarks.apps``: inline and deferred
   ``OrderHooks``) in this process. Every round sends each side ``--batch``
   fresh signed iGV first deliveries (inline), the same again (duplicates),
   ``--batch`` deferred first deliveries (``accept``), then runs
   ``DeliveryStore.claim_due()`` ``--batch`` times (each claims one of those:
   "some due") and ``--batch`` times more (nothing is due: each must return
   None). The side that goes first alternates. Per request: wall time and CPU
   (this process plus the database server's processes). Each round gives a
   full/empty ratio; the median and quartiles over the rounds are printed.

3. **Queries at that size**, on both sides: ``flask orderhooks deliveries``
   (the CLI, through Flask's CLI runner, with and without ``--status``),
   ``DeliveryStore.get(key)`` (``flask orderhooks show``), and the console's
   queries (``flask_orderhooks.console.queries`` when it exists; otherwise
   the equivalent SQL, said so): search by reference, the newest-first page
   and its keyset next page, the newest failed, the 24-hour chart's GROUP BY.
   Each is timed (median of ``--repeat`` after a warm-up) and its SQL, captured
   from the engine, is explained (PostgreSQL ``EXPLAIN (ANALYZE, BUFFERS)``,
   MariaDB ``ANALYZE``, SQLite ``EXPLAIN QUERY PLAN``), naming the index used.

Nothing is asserted about timings; targets are printed with a verdict. The
exit status is 1 when a check failed (row counts, answers, claims).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from flask import Flask
from flask.testing import FlaskClient

from flask_orderhooks.cli import orderhooks as orderhooks_cli
from flask_orderhooks.extension import get_extension
from flask_orderhooks.store import TABLE_NAME, DeliveryStore, deliveries_table
from flask_orderhooks.store import table as table_module
from flask_orderhooks.store.table import REFERENCE
from flask_orderhooks.testing import (
    gateway_collect,
    gateway_payout,
    igv_order_status,
    sud_order,
    sud_order_batch_changed,
    sud_order_changed,
)

from . import sections
from .apps import PATH, create_tables, make_app, signed
from .harness import (
    add_database_urls,
    checkout_line,
    mariadb_version,
    postgres_version,
)
from .paired import server_cpu_meter

#: The package this process imported, as git saw it when the run began (the
#: working tree may change while a long run goes on).
CHECKOUT = checkout_line() or "(not a git checkout)"

DAY = 86400.0
TARGET_RATIO = 1.10
TARGET_QUERY_MS = 50.0

# -- what a year of deliveries looks like ----------------------------------------------

#: (kind, share of the rows)
KIND_SHARES = (
    ("collect", 0.28),
    ("payout", 0.12),
    ("igv", 0.35),
    ("sud", 0.20),
    ("sud-batch", 0.05),
)
#: (status, share of the rows)
STATUS_SHARES = (
    ("done", 0.9749),
    ("failed", 0.01),
    ("dead", 0.005),
    ("pending", 0.01),
    ("processing", 0.0001),
)
ERROR = (
    "ReceiverFailed: A receiver failed; the delivery will be retried. "
    "(OperationalError: connection to shop-db:5432 timed out)"
)
#: Every column the loader fills. A table column missing here stops the run.
KNOWN_COLUMNS = frozenset(
    {
        "provider",
        "callback",
        "key",
        "status",
        "attempts",
        "claim_token",
        "lease_expires_at",
        "body",
        "body_sha256",
        "headers",
        "error",
        "created_at",
        "updated_at",
        "next_attempt_at",
        "reference",
        "failures",
        "compacted_at",
    }
)
_SECRET = "bEnChMaRkSeCrEt0123456789abcdefg"
_GATEWAY_KEY = "a3f1c0ffee0123456789abcdef012345"


def failure_line(attempt: int, at: datetime, error: str) -> str:
    """The store's own history line when it has one (0.3), else the same shape."""
    line = getattr(table_module, "failure_line", None)
    if line is not None:
        return str(line(attempt, at, error))
    return json.dumps({"attempt": attempt, "at": at.isoformat(), "error": error}) + "\n"


@dataclass(frozen=True)
class Template:
    """One kind's real body and stored headers with placeholder values."""

    provider: str
    callback: str
    body: str
    headers: str
    #: placeholders in ``body``/``headers`` -> what they stand for
    slots: tuple[str, ...]


def _headers(headers: dict[str, str], names: Sequence[str]) -> str:
    # What the providers keep: their signed headers (gateway: none).
    return json.dumps({n: headers[n] for n in names if n in headers}, sort_keys=True)


def templates() -> dict[str, Template]:
    """Bodies made by ``flask_orderhooks.testing`` with recognisable values
    that each row replaces with its own."""
    igv = igv_order_status(_SECRET, request_id="RQID_SLOT", order_id=1111111111111111)
    collect = gateway_collect(
        _GATEWAY_KEY, id="GWID_SLOT", trans_id="TRANS_SLOT", order_amount="128.50"
    )
    payout = gateway_payout(_GATEWAY_KEY, id="GWID_SLOT", trans_id="TRANS_SLOT")
    sud = sud_order_changed(
        _SECRET, app_id="1461564080052506636", notify_id="NOTIFY_SLOT", order_id="ORD0_SLOT"
    )
    found = {
        "igv": Template(
            "igv",
            "order-status",
            igv.body.decode(),
            _headers(igv.headers, ("X-Timestamp", "X-Request-Id", "X-Signature")),
            ("RQID_SLOT", "1111111111111111"),
        ),
        "collect": Template(
            "gateway", "collect", collect.body.decode(), "{}", ("GWID_SLOT", "TRANS_SLOT")
        ),
        "payout": Template(
            "gateway", "payout", payout.body.decode(), "{}", ("GWID_SLOT", "TRANS_SLOT")
        ),
        "sud": Template(
            "sud",
            "order-changed",
            sud.body.decode(),
            _headers(sud.headers, ("Sud-AppId", "Sud-Timestamp", "Sud-Nonce", "Sud-Signature")),
            ("NOTIFY_SLOT", "ORD0_SLOT"),
        ),
    }
    for size in range(2, 7):
        batch = sud_order_batch_changed(
            _SECRET,
            app_id="1461564080052506636",
            notify_id="NOTIFY_SLOT",
            orders=[sud_order(order_id=f"ORD{i}_SLOT") for i in range(size)],
        )
        found[f"sud-batch-{size}"] = Template(
            "sud",
            "order-changed",
            batch.body.decode(),
            _headers(batch.headers, ("Sud-AppId", "Sud-Timestamp", "Sud-Nonce", "Sud-Signature")),
            ("NOTIFY_SLOT", *(f"ORD{i}_SLOT" for i in range(size))),
        )
    for name, t in found.items():
        for slot in t.slots:
            if slot not in t.body + t.headers:
                raise SystemExit(f"The {name} template lost its {slot} placeholder.")
    return found


def _pick(shares: Sequence[tuple[str, float]], x: float) -> str:
    for name, share in shares:
        if x < share:
            return name
        x -= share
    return shares[-1][0]


@dataclass
class Generator:
    """Rows (dicts of Python values, every known column) in time order."""

    rows: int
    end: datetime
    seed: int = 15
    #: Done rows older than this many days are tombstones (purge's compaction).
    compact_after: float | None = None
    #: A few (key, reference, provider, callback) of generated rows, for the searches.
    samples: list[tuple[str, str | None, str, str]] = field(default_factory=list)
    status_counts: dict[str, int] = field(default_factory=dict)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rnd = random.Random(self.seed)
        t = templates()
        start = self.end - timedelta(days=365)
        step = 365 * DAY / max(1, self.rows)
        sample_every = max(1, self.rows // 9)
        counts = dict.fromkeys([s for s, _ in STATUS_SHARES], 0)
        for i in range(self.rows):
            kind = _pick(KIND_SHARES, rnd.random())
            status = _pick(STATUS_SHARES, rnd.random())
            counts[status] += 1
            created = start + timedelta(seconds=i * step)
            if kind == "igv":
                tpl = t["igv"]
                key = str(5 * 10**18 + i * 37 + rnd.randrange(37))
                reference = str(1_600_000_000_000_000 + i)
                body = tpl.body.replace("1111111111111111", reference)
                headers = tpl.headers.replace("RQID_SLOT", key)
            elif kind in ("collect", "payout"):
                tpl = t[kind]
                letter, prefix = ("C", "ORDER-") if kind == "collect" else ("P", "WDL-")
                gw_id = f"{letter}{i:012d}"
                reference = f"{prefix}{10_000_000 + i}"
                gw_status = 50 if kind == "payout" and rnd.random() < 0.1 else 60
                key = f"{gw_id}:{gw_status}"
                body = tpl.body.replace("GWID_SLOT", gw_id).replace("TRANS_SLOT", reference)
                if gw_status == 50:
                    body = body.replace('"status":60', '"status":50')
                headers = tpl.headers
            else:
                size = rnd.randrange(2, 7) if kind == "sud-batch" else 1
                tpl = t[f"sud-batch-{size}"] if kind == "sud-batch" else t["sud"]
                # Time-ordered prefix, random rest (SUD's are 64 random hex).
                key = f"{i:016x}{rnd.getrandbits(192):048x}"
                body = tpl.body.replace("NOTIFY_SLOT", key)
                first = None
                for n in range(size):
                    order = str(3_000_000_000_000 + i * 8 + n)
                    body = body.replace(f"ORD{n}_SLOT", order)
                    first = first or order
                reference = f"OUT-{first}"
                headers = tpl.headers
            raw = body.encode()
            attempts, updated, due, error, failures = self._state(rnd, status, created)
            lease = due if status == "processing" and due is not None else created
            row = {
                "provider": tpl.provider,
                "callback": tpl.callback,
                "key": key,
                "status": status,
                "attempts": attempts,
                "claim_token": f"{rnd.getrandbits(128):032x}",
                "lease_expires_at": lease + timedelta(seconds=30)
                if status != "processing"
                else lease,
                "body": raw,
                "body_sha256": hashlib.sha256(raw).hexdigest(),
                "headers": headers,
                "error": error,
                "created_at": created,
                "updated_at": updated,
                "next_attempt_at": due,
                "reference": reference,
                "failures": failures,
                "compacted_at": None,
            }
            if self.compact_after is not None and status == "done":
                compacted = created + timedelta(days=self.compact_after)
                if compacted < self.end:
                    # A tombstone: body and signed headers dropped, the rest kept.
                    row.update(body=b"", headers="{}", compacted_at=compacted)
            if i % sample_every == sample_every // 2:
                self.samples.append((key, reference, tpl.provider, tpl.callback))
            yield row
        self.status_counts = counts

    def _state(
        self, rnd: random.Random, status: str, created: datetime
    ) -> tuple[int, datetime, datetime | None, str | None, str | None]:
        """attempts, updated_at, next_attempt_at, error, failures."""
        later = self.end + timedelta(seconds=rnd.uniform(6 * 3600, 30 * DAY))
        if status == "done":
            x = rnd.random()
            attempts = 1 if x < 0.97 else (2 if x < 0.995 else 3)
            failures = "".join(
                failure_line(a, created + timedelta(minutes=a), ERROR) for a in range(1, attempts)
            )
            return (
                attempts,
                created + timedelta(seconds=0.03 + 60 * (attempts - 1)),
                None,
                ERROR if attempts > 1 else None,
                failures or None,
            )
        if status in ("failed", "dead"):
            attempts = rnd.randrange(1, 5) if status == "failed" else 5
            failures = "".join(
                failure_line(a, created + timedelta(minutes=a), ERROR)
                for a in range(1, attempts + 1)
            )
            updated = created + timedelta(minutes=attempts)
            return attempts, updated, later if status == "failed" else None, ERROR, failures
        if status == "pending":
            return 0, created, later, None, None
        return 1, created + timedelta(seconds=1), later, None, None


def column_names(table: sa.Table) -> list[str]:
    names = [c.name for c in table.columns]
    unknown = [n for n in names if n not in KNOWN_COLUMNS]
    if unknown:
        raise SystemExit(
            f"The deliveries table has column(s) {', '.join(unknown)} that "
            "benchmarks/large_table.py does not know how to fill: add them to "
            "KNOWN_COLUMNS and to Generator, with realistic values."
        )
    return names


# -- bulk loading ---------------------------------------------------------------------


@dataclass
class Store:
    """A store of the benchmark's own: a SQLite file, a PostgreSQL schema or a
    MariaDB database, dropped by :meth:`drop` unless kept."""

    backend: str
    uri: str
    name: str
    admin: sa.Engine | None = None

    def engine(self, **kwargs: Any) -> sa.Engine:
        return sa.create_engine(self.uri, **kwargs)

    def drop(self) -> None:
        if self.backend == "sqlite":
            for suffix in ("", "-wal", "-shm"):
                Path(self.name + suffix).unlink(missing_ok=True)
            return
        assert self.admin is not None
        with self.admin.begin() as connection:
            if self.backend == "postgresql":
                connection.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{self.name}" CASCADE')
            else:
                connection.exec_driver_sql("SET SESSION lock_wait_timeout = 60")
                connection.exec_driver_sql(f"DROP DATABASE IF EXISTS `{self.name}`")
        self.admin.dispose()


def new_store(backend: str, args: argparse.Namespace, label: str, reuse: str | None) -> Store:
    name = reuse or f"orderhooks_bench_large_{label}_{uuid.uuid4().hex[:8]}"
    if backend == "sqlite":
        path = reuse or str(Path(args.sqlite_dir) / f"{name}.sqlite3")
        return Store(backend, f"sqlite:///{path}", path)
    if backend == "postgresql":
        admin = sa.create_engine(args.pg_url)
        if reuse is None:
            with admin.begin() as connection:
                connection.exec_driver_sql(f'CREATE SCHEMA "{name}"')
        url = sa.make_url(args.pg_url).update_query_dict(
            {"options": f"-csearch_path={name}", "application_name": name}
        )
        return Store(backend, url.render_as_string(hide_password=False), name, admin)
    admin = sa.create_engine(args.mariadb_url)
    if reuse is None:
        with admin.begin() as connection:
            connection.exec_driver_sql(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
    url = sa.make_url(args.mariadb_url).set(database=name)
    return Store(backend, url.render_as_string(hide_password=False), name, admin)


def _chunks(rows: Iterator[tuple[Any, ...]], size: int) -> Iterator[list[tuple[Any, ...]]]:
    chunk: list[tuple[Any, ...]] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _progress(done: int, total: int, started: float) -> None:
    rate = done / max(1e-9, time.monotonic() - started)
    print(f"    loaded {done:,} of {total:,} rows ({rate:,.0f} rows/s)", flush=True)


def load(store: Store, generator: Generator, chunk: int) -> float:
    """Fill ``store`` with ``generator``'s rows; seconds taken."""
    create_tables("orderhooks-deferred", store.uri)
    engine = store.engine(connect_args={"local_infile": True} if store.backend == "mariadb" else {})
    table = deliveries_table(sa.MetaData())
    names = column_names(table)
    dialect = engine.dialect
    # The order id is bound as the store binds it: its UTF-8 bytes on MySQL.
    types = {n: table.c[n].type for n in names} | {"reference": REFERENCE}
    processors = [types[n]._cached_bind_processor(dialect) for n in names]
    started = time.monotonic()
    done = 0

    def tuples() -> Iterator[tuple[Any, ...]]:
        for row in generator:
            yield tuple(row[n] for n in names)

    def processed() -> Iterator[tuple[Any, ...]]:
        for values in tuples():
            yield tuple(
                p(v) if p is not None else v for p, v in zip(processors, values, strict=True)
            )

    raw = engine.raw_connection()
    try:
        driver: Any = raw.driver_connection
        columns = ", ".join(dialect.identifier_preparer.quote(n) for n in names)
        if store.backend == "postgresql":
            for rows in _chunks(tuples(), chunk):
                sql = f"COPY {TABLE_NAME} ({columns}) FROM STDIN"
                with driver.cursor() as cursor, cursor.copy(sql) as copy:
                    for values in rows:
                        copy.write_row(values)
                driver.commit()
                done += len(rows)
                _progress(done, generator.rows, started)
        elif store.backend == "sqlite":
            cursor = driver.cursor()
            cursor.execute("PRAGMA synchronous=OFF")
            marks = ", ".join("?" * len(names))
            for rows in _chunks(processed(), chunk):
                cursor.execute("BEGIN")
                cursor.executemany(f"INSERT INTO {TABLE_NAME} ({columns}) VALUES ({marks})", rows)
                cursor.execute("COMMIT")
                done += len(rows)
                _progress(done, generator.rows, started)
            cursor.close()
        else:
            with tempfile.TemporaryDirectory(prefix="orderhooks-load-") as tmp:
                path = Path(tmp) / "chunk.tsv"
                for rows in _chunks(processed(), chunk):
                    with path.open("wb") as out:
                        out.writelines(_tsv(values) for values in rows)
                    cursor = driver.cursor()
                    cursor.execute(
                        f"LOAD DATA LOCAL INFILE '{path}' INTO TABLE {TABLE_NAME} "
                        "CHARACTER SET binary FIELDS TERMINATED BY '\\t' ESCAPED BY '\\\\' "
                        f"LINES TERMINATED BY '\\n' ({columns})"
                    )
                    loaded = cursor.rowcount
                    cursor.close()
                    driver.commit()
                    if loaded != len(rows):
                        raise SystemExit(f"LOAD DATA stored {loaded} of {len(rows)} rows.")
                    done += len(rows)
                    _progress(done, generator.rows, started)
    finally:
        raw.close()
    seconds = time.monotonic() - started
    print(f"    maintenance (VACUUM/ANALYZE) on {store.backend}...", flush=True)
    if store.backend == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.exec_driver_sql(f"VACUUM (ANALYZE) {TABLE_NAME}")
    elif store.backend == "mariadb":
        with engine.connect() as connection:
            connection.exec_driver_sql(f"ANALYZE TABLE {TABLE_NAME}").all()
    engine.dispose()
    return seconds


def _tsv(values: tuple[Any, ...]) -> bytes:
    cells = []
    for v in values:
        if v is None:
            cells.append(b"\\N")
            continue
        if isinstance(v, datetime):
            data = v.isoformat(sep=" ", timespec="microseconds").encode()
        elif isinstance(v, bytes | bytearray | memoryview):
            data = bytes(v)
        else:
            data = str(v).encode()
        cells.append(
            data.replace(b"\\", b"\\\\")
            .replace(b"\t", b"\\t")
            .replace(b"\n", b"\\n")
            .replace(b"\0", b"\\0")
        )
    return b"\t".join(cells) + b"\n"


def table_size(store: Store) -> str:
    engine = store.engine()
    try:
        with engine.connect() as connection:
            if store.backend == "postgresql":
                row = connection.exec_driver_sql(
                    f"SELECT pg_size_pretty(pg_table_size('{TABLE_NAME}')),"
                    f" pg_size_pretty(pg_indexes_size('{TABLE_NAME}'))"
                ).one()
                return f"table {row[0]}, indexes {row[1]}"
            if store.backend == "mariadb":
                row = connection.exec_driver_sql(
                    "SELECT data_length, index_length FROM information_schema.TABLES "
                    "WHERE table_schema = DATABASE() AND table_name = %s",
                    (TABLE_NAME,),
                ).one()
                return f"table {row[0] / 2**30:.2f} GiB, indexes {row[1] / 2**30:.2f} GiB"
        size = sum(
            Path(store.name + s).stat().st_size
            for s in ("", "-wal")
            if Path(store.name + s).exists()
        )
        return f"file {size / 2**30:.2f} GiB (table and indexes)"
    finally:
        engine.dispose()


# -- paired rounds --------------------------------------------------------------------


def deferred_app(uri: str) -> Flask:
    """The deferred benchmark app with claims that outlive the run (a claimed
    row must not fall due again and spoil the "nothing due" check)."""
    app = make_app("orderhooks-deferred", uri)
    state = get_extension(app).state(app)
    state.store.claim_timeout = 3 * 3600.0
    return app


@dataclass
class Side:
    label: str
    store: Store
    inline: Flask
    deferred: Flask
    inline_client: FlaskClient
    deferred_client: FlaskClient
    delivery_store: DeliveryStore
    #: op -> per-round [wall us/op], [CPU us/op]
    wall: dict[str, list[float]] = field(default_factory=dict)
    cpu: dict[str, list[float]] = field(default_factory=dict)
    answered: int = 0
    accepted: int = 0
    failures: list[str] = field(default_factory=list)


OPS = ("first", "duplicate", "accept", "claim_due (some due)", "claim_due (none due)")


def server_cpu_reader(backend: str, args: argparse.Namespace) -> Callable[[], float]:
    return server_cpu_meter(backend, {"postgresql": args.pg_url, "mariadb": args.mariadb_url})


def run_op(side: Side, op: str, batch: Any, server_cpu: Callable[[], float], record: bool) -> None:
    cpu0, server0 = time.process_time(), server_cpu()
    start = time.perf_counter()
    n = len(batch)
    if op in ("first", "duplicate", "accept"):
        client = side.deferred_client if op == "accept" else side.inline_client
        for cb in batch:
            response = client.post(PATH, data=cb.body, headers=cb.headers)
            if response.status_code != 200:
                side.failures.append(f"{side.label} {op}: {response.status_code} {response.text}")
        if op == "first":
            side.answered += n
        if op == "accept":
            side.accepted += n
    else:
        keys = {cb.key for cb in batch}
        with side.deferred.app_context():
            for _ in range(n):
                claimed = side.delivery_store.claim_due()
                if op.endswith("(some due)"):
                    if claimed is None or claimed.delivery.key not in keys:
                        got = None if claimed is None else claimed.delivery.key
                        side.failures.append(f"{side.label} {op}: claimed {got}, not this batch's")
                elif claimed is not None:
                    side.failures.append(f"{side.label} {op}: claimed {claimed.delivery.key}")
    wall = time.perf_counter() - start
    cpu = time.process_time() - cpu0 + server_cpu() - server0
    if record:
        side.wall.setdefault(op, []).append(wall / n * 1e6)
        side.cpu.setdefault(op, []).append(cpu / n * 1e6)


def paired(sides: Sequence[Side], rounds: int, batch: int, server_cpu: Callable[[], float]) -> None:
    for r in range(-1, rounds):
        record = r >= 0
        size = batch if record else max(10, batch // 2)
        firsts = {s.label: signed(size) for s in sides}
        accepts = {s.label: signed(size) for s in sides}
        for o, op in enumerate(OPS):
            order = sides if (r + o) % 2 == 0 else list(reversed(sides))
            for side in order:
                work = accepts[side.label] if op.startswith(("accept", "claim_due")) else None
                run_op(side, op, work or firsts[side.label], server_cpu, record)


def ratio_rows(empty: Side, full: Side) -> list[tuple[str, str, float, float, float, float, float]]:
    rows = []
    for op in OPS:
        for measure, attr in (("wall", "wall"), ("CPU", "cpu")):
            a, b = getattr(empty, attr)[op], getattr(full, attr)[op]
            ratios = [y / x for x, y in zip(a, b, strict=True) if x > 0]
            q1, med, q3 = statistics.quantiles(ratios, n=4)
            rows.append((op, measure, statistics.median(a), statistics.median(b), med, q1, q3))
    return rows


# -- queries at size ------------------------------------------------------------------


@contextmanager
def captured() -> Iterator[list[tuple[str, Any]]]:
    seen: list[tuple[str, Any]] = []

    def hook(conn: Any, cursor: Any, statement: str, parameters: Any, *rest: Any) -> None:
        seen.append((statement, parameters))

    # On the Engine class: the CLI's app builds its own engine.
    sa.event.listen(sa.Engine, "before_cursor_execute", hook)
    try:
        yield seen
    finally:
        sa.event.remove(sa.Engine, "before_cursor_execute", hook)


INDEX_NAMES = re.compile(
    r"(ix_orderhooks_\w+|orderhooks_deliveries_pkey|sqlite_autoindex_\w+|\bPRIMARY\b)"
)
#: A whole-table or whole-index read (a LIMIT may stop it early: see the time).
SCAN = re.compile(r"(Seq Scan|^SCAN |type=ALL\b|type=index\b)", re.MULTILINE)
#: Rows sorted after reading (PostgreSQL's Incremental Sort sorts ties only).
SORT = re.compile(
    r"(^\s*(->\s*)?Sort\b|filesort|USE TEMP B-TREE FOR ORDER BY|USE TEMP B-TREE FOR GROUP BY)",
    re.MULTILINE,
)


def explain(engine: sa.Engine, backend: str, statement: str, parameters: Any) -> list[str]:
    with engine.connect() as connection:
        if backend == "postgresql":
            rows = connection.exec_driver_sql(
                "EXPLAIN (ANALYZE, BUFFERS) " + statement, parameters
            ).all()
            return [str(r[0]) for r in rows]
        if backend == "sqlite":
            rows = connection.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, parameters).all()
            return [str(r[-1]) for r in rows]
        result = connection.exec_driver_sql("ANALYZE " + statement, parameters)
        keys = list(result.keys())
        wanted = ("table", "type", "possible_keys", "key", "rows", "r_rows", "filtered", "Extra")
        lines = []
        for r in result.all():
            m = dict(zip(keys, r, strict=True))
            lines.append(" | ".join(f"{k}={m.get(k)}" for k in wanted if k in m))
        return lines


@dataclass
class QueryResult:
    name: str
    how: str
    ms: dict[str, float]
    plan: list[str]
    indexes: list[str]
    scan: bool
    sort: bool
    rows: int


def console_queries() -> Any:
    try:
        from flask_orderhooks.console import queries  # noqa: PLC0415 - may not exist yet
    except ImportError:
        return None
    return queries


#: Every (provider, callback) a key search looks in (the console's ``pairs``).
PAIRS = (
    ("gateway", "collect"),
    ("gateway", "payout"),
    ("igv", "order-status"),
    ("sud", "order-changed"),
)


def console_specs(
    queries: Any, samples: Sequence[tuple[str, str | None, str, str]], end: datetime
) -> list[tuple[str, str, Callable[[Side], int]]]:
    """The console's own query functions, timed directly."""
    key, reference, _provider, _callback = samples[len(samples) // 2]

    def page(filters: Any, *, second: bool = False) -> Callable[[Side], int]:
        def run(side: Side) -> int:
            with side.inline.app_context():
                store = side.delivery_store
                got = queries.list_page(store, filters, pairs=PAIRS, after=None, limit=50)
                if second:
                    if got.next is None:
                        raise SystemExit("The console's first page has no next page.")
                    got = queries.list_page(store, filters, pairs=PAIRS, after=got.next, limit=50)
                return len(got.rows)

        return run

    def chart(side: Side) -> int:
        with side.inline.app_context():
            start, stop = queries.last_hours(end)
            counts = queries.hourly_counts(side.delivery_store, start=start, end=stop)
            return sum(sum(c.values()) for c in counts.values())

    how = "console: queries.list_page"
    return [
        ("console list, newest first, page 1 (50)", how, page(queries.Filters())),
        (
            "console list, page 1 then keyset page 2",
            how + " x2",
            page(queries.Filters(), second=True),
        ),
        ("console list, status failed", how, page(queries.Filters(status="failed"))),
        ("console list, status dead", how, page(queries.Filters(status="dead"))),
        ("console list, status done", how, page(queries.Filters(status="done"))),
        ("console search by key", how, page(queries.Filters(search=key))),
        ("console search by order id (reference)", how, page(queries.Filters(search=reference))),
        ("console chart, 24 hours by hour and status", "console: queries.hourly_counts", chart),
    ]


def proposals(t: sa.Table, key: str, end: datetime) -> list[tuple[str, str, Callable[[Side], int]]]:
    """The fixes proposed for the CLI's slow queries, as SQL (whole rows, as
    ``DeliveryStore.list()`` and ``get()`` read them)."""
    when = table_module.WHEN
    pk_desc = (t.c.provider.desc(), t.c.callback.desc(), t.c.key.desc())

    def sql(statement: Any) -> Callable[[Side], int]:
        def run(side: Side) -> int:
            with side.inline.app_context(), side.delivery_store.engine.connect() as connection:
                return len(connection.execute(statement).all())

        return run

    how = "proposal (SQL)"
    since = sa.bindparam("since", end - timedelta(hours=24), type_=when)
    by_key = sa.or_(
        *(sa.and_(t.c.provider == p, t.c.callback == c, t.c.key == key) for p, c in PAIRS)
    )
    return [
        (
            "deliveries, ordered by created_at DESC + primary key DESC",
            how,
            sql(sa.select(t).order_by(t.c.created_at.desc(), *pk_desc).limit(100)),
        ),
        (
            "deliveries --since 24h on created_at",
            how,
            sql(
                sa.select(t)
                .where(t.c.created_at >= since)
                .order_by(t.c.created_at.desc(), *pk_desc)
                .limit(100)
            ),
        ),
        (
            "deliveries --status done, ties broken by primary key DESC",
            how,
            sql(
                sa.select(t)
                .where(t.c.status == "done")
                .order_by(t.c.updated_at.desc(), *pk_desc)
                .limit(100)
            ),
        ),
        (
            "show KEY as one primary-key lookup per (provider, callback)",
            how,
            sql(sa.select(t).where(by_key).order_by(t.c.provider, t.c.callback)),
        ),
    ]


def query_specs(
    full: Side, samples: Sequence[tuple[str, str | None, str, str]], end: datetime
) -> list[tuple[str, str, Callable[[Side], int]]]:
    """(name, how it runs, fn(side) -> rows it returned)."""
    t = full.delivery_store.table
    key, reference, provider, callback = samples[len(samples) // 2]
    cols = [t.c.provider, t.c.callback, t.c.key, t.c.status, t.c.attempts, t.c.created_at]
    if "reference" in t.c:
        cols.append(t.c.reference)
    order = (t.c.created_at.desc(), t.c.provider.desc(), t.c.callback.desc(), t.c.key.desc())
    newest = sa.select(*cols).order_by(*order).limit(50)
    when = table_module.WHEN

    def cli(*extra: str) -> Callable[[Side], int]:
        def run(side: Side) -> int:
            result = side.inline.test_cli_runner().invoke(orderhooks_cli, ["deliveries", *extra])
            if result.exit_code != 0:
                raise SystemExit(f"flask orderhooks deliveries {extra}: {result.output}")
            return max(0, len(result.output.splitlines()) - 1)

        return run

    def sql(statement: Any) -> Callable[[Side], int]:
        def run(side: Side) -> int:
            with side.inline.app_context():
                engine = side.delivery_store.engine
                with engine.connect() as connection:
                    return len(connection.execute(statement).all())

        return run

    def get(side: Side) -> int:
        with side.inline.app_context():
            return len(side.delivery_store.get(key))

    # The CLI looks under the app's configured routes (these apps: iGV only).
    routed = next(k for k, _r, p, c in samples[len(samples) // 2 :] if p == "igv")

    def show(side: Side) -> int:
        result = side.inline.test_cli_runner().invoke(orderhooks_cli, ["show", routed])
        if result.exit_code != 0 and "No delivery is stored" in result.output:
            return 0  # the empty side: looked for, not found
        if result.exit_code != 0:
            raise SystemExit(f"flask orderhooks show {routed}: {result.output}")
        return result.output.count("\n  status:   ")

    def next_page(side: Side) -> int:
        with side.inline.app_context(), side.delivery_store.engine.connect() as connection:
            last = connection.execute(newest).all()[-1]
            c = sa.bindparam("c", last.created_at, type_=when)
            page = newest.where(
                t.c.created_at <= c,
                sa.or_(
                    t.c.created_at < c,
                    sa.tuple_(t.c.provider, t.c.callback, t.c.key)
                    < sa.tuple_(
                        sa.literal(last.provider),
                        sa.literal(last.callback),
                        sa.bindparam("k", last.key, type_=t.c.key.type),
                    ),
                ),
            )
            return len(connection.execute(page).all())

    specs: list[tuple[str, str, Callable[[Side], int]]] = [
        ("flask orderhooks deliveries", "CLI (store.list, limit 100)", cli()),
        ("flask orderhooks deliveries --status failed", "CLI", cli("--status", "failed")),
        ("flask orderhooks deliveries --status done", "CLI", cli("--status", "done")),
        ("flask orderhooks deliveries --since 24h", "CLI", cli("--since", "24h")),
        ("flask orderhooks show KEY", "CLI (store.get under the configured routes)", show),
        ("search by key alone: store.get(key), no routes", "store (the CLI's fallback)", get),
        (
            "search by key with its provider and callback",
            "SQL (the primary key's columns)",
            sql(
                sa.select(*cols).where(
                    t.c.provider == provider, t.c.callback == callback, t.c.key == key
                )
            ),
        ),
    ]
    specs += proposals(t, key, end)
    queries = console_queries()
    if queries is not None:
        return specs + console_specs(queries, samples, end)
    if "reference" in t.c:
        specs.append(
            (
                "search by reference (order id)",
                "SQL (console equivalent)",
                sql(sa.select(*cols).where(t.c.reference == reference).order_by(*order).limit(50)),
            )
        )
    specs += [
        ("newest first, page 1 (LIMIT 50)", "SQL (console equivalent)", sql(newest)),
        ("newest first, keyset page 2", "SQL (console equivalent)", next_page),
        (
            "newest failed first (LIMIT 50)",
            "SQL (console equivalent)",
            sql(newest.where(t.c.status == "failed")),
        ),
        (
            "24-hour chart: GROUP BY provider, status",
            "SQL (console equivalent)",
            sql(
                sa.select(t.c.provider, t.c.status, sa.func.count())
                .where(
                    t.c.created_at >= sa.bindparam("since", end - timedelta(hours=24), type_=when)
                )
                .group_by(t.c.provider, t.c.status)
            ),
        ),
    ]
    return specs


def measure_queries(
    sides: Sequence[Side],
    specs: Sequence[tuple[str, str, Callable[[Side], int]]],
    repeat: int,
) -> list[QueryResult]:
    results = []
    full = sides[-1]
    for name, how, fn in specs:
        ms: dict[str, float] = {}
        rows = 0
        statements: list[tuple[str, Any]] = []
        for side in sides:
            start = time.perf_counter()
            fn(side)  # warm: plans, caches
            # A query that takes seconds is timed once more, not --repeat times.
            times = []
            for _ in range(repeat if time.perf_counter() - start < 1.0 else 1):
                start = time.perf_counter()
                rows = fn(side)
                times.append((time.perf_counter() - start) * 1000)
            ms[side.label] = statistics.median(times)
        with full.inline.app_context():
            engine = full.delivery_store.engine
            with captured() as statements:
                fn(full)
            plan: list[str] = []
            for statement, parameters in statements:
                if statement.lstrip().upper().startswith("SELECT"):
                    plan += [
                        statement.replace("\n", " "),
                        *explain(engine, full.store.backend, statement, parameters),
                    ]
        text = "\n".join(plan)
        results.append(
            QueryResult(
                name,
                how,
                ms,
                plan,
                sorted(set(INDEX_NAMES.findall(text))),
                bool(SCAN.search(text)),
                bool(SORT.search(text)),
                rows,
            )
        )
        print(f"    {name}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in ms.items()), flush=True)
    return results


# -- the run --------------------------------------------------------------------------


def count_rows(uri: str) -> int:
    engine = sa.create_engine(uri)
    try:
        with engine.connect() as connection:
            return int(
                connection.exec_driver_sql(f"SELECT count(*) FROM {TABLE_NAME}").scalar_one()
            )
    finally:
        engine.dispose()


def make_side(label: str, store: Store) -> Side:
    inline = make_app("orderhooks", store.uri)
    deferred = deferred_app(store.uri)
    return Side(
        label,
        store,
        inline,
        deferred,
        inline.test_client(),
        deferred.test_client(),
        get_extension(deferred).state(deferred).store,
    )


def run_backend(backend: str, args: argparse.Namespace) -> tuple[str, bool]:
    """One backend's whole measurement: (markdown, ok)."""
    load_before = os.getloadavg()
    end = datetime.now(UTC).replace(microsecond=0)
    generator = Generator(args.rows, end, compact_after=args.compact_after)
    lines: list[str] = []
    ok = True
    with ExitStack() as stack:
        empty = new_store(backend, args, "empty", None)
        stack.callback(empty.drop)
        full = new_store(backend, args, "full", args.reuse)
        if not args.keep:
            stack.callback(full.drop)
        create_tables("orderhooks-deferred", empty.uri)
        print(f"\n{backend}: filling {full.name} with {args.rows:,} rows", flush=True)
        if args.reuse is None:
            load_seconds = load(full, generator, args.chunk)
        else:
            load_seconds = float("nan")
            for _ in generator:  # its samples and counts, without loading
                pass
        filled = count_rows(full.uri)
        if filled != args.rows:
            raise SystemExit(f"{backend}: {filled} rows in the filled table, not {args.rows}.")
        size = table_size(full)
        print(f"    {filled:,} rows in {load_seconds:.0f} s; {size}", flush=True)
        sides = [make_side("empty", empty), make_side("full", full)]
        server_cpu = server_cpu_reader(backend, args)
        print(f"    paired rounds: {args.rounds} x {args.batch} per operation", flush=True)
        paired(sides, args.rounds, args.batch, server_cpu)
        for side in sides:
            expected = (args.rows if side.label == "full" else 0) + side.answered + side.accepted
            stored = count_rows(side.store.uri)
            if stored != expected:
                side.failures.append(
                    f"{side.label}: {stored} rows, expected {expected} "
                    f"({side.answered} first deliveries + {side.accepted} accepted)"
                )
        failures = [f for side in sides for f in side.failures]
        ok = not failures
        ratios = ratio_rows(*sides)
        print("    queries at size", flush=True)
        queries = measure_queries(sides, query_specs(sides[1], generator.samples, end), args.repeat)
        load_after = os.getloadavg()
        if backend == "postgresql":
            version = "PostgreSQL " + postgres_version(args.pg_url)
        elif backend == "mariadb":
            version = "MariaDB " + mariadb_version(args.mariadb_url)
        else:
            version = "SQLite " + sqlite3.sqlite_version
        lines += report(
            backend,
            args,
            version,
            generator,
            filled,
            load_seconds,
            size,
            ratios,
            queries,
            failures,
            load_before,
            load_after,
            console_queries() is not None,
        )
    return "\n".join(lines), ok


def report(
    backend: str,
    args: argparse.Namespace,
    version: str,
    generator: Generator,
    filled: int,
    load_seconds: float,
    size: str,
    ratios: Sequence[tuple[str, str, float, float, float, float, float]],
    queries: Sequence[QueryResult],
    failures: Sequence[str],
    load_before: tuple[float, ...],
    load_after: tuple[float, ...],
    console: bool,
) -> list[str]:
    counts = ", ".join(f"{k} {v:,}" for k, v in generator.status_counts.items())
    command = "python -m benchmarks.large_table " + " ".join(
        a for a in sys.argv[1:] if a != "--results"
    )
    lines = [
        f"### {version}: {filled:,} rows",
        "",
        f"- Command: `{command}`",
        f"- Date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}; load average before "
        f"{load_before[0]:.2f}, after {load_after[0]:.2f} (2 cores, shared)",
        f"- Checkout: {CHECKOUT}",
        f"- Fill: {filled:,} rows ({counts}) in {load_seconds:.0f} s "
        f"({filled / load_seconds if load_seconds == load_seconds and load_seconds else 0:,.0f} "
        f"rows/s); {size}",
        f"- Paired rounds: {args.rounds} rounds x {args.batch} operations per side, empty and "
        "filled table, alternating",
        "",
        "| operation | measure | empty µs | full µs | full/empty (q1-q3) | target | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for op, measure, a, b, med, q1, q3 in ratios:
        verdict = "met" if med <= TARGET_RATIO else "**not met**"
        lines.append(
            f"| {op} | {measure} | {a:.0f} | {b:.0f} | {med:.3f} ({q1:.3f}-{q3:.3f}) | "
            f"<= {TARGET_RATIO:.2f} | {verdict} |"
        )
    lines += [
        "",
        "CPU is this process plus the database server's processes "
        + (
            "(every `postgres` process)"
            if backend == "postgresql"
            else "(the `mariadbd` process)"
            if backend == "mariadb"
            else "(SQLite runs in this process)"
        )
        + ".",
        "",
        "Queries on the filled table (median of "
        f"{args.repeat} after a warm-up; "
        + (
            "the console's query functions"
            if console
            else "no `flask_orderhooks.console.queries` yet: the console's queries are "
            "the equivalent SQL"
        )
        + "):",
        "",
        "| query | how | empty ms | full ms | rows | index(es) in the plan | scan | sort "
        "| target | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for q in queries:
        full_ms = q.ms["full"]
        verdict = "met" if full_ms < TARGET_QUERY_MS else "**not met**"
        lines.append(
            f"| {q.name} | {q.how} | {q.ms['empty']:.1f} | {full_ms:.1f} | {q.rows} | "
            f"{', '.join(q.indexes) or '—'} | {'yes' if q.scan else 'no'} | "
            f"{'yes' if q.sort else 'no'} | "
            f"< {TARGET_QUERY_MS:.0f} ms | {verdict} |"
        )
    lines += ["", "<details><summary>Plans</summary>", ""]
    for q in queries:
        lines += [f"**{q.name}**", "", "```", *q.plan, "```", ""]
    lines += ["</details>", ""]
    if failures:
        lines += ["**CHECKS FAILED:**", "", *(f"- {f}" for f in failures), ""]
    else:
        lines += [
            "Checks: every answer 200; rows stored = rows loaded + first deliveries + "
            "deferred acceptances on both sides; every 'some due' claim took a row of its "
            "batch, every 'none due' claim found nothing: OK",
            "",
        ]
    return lines


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.large_table",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--backend",
        action="append",
        choices=("postgresql", "sqlite", "mariadb"),
        help="[postgresql, sqlite, mariadb, one after the other]",
    )
    parser.add_argument("--rows", type=int, default=10_000_000, help="rows to load [10,000,000]")
    parser.add_argument(
        "--compact-after",
        type=float,
        metavar="DAYS",
        help="done rows older than DAYS are tombstones: body and headers dropped, "
        "compacted_at set (default: none, a year kept whole)",
    )
    parser.add_argument("--rounds", type=int, default=20, help="paired rounds [20]")
    parser.add_argument("--batch", type=int, default=50, help="operations per side per round [50]")
    parser.add_argument("--repeat", type=int, default=7, help="timings per query [7]")
    parser.add_argument("--chunk", type=int, default=100_000, help="rows per load transaction")
    add_database_urls(parser)
    parser.add_argument("--sqlite-dir", default=tempfile.gettempdir(), help="[the temp dir]")
    parser.add_argument(
        "--keep", action="store_true", help="keep the filled store (prints its name)"
    )
    parser.add_argument("--reuse", help="a kept filled store's name (schema, database or file)")
    parser.add_argument("--markdown", type=Path, help="also write the report here")
    parser.add_argument(
        "--results",
        action="store_true",
        help="put the report into benchmarks/RESULTS.md (section large-table-<backend>)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    backends = args.backend or ["postgresql", "sqlite", "mariadb"]
    if args.reuse and len(backends) != 1:
        raise SystemExit("--reuse names one store: give exactly one --backend.")
    ok = True
    for backend in backends:
        text, good = run_backend(backend, args)
        ok = ok and good
        print("\n" + text)
        if args.markdown:
            with args.markdown.open("a") as out:
                out.write(text + "\n")
        if args.results:
            sections.replace_section(f"large-table-{backend}", text)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
