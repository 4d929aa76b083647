"""The store's SQL, per database: written by SQLAlchemy's dialect compilers, compiled once."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Dialect

from ..driver_statement import DriverStatement
from .table import BODY, DEAD, DONE, FAILED, PENDING, PROCESSING, REFERENCE, WHEN

#: What the failure record and the due claim hand back: a whole row.
ROW_COLUMNS = (
    "provider",
    "callback",
    "key",
    "status",
    "attempts",
    "claim_token",
    "body",
    "headers",
    "error",
    "created_at",
    "updated_at",
    "lease_expires_at",
    "next_attempt_at",
    "reference",
    "failures",
    "compacted_at",
)


#: The error of an attempt whose worker never came back.
LEASE_LOST = (
    "LeaseExpired: the attempt did not finish within ORDERHOOKS_CLAIM_TIMEOUT "
    "(its worker died or hung)."
)


class Statements:
    """The store's statements, with bound parameters named ``p_*``."""

    #: Whether the writes that may wait for a row lock bound the wait
    #: themselves (``p_lock_wait``: MariaDB's SET STATEMENT); PostgreSQL's
    #: carry ``lock_timeout`` in ``p_ms``.
    statement_lock_wait = False

    def __init__(self, t: sa.Table, engine_dialect: Dialect) -> None:
        dialect = engine_dialect.name
        when = WHEN
        key = (
            t.c.provider == sa.bindparam("p_provider"),
            t.c.callback == sa.bindparam("p_callback"),
            t.c.key == sa.bindparam("p_key"),
        )
        whole_row = [t.c[name] for name in ROW_COLUMNS]
        insert = dialect_insert(dialect)
        # The claim (inline dispatch): inserted as processing, its lease
        # being when a worker should look again if this one dies.
        claim_insert = insert(t)
        claim_insert = _with_row(
            claim_insert,
            dialect,
            new_row(t, status=PROCESSING, attempts=1, lease="p_lease", due="p_lease"),
            relax_commit=True,
        )
        takeover = claim_takeover(t, claim_insert.excluded.body_sha256)
        claim = claim_insert.on_conflict_do_update(
            index_elements=[t.c.provider, t.c.callback, t.c.key],
            set_={
                "status": PROCESSING,
                # A processing row is taken over only when its lease ran
                # out (``takeover``): its attempt is lost, and kept as the
                # workers' due claim keeps it. SET reads the old row.
                **record_lost_attempt(t, t.c.status == PROCESSING),
                "attempts": t.c.attempts + 1,
                "claim_token": claim_insert.excluded.claim_token,
                "lease_expires_at": claim_insert.excluded.lease_expires_at,
                "next_attempt_at": claim_insert.excluded.next_attempt_at,
                "updated_at": claim_insert.excluded.updated_at,
            },
            where=takeover,
        ).returning(t.c.claim_token, t.c.attempts)
        # The acceptance (deferred dispatch): inserted as pending and due now.
        # Its commit is synchronous, unlike the claim's: no later commit of
        # this request makes it durable, and the answer says "done".
        accept_insert = _with_row(
            insert(t),
            dialect,
            new_row(t, status=PENDING, attempts=0, lease="p_now", due="p_now"),
            relax_commit=False,
        )
        # DO NOTHING, not DO UPDATE … WHERE: PostgreSQL locks the existing row
        # for DO UPDATE even when its condition fails, which gives a mere
        # duplicate a transaction id, a WAL record and a synchronous flush.
        accept = accept_insert.on_conflict_do_nothing(
            index_elements=[t.c.provider, t.c.callback, t.c.key],
        ).returning(t.c.claim_token)
        revivable = [*key, accept_takeover(t, sa.bindparam("p_digest"))]
        if dialect == "postgresql":
            # A row a worker holds would make the update wait: bounded.
            revivable.append(_lock_timeout())
        revive = (
            sa.update(t)
            .where(*revivable)
            .values(
                status=PENDING,
                claim_token=sa.bindparam("p_token"),
                # Made due again after its worker died: that attempt is lost,
                # kept as the due claim keeps it (the worker that takes the
                # row next finds it pending, not processing).
                **record_lost_attempt(t, t.c.status == PROCESSING),
                next_attempt_at=sa.bindparam("p_now", type_=when),
                updated_at=sa.bindparam("p_now", type_=when),
            )
            .returning(t.c.claim_token)
        )
        state = sa.select(t.c.status, t.c.body_sha256, t.c.lease_expires_at).where(*key)
        # The two fences below hold no "status = <value>" condition, on
        # purpose: once autoanalyze has seen that almost no row is
        # 'processing', PostgreSQL's custom plans prefer the (status,
        # updated_at) index for such a condition over the primary key, and
        # that index keeps a dead 'processing' entry per recent delivery
        # (tests/test_store_plans.py). The claim token alone fences the
        # dispatch: only a takeover changes it, and a worker marks its own
        # claim done at most once.
        mark_done = (
            sa.update(t)
            .where(*key, t.c.claim_token == sa.bindparam("p_token"))
            .values(
                status=DONE,
                next_attempt_at=None,
                updated_at=sa.bindparam("p_now", type_=when),
            )
            .returning(t.c.attempts)
        )
        # Fenced by status too: after a COMMIT whose answer was lost, the row
        # may be done with the receivers' writes committed; it must stay so.
        # ("<> done" rather than "= processing": the same thing for a row
        # that still holds this token, and no index can serve it.) The
        # status (failed or dead) and the next attempt come from the retry
        # schedule.
        failed_fence = [*key, t.c.claim_token == sa.bindparam("p_token"), t.c.status != DONE]
        if dialect == "postgresql":
            # A backend whose client is gone (a partition, a lost COMMIT
            # answer) can hold the row until the server notices: bounded.
            failed_fence.append(_lock_timeout())
        mark_failed = (
            sa.update(t)
            .where(*failed_fence)
            .values(
                status=sa.bindparam("p_status", type_=t.c.status.type),
                error=sa.bindparam("p_error"),
                # The attempts that ran: a due claim that found its lease
                # lost has counted one that a dead last attempt never made.
                attempts=sa.bindparam("p_attempts", type_=sa.Integer),
                failures=append_failure(t, sa.bindparam("p_failure", type_=t.c.failures.type)),
                next_attempt_at=sa.bindparam("p_next", type_=when),
                updated_at=sa.bindparam("p_now", type_=when),
            )
            .returning(*whole_row)
        )
        #: Rows: (claim_token, attempts) when this claim won, else none.
        self.claim = DriverStatement(claim, engine_dialect)
        #: Rows: (claim_token,) when this request stored it.
        self.accept = DriverStatement(accept, engine_dialect)
        #: Rows: (claim_token,) when this request made it due again.
        self.revive = DriverStatement(revive, engine_dialect)
        #: Rows: (status, body_sha256, lease_expires_at).
        self.state = DriverStatement(state, engine_dialect)
        #: Rows: (status, claim_token): whose claim the row's status is.
        self.owner = DriverStatement(
            sa.select(t.c.status, t.c.claim_token).where(*key), engine_dialect
        )
        #: Rows: (attempts,) when the claim was still this worker's.
        self.mark_done = DriverStatement(mark_done, engine_dialect)
        #: Rows: the whole row (ROW_COLUMNS) when the claim was still this worker's.
        self.mark_failed = DriverStatement(mark_failed, engine_dialect)
        #: Rows: the claimed row (ROW_COLUMNS), if any delivery was due.
        relax = dialect == "postgresql"
        self.claim_due = DriverStatement(
            _claim_due(t, only_key=False, relax_commit=relax), engine_dialect
        )
        #: The same for one given delivery.
        self.claim_due_key = DriverStatement(
            _claim_due(t, only_key=True, relax_commit=relax), engine_dialect
        )

    def claimed_state(
        self, connection: Connection, params: dict[str, Any], row: tuple[Any, ...] | None
    ) -> tuple[Any, ...] | None:
        """(status, body_sha256, lease_expires_at) of a delivery whose claim
        returned ``row`` and did not win, read in the claim's transaction."""
        return self.state.first(connection, params)

    @staticmethod
    def accepted_state(row: tuple[Any, ...] | None) -> tuple[Any, ...] | None:
        """The state an acceptance that did not store the row returned:
        none here (``ON CONFLICT DO NOTHING`` returns nothing), so read it."""
        return None


