"""MySQL and MariaDB: the store's own autocommit pool.

- On MySQL 8 (no ``SET STATEMENT``) the session's lock wait is set on the
  own pool's connections when the wanted wait changes: on the driver's
  cursor, so SQLAlchemy begins no transaction it would end with a ROLLBACK.
- The own pool is shaped like the host's: a QueuePool of the same size,
  overflow and timeout; a NullPool (nothing kept) for a NullPool; a
  StaticPool or SingletonThreadPool of its own connections, never the
  connection the host is using.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask

from flask_orderhooks.store.mysql_autocommit import _pool_like
from tests.conftest import Recorder
from tests.test_durability import make, post, rows
from tests.test_mysql import as_mysql_8, own_engine, sent_to_the_server, store_of
from tests.test_mysql_autocommit import own_connection_id

RecorderFactory = Callable[..., tuple[Flask, Recorder]]

pytestmark = [pytest.mark.mariadb, pytest.mark.parametrize("backend", ["mariadb"])]


def test_mysql_8_sets_the_own_connections_lock_wait_without_a_rollback(
    recorder: RecorderFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each time the wanted wait changes, one SET and nothing else: the own
    connections autocommit, so nothing is open that a ROLLBACK would end."""
    app, _rec = recorder(ORDERHOOKS_DUPLICATE_WAIT=0.5)
    store = store_of(app)
    as_mysql_8(store)
    assert post(app, make("igv", app)).status_code == 200  # the own pool's connection made
    seen = sent_to_the_server(monkeypatch)
    sent: list[list[str]] = []
    for wait in (1, 2, 2, 5, 1):
        del seen[:]
        with store._own_transaction(each_alone=True, lock_wait=wait):
            pass
        sent.append(list(seen))
    assert sent == [
        [],  # the claim above left it at 1 s (0.5 rounded up)
        ["SET SESSION innodb_lock_wait_timeout = 2"],
        [],
        ["SET SESSION innodb_lock_wait_timeout = 5"],
        ["SET SESSION innodb_lock_wait_timeout = 1"],
    ]


