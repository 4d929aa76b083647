"""The transactions a dispatch runs in: the host's ``db.session`` or a plain connection."""

from __future__ import annotations

import logging
import weakref
from typing import Protocol

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session
from sqlalchemy.orm import SessionTransaction as _OrmTransaction

from ..exc import ReceiverCommit, StoreUnavailable

logger = logging.getLogger("flask_orderhooks")

#: ``Session.info`` keys: a dispatch runs in this session; the extension's
#: own commit is under way.
_DISPATCHING = "flask_orderhooks.dispatching"
_OWN_COMMIT = "flask_orderhooks.own_commit"


class Transaction(Protocol):
    """What the dispatch needs of the transaction receivers write in."""

    def connection(self) -> Connection:
        """The transaction's connection, its transaction begun."""
        ...

    def current(self) -> object:
        """What identifies the transaction now open (``None`` for none): a
        receiver that commits or rolls back ends the one the done mark is in."""
        ...

    def has_unflushed_changes(self) -> bool:
        """Objects added, changed or deleted and not yet flushed: a rollback
        would drop them without a word."""
        ...

    def flush(self) -> None:
        """Send what receivers wrote and have not flushed (the commit would)."""
        ...

    def commit(self) -> None: ...

    def rollback(self) -> None: ...


class SessionTransaction:
    """The host's ``db.session`` as the dispatch's :class:`Transaction`: the
    store's statements run on its connection, receivers use the session, and
    one ``commit()`` flushes and commits both.

    Until :meth:`close`, a ``commit()`` of the session or of its connection
    by anyone else (a receiver) raises
    :exc:`~flask_orderhooks.exc.ReceiverCommit`; savepoints
    (``begin_nested()``) commit as usual.
    """

    def __init__(self, session: Session) -> None:
        self.session = session
        # Whether connection() has made sure of a real transaction yet.
        self._transactional = False
        _guard_commits()
        # A depth, not a flag: a dispatch inside a receiver (a replay) must
        # not lift the guard of the one around it when it ends.
        session.info[_DISPATCHING] = session.info.get(_DISPATCHING, 0) + 1

    def connection(self) -> Connection:
        session = self.session
        if not self._transactional:
            self._transactional = True
            level = transaction_level(session.get_bind().engine)
            if level is not None:
                return self._begin_at(level)
        connection = session.connection()
        # The transaction may have begun before the dispatch did (the host's
        # own statements), when no after_begin of ours was there to see it.
        if _guarded.get(connection) is not session:
            _guard_connection(connection, session)
        return connection

    def _begin_at(self, level: str) -> Connection:
        """The session's transaction on a connection that is not in
        autocommit mode: there the done mark would commit on its own before
        any receiver ran, and a receiver's failure could not undo it."""
        session = self.session
        if session.in_transaction():
            # Begun before the view, on an autocommit connection: whatever it
            # flushed is committed already, so only unflushed objects could
            # be lost by beginning again.
            if self.has_unflushed_changes():
                logger.warning(
                    "db.session's engine is in AUTOCOMMIT mode and the session has "
                    "unflushed changes from before the callback view; the dispatch needs "
                    "a transaction of its own. Flush or commit them before the view runs."
                )
                raise StoreUnavailable(
                    "The app's database session is in autocommit mode with changes from "
                    "before this callback; the delivery was kept for retry."
                )
            session.rollback()
        connection = session.connection(execution_options={"isolation_level": level})
        _guard_connection(connection, session)
        return connection

    def current(self) -> object:
        return self.session.get_transaction()

    def has_unflushed_changes(self) -> bool:
        session = self.session
        return bool(session.new or session.dirty or session.deleted)

    def flush(self) -> None:
        self.session.flush()

    def commit(self) -> None:
        self.session.info[_OWN_COMMIT] = True
        try:
            self.session.commit()
        finally:
            self.session.info.pop(_OWN_COMMIT, None)

    def rollback(self) -> None:
        self.session.rollback()
        # The next connection() begins a new transaction: on an engine in
        # autocommit mode it must ask for the isolation level again, or the
        # done mark of a retry would commit alone.
        self._transactional = False

    def close(self) -> None:
        """The dispatch is over: the session's commits are the host's again
        (unless another dispatch around this one is still running)."""
        depth = self.session.info.get(_DISPATCHING, 1) - 1
        if depth > 0:
            self.session.info[_DISPATCHING] = depth
        else:
            self.session.info.pop(_DISPATCHING, None)


#: Why a receiver's commit is refused, and what to do instead.
_LEAVE_THE_COMMIT = (
    "the extension commits what receivers write together with the done mark, after the "
    "last one returned. Remove the commit (flush() gives new rows their ids)."
)


def _refuse_a_receivers_commit(session: Session) -> None:
    if (
        session.info.get(_DISPATCHING)
        and not session.info.get(_OWN_COMMIT)
        and not session.in_nested_transaction()
    ):
        raise ReceiverCommit(f"db.session.commit() inside a receiver: {_LEAVE_THE_COMMIT}")


