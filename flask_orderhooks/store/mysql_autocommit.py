"""MySQL and MariaDB: a pool of the store's own whose connections autocommit.

A claim that runs in a transaction of its own on a connection of the host's
pool costs three commands: the upsert, its ``COMMIT``, and the ``ROLLBACK``
that SQLAlchemy's pool has PyMySQL send when the connection goes back (PyMySQL
sends it whatever the connection's state). On a connection in autocommit mode
the upsert commits itself, as durably (``innodb_flush_log_at_trx_commit``
applies to it alike), and a pool that knows its connections never hold a
transaction needs no reset: one command (``benchmarks/README.md``, session 14).

Switching a connection of the host's pool to autocommit and back would cost
more than it saves (``SET AUTOCOMMIT`` each way, and SQLAlchemy's reset of the
isolation level on check-in), so the store keeps a small pool of its own. Its
connections are made by the host's engine (checked out of its pool and
detached), so they carry whatever the host's engine sets up on a new
connection (connect arguments, an ``init_command``, ``connect`` listeners);
they are then switched to autocommit once. One idle for most of the server's
``wait_timeout`` is replaced before use. Disposing of the host's engine
disposes of this one too.

Only statements that stand alone run here: the claim and the acceptance (an
upsert, and a read of the row when it was not inserted, whose decision holds
whatever happened in between: only the claim token says "mine"), and plain
reads. The workers' due claim (a locking read, then its update) and the
failure record (an update, then the row it left) stay in transactions.
"""

from __future__ import annotations

import os
import time
import weakref
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.pool import ConnectionPoolEntry

#: Connections older than this are replaced when next checked out.
RECYCLE_SECONDS = 3600
#: Of the server's ``wait_timeout``: a connection idle longer than this share
#: of it is replaced when next checked out, before the server closes it.
IDLE_SHARE = 0.8
#: Where a connection's record keeps its server's ``wait_timeout`` and when
#: it last went back to the pool.
_WAIT_TIMEOUT = "orderhooks_wait_timeout"
_IDLE_SINCE = "orderhooks_idle_since"


def autocommit_engine(host: Engine) -> Engine:
    """An engine over connections that ``host`` makes, in autocommit mode,
    whose pool gives them back without a ``ROLLBACK``."""

    def connect() -> Any:
        proxied = host.raw_connection()
        # Out of the host's pool for good: it will make another when it needs one.
        proxied.detach()
        return proxied.dbapi_connection

    own = sa.create_engine(
        host.url,
        creator=connect,
        isolation_level="AUTOCOMMIT",
        # In autocommit mode no transaction outlives its statement: nothing
        # to reset, and PyMySQL's reset would be a round trip.
        pool_reset_on_return=None,
        pool_recycle=RECYCLE_SECONDS,
    )
    event.listen(own, "connect", _read_wait_timeout)
    event.listen(own, "checkin", _idle_from_now)
    event.listen(own, "checkout", _replace_if_idle_too_long)

    def dispose(_engine: Engine) -> None:
        own.dispose()

    event.listen(host, "engine_disposed", dispose)
    _forget_in_forked_children(own)
    return own


def _forget_in_forked_children(own: Engine) -> None:
    """A child process made by ``fork`` (gunicorn's workers with
    ``--preload``) starts with a pool of its own, without closing the
    connections it inherited: they are the parent's, and closing them would
    break the parent's next claim (the host's ``dispose(close=False)`` after
    a fork, which this engine's dispose listener follows, would otherwise
    close them). Held weakly: an engine no store uses any more goes."""
    if not hasattr(os, "register_at_fork"):  # pragma: no cover - not on Windows
        return
    engine = weakref.ref(own)

    def forget() -> None:
        alive = engine()
        if alive is not None:
            alive.dispose(close=False)

    os.register_at_fork(after_in_child=forget)


# The server closes a connection idle for ``wait_timeout`` seconds (8 hours by
# default, minutes on some hosted servers), and the claim that next used it
# would fail as "store unavailable". The host's ``pool_pre_ping`` would catch
# it at the cost of a round trip per checkout, the one this pool saves; the
# idle time is known without asking, so a connection idle too long is
# replaced before use (SQLAlchemy retries the checkout on DisconnectionError).


def _read_wait_timeout(dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("SELECT @@SESSION.wait_timeout")
        row = cursor.fetchone()
    finally:
        cursor.close()
    if row is not None and row[0]:
        record.info[_WAIT_TIMEOUT] = float(row[0])


def _idle_from_now(_dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
    record.info[_IDLE_SINCE] = time.monotonic()


def _replace_if_idle_too_long(
    _dbapi_connection: Any, record: ConnectionPoolEntry, _proxy: Any
) -> None:
    wait_timeout = record.info.get(_WAIT_TIMEOUT)
    idle_since = record.info.get(_IDLE_SINCE)
    if wait_timeout is None or idle_since is None:
        return
    if time.monotonic() - idle_since > IDLE_SHARE * wait_timeout:
        raise DisconnectionError("idle longer than the server's wait_timeout allows")