def test_mysql_8_an_inline_first_delivery_with_a_new_lock_wait_sends_no_rollback(
    recorder: RecorderFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The claim on the own connection: the SET (the wanted wait changed:
    the duplicate wait, rounded up) and the upsert, then the dispatch on the
    host's connection as on MariaDB (the done mark, the receiver's write,
    COMMIT, and the host pool's ROLLBACK)."""
    app, rec = recorder(ORDERHOOKS_DUPLICATE_WAIT=2.5)
    store = store_of(app)
    as_mysql_8(store)
    assert post(app, make("igv", app)).status_code == 200  # connections made
    for duplicate_wait, whole in ((4.5, 5), (1.5, 2)):
        store.duplicate_wait = duplicate_wait
        seen = sent_to_the_server(monkeypatch)
        assert post(app, make("igv", app)).status_code == 200
        commands = [sql.split()[0] for sql in seen]
        assert commands == ["SET", "INSERT", "UPDATE", "INSERT", "COMMIT", "ROLLBACK"], seen
        assert seen[0] == f"SET SESSION innodb_lock_wait_timeout = {whole}"
        assert seen[1].startswith("INSERT INTO orderhooks_deliveries ")
        monkeypatch.undo()
    assert len(rec.events) == 3
    assert [row.status for row in rows(app)] == ["done"] * 3


def test_mysql_8_a_lock_wait_set_on_a_dropped_connection_costs_no_callback(
    recorder: RecorderFactory,
) -> None:
    """The SET is then the first command on a connection the server dropped
    (KILL here; a restart, a failover): run on the driver's cursor it still
    fails as a disconnect, and the claim runs once more on a new connection
    (``DeliveryStore._standing_alone``) instead of answering 503."""
    app, rec = recorder(ORDERHOOKS_DUPLICATE_WAIT=0.5)
    store = store_of(app)
    as_mysql_8(store)
    assert post(app, make("igv", app)).status_code == 200
    dropped = own_connection_id(store)
    with store.engine.connect() as killer:
        killer.exec_driver_sql(f"KILL {dropped}")
    store.duplicate_wait = 4.5  # the next claim sets 5 s first
    assert post(app, make("igv", app)).status_code == 200
    assert own_connection_id(store) != dropped
    assert len(rec.events) == 2


def _connections_to_the_database(store: Any) -> int:
    """The server's connections to the test's database, this one excluded."""
    with store.engine.connect() as connection:
        return int(
            connection.exec_driver_sql(
                "SELECT COUNT(*) FROM information_schema.PROCESSLIST "
                "WHERE DB = DATABASE() AND ID <> CONNECTION_ID()"
            ).scalar_one()
        )


@pytest.mark.parametrize(
    ("options", "size", "overflow", "timeout"),
    [
        ({}, 5, 10, 30.0),
        ({"pool_size": 2, "max_overflow": 1, "pool_timeout": 7}, 2, 1, 7.0),
        ({"pool_size": 0, "pool_timeout": 4}, 0, -1, 4.0),
    ],
    ids=["defaults", "sized", "unbounded"],
)
def test_the_own_pool_is_a_queue_pool_of_the_hosts_size(
    recorder: RecorderFactory, options: dict[str, Any], size: int, overflow: int, timeout: float
) -> None:
    app, rec = recorder(SQLALCHEMY_ENGINE_OPTIONS=options)
    store = store_of(app)
    assert post(app, make("igv", app)).status_code == 200
    host, own = store.engine.pool, own_engine(store).pool
    assert isinstance(host, sa.QueuePool) and type(own) is sa.QueuePool
    assert (host.size(), host._max_overflow, host.timeout()) == (size, overflow, timeout)
    assert (own.size(), own._max_overflow, own.timeout()) == (size, overflow, timeout)
    assert len(rec.events) == 1


def test_a_null_pool_host_gets_an_own_null_pool_that_keeps_no_connection(
    recorder: RecorderFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing stays open between deliveries, and the new connection each
    claim makes does not read the server's wait_timeout (no connection is
    ever idle in a NullPool): no round trip more than the host's own
    connections cost."""
    app, rec = recorder(SQLALCHEMY_ENGINE_OPTIONS={"poolclass": sa.NullPool})
    store = store_of(app)
    assert post(app, make("igv", app)).status_code == 200
    assert type(own_engine(store).pool) is sa.NullPool
    assert _connections_to_the_database(store) == 0
    seen = sent_to_the_server(monkeypatch)
    assert post(app, make("igv", app)).status_code == 200
    assert not [sql for sql in seen if "@@SESSION.wait_timeout" in sql], seen
    monkeypatch.undo()
    assert _connections_to_the_database(store) == 0
    assert len(rec.events) == 2
    assert [row.status for row in rows(app)] == ["done", "done"]


def _server_id(engine: sa.Engine) -> int:
    with engine.connect() as connection:
        return int(connection.exec_driver_sql("SELECT CONNECTION_ID()").scalar_one())


@pytest.mark.parametrize(
    ("options", "kind"),
    [
        ({"poolclass": sa.StaticPool}, sa.StaticPool),
        ({"poolclass": sa.SingletonThreadPool, "pool_size": 3}, sa.SingletonThreadPool),
    ],
    ids=["static", "singleton-thread"],
)
def test_a_shared_connection_host_gets_an_own_pool_of_that_class_of_other_connections(
    recorder: RecorderFactory, options: dict[str, Any], kind: type[sa.Pool]
) -> None:
    """StaticPool and SingletonThreadPool hand every checkout (in a thread)
    the same connection. The own pool is of the same class, and its
    connection is another one: the host's, taken and switched to autocommit,
    would have committed whatever the host's session had open on it."""
    app, rec = recorder(SQLALCHEMY_ENGINE_OPTIONS=options)
    store = store_of(app)
    hosts = _server_id(store.engine)
    assert post(app, make("igv", app)).status_code == 200
    own = own_engine(store)
    assert type(own.pool) is kind
    if kind is sa.SingletonThreadPool:
        assert isinstance(own.pool, sa.SingletonThreadPool) and own.pool.size == 3
    assert _server_id(store.engine) == hosts, "the host's connection was taken"
    assert _server_id(own) != hosts
    with store.engine.connect() as connection:
        assert connection.exec_driver_sql("SELECT @@autocommit").scalar_one() == 0
    assert post(app, make("igv", app)).status_code == 200
    assert len(rec.events) == 2


def test_the_own_pool_takes_the_shape_of_every_host_pool(backend: str) -> None:
    """Every pool class SQLAlchemy ships; nothing is connected (the creator
    is never called), so no server is needed (``backend`` is only the
    module's parametrization). A pool class of the host's own: NullPool."""

    def creator() -> Any:
        raise AssertionError("nothing connects")

    class HostsOwnPool(sa.NullPool):
        pass

    assert _pool_like(sa.QueuePool(creator, pool_size=3, max_overflow=4, timeout=5)) == {
        "poolclass": sa.QueuePool,
        "pool_size": 3,
        "max_overflow": 4,
        "pool_timeout": 5,
    }
    assert _pool_like(sa.SingletonThreadPool(creator, pool_size=2)) == {
        "poolclass": sa.SingletonThreadPool,
        "pool_size": 2,
    }
    for kind in (sa.NullPool, sa.StaticPool, sa.AssertionPool):
        assert _pool_like(kind(creator)) == {"poolclass": kind}
    assert _pool_like(HostsOwnPool(creator)) == {"poolclass": sa.NullPool}
