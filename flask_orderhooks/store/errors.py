"""How database errors become :class:`~flask_orderhooks.StoreUnavailable` answers, and
how long the store waits for another transaction's locks."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager, suppress

from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

# SQLSTATE of PostgreSQL's lock_timeout expiring.
PG_LOCK_NOT_AVAILABLE = "55P03"


#: MySQL's lock wait timeout and deadlock: the statement (or its
#: transaction) was rolled back and can simply be tried again.
MYSQL_BUSY = frozenset({1205, 1213})


def is_busy(exc: DBAPIError) -> bool:
    """A lock another transaction holds: "retry later", not "down"."""
    if getattr(exc.orig, "sqlstate", None) == PG_LOCK_NOT_AVAILABLE:
        return True
    args = getattr(exc.orig, "args", ())
    if args and args[0] in MYSQL_BUSY:
        return True
    return "database is locked" in str(exc.orig)


@contextmanager
def mysql_lock_wait(connection: Connection, seconds: float | None) -> Iterator[None]:
    """Bound this connection's row-lock waits to ``seconds`` for the block.

    ``innodb_lock_wait_timeout`` takes whole seconds only (MySQL refuses
    0.5 with error 1232), so the wait is rounded up, to at least one second.
    The session's value goes back to the server's default afterwards: the
    connection may be the host's.
    """
    if seconds is None:
        yield
        return
    whole = max(1, math.ceil(seconds))
    connection.exec_driver_sql(f"SET SESSION innodb_lock_wait_timeout = {whole}")
    try:
        yield
    finally:
        if not connection.invalidated:
            with suppress(SQLAlchemyError):
                if connection.in_transaction():
                    connection.rollback()
                connection.exec_driver_sql("SET SESSION innodb_lock_wait_timeout = DEFAULT")
