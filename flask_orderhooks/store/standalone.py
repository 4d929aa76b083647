"""The extension's own database, for ``OrderHooks(app)`` without ``db=``."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import URL, Engine
from sqlalchemy.exc import SQLAlchemyError

from ..exc import ConfigurationError
from .sqlite import sqlite_pragmas
from .table import MYSQL, TABLE_NAME, deliveries_table
from .transactions import ConnectionTransaction, Transaction, transaction_level
from .upgrade import upgrade_table

_MYSQL_LOCK = "SELECT GET_LOCK(%s, %s)"

#: Tries at creating or upgrading the table while other processes do the same.
_DDL_ATTEMPTS = 5

#: What pysqlite reads as true in ``?uri=``, as SQLAlchemy coerces it.
_TRUE_WORDS = frozenset({"true", "yes", "on", "y", "t", "1"})
#: SQLite filenames that name no file: a database private to one connection.
_NO_FILE = frozenset({"", ":memory:"})
_IN_MEMORY_REFUSED = (
    "an in-memory or temporary SQLite database is not a durable store: it lives only as "
    "long as one connection, so every recorded delivery is lost with the process (a "
    "retried payment would be credited again), and each thread gets one of its own, "
    'without the table. Use a SQLite file, such as "sqlite:////var/lib/shop/orderhooks.sqlite3" '
    "(in tests, one in a temporary folder), or leave it unset for orderhooks.sqlite3 in the "
    "instance folder."
)


def _refuse_in_memory_sqlite(url: URL, connect_args: Mapping[str, Any]) -> None:
    """Refuse a SQLite URL whose database vanishes with its connection:
    ``sqlite://``, ``sqlite:///:memory:`` (any driver), and in URI mode
    (``?uri=true`` or ``connect_args={"uri": True}``) ``file::memory:``,
    ``file:`` (a temporary file), ``mode=memory`` and ``vfs=memdb``.

    :raises ConfigurationError: naming ``ORDERHOOKS_DATABASE_URI``.
    """
    if _sqlite_is_ephemeral(url, connect_args):
        raise ConfigurationError("ORDERHOOKS_DATABASE_URI", _IN_MEMORY_REFUSED)


def _sqlite_is_ephemeral(url: URL, connect_args: Mapping[str, Any]) -> bool:
    database = url.database or ""
    uri_mode = bool(connect_args.get("uri")) or any(
        value.strip().lower() in _TRUE_WORDS for value in _query_values(url, "uri")
    )
    if not uri_mode:
        # Outside URI mode pysqlite reads "file:..." and "?mode=" as a
        # plain filename and ignored options: only these two are in memory.
        return database in _NO_FILE
    if "memory" in _query_values(url, "mode") or "memdb" in _query_values(url, "vfs"):
        return True
    return _uri_path(database) in _NO_FILE


def _query_values(url: URL, name: str) -> tuple[str, ...]:
    """Every value of ``?name=`` (a repeated parameter gives several)."""
    value = url.query.get(name, ())
    return (value,) if isinstance(value, str) else tuple(value)


def _uri_path(database: str) -> str:
    """The filename a SQLite URI filename opens: ``file:`` and an authority
    (``file://localhost/...``) removed; any other text is a filename as is."""
    if not database.startswith("file:"):
        return database
    path = database.removeprefix("file:")
    if path.startswith("//"):
        _, _, rest = path[2:].partition("/")
        path = "/" + rest if rest else ""
    return path


class StandaloneDatabase:
    """The store's own engine, for ``OrderHooks(app)`` without ``db=``.

    The table is created on first use, not at start-up: an app must boot (and
    answer 503, so platforms retry) while its database is down, and several
    workers creating it at once must not crash each other.
    """

    def __init__(self, uri: str, *, busy_timeout: float, engine_options: Mapping[str, Any]) -> None:
        """:raises ConfigurationError: ``uri`` is an in-memory or temporary
        SQLite database."""
        options = dict(engine_options)
        url = sa.make_url(uri)
        if url.get_backend_name() == "sqlite":
            connect_args = dict(options.pop("connect_args", {}))
            # A store the process forgets is no de-dup store; the table
            # would also be made ready for one thread's database only.
            _refuse_in_memory_sqlite(url, connect_args)
            connect_args.setdefault("timeout", busy_timeout)
            options["connect_args"] = connect_args
        self.engine: Engine = sa.create_engine(url, **options)
        if self.engine.dialect.name == "sqlite":
            sa.event.listen(self.engine, "connect", sqlite_pragmas)
        self.metadata = sa.MetaData()
        self.table = deliveries_table(self.metadata)
        self._ready = False
        self._lock = threading.Lock()

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        """A connection for the dispatch: receivers' writes are their own."""
        # Asked first: its probe (once per engine) takes a connection of its
        # own, which a pool of one cannot give while the dispatch holds it.
        level = transaction_level(self.engine)
        with self.engine.connect() as connection:
            if level is not None:
                # An engine in autocommit mode would commit the done mark on
                # its own, before any receiver ran. Reset when the
                # connection goes back to the pool.
                connection.execution_options(isolation_level=level)
            transaction = ConnectionTransaction(connection)
            try:
                yield transaction
            finally:
                transaction.close()

    def ensure_table(self) -> None:
        """Create the table, or upgrade one an older version made, once."""
        if self._ready:
            return
        with self._lock:
            if self._ready:
                return
            for attempt in range(1, _DDL_ATTEMPTS + 1):
                try:
                    self._create_or_upgrade()
                    break
                except SQLAlchemyError:
                    # Another process may be half-way through the same steps
                    # (SQLite runs DDL outside transactions and cannot
                    # serialise them): if the table is whole now, that is all
                    # we needed; if not, each step is checked again.
                    if self._is_current():
                        break
                    if attempt == _DDL_ATTEMPTS:
                        raise
                    time.sleep(0.05 * attempt)
            self._ready = True

    def _create_or_upgrade(self) -> None:
        with self.engine.begin() as connection:
            dialect = self.engine.dialect.name
            if dialect == "postgresql":
                # Serialises concurrent create_all() and upgrades across
                # processes; released at commit.
                connection.execute(sa.select(sa.func.pg_advisory_xact_lock(0x0DE7_1FE5)))
            # MySQL commits each DDL statement on its own: a named lock, held
            # by this session until released, serialises instead.
            elif (
                dialect in MYSQL
                and connection.exec_driver_sql(_MYSQL_LOCK, ("orderhooks_ddl", 60)).scalar() != 1
            ):
                raise sa.exc.OperationalError(_MYSQL_LOCK, None, TimeoutError("no DDL lock"))
            try:
                self.metadata.create_all(connection, checkfirst=True)
                upgrade_table(connection, self.table)
            finally:
                if dialect in MYSQL:
                    connection.exec_driver_sql("SELECT RELEASE_LOCK(%s)", ("orderhooks_ddl",))

    def _is_current(self) -> bool:
        inspector = sa.inspect(self.engine)
        if not inspector.has_table(TABLE_NAME):
            return False
        columns = {column["name"] for column in inspector.get_columns(TABLE_NAME)}
        indexes = {index["name"] for index in inspector.get_indexes(TABLE_NAME)}
        # Every column and index of this version's definition, not only the
        # last one added: a process overtaken between the upgrade's steps
        # must not report ready with a step still missing.
        return (
            set(self.table.c.keys()) <= columns
            and {str(index.name) for index in self.table.indexes} <= indexes
        )

    def __repr__(self) -> str:
        return f"<StandaloneDatabase {self.engine.url!r}>"
