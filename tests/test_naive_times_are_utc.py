"""A naive time given to the store is UTC on every backend, whatever the
database session's time zone: PostgreSQL would read it in the session's
zone (the server's unless set, hours off UTC), SQLite and MySQL as UTC."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import sqlalchemy as sa

from tests.conftest import AppFactory, stored_row
from tests.test_purge_cutoff_and_live_deliveries import _engine_options


def test_list_since_a_naive_time_reads_it_as_utc(make_app: AppFactory, backend: str) -> None:
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
                        key=key,
                        status="done",
                        when=now - age,
                    )
                    for key, age in (
                        ("received-30-minutes-ago", timedelta(minutes=30)),
                        ("received-2-hours-ago", timedelta(hours=2)),
                    )
                ],
            )
        since = (now - timedelta(hours=1)).replace(tzinfo=None)
        assert [row.key for row in store.list(since=since)] == ["received-30-minutes-ago"]
