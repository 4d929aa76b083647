"""SQLite's connection settings: WAL, and a claim commit that skips its fsync."""

from __future__ import annotations

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
