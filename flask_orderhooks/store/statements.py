"""The store's SQL, per database: written by SQLAlchemy's dialect compilers, compiled once."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Dialect

from ..driver_statement import DriverStatement
from .table import DONE, FAILED, PROCESSING


class Statements:
    """The store's statements, with bound parameters named ``p_*``."""

    def __init__(self, t: sa.Table, engine_dialect: Dialect) -> None:
        dialect = engine_dialect.name
        when = sa.DateTime(timezone=True)
        key = (
            t.c.provider == sa.bindparam("p_provider"),
            t.c.callback == sa.bindparam("p_callback"),
            t.c.key == sa.bindparam("p_key"),
        )
        row = {
            "provider": sa.bindparam("p_provider", type_=t.c.provider.type),
            "callback": sa.bindparam("p_callback", type_=t.c.callback.type),
            "key": sa.bindparam("p_key", type_=t.c.key.type),
            "status": sa.literal(PROCESSING, t.c.status.type),
            "attempts": sa.literal(1, sa.Integer),
            "claim_token": sa.bindparam("p_token", type_=t.c.claim_token.type),
            "lease_expires_at": sa.bindparam("p_lease", type_=when),
            "body": sa.bindparam("p_body", type_=sa.LargeBinary),
            "body_sha256": sa.bindparam("p_digest", type_=t.c.body_sha256.type),
            "headers": sa.bindparam("p_headers", type_=t.c.headers.type),
            "created_at": sa.bindparam("p_now", type_=when),
            "updated_at": sa.bindparam("p_now", type_=when),
        }
        insert = dialect_insert(dialect)(t)
        if dialect == "postgresql":
            # The claim's settings ride in the INSERT itself, which saves a
            # round trip: its row comes from a sub-select that sets them
            # (is_local: for the statement's own transaction only) before the
            # conflict check can wait. lock_timeout bounds that wait; with
            # synchronous_commit off the claim's commit skips the WAL flush,
            # which is safe because the dispatch's COMMIT is synchronous and
            # PostgreSQL flushes WAL in order: when a delivery is answered
            # "done" its claim is on disk too, and a server crash before then
            # loses only an unanswered claim, which the platform sends again.
            settings = sa.select(
                sa.func.set_config("lock_timeout", sa.bindparam("p_ms"), True).label("lt"),
                sa.func.set_config("synchronous_commit", "off", True).label("sc"),
            ).subquery("claim_settings")
            source = (
                sa.select(*row.values())
                .select_from(settings)
                # Referenced, so the planner cannot drop the sub-select.
                .where(settings.c.lt.is_not(None), settings.c.sc.is_not(None))
            )
            insert = insert.from_select(list(row), source)
        else:
            insert = insert.values(row)
        # Taken over: a failed attempt, a claim whose worker died (lease
        # over), or a done one when replay is forced; never another body.
        takeover = sa.and_(
            sa.or_(
                t.c.status == FAILED,
                t.c.status == sa.bindparam("p_takeover"),
                sa.and_(
                    t.c.status == PROCESSING,
                    t.c.lease_expires_at < sa.bindparam("p_now", type_=when),
                ),
            ),
            t.c.body_sha256 == insert.excluded.body_sha256,
        )
        claim = insert.on_conflict_do_update(
            index_elements=[t.c.provider, t.c.callback, t.c.key],
            set_={
                "status": PROCESSING,
                "attempts": t.c.attempts + 1,
                "claim_token": insert.excluded.claim_token,
                "lease_expires_at": insert.excluded.lease_expires_at,
                "updated_at": insert.excluded.updated_at,
            },
            where=takeover,
        ).returning(t.c.claim_token, t.c.attempts)
        state = sa.select(t.c.status, t.c.body_sha256).where(*key)
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
            .values(status=DONE, updated_at=sa.bindparam("p_now", type_=when))
            .returning(t.c.attempts)
        )
        # Fenced by status too: after a COMMIT whose answer was lost, the row
        # may be done with the receivers' writes committed; it must stay so.
        # ("<> done" rather than "= processing": the same thing for a row
        # that still holds this token, and no index can serve it.)
        mark_failed = (
            sa.update(t)
            .where(*key, t.c.claim_token == sa.bindparam("p_token"), t.c.status != DONE)
            .values(
                status=FAILED,
                error=sa.bindparam("p_error"),
                updated_at=sa.bindparam("p_now", type_=when),
            )
        )
        #: Rows: (claim_token, attempts) when this claim won, else none.
        self.claim = DriverStatement(claim, engine_dialect)
        #: Rows: (status, body_sha256).
        self.state = DriverStatement(state, engine_dialect)
        #: Rows: (attempts,) when the claim was still this worker's.
        self.mark_done = DriverStatement(mark_done, engine_dialect)
        self.mark_failed = DriverStatement(mark_failed, engine_dialect)


def dialect_insert(dialect: str) -> Callable[[sa.Table], Any]:
    if dialect == "postgresql":
        return postgresql.insert
    if dialect == "sqlite":
        return sqlite.insert
    raise ValueError(
        f"The {dialect!r} database is not supported by the delivery store; "
        "use PostgreSQL or SQLite."
    )
