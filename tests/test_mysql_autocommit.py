"""MySQL and MariaDB: the store's own autocommit pool (store/mysql_autocommit.py).

The claim, the acceptance and the store's plain reads run on connections of
a pool of the store's own in autocommit mode: one command where a
transaction on the host's pool took three (the statement, COMMIT, and the
pool's reset ROLLBACK). These tests hold it to what it must keep: the
connections are set up as the host's engine sets up its own, they never
hold a transaction, and they go when the host's engine is disposed of.
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask

from flask_orderhooks.store import DeliveryStore
from tests.conftest import Recorder
from tests.test_durability import make, post, rows
from tests.test_history import failing
from tests.test_mysql import own_engine, sent_to_the_server, store_of

RecorderFactory = Callable[..., tuple[Flask, Recorder]]

pytestmark = [pytest.mark.mariadb, pytest.mark.parametrize("backend", ["mariadb"])]


@contextmanager
def new_host_connections_run(store: DeliveryStore, sql: str) -> Iterator[None]:
    """Every connection the host's engine makes in the block runs ``sql``
    first (a ``connect`` listener), and the block starts with none made."""

    def run(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute(sql)
        cursor.close()

    sa.event.listen(store.engine, "connect", run)
    try:
        store.engine.dispose()  # every connection from now on is a new one
        yield
    finally:
        sa.event.remove(store.engine, "connect", run)


def own_connection_id(store: DeliveryStore) -> int:
    """The server's id of the connection the own pool hands out next (it
    holds one: a single thread claims)."""
    with own_engine(store).connect() as connection:
        return int(connection.exec_driver_sql("SELECT CONNECTION_ID()").scalar_one())


def test_an_inline_first_delivery_sends_four_commands(
    recorder: RecorderFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The claim alone, committed by itself; then the dispatch on the host's
    connection: the done mark, the receiver's write, COMMIT and the pool's
    ROLLBACK (the last three are what a hand-written endpoint sends too)."""
    app, rec = recorder()
    assert post(app, make("igv", app)).status_code == 200  # engines connected
    seen = sent_to_the_server(monkeypatch)
    assert post(app, make("igv", app)).status_code == 200
    commands = [sql.split()[0] for sql in seen]
    assert commands == ["SET", "UPDATE", "INSERT", "COMMIT", "ROLLBACK"], seen
    assert " INSERT INTO orderhooks_deliveries " in seen[0]
    assert seen[2].startswith("INSERT INTO test_credits ")
    assert len(rec.events) == 2
    assert [row.status for row in rows(app)] == ["done", "done"]


def test_the_own_connections_are_the_host_engines_own_make(
    recorder: RecorderFactory,
) -> None:
    """A connection of the store's own pool is made by the host's engine
    (its connect listeners and arguments apply: here a session variable),
    then switched to autocommit; the host's own connections are left as
    they were."""
    app, _rec = recorder()
    store = store_of(app)
    with new_host_connections_run(store, "SET @orderhooks_made_by = 'the host'"):
        assert post(app, make("igv", app)).status_code == 200
        with own_engine(store).connect() as connection:
            made_by, autocommit = connection.exec_driver_sql(
                "SELECT @orderhooks_made_by, @@autocommit"
            ).one()
        assert (made_by, autocommit) == ("the host", 1)
        with store.engine.connect() as connection:
            made_by, autocommit = connection.exec_driver_sql(
                "SELECT @orderhooks_made_by, @@autocommit"
            ).one()
        assert (made_by, autocommit) == ("the host", 0)


def test_disposing_of_the_host_engine_closes_the_own_pool(recorder: RecorderFactory) -> None:
    app, _rec = recorder()
    store = store_of(app)
    assert post(app, make("igv", app)).status_code == 200
    own = own_engine(store)
    pool = own.pool
    assert isinstance(pool, sa.QueuePool)
    assert pool.checkedin() == 1
    store.engine.dispose()
    assert own.pool is not pool
    assert pool.checkedin() == 0
    # And it makes a new connection when next needed.
    assert post(app, make("igv", app)).status_code == 200
    assert isinstance(own.pool, sa.QueuePool)
    assert own.pool.checkedin() == 1


