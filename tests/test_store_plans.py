"""PostgreSQL plans the store's per-delivery statements on the primary key.

Every delivery is inserted as 'processing' and updated to 'done', so once
autoanalyze has run, the statistics say that almost no row is 'processing',
and a condition "status = 'processing'" looks cheaper through the
(status, updated_at) index than the three-column primary key: PostgreSQL 15
picks that index for such a statement's custom plan (the first executions on
a connection, and every execution when prepared statements are off, as behind
PgBouncer). That index holds a dead 'processing' entry for each recent
delivery until vacuum or index cleanup removes it. The statements a delivery
runs must find their row by its unique key whatever the statistics say, in
the custom plan and in the generic plan PostgreSQL caches later.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from sqlalchemy.dialects import postgresql
from sqlalchemy.sql.compiler import SQLCompiler

from flask_orderhooks.driver_statement import DriverStatement
from flask_orderhooks.provider import Delivery
from flask_orderhooks.store import DUE_INDEX, TABLE_NAME, DeliveryStore, StandaloneDatabase
from tests.conftest import private_schema

pytestmark = pytest.mark.postgres

PRIMARY_KEY = f"{TABLE_NAME}_pkey"
DELIVERIES = 1500


@pytest.fixture
def analyzed_store(postgres_url: str) -> Iterator[DeliveryStore]:
    """A store in a schema of its own, after many deliveries and an ANALYZE."""
    with private_schema(postgres_url, "orderhooks_plans") as url:
        database = StandaloneDatabase(url, busy_timeout=5, engine_options={})
        store = DeliveryStore(
            engine=database.engine,
            dispatch_transaction=database.transaction,
            table=database.table,
            duplicate_wait=5,
            claim_timeout=30,
            prepare=database.ensure_table,
        )
        try:
            for n in range(DELIVERIES):
                delivery = Delivery("igv", "order-status", f"{n:019d}", b"{}", {}, ())
                assert store.deliver(delivery, lambda: None) == "dispatched"
            with database.engine.begin() as connection:
                connection.exec_driver_sql(f"ANALYZE {TABLE_NAME}")
            yield store
        finally:
            database.engine.dispose()


def _parameters(n: int) -> dict[str, Any]:
    """Values for every bind of the store's statements, as the store sends them."""
    now = datetime.now(UTC)
    return {
        "p_provider": "igv",
        "p_callback": "order-status",
        "p_key": f"{n:019d}",
        "p_token": "0" * 32,
        "p_lease": now,
        "p_body": b"{}",
        "p_digest": "0" * 64,
        "p_headers": "{}",
        "p_now": now,
        "p_takeover": "failed",
        "p_seen_attempts": -1,
        "p_seen_created": now,
        "p_error": "error",
        "p_attempts": 1,
        "p_ms": "1000ms",
        "p_status": "failed",
        "p_next": now,
        "p_lost_token": "1" * 32,
        "p_failure": "{}\n",
        "p_lost_line": "}\n",
        "p_reference": None,
    }


def _index_scans(plan: dict[str, Any]) -> list[str]:
    """How each scan of the deliveries table in a JSON plan reads it."""
    found = []
    if plan.get("Relation Name") == TABLE_NAME and "Scan" in plan["Node Type"]:
        found.append(f"{plan['Node Type']} {plan.get('Index Name', '')}".strip())
    for child in plan.get("Plans", []):
        found.extend(_index_scans(child))
    return found


def _plans(store: DeliveryStore, name: str) -> dict[str, list[str]]:
    """The table accesses of statement ``name``: custom and generic plan."""
    statement: DriverStatement = getattr(store._sql, name)
    # The same statement with $n placeholders, for PREPARE.
    numbered = statement.statement.compile(
        dialect=postgresql.dialect(paramstyle="numeric_dollar")  # type: ignore[no-untyped-call]
    )
    assert isinstance(numbered, SQLCompiler)
    order = list(numbered.positiontup or ())
    # The statement's own literals (the statuses) with the store's values.
    values = numbered.construct_params(_parameters(DELIVERIES // 2))
    plans: dict[str, list[str]] = {}
    with store.engine.connect() as connection:
        # Values inlined by the client: EXPLAIN EXECUTE takes no parameters.
        driver_connection = connection.connection.dbapi_connection
        assert isinstance(driver_connection, psycopg.Connection)
        cursor = psycopg.ClientCursor(driver_connection)
        for mode in ("force_custom_plan", "force_generic_plan"):
            cursor.execute(f"SET plan_cache_mode = {mode}")
            cursor.execute(f"PREPARE plan_probe AS {numbered.string}")
            arguments = ", ".join(["%s"] * len(order))
            cursor.execute(
                f"EXPLAIN (FORMAT JSON) EXECUTE plan_probe({arguments})",
                [values[n] for n in order],
            )
            (document,) = cursor.fetchone()
            plans[mode] = _index_scans(document[0]["Plan"])
            cursor.execute("DEALLOCATE plan_probe")
        connection.rollback()
    return plans


@pytest.mark.parametrize("name", ["state", "mark_done", "mark_failed"])
def test_per_delivery_statements_find_the_row_by_primary_key(
    analyzed_store: DeliveryStore, name: str
) -> None:
    plans = _plans(analyzed_store, name)
    assert plans == {
        "force_custom_plan": [f"Index Scan {PRIMARY_KEY}"],
        "force_generic_plan": [f"Index Scan {PRIMARY_KEY}"],
    }


def test_the_due_query_reads_the_due_index(analyzed_store: DeliveryStore) -> None:
    """A worker's search for the next due delivery reads the index on
    ``next_attempt_at``, where done rows hold NULL: its cost does not grow
    with the done deliveries a shop keeps."""
    plans = _plans(analyzed_store, "claim_due")
    assert plans == {
        "force_custom_plan": [f"Index Scan {DUE_INDEX}", f"Index Scan {PRIMARY_KEY}"],
        "force_generic_plan": [f"Index Scan {DUE_INDEX}", f"Index Scan {PRIMARY_KEY}"],
    }


def test_the_due_query_for_one_delivery_reads_indexes_only(
    analyzed_store: DeliveryStore,
) -> None:
    """The Celery task's claim of one given delivery: its row by the primary
    key (or the small due index), then the update by the primary key."""
    plans = _plans(analyzed_store, "claim_due_key")
    for mode in ("force_custom_plan", "force_generic_plan"):
        assert len(plans[mode]) == 2, plans
        assert plans[mode][0] in (f"Index Scan {DUE_INDEX}", f"Index Scan {PRIMARY_KEY}"), plans
        assert plans[mode][1] == f"Index Scan {PRIMARY_KEY}", plans
