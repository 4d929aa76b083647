"""Store fixes, session 15, MySQL and MariaDB: the store's own autocommit pool.

- On MySQL 8 (no ``SET STATEMENT``) the session's lock wait is set on the
  own pool's connections when the wanted wait changes: on the driver's
  cursor, so SQLAlchemy begins no transaction it would end with a ROLLBACK.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from flask import Flask

from tests.conftest import Recorder
from tests.test_durability import make, post, rows
from tests.test_mysql import as_mysql_8, sent_to_the_server, store_of
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