def _lock_timeout() -> sa.ColumnElement[bool]:
    """A condition that sets PostgreSQL's ``lock_timeout`` to ``p_ms`` for the
    statement's transaction, evaluated before the update waits for a row."""
    return sa.func.set_config("lock_timeout", sa.bindparam("p_ms"), True).is_not(None)


def claim_takeover(t: sa.Table, digest: Any) -> sa.ColumnElement[bool]:
    """When a claim takes an existing row over: a failed, dead or pending
    delivery, a claim whose worker died (lease over), or a done one when
    replay is forced and it is still in the state the operator saw; never
    another body.

    A forced claim passes ``p_takeover = 'done'``, ``p_seen_attempts``, the
    attempts it saw, and ``p_seen_created``, when the row it saw was
    stored; an unforced one ``'failed'`` and ``-1``, which no row has (the
    failed rows it takes match the condition before). The attempts are
    checked here, in the claim's own statement, because every claim adds
    one: of two forced replays of the same done state (a double submit, two
    operators), the second finds one attempt more and takes nothing over,
    however the two interleave. The creation time tells the row seen from
    one stored anew after purge deleted it (by the first of those forced
    replays, at attempt 1 again: the attempts alone would match), and a
    tombstone is never taken over (purge compacted the row since it was
    read: there is no body to retry a failed attempt with). Plain
    comparisons, not one of concatenated text: on MySQL a concatenation of
    the column and a cast has no collation when the column's differs from
    the connection's, and the server would refuse every claim (error
    1267)."""
    return sa.and_(
        sa.or_(
            t.c.status == FAILED,
            t.c.status == DEAD,
            t.c.status == PENDING,
            sa.and_(
                t.c.status == sa.bindparam("p_takeover"),
                t.c.attempts == sa.bindparam("p_seen_attempts", type_=sa.Integer),
                t.c.created_at <= sa.bindparam("p_seen_created", type_=WHEN),
                t.c.compacted_at.is_(None),
            ),
            abandoned(t),
        ),
        t.c.body_sha256 == digest,
    )


