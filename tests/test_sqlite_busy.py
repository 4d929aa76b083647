"""SQLite's write lock: the claim and the done mark take it with BEGIN
IMMEDIATE, tried every 0.1 to 2 ms for at most ORDERHOOKS_DUPLICATE_WAIT,
instead of sleeping in SQLite's busy handler (1, 2, 5, 10... ms between
tries); the connection's own busy timeout is left as it was for everything
else."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask
from flask_sqlalchemy import SQLAlchemy

from flask_orderhooks import OrderHooks, order_pending_delivery
from flask_orderhooks.store import StandaloneDatabase, delivery_store
from flask_orderhooks.store.sqlite import pause, take_write_lock
from flask_orderhooks.testing import SignedCallback, build

#: The driver's busy timeout of these apps: far longer than the duplicate
#: wait, so that a wait in SQLite's own handler would outlast the request's.
DRIVER_TIMEOUT_S = 30


@pytest.fixture
def app(tmp_path: Path) -> Iterator[Flask]:
    app = Flask("busy", instance_path=str(tmp_path))
    app.config.update(ORDERHOOKS_IGV_SECRET="s" * 32, ORDERHOOKS_DUPLICATE_WAIT=0.5)
    hooks = OrderHooks(app, engine_options={"connect_args": {"timeout": DRIVER_TIMEOUT_S}})
    hooks.create_all(app)
    dispatched: list[object] = []

    def receiver(sender: Flask, *, event: object) -> None:
        dispatched.append(event)

    order_pending_delivery.connect(receiver, app)
    app.config["dispatched"] = dispatched
    yield app
    order_pending_delivery.disconnect(receiver, app)
    _standalone(app).engine.dispose()


def _standalone(app: Flask) -> StandaloneDatabase:
    hooks: OrderHooks = app.extensions["orderhooks"]
    standalone = hooks.state(app).standalone
    assert standalone is not None
    return standalone


def _callback(app: Flask) -> SignedCallback:
    with app.app_context():
        return build("igv", app=app)


def _post(app: Flask, cb: SignedCallback) -> Any:
    return app.test_client().post(cb.url(), data=cb.body, headers=cb.headers)


def _writer(app: Flask) -> sqlite3.Connection:
    """Another writer on the app's database, holding its write lock."""
    path = _standalone(app).engine.url.database
    assert path
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    return other


