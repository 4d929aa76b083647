"""PostgreSQL with psycopg 3: an inline delivery's claim, its commit, the
dispatch's BEGIN and its done mark in one round trip.

The store-before-dispatch rule asks for two transactions: the claim,
committed before any receiver runs, and the dispatch, whose done mark
commits with the receivers' writes. Sent one statement at a time that is four
round trips (claim, BEGIN, done mark, COMMIT) where a hand-written callback
needs three. Here the first three travel as one simple-protocol query on the
dispatch's own connection::

    INSERT … ON CONFLICT … RETURNING …;   -- the claim
    COMMIT;                               -- stored, before anything can fail
    BEGIN;                                -- the dispatch's transaction
    UPDATE … SET status = 'done' … RETURNING …;   -- its done mark, uncommitted
    SELECT status, body_sha256, lease_expires_at …  -- the row as it now is

PostgreSQL runs the statements before ``COMMIT`` as one implicit
transaction, and the ``BEGIN`` leaves the dispatch's open when the query
ends: the receivers then write in it and the request's one ``COMMIT`` makes
their writes and the done mark durable together, as before. The rule is
kept: an error in the claim rolls back the claim alone and runs nothing
after it, and the done mark can only match a claim that was committed (the
token is this request's own).

It needs client-side binding (the extended protocol takes one statement per
message), so the parameters are merged into the text by psycopg's
``ClientCursor``, with its quoting; and a driver that sends no BEGIN of its
own, which is what SQLAlchemy's ``AUTOCOMMIT`` execution option gives for the
dispatch's connection (psycopg follows the server's transaction status, so
the receivers' statements and the ``COMMIT`` land in the transaction that
``BEGIN`` opened). ``benchmarks/README.md`` has the measurements.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Dialect, Engine

from ..driver_statement import DriverStatement, driver_cursor
from .statements import Statements


@dataclass(frozen=True)
class Trip:
    """What the query found.

    :param claimed: the claim's row ``(claim_token, attempts)`` when this
        request's claim won, else ``None``.
    :param marked: the done mark matched (the dispatch's transaction holds
        the row, uncommitted).
    :param state: ``(status, body_sha256, lease_expires_at)`` of the row as
        the dispatch's transaction sees it; ``None`` if there is none.
    """

    claimed: tuple[Any, ...] | None
    marked: bool
    state: tuple[Any, ...] | None


class ClaimAndBegin:
    """The claim, its COMMIT, the dispatch's BEGIN, its done mark and the
    row's state, sent in one query."""

    def __init__(self, t: sa.Table, sql: Statements, dialect: Dialect) -> None:
        self._claim = sql.claim
        self._mark_done = sql.mark_done
        self._state = sql.state
        self._dialect = dialect
        #: Rows: (attempts,) of the row if it holds ``p_token``.
        self.attempt_of = DriverStatement(
            sa.select(t.c.attempts).where(
                t.c.provider == sa.bindparam("p_provider"),
                t.c.callback == sa.bindparam("p_callback"),
                t.c.key == sa.bindparam("p_key"),
                t.c.claim_token == sa.bindparam("p_token"),
            ),
            dialect,
        ).first
        # BEGIN before the claim too: a COMMIT that closes the implicit
        # transaction of a multi-statement query commits it, but makes the
        # server log "WARNING: there is no transaction in progress".
        self._before_begin = f"BEGIN; {sql.claim.sql}; COMMIT; "
        self._after_begin = f"; {sql.mark_done.sql}; {sql.state.sql}"
        _check_shared_names(sql.claim, sql.mark_done, sql.state)

    @staticmethod
    def usable(dialect: Dialect) -> bool:
        """Whether the engine's driver can send it: psycopg 3, and SQLAlchemy
        rolling back an autocommit connection's transaction on return (the
        ``skip_autocommit_rollback`` option would leave it open)."""
        return dialect.driver == "psycopg" and not getattr(
            dialect, "skip_autocommit_rollback", False
        )

    def run(self, connection: Connection, begin: str, parameters: dict[str, Any]) -> Trip:
        """Send the query on ``connection`` (in autocommit mode, not in a
        transaction); the dispatch's transaction, opened with ``begin``
        (:func:`begin_command`), is open afterwards.

        :raises sqlalchemy.exc.DBAPIError: the query failed, before or
            after the claim's COMMIT (the caller looks the claim up).
        """
        from psycopg import ClientCursor  # noqa: PLC0415 (the [postgres] extra)

        script = self._before_begin + begin + self._after_begin
        values = {
            **self._claim.values(parameters),
            **self._mark_done.values(parameters),
            **self._state.values(parameters),
        }
        with driver_cursor(connection, script, self._dialect, ClientCursor) as cursor:
            cursor.execute(script, values)
            # BEGIN: no rows.
            cursor.nextset()
            claimed = self._claim.rows(cursor)
            # COMMIT, BEGIN: no rows.
            cursor.nextset()
            cursor.nextset()
            cursor.nextset()
            marked = self._mark_done.rows(cursor)
            cursor.nextset()
            state = self._state.rows(cursor)
        return Trip(
            claimed=claimed[0] if claimed else None,
            marked=bool(marked),
            state=state[0] if state else None,
        )


def begin_command(engine: Engine) -> str | None:
    """The BEGIN psycopg would send on a connection of ``engine``: with the
    isolation level the engine sets (``create_engine(isolation_level=…)`` or
    its execution options), else the server's default. ``None`` for an
    engine in autocommit mode or with read-only or deferrable transactions,
    which keep the usual statements."""
    options = engine.get_execution_options()
    if options.get("postgresql_readonly") or options.get("postgresql_deferrable"):
        return None
    # SQLAlchemy keeps create_engine's level here, and gives it back to each
    # connection returned to the pool (what the dispatch's BEGIN must open).
    # Not knowing it would mean guessing: the usual path then.
    if not hasattr(engine.dialect, "_on_connect_isolation_level"):
        return None
    level = options.get("isolation_level", engine.dialect._on_connect_isolation_level)
    if level is None:
        return "BEGIN"
    # SQLAlchemy takes "repeatable_read" as well as "REPEATABLE READ".
    level = str(level).upper().replace("_", " ")
    if level not in _LEVELS:
        return None
    return f"BEGIN ISOLATION LEVEL {level}"


_LEVELS = frozenset({"READ UNCOMMITTED", "READ COMMITTED", "REPEATABLE READ", "SERIALIZABLE"})


def _check_shared_names(*statements: DriverStatement) -> None:
    """The statements share one parameter dict: a name two of them use must
    mean one value (a literal SQLAlchemy named ``param_1`` in two of them
    would otherwise take the other's value)."""
    seen: dict[str, Any] = {}
    for statement in statements:
        for name, value in statement.values_given().items():
            if name in seen and seen[name] != value:
                raise ValueError(f"Parameter {name!r} means two values in one query.")
            seen[name] = value