def _open_transactions(store: DeliveryStore) -> int:
    """Transactions open on the own pool's (one) idle connection."""
    with own_engine(store).connect() as connection:
        dbapi_connection = connection.connection.dbapi_connection
        assert dbapi_connection is not None
        cursor = dbapi_connection.cursor()
        cursor.execute(
            "SELECT COUNT(*) FROM information_schema.innodb_trx "
            "WHERE trx_mysql_thread_id = CONNECTION_ID()"
        )
        row = cursor.fetchone()
        cursor.close()
    assert row is not None
    return int(row[0])


def test_claims_that_fail_leave_no_transaction_on_the_own_connection(
    recorder: RecorderFactory,
) -> None:
    """A claim that did not win (a key conflict) and one the server refused
    (its lock wait ran out behind another transaction's row lock: 1205)
    leave the own connection idle: with no reset on check-in, nothing may be
    left open for the next claim."""
    app, rec = recorder(ORDERHOOKS_DUPLICATE_WAIT=0.2)
    store = store_of(app)
    rec.fail_next = 1
    cb = make("igv", app, request_id="conflict-1", order_id=1)
    assert post(app, cb).status_code == 500  # failed: a resend may take it over
    other = make("igv", app, request_id="conflict-1", order_id=2)
    assert post(app, other).status_code == 409
    assert _open_transactions(store) == 0
    with store.engine.connect() as holder:
        holder.exec_driver_sql(
            "SELECT status FROM orderhooks_deliveries WHERE `key` = 'conflict-1' FOR UPDATE"
        ).all()
        assert post(app, cb).status_code == 503  # waited 1 s (whole seconds), refused
        holder.rollback()
    assert _open_transactions(store) == 0
    assert post(app, cb).status_code == 200
    assert [row.status for row in rows(app)] == ["done"]


def test_a_connection_idle_past_the_servers_wait_timeout_is_replaced(
    recorder: RecorderFactory,
) -> None:
    """A server that closes idle connections quickly (``wait_timeout``, here
    2 s for the connections the host's engine makes): the own pool's idle
    connection is replaced before the next claim, which would otherwise fail
    as "store unavailable" (503). The host's engine pings its own connections
    (``pool_pre_ping``), which the own pool does not copy: a ping per claim is
    the round trip it saves."""
    app, rec = recorder(SQLALCHEMY_ENGINE_OPTIONS={"pool_pre_ping": True})
    store = store_of(app)
    with new_host_connections_run(store, "SET SESSION wait_timeout = 2"):
        assert post(app, make("igv", app)).status_code == 200
        first = own_connection_id(store)
        time.sleep(3)  # the server has closed it by now
        assert post(app, make("igv", app)).status_code == 200
        assert own_connection_id(store) != first
        assert len(rec.events) == 2


def test_a_forked_child_leaves_the_parents_connections_open(recorder: RecorderFactory) -> None:
    """gunicorn with ``--preload`` forks workers from a process that may
    have claimed already. The child's pool starts empty without closing the
    inherited connections, even when the child disposes of the host's engine
    the way SQLAlchemy recommends after a fork (``dispose(close=False)``):
    closing them would end the parent's, and its next claim would be 503."""
    app, rec = recorder()
    store = store_of(app)
    assert post(app, make("igv", app)).status_code == 200
    before = own_connection_id(store)
    child = os.fork()
    if child == 0:  # pragma: no cover - the child's coverage is not collected
        try:
            store.engine.dispose(close=False)
        finally:
            os._exit(0)
    _pid, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert post(app, make("igv", app)).status_code == 200
    assert own_connection_id(store) == before
    assert len(rec.events) == 2


def test_the_own_connections_outlive_a_garbage_collection(recorder: RecorderFactory) -> None:
    """The own pool's connections come out of the host's pool detached;
    SQLAlchemy keeps no finalizer on a detached connection (its issue
    #13570 discusses one). Were one to close it when the checked-out proxy
    is collected, every claim after a collection would be 503."""
    app, rec = recorder()
    store = store_of(app)
    assert post(app, make("igv", app)).status_code == 200
    before = own_connection_id(store)
    gc.collect()
    assert post(app, make("igv", app)).status_code == 200
    assert own_connection_id(store) == before
    assert len(rec.events) == 2


