"""Every console query is served by an index: asked of each backend's own
planner (EXPLAIN), never a full scan of the deliveries table.

PostgreSQL is asked with ``enable_seqscan`` off, which makes a sequential
scan a last resort: a plan that still has one has no index to use. SQLite's
``EXPLAIN QUERY PLAN`` says ``SCAN <table>`` (no index) or ``... USING
INDEX``. MariaDB's ``EXPLAIN`` type ``ALL`` is a full scan; its statistics
are refreshed first (ANALYZE TABLE) so it plans as it would at size.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask
from sqlalchemy import event

from flask_orderhooks import get_extension
from flask_orderhooks.console.queries import (
    Cursor,
    Filters,
    hourly_query,
    last_hours,
    list_query,
)
from flask_orderhooks.store import TABLE_NAME, DeliveryStore
from flask_orderhooks.store.table import MYSQL
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
            binary = store.dialect in MYSQL
            rows.append(
                {
                    "provider": provider,
                    "callback": callback,
                    "key": f"K{n:08d}",
                    "status": status,
                    "attempts": 1,
                    "claim_token": "0" * 32,
                    "lease_expires_at": when,
                    "body": b"{}",
                    "body_sha256": "0" * 64,
                    "headers": "{}",
                    "error": None,
                    "created_at": when,
                    "updated_at": when,
                    "next_attempt_at": when if status == "failed" else None,
                    # The column holds bytes on MySQL (store/table.py: REFERENCE).
                    "reference": f"R{n:08d}".encode() if binary else f"R{n:08d}",
                    "failures": None,
                }
            )
        with store.engine.begin() as connection:
            connection.execute(t.insert(), rows)
            if store.dialect == "postgresql":
                connection.exec_driver_sql(f"ANALYZE {TABLE_NAME}")
            elif store.dialect == "sqlite":
                connection.exec_driver_sql("ANALYZE")
            else:
                connection.exec_driver_sql(f"ANALYZE TABLE {TABLE_NAME}")
    return console


def _store(app: Flask) -> DeliveryStore:
    return get_extension(app).state(app).store


def _explain(app: Flask, query: sa.Select[Any]) -> list[str]:
    """The plan of ``query`` as its planner reports it, one line per row."""
    store = _store(app)
    prefix = {
        "postgresql": "EXPLAIN ",
        "sqlite": "EXPLAIN QUERY PLAN ",
    }.get(store.dialect, "EXPLAIN ")

    rows: list[dict[str, Any]] = []

    def explain(
        conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool
    ) -> None:
        # On the statement's own cursor, with its parameters exactly as the
        # driver gets them; the statement itself runs afterwards.
        cursor.execute(prefix + statement, params)
        names = [column[0] for column in cursor.description]
        rows.extend(dict(zip(names, row, strict=True)) for row in cursor.fetchall())

    with app.app_context(), store.engine.connect() as connection:
        if store.dialect == "postgresql":
            connection.exec_driver_sql("SET enable_seqscan = off")
        event.listen(connection, "before_cursor_execute", explain)
        try:
            connection.execute(query).all()
        finally:
            event.remove(connection, "before_cursor_execute", explain)
            if store.dialect == "postgresql":
                connection.exec_driver_sql("RESET enable_seqscan")
    if store.dialect == "postgresql":
        return [str(r["QUERY PLAN"]) for r in rows]
    if store.dialect == "sqlite":
        return [str(r["detail"]) for r in rows]
    return [f"{r['table']} type={r['type']} key={r['key']} rows={r['rows']}" for r in rows]


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


def test_the_chart_query_uses_the_created_index(filled: Console) -> None:
    app = filled.app
    store = _store(app)
    start, end = last_hours(NOW_DT)
    plan = _explain(app, hourly_query(store.dialect, store.table, start=start, end=end))
    assert plan
    assert _full_scans(app, plan) == [], "\n".join(plan)
    assert any("ix_orderhooks_deliveries_created" in line for line in plan), "\n".join(plan)


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
                    {
                        "provider": "igv",
                        "callback": "order-status",
                        "key": "tz",
                        "status": "done",
                        "attempts": 1,
                        "claim_token": "0" * 32,
                        "lease_expires_at": when,
                        "body": b"{}",
                        "body_sha256": "0" * 64,
                        "headers": "{}",
                        "created_at": when,
                        "updated_at": when,
                    }
                ],
            )
        start, end = last_hours(NOW_DT)
        with store.engine.connect() as connection:
            connection.exec_driver_sql("SET TIME ZONE 'Asia/Kolkata'")
            rows = connection.execute(hourly_query(store.dialect, t, start=start, end=end)).all()
            connection.exec_driver_sql("RESET TIME ZONE")
    assert [(r.bucket, r.status, r.n) for r in rows] == [("2026-05-04 10", "done", 1)]
