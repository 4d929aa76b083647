"""How database errors become :class:`~flask_orderhooks.StoreUnavailable` answers, and
how long the store waits for another transaction's locks."""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterator
from contextlib import contextmanager, suppress

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine, ExceptionContext
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from ..driver_statement import run_on_cursor

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
    ``give_back``: the session's value goes back to what it was afterwards,
    because the connection is the host's (which may have set its own, say in
    an ``init_command``); the store's own engine keeps it (set again only
    when the wanted value changes).
    """
    if seconds is None:
        yield
        return
    whole = whole_seconds(seconds)
    if give_back:
        # The host's value kept in a user variable by the same statement:
        # no round trip more than setting it.
        connection.exec_driver_sql(
            f"SET {_HOSTS_LOCK_WAIT} = @@SESSION.innodb_lock_wait_timeout, "
            f"SESSION innodb_lock_wait_timeout = {whole}"
        )
    elif connection.info.get(_LOCK_WAIT_KEY) != whole:
        # On the driver's cursor: exec_driver_sql would begin a transaction
        # on the store's own autocommit connection, and closing it send a
        # ROLLBACK for nothing (a round trip whenever the wanted wait changes).
        run_on_cursor(connection, f"SET SESSION innodb_lock_wait_timeout = {whole}")
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
                connection.exec_driver_sql(
                    f"SET SESSION innodb_lock_wait_timeout = {_HOSTS_LOCK_WAIT}"
                )


def whole_seconds(seconds: float) -> int:
    """``innodb_lock_wait_timeout`` for a wait of ``seconds``: whole seconds,
    rounded up, at least one (MySQL refuses fractions with error 1232)."""
    return max(1, math.ceil(seconds))


_LOCK_WAIT_KEY = "orderhooks_lock_wait"
#: The user variable that keeps the host's own lock wait while the store's
#: is set on the host's connection.
_HOSTS_LOCK_WAIT = "@orderhooks_hosts_lock_wait"


#: InnoDB errors after which the server has rolled the whole transaction
#: back, not only the statement: a deadlock.
MYSQL_ROLLED_BACK = frozenset({1213})
#: A lock wait timeout rolls back the statement alone, or the whole
#: transaction when the server runs with ``innodb_rollback_on_timeout``.
MYSQL_LOCK_WAIT_TIMEOUT = 1205
_ROLLED_BACK_KEY = "orderhooks_rolled_back"
#: Engines listened to: a set lookup per dispatch, where event.contains()
#: costs about a microsecond.
_watched_engines: weakref.WeakSet[Engine] = weakref.WeakSet()
#: ``innodb_rollback_on_timeout`` by engine, read at an engine's first lock
#: wait timeout. The option is global and can only be set at the server's
#: start, so one reading holds for the engine's life.
_rolls_back_on_timeout: weakref.WeakKeyDictionary[Engine, bool] = weakref.WeakKeyDictionary()


def watch_for_server_rollbacks(engine: Engine) -> None:
    """Note on a connection when one of its statements failed with an error
    that made MySQL roll its transaction back (once per engine).

    A receiver that catches such an error and carries on would otherwise
    let the dispatch commit what it ran afterwards, in a new transaction
    without the done mark (MySQL begins one by itself), and answer done: a
    worker would dispatch the delivery again after its lease. PostgreSQL
    says so itself (the transaction is in error)."""
    if engine not in _watched_engines:
        _watched_engines.add(engine)
        event.listen(engine, "handle_error", _note_server_rollback)


def _note_server_rollback(context: ExceptionContext) -> None:
    args = getattr(context.original_exception, "args", ())
    if not args or context.connection is None:
        return
    if args[0] in MYSQL_ROLLED_BACK or (
        args[0] == MYSQL_LOCK_WAIT_TIMEOUT and _timeout_rolls_back(context.connection)
    ):
        context.connection.info[_ROLLED_BACK_KEY] = True


def _timeout_rolls_back(connection: Connection) -> bool:
    """Whether the server behind ``connection`` rolls a transaction back
    whole on a lock wait timeout.

    Asked on the failed statement's own driver connection, which the error
    left usable: no other connection is taken from a pool that may be
    exhausted. When the question cannot be answered the answer is yes: the
    attempt is then failed and retried, where a wrong no would answer done a
    delivery whose done mark the server threw away."""
    engine = connection.engine
    known = _rolls_back_on_timeout.get(engine)
    if known is not None:
        return known
    try:
        cursor = connection.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        try:
            cursor.execute("SELECT @@GLOBAL.innodb_rollback_on_timeout")
            row = cursor.fetchone()
        finally:
            cursor.close()
    except Exception:
        return True
    answer = row is None or str(row[0]).upper() in {"1", "ON"}
    _rolls_back_on_timeout[engine] = answer
    return answer


def forget_server_rollbacks(connection: Connection) -> None:
    """Start watching ``connection`` afresh (its info outlives a checkout)."""
    connection.info.pop(_ROLLED_BACK_KEY, None)


def server_rolled_back(connection: Connection) -> bool:
    """Whether a statement on ``connection`` made the server roll its
    transaction back since :func:`forget_server_rollbacks`."""
    return bool(connection.info.get(_ROLLED_BACK_KEY))