#: ``p_seen_attempts`` of a claim that is not forced: no row has it.
NOT_FORCED = -1
#: ``p_seen_created`` when the caller did not say when the row it saw was
#: stored: every row was stored before it.
SEEN_ANY_TIME = datetime(9999, 12, 31, tzinfo=UTC)


def accept_takeover(t: sa.Table, digest: Any) -> sa.ColumnElement[bool]:
    """When a deferred resend makes an existing row due now: failed, dead, or
    abandoned by its worker (a row stored by 0.1 has no due time, so no
    worker would ever find it); never another body."""
    return sa.and_(
        sa.or_(t.c.status == FAILED, t.c.status == DEAD, abandoned(t)),
        t.c.body_sha256 == digest,
    )


def abandoned(t: sa.Table) -> sa.ColumnElement[bool]:
    """A processing row whose lease ran out: its worker died or hung."""
    return sa.and_(
        t.c.status == PROCESSING,
        t.c.lease_expires_at < sa.bindparam("p_now", type_=WHEN),
    )


def _claim_due(t: sa.Table, *, only_key: bool, relax_commit: bool) -> Any:
    """Take the delivery due soonest (or the given one, if due) for this worker.

    One statement: the sub-select finds the row and, on PostgreSQL, locks it
    with ``FOR UPDATE SKIP LOCKED``, so workers on many hosts never wait on
    one another's rows and never take the same one; the update claims it
    (committed alone, like the request's claim). SQLite has one writer at a
    time, which serialises workers instead.

    Done and dead rows hold no due time, so the index on ``next_attempt_at``
    serves the search whatever the table's size. A processing row is due when
    its lease ran out: its worker died, and that attempt counts as failed.
    The token tells the two cases apart afterwards (``SET`` reads the old
    row): ``p_lost_token`` when the row was processing, else ``p_token``.

    On PostgreSQL its commit skips the WAL flush, like the request's claim:
    the dispatch's synchronous COMMIT flushes it first, and a claim lost in
    a crash leaves the delivery due, to be claimed again.
    """
    when = WHEN
    due = sa.select(t.c.provider, t.c.callback, t.c.key).where(
        t.c.next_attempt_at <= sa.bindparam("p_now", type_=when)
    )
    if only_key:
        due = due.where(
            t.c.provider == sa.bindparam("p_provider"),
            t.c.callback == sa.bindparam("p_callback"),
            t.c.key == sa.bindparam("p_key"),
        )
    found = (
        due.order_by(t.c.next_attempt_at)
        # Written into the SQL: a LIMIT parameter leaves PostgreSQL's generic
        # plan guessing how many rows come back, and it then hashed them and
        # scanned the whole table for the update.
        .limit(sa.literal_column("1", sa.Integer))
        .with_for_update(skip_locked=True)
        .subquery("due")
    )
    return (
        sa.update(t)
        .where(
            t.c.provider == found.c.provider,
            t.c.callback == found.c.callback,
            t.c.key == found.c.key,
            *(
                [sa.func.set_config("synchronous_commit", "off", True).is_not(None)]
                if relax_commit
                else []
            ),
        )
        .values(
            status=PROCESSING,
            attempts=t.c.attempts + 1,
            claim_token=sa.case(
                (t.c.status == PROCESSING, sa.bindparam("p_lost_token")),
                else_=sa.bindparam("p_token"),
            ),
            **record_lost_attempt(t, t.c.status == PROCESSING),
            lease_expires_at=sa.bindparam("p_lease", type_=when),
            next_attempt_at=sa.bindparam("p_lease", type_=when),
            updated_at=sa.bindparam("p_now", type_=when),
        )
        .returning(*[t.c[name] for name in ROW_COLUMNS])
    )


