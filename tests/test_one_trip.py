"""PostgreSQL: the claim, its COMMIT, the dispatch's BEGIN and its done mark
in one round trip (``flask_orderhooks/store/one_trip.py``)."""

from __future__ import annotations

import contextlib
import dataclasses
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask

from benchmarks.roundtrips import Recorder as WireRecorder
from flask_orderhooks import OrderHooks
from flask_orderhooks.provider import Delivery
from flask_orderhooks.store.one_trip import ClaimAndBegin, begin_command
from flask_orderhooks.testing import SignedCallback, build
from tests.conftest import Credit, Recorder

RecorderFactory = Callable[..., tuple[Flask, Recorder]]

on_postgresql = pytest.mark.parametrize(
    "backend", [pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True
)


def post(app: Flask, cb: SignedCallback) -> tuple[int, str]:
    response = app.test_client().post(cb.url(), data=cb.body, headers=cb.headers)
    return response.status_code, response.get_data(as_text=True)


def make(app: Flask, **fields: object) -> SignedCallback:
    with app.app_context():
        return build("igv", app=app, **fields)


def stored(app: Flask, cb: SignedCallback) -> tuple[str, int]:
    with app.app_context():
        (row,) = app.extensions["orderhooks"].store.get(cb.key)
    return row.status, row.attempts


def spy_on_trips(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The BEGIN of every one-trip query sent from now on."""
    sent: list[str] = []
    original = ClaimAndBegin.run

    def run(self: ClaimAndBegin, connection: Any, begin: str, parameters: Any) -> Any:
        sent.append(begin)
        return original(self, connection, begin, parameters)

    monkeypatch.setattr(ClaimAndBegin, "run", run)
    return sent


@pytest.fixture
def wire() -> Iterator[WireRecorder]:
    recorder = WireRecorder()
    try:
        yield recorder
    finally:
        recorder.close()


@on_postgresql
def test_a_first_delivery_costs_one_round_trip_before_its_receivers(
    recorder: RecorderFactory, wire: WireRecorder
) -> None:
    """The shape of the wire, counted by libpq's trace: the one-trip query,
    the receiver's statement and the dispatch's COMMIT for a first delivery;
    the same query and a ROLLBACK for a duplicate."""
    app, rec = recorder()
    with app.app_context():
        assert rec.db is not None
        wire.attach(rec.db.engine)
        # Traced from their connect event: open them again.
        rec.db.engine.dispose()
    warm = [make(app) for _ in range(3)]
    for cb in warm:
        assert post(app, cb)[0] == 200
    first = make(app)
    wire.start()
    assert post(app, first)[0] == 200
    trips = wire.wire()
    # The receiver writes one row through db.session, as a hand-written
    # callback would: 3 round trips in all, as the naive endpoint's
    # BEGIN, INSERT, COMMIT (5 before: claim, BEGIN, done mark, INSERT, COMMIT).
    assert [t.split(" (")[0] for t in trips] == [
        "BEGIN; INSERT INTO orderhooks_deliveries",
        "INSERT INTO test_credits",
        "COMMIT",
    ], trips
    wire.start()
    assert post(app, first)[0] == 200
    trips = wire.wire()
    assert len(trips) == 2, trips
    assert trips[0].startswith("BEGIN; INSERT INTO orderhooks_deliveries")
    assert "; COMMIT; BEGIN; UPDATE orderhooks_deliveries SET status=" in trips[0]
    assert trips[1] == "ROLLBACK"
    assert len(rec.events) == 4
    assert rec.credits() == 4
    assert stored(app, first) == ("done", 1)


@on_postgresql
@pytest.mark.parametrize("level", [None, "READ COMMITTED", "REPEATABLE READ", "SERIALIZABLE"])
def test_the_dispatch_runs_at_the_engines_isolation_level(
    recorder: RecorderFactory, level: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store sends the dispatch's BEGIN itself: with the host engine's
    isolation level, as psycopg would have, and with a synchronous commit
    (the claim's relaxed one was local to the claim)."""
    options = {} if level is None else {"isolation_level": level}
    app, rec = recorder(SQLALCHEMY_ENGINE_OPTIONS=options)
    trips = spy_on_trips(monkeypatch)
    seen: list[tuple[Any, ...]] = []

    def look(_event: object) -> None:
        assert rec.db is not None
        seen.append(
            rec.db.session.execute(
                sa.text(
                    "SELECT current_setting('transaction_isolation'),"
                    " current_setting('synchronous_commit')"
                )
            ).one()[:]
        )

    rec.hook = look
    cb = make(app)
    assert post(app, cb)[0] == 200
    assert post(app, cb)[0] == 200
    assert seen == [((level or "read committed").lower(), "on")]
    assert rec.credits() == 1
    assert stored(app, cb) == ("done", 1)
    assert trips == [f"BEGIN ISOLATION LEVEL {level}" if level else "BEGIN"] * 2


@on_postgresql
def test_connections_go_back_to_the_pool_as_they_came(recorder: RecorderFactory) -> None:
    """The dispatch's connection runs in the driver's autocommit mode while
    the store's BEGIN holds the transaction; after a success, a receiver's
    failure, a duplicate and a conflict it is back in the pool in
    transaction mode, idle. One pooled connection: every path reuses it."""
    app, rec = recorder(SQLALCHEMY_ENGINE_OPTIONS={"pool_size": 1, "max_overflow": 0})
    assert rec.db is not None
    db = rec.db

    def pooled() -> tuple[bool, int]:
        with app.app_context(), db.engine.connect() as connection:
            raw = connection.connection.dbapi_connection
            assert raw is not None
            return raw.autocommit, int(raw.info.transaction_status)

    ok = make(app)
    assert post(app, ok)[0] == 200
    assert pooled() == (False, 0)
    rec.fail_next = 1
    failing = make(app)
    assert post(app, failing)[0] == 500
    assert pooled() == (False, 0)
    assert post(app, ok)[0] == 200
    assert pooled() == (False, 0)
    conflict = dataclasses.replace(
        failing, body=failing.body.replace(b'"buyerId":"', b'"buyerId":"9')
    )
    assert post(app, conflict) == (409, "This key is stored with a different body.")
    assert pooled() == (False, 0)
    # And the host's own transactions still are transactions.
    with app.app_context():
        db.session.add(Credit(key="rolled back"))
        db.session.flush()
        db.session.rollback()
        assert db.session.scalar(sa.select(sa.func.count()).where(Credit.key == "rolled back")) == 0
    assert stored(app, failing) == ("failed", 1)
    assert post(app, failing)[0] == 200
    assert stored(app, failing) == ("done", 2)


@on_postgresql
def test_a_failure_after_the_claim_committed_hands_the_claim_back(
    recorder: RecorderFactory,
) -> None:
    """The query fails after its COMMIT (here: a trigger refuses the done
    mark). The claim is stored; no receiver ran; the attempt is recorded as
    failed at once, so the platform's retry dispatches instead of waiting
    out the lease."""
    app, rec = recorder()
    assert rec.db is not None
    db = rec.db
    with app.app_context():
        db.session.execute(
            sa.text(
                "CREATE FUNCTION orderhooks_test_refuse_done() RETURNS trigger AS $$"
                " BEGIN RAISE EXCEPTION 'done refused by the test'; END $$ LANGUAGE plpgsql"
            )
        )
        db.session.execute(
            sa.text(
                "CREATE TRIGGER orderhooks_test_refuse_done BEFORE UPDATE ON orderhooks_deliveries"
                " FOR EACH ROW WHEN (NEW.status = 'done') EXECUTE FUNCTION"
                " orderhooks_test_refuse_done()"
            )
        )
        db.session.commit()
    try:
        cb = make(app)
        status, text = post(app, cb)
        assert (status, text) == (503, "The store is unavailable.")
        assert rec.events == []
        with app.app_context():
            (row,) = app.extensions["orderhooks"].store.get(cb.key)
        assert (row.status, row.attempts) == ("failed", 1)
        assert "done refused by the test" in (row.error or "")
    finally:
        with app.app_context():
            db.session.execute(
                sa.text("DROP TRIGGER orderhooks_test_refuse_done ON orderhooks_deliveries")
            )
            db.session.execute(sa.text("DROP FUNCTION orderhooks_test_refuse_done()"))
            db.session.commit()
    assert post(app, cb)[0] == 200
    assert len(rec.events) == 1
    assert stored(app, cb) == ("done", 2)


@on_postgresql
@pytest.mark.parametrize("host_db", [True, False], ids=["db", "own-store"])
def test_keys_and_bodies_reach_the_store_byte_for_byte(
    recorder: RecorderFactory, host_db: bool
) -> None:
    """The query's parameters are merged into its text by psycopg's
    ClientCursor: quotes, backslashes, dollar quotes, percent signs, NUL
    bytes and semicolons stay data."""
    app, _rec = recorder(host_db=host_db)
    hooks: OrderHooks = app.extensions["orderhooks"]
    key = "k'; DROP TABLE orderhooks_deliveries; -- \\ $$ %s %(p_key)s " + uuid.uuid4().hex
    body = b"\x00'\\\"; COMMIT; $$ %s \xff" + uuid.uuid4().bytes
    delivery = Delivery(
        provider="igv",
        callback="order-status",
        key=key,
        body=body,
        headers={"X-Quote": "'; ROLLBACK; --"},
        dispatches=(),
        reference="ref'\\",
    )
    ran: list[int] = []
    with app.app_context():
        store = hooks.state(app).store
        assert store.deliver(delivery, lambda: ran.append(1)) == "dispatched"
        assert store.deliver(delivery, lambda: ran.append(1)) == "duplicate"
        (row,) = store.get(key)
    assert ran == [1]
    assert (row.key, row.body, row.headers, row.reference) == (
        key,
        body,
        {"X-Quote": "'; ROLLBACK; --"},
        "ref'\\",
    )
    assert row.status == "done"
    assert row.created_at <= datetime.now(UTC)


def test_the_one_trip_is_taken_only_where_it_can_be() -> None:
    """psycopg 3 only, and not where SQLAlchemy would skip the ROLLBACK of an
    autocommit connection (it would leave the store's BEGIN open in the pool);
    the BEGIN carries the engine's isolation level; an autocommit, read-only
    or deferrable engine keeps the usual statements."""
    url = "postgresql+psycopg://postgres@127.0.0.1:1/none"
    plain = sa.create_engine(url)
    assert ClaimAndBegin.usable(plain.dialect)
    assert not ClaimAndBegin.usable(sa.create_engine(url, skip_autocommit_rollback=True).dialect)
    assert begin_command(plain) == "BEGIN"
    assert (
        begin_command(sa.create_engine(url, isolation_level="SERIALIZABLE"))
        == "BEGIN ISOLATION LEVEL SERIALIZABLE"
    )
    assert (
        begin_command(plain.execution_options(isolation_level="REPEATABLE READ"))
        == "BEGIN ISOLATION LEVEL REPEATABLE READ"
    )
    assert begin_command(sa.create_engine(url, isolation_level="AUTOCOMMIT")) is None
    assert begin_command(plain.execution_options(postgresql_readonly=True)) is None
    assert begin_command(plain.execution_options(postgresql_deferrable=True)) is None


@on_postgresql
def test_the_server_has_nothing_to_warn_about(recorder: RecorderFactory) -> None:
    """No notice for the client (nor a WARNING line in the server's log): the
    claim's COMMIT closes a transaction the query began itself."""
    app, rec = recorder()
    assert rec.db is not None
    notices: list[str] = []
    with app.app_context():
        engine = rec.db.engine

        @sa.event.listens_for(engine, "connect")
        def listen(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.add_notice_handler(lambda n: notices.append(n.message_primary))

        engine.dispose()
    cb = make(app)
    assert post(app, cb)[0] == 200
    assert post(app, cb)[0] == 200
    assert (notices, len(rec.events)) == ([], 1)


@on_postgresql
def test_sessions_with_settings_or_begin_hooks_keep_the_drivers_begin(
    recorder: RecorderFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A session with its own isolation level, or a hook that runs a
    statement when the session's transaction begins (a SET LOCAL for a
    tenant), needs the driver's BEGIN: the usual statements, and the receivers
    see the session's settings."""
    app, rec = recorder()
    assert rec.db is not None
    db = rec.db
    trips = spy_on_trips(monkeypatch)
    seen: list[tuple[Any, ...]] = []

    def look(_event: object) -> None:
        seen.append(
            db.session.execute(
                sa.text(
                    "SELECT current_setting('transaction_isolation'),"
                    " current_setting('application_name')"
                )
            ).one()[:]
        )

    rec.hook = look

    def tenant(session: Any, _transaction: Any, connection: Any) -> None:
        connection.exec_driver_sql("SET LOCAL application_name = 'tenant42'")

    with app.app_context():
        session_class = type(db.session())
    sa.event.listen(session_class, "after_begin", tenant)
    try:
        assert post(app, make(app))[0] == 200
    finally:
        sa.event.remove(session_class, "after_begin", tenant)
    assert seen == [("read committed", "tenant42")]
    assert trips == []
    # And a plain session takes the one trip again.
    assert post(app, make(app))[0] == 200
    assert trips == ["BEGIN"]
    assert len(rec.events) == 2


@on_postgresql
def test_a_receiver_that_swallows_a_database_error_fails_the_delivery(
    recorder: RecorderFactory,
) -> None:
    """PostgreSQL answers the COMMIT of a transaction in error with a ROLLBACK
    that psycopg reports as a success: answered 200, the delivery would stay
    undone. It is a failed attempt instead, retried."""
    app, rec = recorder()
    assert rec.db is not None
    db = rec.db
    broken = [True]

    def swallow(_event: object) -> None:
        if broken[0]:
            with contextlib.suppress(sa.exc.DBAPIError):
                db.session.execute(sa.text("SELECT 1 / 0"))

    rec.hook = swallow
    cb = make(app)
    assert post(app, cb) == (500, "A receiver failed; the delivery will be retried.")
    with app.app_context():
        (row,) = app.extensions["orderhooks"].store.get(cb.key)
    assert (row.status, row.attempts) == ("failed", 1)
    assert (row.error or "").startswith("AbortedTransaction:")
    broken[0] = False
    assert post(app, cb)[0] == 200
    assert stored(app, cb) == ("done", 2)
