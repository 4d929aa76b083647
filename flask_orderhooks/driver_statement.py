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
        rows = self.run(connection, parameters).rows
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
        values = dict(self._defaults)
        for name, process in self._required:
            value = parameters[name]
            values[name] = process(value) if process else value
        arguments: Any = values if self._order is None else [values[n] for n in self._order]
        return run_on_cursor(connection, self.sql, arguments)

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
    dialect = connection.dialect
    error = dialect.loaded_dbapi.Error
    proxy = connection.connection
    cursor = proxy.cursor()
    try:
        cursor.execute(sql, arguments)
        rows = cursor.fetchall() if cursor.description is not None else []
        # psycopg's cursors have no lastrowid.
        ran = Ran(rows, cursor.rowcount, getattr(cursor, "lastrowid", None))
    except error as exc:
        gone = dialect.is_disconnect(exc, proxy.dbapi_connection, cursor)
        if gone:
            connection.invalidate(exc)
        # Parameters hidden: they hold bodies and signed headers, and this
        # text is logged and stored as a failed attempt's error.
        raise DBAPIError.instance(
            sql,
            None,
            exc,
            error,
            hide_parameters=True,
            connection_invalidated=gone,
            dialect=dialect,
        ) from exc
    finally:
        # The statement's own outcome is what matters.
        with suppress(error):
            cursor.close()
    return ran
