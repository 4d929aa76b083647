"""SQLite's connection settings: WAL, a claim commit that skips its fsync,
and a write lock taken by polling."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError

from ..driver_statement import run_on_cursor


@contextmanager
def relaxed_sqlite_sync(connection: Connection) -> Iterator[None]:
    """On SQLite in WAL mode, let the claim's COMMIT skip its fsync.

    ``synchronous=NORMAL`` still survives a crash of the process; only power
    loss can lose the claim, and only until the next FULL commit on the
    database (the dispatch's) syncs the WAL, which holds the claim's frames
    before its own. A delivery is answered "done" only after that commit, so
    nothing answered is ever lost. The connection's own level is restored
    before it goes back to the pool (it may be the host's engine). Outside WAL
    mode NORMAL can corrupt on power loss, so nothing changes there.
    """
    wal = connection.info.get(WAL_KEY)
    if wal is None:
        mode = _pragma(connection, "PRAGMA journal_mode")
        wal = connection.info[WAL_KEY] = str(mode).lower() == "wal"
    level = int(_pragma(connection, "PRAGMA synchronous") or 0) if wal else 0
    if level <= SQLITE_NORMAL:
        yield
        return
    _pragma(connection, f"PRAGMA synchronous = {SQLITE_NORMAL}")
    try:
        yield
    finally:
        try:
            # SQLite refuses to change the level inside a transaction; one is
            # still open only when the claim failed.
            if connection.in_transaction():
                connection.rollback()
            _pragma(connection, f"PRAGMA synchronous = {level}")
        except SQLAlchemyError:
            # Never hand a connection back to the pool at the relaxed level.
            connection.invalidate()
            raise


def take_write_lock(connection: Connection, deadline: float) -> None:
    """Begin ``connection``'s transaction with SQLite's write lock taken,
    trying ``BEGIN IMMEDIATE`` every :func:`pause` until ``deadline`` (a
    ``time.monotonic()``) or for as long as the connection's own busy timeout,
    whichever is later (what the statement would have waited in SQLite's
    handler), with that busy wait off meanwhile.

    SQLite's busy handler sleeps 1, 2, 5, 10 ms and more between its tries,
    while another worker holds the lock for well under a millisecond (a
    claim's commit, a done mark's commit and its fsync). A statement that
    meets the lock here fails at once and costs a few microseconds, and the
    lock is taken before the transaction reads anything, so its snapshot is
    never stale. A transaction already begun (by the host's ``begin`` hook,
    or by a statement before) is left to the driver's busy wait, as is a
    connection whose ``commit()`` commits nothing (Python 3.12's
    ``autocommit=True``). The connection's own busy timeout is set back
    afterwards: it may be the host's, and its other statements keep it.
    Past the deadline, the driver's "database is locked" error is raised.
    """
    dbapi_connection = connection.connection.dbapi_connection
    if dbapi_connection is None or dbapi_connection.in_transaction:
        return
    if getattr(dbapi_connection, "autocommit", None) is True:
        return
    before = int(_pragma(connection, "PRAGMA busy_timeout") or 0)
    deadline = max(deadline, time.monotonic() + before / 1000)
    _pragma(connection, "PRAGMA busy_timeout = 0")
    try:
        tries = 0
        while time.monotonic() < deadline:
            cursor = dbapi_connection.cursor()
            try:
                cursor.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc):
                    break  # raised below, as SQLAlchemy's error
            finally:
                cursor.close()
            time.sleep(min(pause(tries), max(0.0, deadline - time.monotonic())))
            tries += 1
        # Once more, for the error: raised as SQLAlchemy's, like the store's
        # other statements.
        run_on_cursor(connection, "BEGIN IMMEDIATE")
    finally:
        try:
            _pragma(connection, f"PRAGMA busy_timeout = {before}")
        except SQLAlchemyError:
            # Never hand a connection back to the pool without its wait.
            connection.invalidate()
            raise


def pause(tries: int) -> float:
    """Seconds to sleep after ``tries`` failed tries for the write lock:
    0.1 ms eight times, then 0.2 ms eight times, and so on up to 2 ms."""
    return min(0.0001 * (1 << min(tries // 8, 5)), 0.002)


def _pragma(connection: Connection, sql: str) -> Any:
    """A PRAGMA's value, run on the driver's cursor. Every claim runs three;
    through ``exec_driver_sql`` they cost about 80 µs of CPU a claim, on the
    driver's cursor about 14 (``sqlite3`` has no round trip: CPU is the cost)."""
    rows = run_on_cursor(connection, sql).rows
    return rows[0][0] if rows else None


WAL_KEY = "orderhooks_wal"
SQLITE_NORMAL = 1


def sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        # WAL lets readers run beside the one writer; the busy timeout comes
        # from the driver's ``timeout`` connect argument.
        cursor.execute("PRAGMA journal_mode=WAL")
    finally:
        cursor.close()
