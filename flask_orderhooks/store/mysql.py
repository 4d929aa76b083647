"""The store's SQL for MySQL and MariaDB (InnoDB).

They have ``INSERT … ON DUPLICATE KEY UPDATE`` but no ``RETURNING`` on it
(MariaDB's ``INSERT … RETURNING`` is its own, MySQL has none), so each
operation is a few statements, written so that both MySQL 8 and MariaDB ≥
10.6 accept them: in autocommit mode on the store's own pool where each may
commit alone (the claim, the acceptance, plain reads:
:mod:`.mysql_autocommit`), in one short transaction otherwise (the failure
record, the workers' due claim). Each exposes ``first(connection,
params)`` with the same rows as :class:`~.statements.Statements` (the claim's
and the acceptance's followed by the row's state, which
:meth:`~MySQLStatements.claimed_state` and
:meth:`~MySQLStatements.accepted_state` hand on), so the state machine in
:mod:`.delivery_store` is the same for every database.

Two MySQL rules shape the SQL:

- ``ON DUPLICATE KEY UPDATE`` assigns left to right, and a later assignment
  sees the earlier ones' new values. The first assignment decides (the claim
  token changes only on a takeover); every later one asks "is the token now
  mine?", and ``status`` and ``lease_expires_at``, which the decision reads,
  change last.
- ``UPDATE`` and locking reads act on the latest committed row whatever the
  transaction's snapshot, so REPEATABLE READ (the default) never hides a
  claim from the done mark.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Connection, Dialect

from ..driver_statement import DriverStatement
from .statements import (
    ROW_COLUMNS,
    abandoned,
    accept_takeover,
    append_failure,
    claim_takeover,
    new_row,
    record_lost_attempt,
)
from .table import DONE, PENDING, PROCESSING, WHEN

#: MariaDB's per-statement setting: the row-lock wait bounded for the one
#: statement that may wait, with no SET before and after it (two round trips).
#: MySQL 8 has no SET STATEMENT: there the session variable is set around the
#: transaction (``errors.mysql_lock_wait``).
_LOCK_WAIT = ("SET STATEMENT innodb_lock_wait_timeout = {} FOR", "p_lock_wait")

#: The insert id (``LAST_INSERT_ID``, in the statement's OK packet) of an
#: upsert that inserted its row: its VALUES call ``LAST_INSERT_ID(1)``, and on
#: a duplicate key its update calls ``LAST_INSERT_ID(attempts + 2)``, 2 or
#: more. An upsert that inserted knows its row without reading it back, which
#: saves every first delivery a round trip; any other id reads it (0 too: a
#: server that reports none falls back to the read).
INSERTED = 1
_ON_DUPLICATE = 2


class MySQLStatements:
    """The store's operations on MySQL and MariaDB.

    ``statement_lock_wait`` (MariaDB): the writes that may wait for another
    transaction's row lock (the claim, the acceptance, the revival, the
    failure record) carry their own bound, ``p_lock_wait`` whole seconds.
    """

    def __init__(
        self, t: sa.Table, dialect: Dialect, *, statement_lock_wait: bool | None = None
    ) -> None:
        if statement_lock_wait is None:
            # The prefix is written for PyMySQL's (and mysqlclient's)
            # paramstyle; MariaDB Connector/Python's qmark keeps the session's.
            statement_lock_wait = bool(getattr(dialect, "is_mariadb", False)) and (
                dialect.paramstyle in ("format", "pyformat")
            )
        self.statement_lock_wait = statement_lock_wait
        waits = _LOCK_WAIT if self.statement_lock_wait else None
        key = (
            t.c.provider == sa.bindparam("p_provider"),
            t.c.callback == sa.bindparam("p_callback"),
            t.c.key == sa.bindparam("p_key"),
        )
        mine = t.c.claim_token == sa.bindparam("p_token")

        def then(value: Any, column: sa.Column[Any]) -> Any:
            return sa.case((mine, value), else_=column)

        digest: sa.BindParameter[str] = sa.bindparam("p_digest")
        lease = sa.bindparam("p_lease", type_=WHEN)
        now = sa.bindparam("p_now", type_=WHEN)
        # A takeover of a row whose worker died: its attempt is lost, and
        # kept as the due claim keeps it. Asked of the old row (status and
        # lease change last, attempts after the history line that names
        # it), not as "mine": a claim run once more after a lost connection
        # finds its own claim, live, and must not record a lost attempt.
        lost = record_lost_attempt(t, sa.and_(abandoned(t), t.c.body_sha256 == digest))
        claim = _upsert(
            t,
            _marked(new_row(t, status=PROCESSING, attempts=1, lease="p_lease", due="p_lease")),
            claim_takeover(t, digest),
            [
                *lost.items(),
                ("attempts", _on_duplicate(then(t.c.attempts + 1, t.c.attempts))),
                ("next_attempt_at", then(lease, t.c.next_attempt_at)),
                ("updated_at", then(now, t.c.updated_at)),
                ("lease_expires_at", then(lease, t.c.lease_expires_at)),
                ("status", then(PROCESSING, t.c.status)),
            ],
        )
        accept = _upsert(
            t,
            _marked(new_row(t, status=PENDING, attempts=0, lease="p_now", due="p_now")),
            accept_takeover(t, digest),
            [
                *lost.items(),
                ("attempts", _on_duplicate(t.c.attempts)),
                ("next_attempt_at", then(now, t.c.next_attempt_at)),
                ("updated_at", then(now, t.c.updated_at)),
                ("status", then(PENDING, t.c.status)),
            ],
        )
        # The read-backs end with the row's state (status, digest, lease), so
        # a duplicate learns it without a statement more.
        state_columns = (t.c.status, t.c.body_sha256, t.c.lease_expires_at)
        claim_row = sa.select(t.c.claim_token, t.c.attempts, *state_columns).where(*key)
        accept_row = sa.select(t.c.claim_token, *state_columns).where(*key)
        whole_row = sa.select(*[t.c[name] for name in ROW_COLUMNS]).where(*key)
        mark_done = (
            sa.update(t).where(*key, mine).values(status=DONE, next_attempt_at=None, updated_at=now)
        )
        mark_failed = (
            sa.update(t)
            .where(*key, mine, t.c.status != DONE)
            .values(
                status=sa.bindparam("p_status", type_=t.c.status.type),
                error=sa.bindparam("p_error"),
                # The attempts that ran: a due claim that found its lease
                # lost has counted one that a dead last attempt never made.
                attempts=sa.bindparam("p_attempts", type_=sa.Integer),
                failures=append_failure(t, sa.bindparam("p_failure", type_=t.c.failures.type)),
                next_attempt_at=sa.bindparam("p_next", type_=WHEN),
                updated_at=now,
            )
        )
        was_processing = t.c.status == PROCESSING
        take_due = (
            sa.update(t)
            .where(*key)
            .ordered_values(
                (
                    t.c.claim_token,
                    sa.case(
                        (was_processing, sa.bindparam("p_lost_token")),
                        else_=sa.bindparam("p_token"),
                    ),
                ),
                # Before attempts: the line names the lost (old) attempt.
                *record_lost_attempt(t, was_processing).items(),
                (t.c.attempts, t.c.attempts + 1),
                (t.c.lease_expires_at, lease),
                (t.c.next_attempt_at, lease),
                (t.c.updated_at, now),
                (t.c.status, PROCESSING),
            )
        )
        self.claim = _UpsertThenRead(
            DriverStatement(claim, dialect, prefix=waits),
            DriverStatement(claim_row, dialect),
            inserted=lambda p: (p["p_token"], 1, PROCESSING, p["p_digest"], p["p_lease"]),
        )
        self.accept = _UpsertThenRead(
            DriverStatement(accept, dialect, prefix=waits),
            DriverStatement(accept_row, dialect),
            inserted=lambda p: (p["p_token"], PENDING, p["p_digest"], p["p_now"]),
        )
        self.state = DriverStatement(
            sa.select(t.c.status, t.c.body_sha256, t.c.lease_expires_at).where(*key), dialect
        )
        self.owner = DriverStatement(sa.select(t.c.status, t.c.claim_token).where(*key), dialect)
        # The acceptance's upsert revives already; this serves a resend that
        # lost a race against another statement on the row.
        self.revive = _UpdateThenRead(
            DriverStatement(
                sa.update(t)
                .where(*key, accept_takeover(t, digest))
                .ordered_values(
                    ("claim_token", sa.bindparam("p_token")),
                    # Before status, which they read (old row).
                    *record_lost_attempt(t, t.c.status == PROCESSING).items(),
                    ("next_attempt_at", now),
                    ("updated_at", now),
                    ("status", PENDING),
                ),
                dialect,
                prefix=waits,
            ),
            DriverStatement(sa.select(t.c.claim_token).where(*key), dialect),
        )
        self.mark_done = _UpdateThenRead(DriverStatement(mark_done, dialect), None)
        self.mark_failed = _UpdateThenRead(
            DriverStatement(mark_failed, dialect, prefix=waits), DriverStatement(whole_row, dialect)
        )
        found = sa.select(t.c.provider, t.c.callback, t.c.key).order_by(t.c.next_attempt_at)
        due = found.where(t.c.next_attempt_at <= now)
        self.claim_due = _TakeDue(
            DriverStatement(due.limit(1).with_for_update(skip_locked=True), dialect),
            DriverStatement(take_due, dialect),
            DriverStatement(whole_row, dialect),
        )
        self.claim_due_key = _TakeDue(
            DriverStatement(due.where(*key).limit(1).with_for_update(skip_locked=True), dialect),
            DriverStatement(take_due, dialect),
            DriverStatement(whole_row, dialect),
        )

    @staticmethod
    def claimed_state(
        connection: Connection, params: dict[str, Any], row: tuple[Any, ...] | None
    ) -> tuple[Any, ...] | None:
        """(status, body_sha256, lease_expires_at) of a delivery whose claim
        returned ``row`` and did not win: the read-back's last columns."""
        return None if row is None else row[2:]

    @staticmethod
    def accepted_state(row: tuple[Any, ...] | None) -> tuple[Any, ...] | None:
        """The same after an acceptance (``None``: read it)."""
        return None if row is None else row[1:]