def _guard_commits() -> None:
    """Listen to every Session's commits, once per process: one check of
    ``info`` per commit, where listening per dispatch would cost a listener's
    setup and removal on every callback."""
    # A set, not event.contains(): that costs more than a dispatch's other
    # bookkeeping together.
    if Session not in _guarded_session_classes:
        _guarded_session_classes.add(Session)
        event.listen(Session, "before_commit", _refuse_a_receivers_commit)
        event.listen(Session, "after_begin", _guard_a_dispatchs_connection)


#: The connections of sessions that may be dispatching, and their engines
#: listened to: ``Connection.commit()`` goes around the session's own
#: ``before_commit``. Weak: a connection object lasts one checkout.
_guarded: weakref.WeakKeyDictionary[Connection, Session] = weakref.WeakKeyDictionary()
_guarded_engines: weakref.WeakSet[Engine] = weakref.WeakSet()
_guarded_session_classes: set[type[Session]] = set()


def _guard_a_dispatchs_connection(
    session: Session, _transaction: _OrmTransaction, connection: Connection
) -> None:
    # A receiver that rolled back begins again on a connection the dispatch
    # has not seen.
    if session.info.get(_DISPATCHING):
        _guard_connection(connection, session)


def _guard_connection(connection: Connection, session: Session) -> None:
    _guarded[connection] = session
    engine = connection.engine
    if engine not in _guarded_engines:
        _guarded_engines.add(engine)
        event.listen(engine, "commit", _refuse_a_receivers_connection_commit)


def _refuse_a_receivers_connection_commit(connection: Connection) -> None:
    session = _guarded.get(connection)
    # Nested or not: the connection's commit commits the root transaction.
    if session is not None and session.info.get(_DISPATCHING) and not session.info.get(_OWN_COMMIT):
        raise ReceiverCommit(
            f"a commit of db.session's connection inside a receiver: {_LEAVE_THE_COMMIT}"
        )


class ConnectionTransaction:
    """A plain :class:`~sqlalchemy.engine.Connection` as the dispatch's
    :class:`Transaction` (the store's own database).

    A rollback gives the connection back to its pool at once (the failure
    record that follows takes a connection of its own, which a pool of one
    could not give while the dispatch held one); a later :meth:`connection`
    takes a new one with the same options, which :meth:`close` gives back.

    .. versionchanged:: 0.3
       Rollback gives the connection back; :meth:`close`.
    """

    def __init__(self, connection: Connection) -> None:
        self._connection: Connection | None = connection
        self._engine = connection.engine
        self._options = connection.get_execution_options()
        self._reopened: Connection | None = None

    def connection(self) -> Connection:
        if self._connection is None:
            self._connection = self._reopened = self._engine.connect().execution_options(
                **self._options
            )
        return begun(self._connection)

    def current(self) -> object:
        return None if self._connection is None else self._connection.get_transaction()

    def has_unflushed_changes(self) -> bool:
        return False

    def flush(self) -> None:
        pass

    def commit(self) -> None:
        if self._connection is not None:
            self._connection.commit()

    def rollback(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            try:
                connection.rollback()
            finally:
                connection.close()

    def close(self) -> None:
        """Give back the connection this took after a rollback, if any (the
        one it was made with is its creator's to close)."""
        reopened, self._reopened = self._reopened, None
        if reopened is not None:
            if self._connection is reopened:
                self._connection = None
            reopened.close()


#: Per engine: ``None`` when its connections begin transactions, or the
#: isolation level a dispatch asks for when they autocommit.
_transaction_levels: weakref.WeakKeyDictionary[Engine, str | None] = weakref.WeakKeyDictionary()


def transaction_level(engine: Engine) -> str | None:
    """``None`` when ``engine``'s connections begin transactions as usual;
    when they are in autocommit mode (``isolation_level="AUTOCOMMIT"``), the
    level to ask a dispatch's connection for: the server's default.

    Asked once per engine, of one connection and without a round trip (the
    driver's own flag); dialects that cannot tell are taken to begin
    transactions.
    """
    try:
        return _transaction_levels[engine]
    except KeyError:
        pass
    with engine.connect() as probe:
        dbapi_connection = probe.connection.dbapi_connection
        assert dbapi_connection is not None
        try:
            autocommit = engine.dialect.detect_autocommit_setting(dbapi_connection)
        except NotImplementedError:
            autocommit = False
        level = probe.default_isolation_level if autocommit else None
    _transaction_levels[engine] = level
    return level


def begun(connection: Connection) -> Connection:
    """``connection`` with its SQLAlchemy transaction begun.

    The store's statements run on the driver cursor, which does not autobegin
    one; without it ``commit()`` would commit nothing. (It may be begun
    already: by the host's session, or by a PRAGMA run through SQLAlchemy.)
    """
    if not connection.in_transaction():
        connection.begin()
    return connection
