"""The transactions a dispatch runs in: the host's ``db.session`` or a plain connection."""

from __future__ import annotations

from typing import Protocol

from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session


class Transaction(Protocol):
    """What the dispatch needs of the transaction receivers write in."""

    def connection(self) -> Connection:
        """The transaction's connection, its transaction begun."""
        ...

    def connection_to_begin(self) -> Connection | None:
        """The transaction's connection in the driver's autocommit mode, for
        the store to send BEGIN itself (with the statements before it, in one
        round trip); ``None`` when the transaction has begun already. The
        connection's own mode is given back when it returns to the pool."""
        ...

    def commit(self) -> None: ...

    def rollback(self) -> None: ...


class SessionTransaction:
    """The host's ``db.session`` as the dispatch's :class:`Transaction`: the
    store's statements run on its connection, receivers use the session, and
    one ``commit()`` flushes and commits both."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def connection(self) -> Connection:
        return self.session.connection()

    def connection_to_begin(self) -> Connection | None:
        session = self.session
        if session.in_transaction():
            # The host's code used the session before the callback view.
            return None
        bind = session.get_bind()
        if (
            isinstance(bind, Connection)
            or getattr(session, "execution_options", None)
            or session.dispatch.after_begin
            or bind.dispatch.begin
        ):
            # A session joined to an outer transaction, settings of the
            # session's own (an isolation level), or hooks that run when its
            # transaction begins (a SET LOCAL): they need the driver's BEGIN,
            # so the usual statements.
            return None
        return session.connection(execution_options=_AUTOCOMMIT)

    def commit(self) -> None:
        self.session.commit()

    def rollback(self) -> None:
        self.session.rollback()


class ConnectionTransaction:
    """A plain :class:`~sqlalchemy.engine.Connection` as the dispatch's
    :class:`Transaction` (the store's own database)."""

    def __init__(self, connection: Connection) -> None:
        self._connection = connection

    def connection(self) -> Connection:
        return begun(self._connection)

    def connection_to_begin(self) -> Connection | None:
        if self._connection.in_transaction() or self._connection.dispatch.begin:
            return None
        return begun(self._connection.execution_options(**_AUTOCOMMIT))

    def commit(self) -> None:
        self._connection.commit()

    def rollback(self) -> None:
        self._connection.rollback()


# SQLAlchemy's name for the driver's autocommit mode; on PostgreSQL a BEGIN
# the store sends itself then opens a transaction the driver carries on
# (psycopg follows the server's transaction status, not its own flag).
_AUTOCOMMIT = {"isolation_level": "AUTOCOMMIT"}


def begun(connection: Connection) -> Connection:
    """``connection`` with its SQLAlchemy transaction begun.

    The store's statements run on the driver cursor, which does not autobegin
    one; without it ``commit()`` would commit nothing. (It may be begun
    already: by the host's session, or by a PRAGMA run through SQLAlchemy.)
    """
    if not connection.in_transaction():
        connection.begin()
    return connection
