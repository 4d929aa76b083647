"""Run a SQLAlchemy statement, compiled once, on the driver's cursor.

``Connection.execute()`` spends more CPU on a statement than a PostgreSQL
round trip on the same machine costs: it computes the statement's cache key
(about 100 µs for the claim's upsert), processes parameters, dispatches
events and wraps the result, on every call. The delivery store runs the same
three statements for every callback, so it compiles each once for the
engine's dialect and runs it on the connection's DB-API cursor
(``benchmarks/RESULTS.md`` has the measurements).

What stays SQLAlchemy's: the SQL (the dialect's compiler writes it, with its
upserts, casts and quoting), the parameter conversions (each bind's type
processor), the connection, its pool and its transaction, and the exceptions
(driver errors are raised as SQLAlchemy's :class:`~sqlalchemy.exc.DBAPIError`
subclasses, and a connection the dialect sees as disconnected is invalidated).
What does not pass through SQLAlchemy: its ``before_cursor_execute`` /
``after_cursor_execute`` events, so ``echo`` and query recording don't list
these statements.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from typing import Any, NamedTuple

from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.expression import ClauseElement


class DriverStatement:
    """``statement`` compiled for ``dialect``, run with :meth:`first`.

    Parameters are passed by bind name; binds with a value in the statement
    (literals) are converted once, here.
    """

    def __init__(
        self, statement: ClauseElement, dialect: Dialect, *, prefix: tuple[str, str] | None = None
    ) -> None:
        """:param prefix: ``(text, name)``: SQL written before the statement,
        with one parameter ``name`` (an integer) where ``text`` says ``{}``;
        e.g. MariaDB's ``SET STATEMENT variable = {} FOR``."""
        compiled = statement.compile(dialect=dialect)
        if not isinstance(compiled, SQLCompiler):
            raise TypeError(f"Not a SQL statement: {statement!r}")
        if compiled.post_compile_params or compiled.literal_execute_params:
            # Their SQL text depends on the values: not compiled once.
            raise ValueError("Statements with expanding parameters cannot be precompiled.")
        #: What was compiled, and the SQL the driver runs.
        self.statement = statement
        self.sql = compiled.string
        self._defaults: dict[str, Any] = {}
        # By name: a parameter used several times (p_now) is converted once.
        required: dict[str, Callable[[Any], Any] | None] = {}
        for bind, name in compiled.bind_names.items():
            process = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if bind.required:
                required[name] = process
            else:
                value = bind.effective_value
                self._defaults[name] = process(value) if process else value
        self._order = tuple(compiled.positiontup or ()) if compiled.positional else None
        if prefix is not None:
            text, name = prefix
            if compiled.positional:
                if dialect.paramstyle != "format":
                    raise ValueError(
                        f"A prefix needs the format paramstyle, not {dialect.paramstyle}."
                    )
                placeholder = "%s"
                self._order = (name, *(self._order or ()))
            elif dialect.paramstyle == "pyformat":
                placeholder = f"%({name})s"
            else:
                raise ValueError(f"A prefix needs a format paramstyle, not {dialect.paramstyle}.")
            self.sql = text.format(placeholder) + " " + self.sql
            required[name] = int
        self._required = tuple(required.items())
        # Result conversions (SQLite's datetimes arrive as text), only where a
        # type has one: the store's hot statements return strings and ints.
        described = getattr(statement, "returning_column_descriptions", None)
        types = (
            [d["type"] for d in described]
            if described is not None
            else [c.type for c in getattr(statement, "selected_columns", ())]
        )
        processors = [t.dialect_impl(dialect).result_processor(dialect, None) for t in types]
        self._results = tuple(processors) if any(processors) else None

    def first(
        self, connection: Connection, parameters: Mapping[str, Any]
    ) -> tuple[Any, ...] | None:
        """Execute on ``connection``'s cursor; the first row, if any."""
        return self.first_row(self.run(connection, parameters))

    def first_row(self, ran: Ran) -> tuple[Any, ...] | None:
        """The first row ``ran`` returned, if any, converted to Python."""
        rows = ran.rows
        if not rows:
            return None
        if self._results is None:
            return tuple(rows[0])
        return tuple(
            process(value) if process is not None and value is not None else value
            for process, value in zip(self._results, rows[0], strict=True)
        )

    def rowcount(self, connection: Connection, parameters: Mapping[str, Any]) -> int:
        """Execute on ``connection``'s cursor; the rows it matched (for
        databases whose ``UPDATE`` has no ``RETURNING``)."""
        return self.run(connection, parameters).rowcount

    def run(self, connection: Connection, parameters: Mapping[str, Any]) -> Ran:
        """Execute on ``connection``'s cursor; everything the driver reported."""
        return run_on_cursor(connection, *self.bound(parameters))

    def bound(self, parameters: Mapping[str, Any]) -> tuple[str, Any]:
        """The SQL and the driver's arguments for ``parameters``, converted
        (for :func:`run_pipelined`)."""
        values = dict(self._defaults)
        for name, process in self._required:
            value = parameters[name]
            values[name] = process(value) if process else value
        return self.sql, values if self._order is None else [values[n] for n in self._order]

    def __repr__(self) -> str:
        return f"<DriverStatement {self.sql[:40]!r}...>"


