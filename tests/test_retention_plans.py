"""Purge reads each batch's candidates from one range of the (status,
updated_at) index, in index order, on every backend: a read that had to sort
would read every old row of the table for each batch of 500.

``flask orderhooks purge --failed`` deletes done, failed and dead
deliveries; no index gives rows of several statuses in ``updated_at``
order, so with all three in one read each batch was a full scan and a sort
(PostgreSQL a Seq Scan and a top-N sort, MariaDB "Using filesort", SQLite
"USE TEMP B-TREE FOR ORDER BY"). Purge now takes one status after the other.
"""

from __future__ import annotations

import random
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event

from flask_orderhooks.store import TABLE_NAME, DeliveryStore
from flask_orderhooks.store.table import STATUS_UPDATED_INDEX
from tests.conftest import AppFactory, refresh_statistics, stored_row

ROWS = 20_000
NOW = datetime(2026, 12, 1, tzinfo=UTC)
STATUSES = ("done", "failed", "dead")


def _fill(store: DeliveryStore) -> dict[str, int]:
    """ROWS deliveries every 2 minutes back from NOW, mostly done, on two
    providers, with the statistics a server keeps; how many of provider
    igv's in each status are older than a day."""
    t = store.table
    chosen = random.Random(12).choices(STATUSES, weights=[95, 3, 2], k=ROWS)
    old: dict[str, int] = dict.fromkeys(STATUSES, 0)
    rows: list[dict[str, Any]] = []
    for n, status in enumerate(chosen):
        when = NOW - timedelta(minutes=2 * n)
        provider = ("igv", "gateway")[n % 2]
        if provider == "igv" and when < NOW - timedelta(days=1):
            old[status] += 1
        rows.append(
            stored_row(
                store.dialect,
                provider=provider,
                callback="order-status",
                key=f"P{n:08d}",
                status=status,
                when=when,
                due=when if status == "failed" else None,
                reference=f"R{n:08d}",
            )
        )
    with store.engine.begin() as connection:
        connection.execute(t.insert(), rows)
        refresh_statistics(connection)
    return old


def _candidate_plans(store: DeliveryStore, run: Any) -> list[str]:
    """The plan of every statement ``run()`` sends that reads candidates (the
    deliveries ordered by updated_at), each as one text, asked of the
    backend's planner on the statement's own cursor with its parameters."""
    prefix = "EXPLAIN QUERY PLAN " if store.dialect == "sqlite" else "EXPLAIN "
    plans: list[str] = []

    def explain(
        conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool
    ) -> None:
        # PostgreSQL's batch is one statement (WITH picked AS (SELECT ...
        # ORDER BY ... FOR UPDATE SKIP LOCKED) DELETE ...): EXPLAIN plans it
        # without running it.
        if f"ORDER BY {TABLE_NAME}.updated_at" not in statement:
            return
        cursor.execute(prefix + statement, params)
        plans.append("\n".join(" | ".join(str(v) for v in row) for row in cursor.fetchall()))

    event.listen(store.engine, "before_cursor_execute", explain)
    try:
        run()
    finally:
        event.remove(store.engine, "before_cursor_execute", explain)
    return plans


def test_purge_with_failed_reads_one_index_range_per_batch(make_app: AppFactory) -> None:
    app, hooks, _db = make_app()
    store = hooks.state(app).store
    with app.app_context():
        old = _fill(store)
        deleted: list[int] = []

        def purge() -> None:
            deleted.append(
                store.purge(older_than=NOW - timedelta(days=1), statuses=STATUSES, provider="igv")
            )

        plans = _candidate_plans(store, purge)
        t = store.table
        with store.engine.connect() as connection:
            left = connection.execute(
                sa.select(sa.func.count())
                .select_from(t)
                .where(t.c.provider == "igv", t.c.updated_at < NOW - timedelta(days=1))
            ).scalar()
    # Every old igv row is gone, and nothing else.
    assert deleted == [sum(old.values())], old
    assert left == 0
    # Each status's run reads until a batch comes back short: at least one
    # read per status, each in index order.
    assert len(plans) >= len(STATUSES)
    for plan in plans:
        assert STATUS_UPDATED_INDEX in plan, plan
        if store.dialect == "postgresql":
            # One status's range from the cursor on, whatever the scan: near
            # the end of the range PostgreSQL may sort what is left of it
            # (a batch or two) rather than walk the index in order.
            assert "Seq Scan" not in plan, plan
            conditions = [line for line in plan.splitlines() if "Index Cond" in line]
            assert any(
                re.search(r"\(status\)::text = '\w+'::text\) AND .*updated_at >= ", line)
                for line in conditions
            ), plan
        elif store.dialect == "sqlite":
            assert "TEMP B-TREE" not in plan, plan
        else:
            assert "filesort" not in plan, plan
