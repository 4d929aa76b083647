"""A lock wait timeout (1205) that a receiver catches, on a server that rolls
the whole transaction back on one (``innodb_rollback_on_timeout``), and on
one that rolls back the statement alone (the default, and the machine's).

The option is global and read-only at run time, so the first case needs a
MariaDB server of the test's own, started with it (tests/private_mariadb.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask

from flask_orderhooks.store.errors import _timeout_rolls_back
from tests.conftest import Recorder
from tests.private_mariadb import private_mariadb
from tests.test_durability import _fails_once_then_dispatches, make, post, rows

pytestmark = pytest.mark.mariadb

RecorderFactory = Callable[..., tuple[Flask, Recorder]]

#: Where the app's tables live: the machine's server, or one of the test's own.
MACHINE, ROLLS_BACK_ON_TIMEOUT = "machine", "innodb_rollback_on_timeout"


@pytest.fixture(scope="module")
def rolls_back_on_timeout_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    directory = tmp_path_factory.mktemp("mariadb-rollback-on-timeout")
    with private_mariadb(directory, ["--innodb-rollback-on-timeout=ON"]) as url:
        yield url


@pytest.fixture
def database_uri(request: pytest.FixtureRequest) -> str:
    """Overrides the conftest's: the server is the test's parameter."""
    if request.param == MACHINE:
        return str(request.getfixturevalue("mariadb_url"))
    return str(request.getfixturevalue("rolls_back_on_timeout_url"))


@contextlib.contextmanager
def row_locked(database_uri: str) -> Iterator[Callable[[], None]]:
    """Table ``acct`` with rows 1 and 2, row 1 locked by another transaction
    until the yielded ``release()`` (or the block's end)."""
    other = sa.create_engine(database_uri)
    with other.begin() as connection:
        connection.exec_driver_sql("CREATE TABLE acct (id INT PRIMARY KEY, n INT) ENGINE=InnoDB")
        connection.exec_driver_sql("INSERT INTO acct VALUES (1, 0), (2, 0)")
    holder = other.connect()
    holder.exec_driver_sql("UPDATE acct SET n = n + 100 WHERE id = 1")
    try:
        yield holder.rollback
    finally:
        holder.rollback()
        holder.close()
        with other.begin() as connection:
            connection.exec_driver_sql("DROP TABLE acct")
        other.dispose()


def acct(database_uri: str) -> dict[int, int]:
    engine = sa.create_engine(database_uri)
    try:
        with engine.connect() as connection:
            return {
                int(id_): int(n) for id_, n in connection.exec_driver_sql("SELECT id, n FROM acct")
            }
    finally:
        engine.dispose()


def _times_out_and_carries_on(db: Any, release: Callable[[], None]) -> None:
    """A receiver's write, then a wait for the locked row that times out
    (after a second), caught; then the other transaction lets go."""
    db.session.execute(sa.text("UPDATE acct SET n = n + 1 WHERE id = 2"))
    with pytest.raises(sa.exc.OperationalError) as timed_out:
        db.session.execute(
            sa.text(
                "SET STATEMENT innodb_lock_wait_timeout = 1 FOR "
                "UPDATE acct SET n = n + 1 WHERE id = 1"
            )
        )
    orig = timed_out.value.orig
    assert orig is not None and orig.args[0] == 1205
    release()


@pytest.mark.parametrize("database_uri", [ROLLS_BACK_ON_TIMEOUT], indirect=True)
def test_a_caught_lock_wait_timeout_that_rolled_back_the_transaction_fails_the_delivery(
    recorder: RecorderFactory, database_uri: str
) -> None:
    """With innodb_rollback_on_timeout the server throws the whole
    transaction away on a lock wait timeout, done mark and the receiver's
    earlier writes included, and begins a new one for the next statement.
    A receiver that catches the error and carries on would have only what
    followed committed and the request answered done, the delivery left
    processing for a worker to dispatch again: it is a failed attempt,
    retried, like a caught deadlock."""
    with row_locked(database_uri) as release:
        _fails_once_then_dispatches(
            recorder, lambda db: _times_out_and_carries_on(db, release), "AbortedTransaction:"
        )
        # The first attempt's write went with its transaction.
        assert acct(database_uri) == {1: 0, 2: 0}


@pytest.mark.parametrize("database_uri", [MACHINE], indirect=True)
def test_a_caught_lock_wait_timeout_that_rolled_back_its_statement_alone_is_done(
    recorder: RecorderFactory, database_uri: str
) -> None:
    """Without innodb_rollback_on_timeout (the default) only the statement
    that timed out is rolled back: the done mark and the receiver's other
    writes stand, and a receiver may catch the error and carry on. The
    delivery is done at the first attempt, its writes committed once."""
    app, rec = recorder()
    assert rec.db is not None
    db = rec.db
    with row_locked(database_uri) as release:
        rec.hook = lambda _event: _times_out_and_carries_on(db, release)
        cb = make("igv", app)
        assert post(app, cb).status_code == 200
        (row,) = rows(app)
        assert (row.status, row.attempts) == ("done", 1)
        assert rec.credits() == 1
        assert acct(database_uri) == {1: 0, 2: 1}


@pytest.mark.parametrize("database_uri", [MACHINE], indirect=True)
def test_an_unanswered_question_about_the_option_counts_as_rolled_back(
    database_uri: str,
) -> None:
    """The option is read on the failed statement's connection. If that
    read fails, the transaction is taken as rolled back: a retried attempt
    costs a retry, a wrong "not rolled back" a delivery answered done and
    left processing. Nothing is remembered from a failed read."""
    engine = sa.create_engine(database_uri)
    try:
        with engine.connect() as connection:
            assert _timeout_rolls_back(connection) is False  # the machine's server
        engine.dispose()
        fresh = sa.create_engine(database_uri)
        with fresh.connect() as connection:
            connection.connection.dbapi_connection.close()  # type: ignore[union-attr]
            assert _timeout_rolls_back(connection) is True
            connection.invalidate()
        with fresh.connect() as connection:
            assert _timeout_rolls_back(connection) is False
        fresh.dispose()
    finally:
        engine.dispose()
