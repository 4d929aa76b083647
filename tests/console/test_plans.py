"""Every console query is served by an index: asked of each backend's own
planner (EXPLAIN), never a full scan of the deliveries table.

PostgreSQL is asked with ``enable_seqscan`` off, which makes a sequential
scan a last resort: a plan that still has one has no index to use. SQLite's
``EXPLAIN QUERY PLAN`` says ``SCAN <table>`` (no index) or ``... USING
INDEX``. MariaDB's ``EXPLAIN`` type ``ALL`` is a full scan; its statistics
are refreshed first (ANALYZE TABLE) so it plans as it would at size.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask
from sqlalchemy import event

from flask_orderhooks import get_extension
from flask_orderhooks.cli import orderhooks
from flask_orderhooks.console.queries import (
    Cursor,
    Filters,
    hourly_counts,
    hourly_query,
    last_hours,
    list_page,
    list_query,
)
from flask_orderhooks.store import STATUSES, TABLE_NAME, DeliveryStore
from flask_orderhooks.store.table import CREATED_INDEX, MYSQL, STATUS_CREATED_INDEX
from tests.conftest import refresh_statistics, stored_row
from tests.console.conftest import NOW, Console

ROWS = 3000
PAIRS = [
    ("igv", "order-status"),
    ("gateway", "collect"),
    ("gateway", "payout"),
    ("sud", "order-changed"),
]
NOW_DT = datetime.fromtimestamp(NOW, UTC)


@pytest.fixture
def filled(console: Console) -> Console:
    """The table with ROWS deliveries over 30 days, mostly done."""
    with console.app.app_context():
        store = _store(console.app)
        t = store.table
        statuses = ["done"] * 95 + ["failed", "failed", "dead", "pending", "processing"]
        rows: list[dict[str, Any]] = []
        for n in range(ROWS):
            provider, callback = PAIRS[n % 4]
            when = NOW_DT - timedelta(minutes=15 * n)
            status = statuses[n % 100]
            rows.append(
                stored_row(
                    store.dialect,
                    provider=provider,
                    callback=callback,
                    key=f"K{n:08d}",
                    status=status,
                    when=when,
                    due=when if status == "failed" else None,
                    reference=f"R{n:08d}",
                )
            )
        with store.engine.begin() as connection:
            connection.execute(t.insert(), rows)
            refresh_statistics(connection)
    return console


def _store(app: Flask) -> DeliveryStore:
    return get_extension(app).state(app).store


def _explain(app: Flask, query: sa.Select[Any]) -> list[str]:
    """The plan of ``query`` as its planner reports it, one line per row
    (PostgreSQL: with ``enable_seqscan`` off)."""

    def run() -> None:
        with _store(app).engine.connect() as connection:
            connection.execute(query).all()

    return [line for plan in _plans(app, run, seqscan=False) for line in plan]


def _plans(app: Flask, run: Callable[[], object], *, seqscan: bool = True) -> list[list[str]]:
    """The plan of each statement on the deliveries table that ``run()``
    sends, as its planner reports it, one line per row.

    :param seqscan: ``False``: PostgreSQL plans with ``enable_seqscan`` off.
    """
    store = _store(app)
    prefix = {
        "postgresql": "EXPLAIN ",
        "sqlite": "EXPLAIN QUERY PLAN ",
    }.get(store.dialect, "EXPLAIN ")
    off = store.dialect == "postgresql" and not seqscan
    plans: list[list[dict[str, Any]]] = []

    def explain(
        conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool
    ) -> None:
        if TABLE_NAME not in statement:
            return
        # On the statement's own cursor, with its parameters exactly as the
        # driver gets them; the statement itself runs afterwards.
        if off:
            cursor.execute("SET enable_seqscan = off")
        cursor.execute(prefix + statement, params)
        names = [column[0] for column in cursor.description]
        plans.append([dict(zip(names, row, strict=True)) for row in cursor.fetchall()])
        if off:
            cursor.execute("RESET enable_seqscan")

    with app.app_context():
        event.listen(store.engine, "before_cursor_execute", explain)
        try:
            run()
        finally:
            event.remove(store.engine, "before_cursor_execute", explain)
    if store.dialect == "postgresql":
        return [[str(r["QUERY PLAN"]) for r in rows] for rows in plans]
    if store.dialect == "sqlite":
        return [[str(r["detail"]) for r in rows] for rows in plans]
    return [
        [
            f"{r['table']} type={r['type']} key={r['key']} rows={r['rows']} extra={r['Extra']}"
            for r in rows
        ]
        for rows in plans
    ]


def _full_scans(app: Flask, plan: list[str]) -> list[str]:
    dialect = _store(app).dialect
    if dialect == "postgresql":
        return [line for line in plan if "Seq Scan" in line]
    if dialect == "sqlite":
        return [
            line
            for line in plan
            if re.fullmatch(rf"SCAN {TABLE_NAME}( .*)?", line) and "USING" not in line
        ]
    return [line for line in plan if " type=ALL " in line]


def _cursor() -> Cursor:
    return Cursor(NOW_DT - timedelta(days=3), "igv", "order-status", "K00000288")


CASES: dict[str, tuple[Filters, Cursor | None]] = {
    "first page": (Filters(), None),
    "next page": (Filters(), _cursor()),
    "time range": (
        Filters(since=NOW_DT - timedelta(days=2), until=NOW_DT - timedelta(days=1)),
        None,
    ),
    "status failed": (Filters(status="failed"), None),
    "status done, next page": (Filters(status="done"), _cursor()),
    "platform and callback": (Filters(provider="gateway", callback="collect"), None),
    "search": (Filters(search="K00000042"), None),
    "search by reference": (Filters(search="R00000042"), None),
    "search with filters": (Filters(search="R00000042", status="done", provider="igv"), None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_list_queries_use_an_index(filled: Console, case: str) -> None:
    filters, after = CASES[case]
    app = filled.app
    table = _store(app).table
    query = list_query(table, filters, pairs=PAIRS, after=after, limit=50)
    assert query is not None
    plan = _explain(app, query)
    assert plan
    assert _full_scans(app, plan) == [], "\n".join(plan)


def test_the_chart_query_uses_an_index(filled: Console) -> None:
    """Which one is the planner's choice at size: see the year of callbacks below."""
    app = filled.app
    store = _store(app)
    start, end = last_hours(NOW_DT)
    plan = _explain(app, hourly_query(store.dialect, store.table, start=start, end=end))
    assert plan
    assert _full_scans(app, plan) == [], "\n".join(plan)