class Ran(NamedTuple):
    """What the driver reported of one statement."""

    #: Its rows (empty for a statement that returns none).
    rows: Sequence[Any]
    #: The rows it matched, or the driver's -1 for "unknown".
    rowcount: int
    #: The cursor's ``lastrowid``: MySQL's insert id (``LAST_INSERT_ID``),
    #: SQLite's rowid; ``None`` where the driver has none (psycopg).
    lastrowid: int | None


def run_on_cursor(connection: Connection, sql: str, arguments: Any = ()) -> Ran:
    """Run ``sql`` on ``connection``'s DB-API cursor: what the driver reported.

    A driver error is raised as SQLAlchemy's :class:`~sqlalchemy.exc.DBAPIError`
    subclass, its parameters hidden, and a connection the dialect sees as
    disconnected is invalidated first.
    """
    error = connection.dialect.loaded_dbapi.Error
    cursor = connection.connection.cursor()
    try:
        cursor.execute(sql, arguments)
        return _ran(cursor)
    except error as exc:
        raise _driver_error(connection, sql, exc, cursor) from exc
    finally:
        # The statement's own outcome is what matters.
        with suppress(error):
            cursor.close()


class Pipelined(NamedTuple):
    """What one pipeline of statements did (:func:`run_pipelined`)."""

    #: What each statement that ran reported, in order: the statements
    #: before the first failure (after it, PostgreSQL skips the rest).
    ran: list[Ran]
    #: The first failure, as :func:`run_on_cursor` raises it; ``None`` if
    #: every statement ran.
    error: DBAPIError | None


def can_pipeline(connection: Connection) -> bool:
    """Whether ``connection``'s driver sends statements in a pipeline
    (psycopg 3 on libpq 14 or later)."""
    pipeline = getattr(connection.connection.dbapi_connection, "pipeline", None)
    if pipeline is None:
        return False
    return bool(connection.dialect.loaded_dbapi.Pipeline.is_supported())


def run_pipelined(connection: Connection, statements: Sequence[tuple[str, Any]]) -> Pipelined:
    """Send ``statements`` (SQL, arguments) on ``connection``'s psycopg
    connection in one pipeline: one round trip for all of them.

    A failure is returned, not raised, with what the statements before it
    reported, because what they did (a COMMIT among them) decides what the
    caller must undo. Check :func:`can_pipeline` first.
    """
    driver = connection.connection.dbapi_connection
    assert driver is not None
    dbapi = connection.dialect.loaded_dbapi
    error = dbapi.Error
    done = (dbapi.pq.ExecStatus.COMMAND_OK, dbapi.pq.ExecStatus.TUPLES_OK)
    cursors: list[Any] = []
    caught: Any = None
    try:
        # Leaving the block syncs the pipeline and reads every result (an
        # explicit sync() before that would cost a second round trip).
        with driver.pipeline():
            try:
                for sql, arguments in statements:
                    cursors.append(driver.cursor())
                    cursors[-1].execute(sql, arguments)
            except error as exc:
                # psycopg read an earlier statement's failure while sending:
                # caught here, so the block still ends (and syncs) normally.
                caught = exc
    except error as exc:
        if caught is None:
            caught = exc
    ran: list[Ran] = []
    for cursor in cursors:
        # psycopg's result of the statement; none for one the pipeline skipped.
        result = cursor.pgresult
        if result is None or result.status not in done:
            break
        ran.append(_ran(cursor))
    for cursor in cursors:
        with suppress(error):
            cursor.close()
    failure = None
    if caught is not None:
        failed = statements[min(len(ran), len(statements) - 1)][0]
        failure = _driver_error(connection, failed, caught, None)
    return Pipelined(ran, failure)


def _ran(cursor: Any) -> Ran:
    rows = cursor.fetchall() if cursor.description is not None else []
    # psycopg's cursors have no lastrowid.
    return Ran(rows, cursor.rowcount, getattr(cursor, "lastrowid", None))


def _driver_error(connection: Connection, sql: str, exc: Any, cursor: Any) -> DBAPIError:
    """``exc`` as SQLAlchemy raises it, its parameters hidden; a connection
    the dialect sees as disconnected is invalidated first."""
    dialect = connection.dialect
    proxy = connection.connection
    gone = dialect.is_disconnect(exc, proxy.dbapi_connection, cursor)
    if gone:
        connection.invalidate(exc)
    # Parameters hidden: they hold bodies and signed headers, and this text
    # is logged and stored as a failed attempt's error.
    wrapped = DBAPIError.instance(
        sql,
        None,
        exc,
        dialect.loaded_dbapi.Error,
        hide_parameters=True,
        connection_invalidated=gone,
        dialect=dialect,
    )
    # A driver error (a subclass of the DB-API's Error) is always wrapped as
    # a DBAPIError; the annotation allows StatementError for other errors.
    assert isinstance(wrapped, DBAPIError)
    return wrapped