def _upsert(
    t: sa.Table,
    row: dict[str, Any],
    takeover: sa.ColumnElement[bool],
    then: list[tuple[str, Any]],
) -> Any:
    """``INSERT row ON DUPLICATE KEY UPDATE``: the claim token is assigned
    first, to this request's token when ``takeover`` holds (old values);
    every assignment in ``then`` comes after it and asks "is the token now
    mine?" (see the module's docstring)."""
    decide = sa.case((takeover, sa.bindparam("p_token")), else_=t.c.claim_token)
    return mysql.insert(t).values(row).on_duplicate_key_update([("claim_token", decide), *then])


def _marked(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` with its ``attempts`` set through ``LAST_INSERT_ID(1)``: the
    upsert reports :data:`INSERTED` when it inserts this row."""
    attempts = row["attempts"].value
    marked = sa.func.last_insert_id(INSERTED, type_=sa.Integer)
    if attempts != INSERTED:
        marked = marked + (attempts - INSERTED)
    return {**row, "attempts": marked}


def _on_duplicate(attempts: Any) -> Any:
    """The update's ``attempts``, unchanged in value, passed through
    ``LAST_INSERT_ID`` so that a duplicate key reports an insert id of at
    least 2 (attempts are never negative), never :data:`INSERTED`."""
    return sa.func.last_insert_id(attempts + _ON_DUPLICATE, type_=sa.Integer) - _ON_DUPLICATE


class _UpsertThenRead:
    """The upsert, then the row as it is now (the transaction's own write),
    unless the upsert inserted it: ``inserted(params)`` is that row."""

    def __init__(
        self,
        upsert: DriverStatement,
        read: DriverStatement,
        *,
        inserted: Callable[[dict[str, Any]], tuple[Any, ...]],
    ) -> None:
        self.upsert = upsert
        self.read = read
        self.inserted = inserted

    def first(self, connection: Connection, params: dict[str, Any]) -> tuple[Any, ...] | None:
        ran = self.upsert.run(connection, params)
        if ran.rowcount == 1 and ran.lastrowid == INSERTED:
            return self.inserted(params)
        return self.read.first(connection, params)


class _UpdateThenRead:
    """An update fenced by the claim token; the row (or ``(1,)``) if it matched."""

    def __init__(self, update: DriverStatement, read: DriverStatement | None) -> None:
        self.update = update
        self.read = read

    def first(self, connection: Connection, params: dict[str, Any]) -> tuple[Any, ...] | None:
        # PyMySQL reports matched rows (SQLAlchemy sets CLIENT.FOUND_ROWS).
        if not self.update.rowcount(connection, params):
            return None
        return (1,) if self.read is None else self.read.first(connection, params)


class _TakeDue:
    """``SELECT … FOR UPDATE SKIP LOCKED``, then the claim, then the row."""

    def __init__(self, find: DriverStatement, take: DriverStatement, read: DriverStatement) -> None:
        self.find = find
        self.take = take
        self.read = read

    def first(self, connection: Connection, params: dict[str, Any]) -> tuple[Any, ...] | None:
        found = self.find.first(connection, params)
        if found is None:
            return None
        where = {**params, "p_provider": found[0], "p_callback": found[1], "p_key": found[2]}
        self.take.rowcount(connection, where)
        return self.read.first(connection, where)
