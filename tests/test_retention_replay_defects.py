"""Defects found in purge (store/retention.py) and replay (replay.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from tests.conftest import AppFactory, stored_row


def _engine_options(backend: str) -> dict[str, Any]:
    """A database session whose time zone is not UTC, as a PostgreSQL server
    initialised on a machine set to New York's time has by default."""
    if backend == "postgresql":
        return {"connect_args": {"options": "-c timezone=America/New_York"}}
    if backend == "mariadb":
        return {"connect_args": {"init_command": "SET time_zone = '-05:00'"}}
    return {}


@pytest.mark.parametrize("compact", [False, True], ids=["delete", "compact"])
def test_purge_reads_a_naive_cutoff_as_utc_whatever_the_session_time_zone(
    make_app: AppFactory, backend: str, compact: bool
) -> None:
    """The store keeps UTC, and reads naive times it gets back as UTC; a naive
    ``older_than`` is UTC too, on every backend."""
    app, hooks, _db = make_app(SQLALCHEMY_ENGINE_OPTIONS=_engine_options(backend))
    store = hooks.state(app).store
    now = datetime.now(UTC)
    with app.app_context():
        store.prepare()
        with store.engine.begin() as connection:
            connection.execute(
                sa.insert(store.table),
                [
                    stored_row(
                        store.dialect,
                        provider="igv",
                        callback="order-status",
                        key="done-30-minutes-ago",
                        status="done",
                        when=now - timedelta(minutes=30),
                    )
                ],
            )
        cutoff = (now - timedelta(hours=1)).replace(tzinfo=None)
        if compact:
            assert store.compact(older_than=cutoff) == 0
        else:
            assert store.purge(older_than=cutoff) == 0
        (row,) = store.list()
        assert (row.key, row.body, row.compacted_at) == ("done-30-minutes-ago", b"{}", None)
