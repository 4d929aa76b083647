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
def mysql_lock_wait(
    connection: Connection, seconds: float | None, *, give_back: bool = True
) -> Iterator[None]:
    """Bound this connection's row-lock waits to ``seconds`` for the block.

    ``innodb_lock_wait_timeout`` takes whole seconds only (MySQL refuses
    0.5 with error 1232), so the wait is rounded up, to at least one second.
    ``give_back``: the session's value goes back to the server's default
    afterwards, because the connection is the host's; the store's own engine
    keeps it (set again only when the wanted value changes).
    """
    if seconds is None:
        yield
        return
    whole = whole_seconds(seconds)
    if give_back or connection.info.get(_LOCK_WAIT_KEY) != whole:
        connection.exec_driver_sql(f"SET SESSION innodb_lock_wait_timeout = {whole}")
        connection.info[_LOCK_WAIT_KEY] = whole
    if not give_back:
        yield
        return
    try:
        yield
    finally:
        if not connection.invalidated:
            with suppress(SQLAlchemyError):
                if connection.in_transaction():
                    connection.rollback()
                connection.exec_driver_sql("SET SESSION innodb_lock_wait_timeout = DEFAULT")
                connection.info.pop(_LOCK_WAIT_KEY, None)


def whole_seconds(seconds: float) -> int:
    """``innodb_lock_wait_timeout`` for a wait of ``seconds``: whole seconds,
    rounded up, at least one (MySQL refuses fractions with error 1232)."""
    return max(1, math.ceil(seconds))


_LOCK_WAIT_KEY = "orderhooks_lock_wait"
