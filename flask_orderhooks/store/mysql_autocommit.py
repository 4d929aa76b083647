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
they are then switched to autocommit once. Disposing of the host's engine
disposes of this one too.

Only statements that stand alone run here: the claim and the acceptance (an
upsert, and a read of the row when it was not inserted, whose decision holds
whatever happened in between: only the claim token says "mine"), and plain
reads. The workers' due claim (a locking read, then its update) and the
failure record (an update, then the row it left) stay in transactions.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine

#: Connections older than this are replaced when next checked out: the
#: server closes idle ones after ``wait_timeout`` (8 hours by default), and a
#: pool of its own cannot count on the host's ``pool_pre_ping``, whose ping is
#: a round trip per checkout (what this pool exists to save).
RECYCLE_SECONDS = 3600


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

    def dispose(_engine: Engine) -> None:
        own.dispose()

    event.listen(host, "engine_disposed", dispose)
    return own
