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
isolation level on check-in), so the store keeps a pool of its own, shaped
like the host's: a ``QueuePool`` of the same size, overflow and timeout, a
``NullPool`` (no connection kept) for a ``NullPool``, and so on
(:func:`_pool_like`). Its connections are made the way the host's engine
makes its own (by a copy of its pool: the same creator and listeners, see
:func:`autocommit_engine`), so they carry whatever the host's engine sets up
on a new connection (connect arguments, an ``init_command``, ``connect``
listeners); they are then switched to autocommit once. One idle for most of
the server's ``wait_timeout`` is replaced before use. Disposing of the host's
engine disposes of this one too.

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
from sqlalchemy.pool import (
    AssertionPool,
    ConnectionPoolEntry,
    NullPool,
    Pool,
    QueuePool,
    SingletonThreadPool,
    StaticPool,
)

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
    """An engine over connections made as ``host`` makes its own, in
    autocommit mode, whose pool is shaped like ``host``'s and gives them back
    without a ``ROLLBACK``."""

    def connect() -> Any:
        # Not out of the host's own pool: a StaticPool or SingletonThreadPool
        # would hand over the connection the host is using (its dispatch's
        # transaction, which autocommit would then commit), and an exhausted
        # QueuePool would keep the claim waiting. A copy of it (what
        # dispose() makes) has the same creator and listeners, and nothing
        # else in use.
        proxied = host.pool.recreate().connect()
        proxied.detach()
        return proxied.dbapi_connection

    pool = _pool_like(host.pool)
    own = sa.create_engine(
        host.url,
        creator=connect,
        isolation_level="AUTOCOMMIT",
        # In autocommit mode no transaction outlives its statement: nothing
        # to reset, and PyMySQL's reset would be a round trip.
        pool_reset_on_return=None,
        pool_recycle=RECYCLE_SECONDS,
        **pool,
    )
    if pool["poolclass"] is not NullPool:
        # A NullPool keeps no connection to go idle, and reading the
        # server's wait_timeout would cost each new one (each claim) a round trip.
        event.listen(own, "connect", _read_wait_timeout)
        event.listen(own, "checkin", _idle_from_now)
        event.listen(own, "checkout", _replace_if_idle_too_long)

    def dispose(_engine: Engine) -> None:
        own.dispose()

    event.listen(host, "engine_disposed", dispose)
    _forget_in_forked_children(own)
    return own


def _pool_like(host: Pool) -> dict[str, Any]:
    """``create_engine``'s pool arguments for a pool shaped like ``host``:
    the host's settings bound the connections a process opens, the store's
    included (a host that chose NullPool, behind a proxy that pools, keeps no
    idle connection; one with pool_size=2 gets two more, not fifteen)."""
    if isinstance(host, QueuePool):
        return {
            "poolclass": QueuePool,
            "pool_size": host.size(),
            # No public reader; -1 (no limit) when pool_size is 0.
            "max_overflow": host._max_overflow,
            "pool_timeout": host.timeout(),
        }
    if isinstance(host, SingletonThreadPool):
        return {"poolclass": SingletonThreadPool, "pool_size": host.size}
    for kind in (NullPool, StaticPool, AssertionPool):
        if isinstance(host, kind):
            return {"poolclass": kind}
    # A pool of the host's own making: its arguments are unknown, and
    # keeping no connection never holds more than the host would.
    return {"poolclass": NullPool}


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