def test_search_results(filled: Console) -> None:
    """The statements the plans were asked about return the right rows."""
    from flask_orderhooks.console.queries import list_page

    with filled.app.app_context():
        store = _store(filled.app)
        for text in ("K00000042", "R00000042"):
            page = list_page(store, Filters(search=text), pairs=PAIRS, after=None, limit=50)
            assert [r.key for r in page.rows] == ["K00000042"]
        page = list_page(store, Filters(status="failed"), pairs=PAIRS, after=None, limit=50)
        assert len(page.rows) == 50
        assert {r.status for r in page.rows} == {"failed"}
        keys = [r.key for r in page.rows]
        assert keys == sorted(keys)  # newest first: the smallest n is the newest


@pytest.mark.parametrize("backend", [pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_chart_hours_whatever_the_session_time_zone(console: Console) -> None:
    """PostgreSQL's to_char of a timestamptz follows the session's TimeZone;
    the chart's buckets must stay UTC hours (a half-hour zone shows it)."""
    app = console.app
    store = _store(app)
    with app.app_context():
        t = store.table
        when = datetime(2026, 5, 4, 10, 45, tzinfo=UTC)
        with store.engine.begin() as connection:
            connection.execute(
                t.insert(),
                [
                    stored_row(
                        store.dialect,
                        provider="igv",
                        callback="order-status",
                        key="tz",
                        status="done",
                        when=when,
                    )
                ],
            )
        start, end = last_hours(NOW_DT)
        with store.engine.connect() as connection:
            connection.exec_driver_sql("SET TIME ZONE 'Asia/Kolkata'")
            rows = connection.execute(hourly_query(store.dialect, t, start=start, end=end)).all()
            connection.exec_driver_sql("RESET TIME ZONE")
    assert [(r.bucket, r.status, r.n) for r in rows] == [("2026-05-04 10", "done", 1)]


# -- a year of callbacks: the planners' own choice at size ---------------------------

#: Enough rows, and a day's share of them as at 10 million over a year, that
#: the planners choose as they do at that size (PostgreSQL reads the chart
#: through the created_at index, fetching each row, below about 50,000).
YEAR_ROWS = 100_000
#: The benchmark's proportions (benchmarks/large_table.py).
YEAR_STATUSES = {"done": 9750, "failed": 100, "dead": 50, "pending": 100, "processing": 1}
#: A real body's size: the wider the row, the more a read of the table costs.
YEAR_BODY = b"{" + b'"x": "' + b"x" * 600 + b'"}'
#: Rows one console page and one ``flask orderhooks deliveries`` show.
CONSOLE_PAGE = 50
CLI_PAGE = 100


@dataclass(frozen=True)
class Year:
    """A console on a table of YEAR_ROWS deliveries, newest at NOW_DT."""

    console: Console
    #: (created_at, status) of every row.
    rows: list[tuple[datetime, str]]


@pytest.fixture
def year(console: Console) -> Year:
    """A shop's year: YEAR_ROWS deliveries spread evenly over 365 days, in
    the benchmark's statuses, with the statistics a server has after a load
    (PostgreSQL: VACUUM ANALYZE, as autovacuum does, so the visibility map is
    set; MariaDB: ANALYZE TABLE; SQLite: none, as most apps have)."""
    app = console.app
    store = _store(app)
    t = store.table
    with app.app_context():
        dialect = store.dialect
    chosen = random.Random(15).choices(
        list(YEAR_STATUSES), weights=list(YEAR_STATUSES.values()), k=YEAR_ROWS
    )
    step = timedelta(days=365) / YEAR_ROWS
    made: list[tuple[datetime, str]] = []
    values: list[dict[str, Any]] = []
    for n, status in enumerate(chosen):
        provider, callback = PAIRS[n % 4]
        when = NOW_DT - step * n
        made.append((when, status))
        values.append(
            stored_row(
                dialect,
                provider=provider,
                callback=callback,
                key=f"Y{n:08d}",
                status=status,
                when=when,
                due=when if status in ("failed", "pending") else None,
                reference=f"Y{n:08d}",
                body=YEAR_BODY,
            )
        )
    with app.app_context():
        with store.engine.begin() as connection:
            connection.execute(t.insert(), values)
            if store.dialect in MYSQL:
                connection.exec_driver_sql(f"ANALYZE TABLE {TABLE_NAME}")
        if store.dialect == "postgresql":
            with store.engine.connect().execution_options(
                isolation_level="AUTOCOMMIT"
            ) as connection:
                connection.exec_driver_sql(f"VACUUM ANALYZE {TABLE_NAME}")
    return Year(console, made)


def _statistics(app: Flask) -> Iterator[str]:
    """Runs the test body once per state of the statistics that matters: on
    SQLite without them (as most apps are) and again after ANALYZE."""
    yield "as loaded"
    store = _store(app)
    with app.app_context():
        if store.dialect != "sqlite":
            return
        with store.engine.begin() as connection:
            connection.exec_driver_sql("ANALYZE")
    yield "after ANALYZE"


def _reads_in_created_order(
    dialect: str, plan: list[str], indexes: tuple[str, ...], *, within_a_page: bool
) -> bool:
    """Whether ``plan`` reads one of ``indexes`` newest first and sorts only
    the ties of one created_at (never every matching row).

    :param within_a_page: the status has no more rows than one page shows:
        sorting all of them is reading a page, so a sort of the whole range
        is allowed (PostgreSQL chooses one when its sample of the table saw
        few or none of them, and the sample is random).
    """
    text = "\n".join(plan)
    if dialect == "postgresql":
        return any(f"Index Scan Backward using {name} " in text for name in indexes) and (
            within_a_page
            # An Incremental Sort (presorted on created_at) sorts ties only.
            or re.search(r"^\s*(->\s*)?Sort\b(?! Key)", text, re.MULTILINE) is None
        )
    if dialect == "sqlite":
        searches = [line for line in plan if TABLE_NAME in line]
        return (
            len(searches) == 1
            and any(
                searches[0].startswith(f"SEARCH {TABLE_NAME} USING INDEX {name} (status=?")
                for name in indexes
            )
            and (within_a_page or "USE TEMP B-TREE FOR ORDER BY" not in plan)
        )
    # InnoDB appends the primary key to the index: the tie-break is its order.
    return (
        len(plan) == 1
        and any(f" key={name} " in plan[0] for name in indexes)
        and (within_a_page or "filesort" not in plan[0])
    )


def test_status_lists_read_the_status_created_index(year: Year) -> None:
    """The console's status filter (a page and a keyset next page) and
    ``flask orderhooks deliveries --status``: one range of the (status,
    created_at) index, newest first, that stops after a page."""
    app = year.console.app
    store = _store(app)
    with app.app_context():
        dialect = store.dialect
    runner = app.test_cli_runner()
    # A row 30 days old: the next page starts there.
    when, _status = year.rows[YEAR_ROWS // 12]
    n = YEAR_ROWS // 12
    after = Cursor(when, *PAIRS[n % 4], f"Y{n:08d}")
    counts = Counter(status for _when, status in year.rows)
    # A status of a few rows (processing: 15) fits in a page.
    assert (
        counts["processing"]
        <= CONSOLE_PAGE
        < min(counts[s] for s in YEAR_STATUSES if s != "processing")
    )

    def console_page(status: str, cursor: Cursor | None) -> Callable[[], object]:
        def run() -> None:
            list_page(store, Filters(status=status), pairs=PAIRS, after=cursor, limit=CONSOLE_PAGE)

        return run

    def cli(status: str) -> Callable[[], object]:
        def run() -> None:
            result = runner.invoke(orderhooks, ["deliveries", "--status", status])
            assert result.exit_code == 0, result.output

        return run

    for statistics in _statistics(app):
        wrong: dict[str, list[list[str]]] = {}
        for status in YEAR_STATUSES:
            # done is nearly every row: PostgreSQL may instead read the
            # created_at index and skip the few others, which costs the same.
            indexes: tuple[str, ...] = (STATUS_CREATED_INDEX,)
            if status == "done" and dialect == "postgresql":
                indexes = (STATUS_CREATED_INDEX, CREATED_INDEX)
            rows = counts[status]
            for name, run, page in (
                ("console page", console_page(status, None), CONSOLE_PAGE),
                ("console next page", console_page(status, after), CONSOLE_PAGE),
                ("CLI", cli(status), CLI_PAGE),
            ):
                plans = _plans(app, run)
                if len(plans) != 1 or not _reads_in_created_order(
                    dialect, plans[0], indexes, within_a_page=rows <= page
                ):
                    wrong[f"{name}, {status} ({rows} rows), {statistics}"] = plans
        assert wrong == {}, "\n\n".join(
            f"{case}:\n" + "\n".join(line for plan in plans for line in plan)
            for case, plans in wrong.items()
        )


def test_the_chart_counts_from_the_status_created_index_alone(year: Year) -> None:
    """A day's rows (270 here, 27,000 at 10 million) counted from the index,
    one created_at range per status, without reading a row of the table;
    the counts are every row's."""
    app = year.console.app
    store = _store(app)
    with app.app_context():
        dialect = store.dialect
    start, end = last_hours(NOW_DT)
    expected: dict[datetime, dict[str, int]] = {}
    for when, status in year.rows:
        if start <= when < end:
            hour = when.replace(minute=0, second=0, microsecond=0)
            by_status = expected.setdefault(hour, {})
            by_status[status] = by_status.get(status, 0) + 1
    assert sum(sum(c.values()) for c in expected.values()) > 200
    for statistics in _statistics(app):
        counts: dict[datetime, dict[str, int]] = {}

        def run(into: dict[datetime, dict[str, int]] = counts) -> None:
            into.update(hourly_counts(store, start=start, end=end))

        (plan,) = _plans(app, run)
        assert counts == expected, statistics
        text = "\n".join(plan)
        if dialect == "postgresql":
            # Index-only: the visibility map says the pages are all visible
            # (a page changed since the last vacuum is still read).
            scans = re.findall(r"(\w[\w ]*Scan\w*) using (\w+)", text)
            assert scans == [("Index Only Scan", STATUS_CREATED_INDEX)], text
            assert f"status = ANY ('{{{','.join(STATUSES)}}}'::text[])" in text, text
        elif dialect == "sqlite":
            assert plan == [
                f"SEARCH {TABLE_NAME} USING COVERING INDEX {STATUS_CREATED_INDEX} "
                "(status=? AND created_at>? AND created_at<?)",
                "USE TEMP B-TREE FOR GROUP BY",
            ], statistics
        else:
            (line,) = plan
            assert f" type=range key={STATUS_CREATED_INDEX} " in line, line
            assert "Using index" in line, line  # covering: no row of the table read