def record_lost_attempt(t: sa.Table, lost: sa.ColumnElement[bool]) -> dict[str, Any]:
    """The assignments that keep a lost attempt, when ``lost`` holds (on the
    old row), as any failed attempt is kept: its error, and its line in the
    history (``p_lost_line``: :func:`lost_line_suffix`). Whoever takes such
    a row over writes these: a worker's due claim, a resend's or a replay's
    claim, a deferred resend's revival. On MySQL put them before
    ``attempts`` and ``status`` in the SET list (see :func:`lost_attempt_line`)."""
    return {
        "error": sa.case((lost, sa.literal(LEASE_LOST, t.c.error.type)), else_=t.c.error),
        "failures": sa.case((lost, append_failure(t, lost_attempt_line(t))), else_=t.c.failures),
    }


def append_failure(t: sa.Table, line: Any) -> Any:
    """``failures`` with ``line`` appended (``||``, or MySQL's ``concat()``)."""
    return sa.func.coalesce(t.c.failures, sa.literal("", t.c.failures.type)) + line


def lost_attempt_line(t: sa.Table) -> Any:
    """The history line of an attempt whose lease ran out, built in SQL: only
    the row knows which attempt it was. The attempt count must be the old
    one: on MySQL, put this before ``attempts`` in the SET list."""
    attempt = sa.cast(t.c.attempts, sa.String(12))
    return (
        sa.literal('{"attempt": ', t.c.failures.type)
        + attempt
        + sa.bindparam("p_lost_line", type_=t.c.failures.type)
    )


def lost_line_suffix(at: datetime) -> str:
    """What follows the attempt number in :func:`lost_attempt_line`: the
    rest of :func:`~.table.failure_line`'s object for a lost attempt."""
    # Every claim sends one, in case it takes a lost attempt over: written
    # by hand, 2 µs where json.dumps took 8 µs a claim. An ISO time holds
    # nothing JSON escapes (tests/test_takeover_lost_attempt.py compares the two).
    return f', "at": "{at.isoformat()}", "error": {_LEASE_LOST_JSON}}}\n'


_LEASE_LOST_JSON = json.dumps(LEASE_LOST)


def new_row(t: sa.Table, *, status: str, attempts: int, lease: str, due: str) -> dict[str, Any]:
    when = WHEN
    return {
        "provider": sa.bindparam("p_provider", type_=t.c.provider.type),
        "callback": sa.bindparam("p_callback", type_=t.c.callback.type),
        "key": sa.bindparam("p_key", type_=t.c.key.type),
        "status": sa.literal(status, t.c.status.type),
        "attempts": sa.literal(attempts, sa.Integer),
        "claim_token": sa.bindparam("p_token", type_=t.c.claim_token.type),
        "lease_expires_at": sa.bindparam(lease, type_=when),
        "body": sa.bindparam("p_body", type_=BODY),
        "body_sha256": sa.bindparam("p_digest", type_=t.c.body_sha256.type),
        "headers": sa.bindparam("p_headers", type_=t.c.headers.type),
        "created_at": sa.bindparam("p_now", type_=when),
        "updated_at": sa.bindparam("p_now", type_=when),
        "next_attempt_at": sa.bindparam(due, type_=when),
        "reference": sa.bindparam("p_reference", type_=REFERENCE),
    }


def _with_row(insert: Any, dialect: str, row: dict[str, Any], *, relax_commit: bool) -> Any:
    if dialect != "postgresql":
        return insert.values(row)
    # The statement's settings ride in the INSERT itself, which saves a round
    # trip: its row comes from a sub-select that sets them (is_local: for the
    # statement's own transaction only) before the conflict check can wait.
    # lock_timeout bounds that wait. With synchronous_commit off (the claim
    # only) the commit skips the WAL flush, which is safe because the
    # dispatch's COMMIT is synchronous and PostgreSQL flushes WAL in order:
    # when a delivery is answered "done" its claim is on disk too, and a
    # server crash before then loses only an unanswered claim, which the
    # platform sends again.
    settings = [sa.func.set_config("lock_timeout", sa.bindparam("p_ms"), True).label("lt")]
    if relax_commit:
        settings.append(sa.func.set_config("synchronous_commit", "off", True).label("sc"))
    sub = sa.select(*settings).subquery("claim_settings")
    source = (
        sa.select(*row.values())
        .select_from(sub)
        # Referenced, so the planner cannot drop the sub-select.
        .where(*[column.is_not(None) for column in sub.c])
    )
    return insert.from_select(list(row), source)


def dialect_insert(dialect: str) -> Callable[[sa.Table], Any]:
    if dialect == "postgresql":
        return postgresql.insert
    if dialect == "sqlite":
        return sqlite.insert
    raise ValueError(
        f"The {dialect!r} database is not supported by the delivery store; "
        "use PostgreSQL or SQLite."
    )