def _post_while_locked(app: Flask, seconds: float) -> tuple[Any, list[str]]:
    """Post a fresh callback while another writer holds the lock for its
    first ``seconds``, and until the store has tried for it twice: the
    answer, and every statement the store's connections ran (SQLite's trace;
    its statements bypass SQLAlchemy's)."""
    statements: list[str] = []

    def trace(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.set_trace_callback(statements.append)

    engine = _standalone(app).engine
    engine.dispose()
    sa.event.listen(engine, "connect", trace)
    other = _writer(app)

    def let_go() -> None:
        # After ``seconds`` and two tries seen, not on a timer alone: on a
        # loaded machine the request may not have run its first try by then,
        # and the count of tries below would measure the scheduler. At most
        # 10 s more: a store that never polls is seen by the count.
        deadline = time.monotonic() + seconds
        give_up = deadline + 10
        while time.monotonic() < give_up and (
            time.monotonic() < deadline or statements.count("BEGIN IMMEDIATE") < 2
        ):
            time.sleep(0.005)
        other.rollback()

    release = threading.Thread(target=let_go)
    release.start()
    try:
        response = _post(app, _callback(app))
    finally:
        release.join()
        other.close()
        sa.event.remove(engine, "connect", trace)
    return response, statements


def _busy_timeouts(app: Flask) -> set[int]:
    """The busy timeout (ms) of every connection in the store's pool."""
    engine = _standalone(app).engine
    pool = engine.pool
    assert isinstance(pool, sa.pool.QueuePool)
    seen = set()
    connections = [engine.raw_connection() for _ in range(pool.checkedin() or 1)]
    for connection in connections:
        seen.add(connection.cursor().execute("PRAGMA busy_timeout").fetchone()[0])
        connection.close()
    return seen


def test_the_pauses_start_short_and_stay_short() -> None:
    pauses = [pause(tries) for tries in range(0, 80, 8)]
    assert pauses == [0.0001, 0.0002, 0.0004, 0.0008, 0.0016, 0.002, 0.002, 0.002, 0.002, 0.002]
    assert pause(7) == 0.0001


def test_the_claim_polls_for_the_lock_and_leaves_the_drivers_wait_alone(app: Flask) -> None:
    """Another writer lets the lock go 0.2 s into the request: the callback
    goes through, dispatched once, and SQLite ran the claim with its own busy
    wait off; every connection is back at the driver's 30 s afterwards."""
    response, statements = _post_while_locked(app, 0.2)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert len(app.config["dispatched"]) == 1
    begins = [sql for sql in statements if sql == "BEGIN IMMEDIATE"]
    assert len(begins) > 2, "the lock was tried twice at most: SQLite's own handler waited"
    claims = [sql for sql in statements if sql.startswith("INSERT INTO orderhooks_deliveries")]
    assert len(claims) == 1
    waits = [sql for sql in statements if sql.startswith("PRAGMA busy_timeout =")]
    assert waits[:2] == [
        "PRAGMA busy_timeout = 0",
        f"PRAGMA busy_timeout = {DRIVER_TIMEOUT_S * 1000}",
    ]
    assert _busy_timeouts(app) == {DRIVER_TIMEOUT_S * 1000}


def test_a_claim_waits_as_long_as_the_longer_of_the_two_waits(tmp_path: Path) -> None:
    """The claim waits for the lock as long as SQLite's handler would have
    (the driver's busy timeout, 0.4 s here) when that is longer than
    ORDERHOOKS_DUPLICATE_WAIT (0.05 s): a lock let go after 0.15 s is waited
    for; one held past both is a 503, nothing stored, and the retry goes
    through."""
    app = Flask("waits", instance_path=str(tmp_path))
    app.config.update(ORDERHOOKS_IGV_SECRET="s" * 32, ORDERHOOKS_DUPLICATE_WAIT=0.05)
    hooks = OrderHooks(app, engine_options={"connect_args": {"timeout": 0.4}})
    hooks.create_all(app)

    def receiver(sender: Flask, *, event: object) -> None:
        pass

    order_pending_delivery.connect(receiver, app)
    try:
        other = _writer(app)
        release = threading.Timer(0.15, other.rollback)
        release.start()
        try:
            first = _post(app, _callback(app))
        finally:
            release.join()
        assert first.status_code == 200, first.get_data(as_text=True)
        other.execute("BEGIN IMMEDIATE")
        late = threading.Timer(20, other.rollback)
        late.start()
        cb = _callback(app)
        try:
            response = _post(app, cb)
        finally:
            late.cancel()
            other.rollback()
            other.close()
        assert response.status_code == 503, response.get_data(as_text=True)
        with app.app_context():
            assert len(hooks.store.list()) == 1
        assert _post(app, cb).status_code == 200
    finally:
        order_pending_delivery.disconnect(receiver, app)
        _standalone(app).engine.dispose()


def test_the_done_mark_polls_for_the_lock_after_the_claim(
    app: Flask, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another writer takes the lock between the claim's commit and the done
    mark, and lets it go 0.2 s later: the done mark's transaction tries for
    it again and again (no receiver has run yet), then the delivery is
    dispatched once and done."""
    calls: list[int] = []
    tries: list[str] = []

    def taking(connection: Any, deadline: float) -> None:
        calls.append(1)
        if len(calls) == 2:  # the done mark's, after the claim's
            holder = _writer(app)
            release = threading.Timer(0.2, holder.rollback)
            release.start()
            driver = connection.connection.dbapi_connection
            driver.set_trace_callback(tries.append)
            try:
                take_write_lock(connection, deadline)
            finally:
                driver.set_trace_callback(None)
                release.join()
                holder.close()
            return
        take_write_lock(connection, deadline)

    monkeypatch.setattr(delivery_store, "take_write_lock", taking)
    response = _post(app, _callback(app))
    assert response.status_code == 200, response.get_data(as_text=True)
    assert len(calls) == 2
    assert tries.count("BEGIN IMMEDIATE") > 2
    assert len(app.config["dispatched"]) == 1
    with app.app_context():
        (row,) = app.extensions["orderhooks"].store.list()
    assert (row.status, row.attempts) == ("done", 1)


def test_a_transaction_the_hosts_begin_hook_began_is_left_to_the_driver(tmp_path: Path) -> None:
    """SQLAlchemy's recipe for SQLite's SAVEPOINTs: the driver in autocommit
    mode and a ``begin`` hook that sends BEGIN. The store's transactions are
    begun by then: the write lock is the driver's to wait for, and no second
    BEGIN is sent ("cannot start a transaction within a transaction")."""
    app = Flask("recipe", instance_path=str(tmp_path))
    app.config.update(
        ORDERHOOKS_IGV_SECRET="s" * 32,
        SQLALCHEMY_DATABASE_URI=f"sqlite:///{tmp_path / 'host.sqlite3'}",
    )
    db = SQLAlchemy(app)
    begins: list[str] = []
    with app.app_context():
        engine = db.engine

        @sa.event.listens_for(engine, "connect")
        def autocommit_driver(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.isolation_level = None
            dbapi_connection.set_trace_callback(begins.append)

        @sa.event.listens_for(engine, "begin")
        def begin(connection: sa.Connection) -> None:
            connection.exec_driver_sql("BEGIN")

        engine.dispose()
    hooks = OrderHooks(app, db=db)
    dispatched: list[object] = []

    def receiver(sender: Flask, *, event: object) -> None:
        dispatched.append(event)

    order_pending_delivery.connect(receiver, app)
    try:
        with app.app_context():
            db.create_all()
        cb = _callback(app)
        assert _post(app, cb).status_code == 200
        assert _post(app, cb).status_code == 200
    finally:
        order_pending_delivery.disconnect(receiver, app)
    assert len(dispatched) == 1
    assert "BEGIN IMMEDIATE" not in begins
    with app.app_context():
        (row,) = hooks.store.list()
        assert row.status == "done"
        db.engine.dispose()


def test_a_deferred_acceptance_polls_for_the_lock(tmp_path: Path) -> None:
    """Deferred dispatch: the acceptance takes the write lock the same way;
    another writer lets it go 0.2 s in, and the delivery is stored pending."""
    app = Flask("deferred", instance_path=str(tmp_path))
    app.config.update(ORDERHOOKS_IGV_SECRET="s" * 32, ORDERHOOKS_DISPATCH="deferred")
    hooks = OrderHooks(app, engine_options={"connect_args": {"timeout": DRIVER_TIMEOUT_S}})
    hooks.create_all(app)

    def receiver(sender: Flask, *, event: object) -> None:
        pass

    order_pending_delivery.connect(receiver, app)
    response, statements = _post_while_locked(app, 0.2)
    try:
        assert response.status_code == 200, response.get_data(as_text=True)
        assert statements.count("BEGIN IMMEDIATE") > 2
        with app.app_context():
            (row,) = hooks.store.list()
        assert row.status == "pending"
        assert _busy_timeouts(app) == {DRIVER_TIMEOUT_S * 1000}
    finally:
        order_pending_delivery.disconnect(receiver, app)
        _standalone(app).engine.dispose()


def test_a_resend_that_cannot_revive_a_dead_delivery_is_503(tmp_path: Path) -> None:
    """Deferred: a platform's resend makes a dead delivery due again. When the
    revive cannot take the write lock in its short wait (a worker's slow
    receiver holds it, say), the answer is 503 and the platform sends it
    again; before, it was "done" with the row left dead, and nobody ever
    dispatched it. Once the lock is free the resend revives it."""
    app = Flask("revive", instance_path=str(tmp_path))
    app.config.update(
        ORDERHOOKS_IGV_SECRET="s" * 32,
        ORDERHOOKS_DISPATCH="deferred",
        ORDERHOOKS_RETRY_DELAYS=[],
        ORDERHOOKS_DUPLICATE_WAIT=0.2,
    )
    hooks = OrderHooks(app, engine_options={"connect_args": {"timeout": 0.2}})
    hooks.create_all(app)
    failing = [True]
    dispatched: list[object] = []

    def receiver(sender: Flask, *, event: object) -> None:
        if failing[0]:
            raise RuntimeError("the ledger is down")
        dispatched.append(event)

    order_pending_delivery.connect(receiver, app)
    try:
        cb = _callback(app)
        assert _post(app, cb).status_code == 200
        with app.app_context():
            assert hooks.process_due() == 1
            assert hooks.store.list()[0].status == "dead"
        failing[0] = False
        other = _writer(app)
        try:
            busy = _post(app, cb)
        finally:
            other.rollback()
            other.close()
        assert (busy.status_code, busy.get_data(as_text=True)) == (
            503,
            "The delivery store is busy; retry later.",
        )
        with app.app_context():
            assert hooks.store.list()[0].status == "dead"
        assert _post(app, cb).status_code == 200
        with app.app_context():
            assert hooks.store.list()[0].status == "pending"
            assert hooks.process_due() == 1
            assert hooks.store.list()[0].status == "done"
        assert len(dispatched) == 1
    finally:
        order_pending_delivery.disconnect(receiver, app)
        _standalone(app).engine.dispose()
