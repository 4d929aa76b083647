"""A naive time given to the store is UTC on every backend, whatever the
database session's time zone: PostgreSQL would read it in the session's
zone (the server's unless set, hours off UTC), SQLite and MySQL as UTC."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from tests.conftest import AppFactory, session_not_in_utc, store_done_igv


def test_list_since_a_naive_time_reads_it_as_utc(make_app: AppFactory, backend: str) -> None:
    app, hooks, _db = make_app(SQLALCHEMY_ENGINE_OPTIONS=session_not_in_utc(backend))
    store = hooks.state(app).store
    now = datetime.now(UTC)
    with app.app_context():
        store_done_igv(
            store,
            {
                "received-30-minutes-ago": now - timedelta(minutes=30),
                "received-2-hours-ago": now - timedelta(hours=2),
            },
        )
        since = (now - timedelta(hours=1)).replace(tzinfo=None)
        assert [row.key for row in store.list(since=since)] == ["received-30-minutes-ago"]


def test_stored_times_come_back_in_utc_whatever_the_session_time_zone(
    make_app: AppFactory, backend: str
) -> None:
    """psycopg hands a ``timestamptz`` back in the session's zone; the store
    hands every time back in UTC, so that two reads of one row compare
    equal by value on every backend (a time in a zone's repeated hour never
    equals the same instant in UTC), as the console's force form compares."""
    app, hooks, _db = make_app(SQLALCHEMY_ENGINE_OPTIONS=session_not_in_utc(backend))
    store = hooks.state(app).store
    # 01:30 on 2026-11-01 in New York comes twice: this is the second.
    repeated_hour = datetime(2026, 11, 1, 6, 30, 0, 123456, tzinfo=UTC)
    with app.app_context():
        store_done_igv(store, {"in-the-repeated-hour": repeated_hour})
        (row,) = store.list()
    assert row.created_at.tzinfo is UTC and row.updated_at.tzinfo is UTC
    assert row.created_at == repeated_hour