@pytest.mark.parametrize("dispatch", ["inline", "deferred"])
def test_a_connection_the_server_dropped_costs_no_callback(
    recorder: RecorderFactory, dispatch: str
) -> None:
    """The own pool does not ping before use: a connection the server dropped
    meanwhile (a restart, a failover: here KILL) fails its first statement as
    a disconnect, and the claim (or the acceptance) runs once more on a new
    connection, instead of answering the platform 503. A duplicate after it
    is one too."""
    app, rec = recorder(ORDERHOOKS_DISPATCH=dispatch)
    store = store_of(app)
    assert post(app, make("igv", app)).status_code == 200
    for _ in range(2):
        dropped = own_connection_id(store)
        with store.engine.connect() as killer:
            killer.exec_driver_sql(f"KILL {dropped}")
        cb = make("igv", app)
        assert post(app, cb).status_code == 200
        assert post(app, cb).status_code == 200
    expected = ("done", 1) if dispatch == "inline" else ("pending", 0)
    assert [(r.status, r.attempts) for r in rows(app)][1:] == [expected, expected]
    assert len(rec.events) == (3 if dispatch == "inline" else 0)


def _drop_the_hosts_idle_connections(store: DeliveryStore) -> None:
    """KILL, from a connection of its own, every connection idle in the
    host's pool: what a server restart leaves there."""
    pool = store.engine.pool
    idle = [store.engine.connect() for _ in range(pool.checkedin())]  # type: ignore[attr-defined]
    dropped = [int(c.exec_driver_sql("SELECT CONNECTION_ID()").scalar_one()) for c in idle]
    for connection in idle:
        connection.close()
    assert dropped
    killer_engine = sa.create_engine(store.engine.url, poolclass=sa.pool.NullPool)
    try:
        with killer_engine.connect() as killer:
            for connection_id in dropped:
                killer.exec_driver_sql(f"KILL {connection_id}")
    finally:
        killer_engine.dispose()


def test_a_host_connection_the_server_dropped_costs_no_attempt(
    recorder: RecorderFactory,
) -> None:
    """The claim runs on the own pool, so after a restart or a failover it
    succeeds while the host's pool still holds a dead connection (one per
    process, without ``pool_pre_ping``). The done mark, on that connection,
    fails as a disconnect before any receiver ran: it runs once more on a
    new connection, so the callback is answered done at its first attempt
    instead of costing a failed attempt (and a 500) per pooled connection."""
    app, rec = recorder()
    store = store_of(app)
    assert post(app, make("igv", app)).status_code == 200
    _drop_the_hosts_idle_connections(store)
    cb = make("igv", app)
    assert post(app, cb).status_code == 200
    assert [(r.status, r.attempts, r.error) for r in rows(app)][1:] == [("done", 1, None)]
    assert len(rec.events) == 2


def test_a_done_mark_run_again_on_an_autocommit_host_still_waits_for_the_receivers(
    recorder: RecorderFactory,
) -> None:
    """On a host engine in autocommit mode the dispatch asks for a real
    transaction; the done mark run once more on a new connection must ask
    again, or it would commit alone and a receiver's failure leave the
    delivery done, never retried."""
    app, rec = recorder(SQLALCHEMY_ENGINE_OPTIONS={"isolation_level": "AUTOCOMMIT"})
    store = store_of(app)
    assert post(app, make("igv", app)).status_code == 200
    _drop_the_hosts_idle_connections(store)
    rec.hook = failing("the receiver fails")
    cb = make("igv", app)
    answer = post(app, cb).status_code
    [row] = [r for r in rows(app) if r.key == cb.key]
    # Never done: the receiver failed (500), or the new connection was a dead
    # one too (503: the store's failure, the claim handed back); either way
    # the attempt is on record, not left processing until its lease ran out.
    assert (row.status, row.attempts) == ("failed", 1)
    if answer == 500:
        assert row.error == "RuntimeError: the receiver fails"
    else:
        assert answer == 503
        assert row.error is not None
        assert row.error.startswith("OperationalError")
