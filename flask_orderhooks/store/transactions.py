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

    def current(self) -> object:
        """What identifies the transaction now open (``None`` for none): a
        receiver that commits or rolls back ends the one the done mark is in."""
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

    def current(self) -> object:
        return self.session.get_transaction()

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

    def current(self) -> object:
        return self._connection.get_transaction()

    def commit(self) -> None:
        self._connection.commit()

    def rollback(self) -> None:
        self._connection.rollback()


def begun(connection: Connection) -> Connection:
    """``connection`` with its SQLAlchemy transaction begun.

    The store's statements run on the driver cursor, which does not autobegin
    one; without it ``commit()`` would commit nothing. (It may be begun
    already: by the host's session, or by a PRAGMA run through SQLAlchemy.)
    """
    if not connection.in_transaction():
        connection.begin()
    return connection
