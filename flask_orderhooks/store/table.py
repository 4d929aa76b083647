"""The deliveries table: its columns, its statuses, and the rows read from it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

import sqlalchemy as sa

TABLE_NAME = "orderhooks_deliveries"
#: Longest idempotency key stored; fits a unique index on every backend.
MAX_KEY_LENGTH = 191
#: Longest error text kept for a failed attempt.
MAX_ERROR_LENGTH = 2000

#: Stored, waiting for a worker (deferred dispatch).
PENDING = "pending"
#: Claimed by a worker until ``lease_expires_at``.
PROCESSING = "processing"
#: Every receiver returned and their writes committed with the mark.
DONE = "done"
#: An attempt failed; the next one is due at ``next_attempt_at``.
FAILED = "failed"
#: Every local attempt failed; only a platform's resend or a replay revives it.
DEAD = "dead"
STATUSES = (PENDING, PROCESSING, DONE, FAILED, DEAD)

#: The index a worker's due query reads; done and dead rows hold NULL there.
DUE_INDEX = "ix_orderhooks_deliveries_due"


def deliveries_table(metadata: sa.MetaData) -> sa.Table:
    """The ``orderhooks_deliveries`` table in ``metadata`` (created once)."""
    existing = metadata.tables.get(TABLE_NAME)
    if existing is not None:
        return existing
    return sa.Table(
        TABLE_NAME,
        metadata,
        sa.Column("provider", sa.String(16), primary_key=True),
        sa.Column("callback", sa.String(32), primary_key=True),
        sa.Column("key", sa.String(MAX_KEY_LENGTH), primary_key=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("claim_token", sa.String(32), nullable=False),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("body", sa.LargeBinary, nullable=False),
        sa.Column("body_sha256", sa.String(64), nullable=False),
        sa.Column("headers", sa.Text, nullable=False),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        # When a worker should next look at the row: a pending or failed
        # delivery's next attempt, a processing one's lease end (its worker
        # may have died). NULL once done or dead, and on rows stored by 0.1,
        # which is why it is nullable: adding it keeps every old row.
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Index("ix_orderhooks_deliveries_status_updated", "status", "updated_at"),
        due_index(),
    )


def due_index(column: str = "next_attempt_at") -> sa.Index:
    """The index the workers' due query reads: partial, so done and dead rows
    (NULL) cost it nothing to store or to maintain, however many a shop keeps.
    The due query's ``next_attempt_at <= :now`` implies the predicate, which
    both PostgreSQL and SQLite recognise."""
    where = sa.column(column).is_not(None)
    return sa.Index(DUE_INDEX, column, postgresql_where=where, sqlite_where=where)


@dataclass(frozen=True)
class Claim:
    """This worker owns a delivery's current attempt."""

    token: str
    attempt: int


@dataclass(frozen=True)
class StoredDelivery:
    """A row of the store, as the CLI and tests read it."""

    provider: str
    callback: str
    key: str
    status: str
    attempts: int
    body: bytes
    headers: dict[str, str]
    error: str | None
    created_at: datetime
    updated_at: datetime
    lease_expires_at: datetime
    #: When the next attempt is due (a processing row: its lease end), or
    #: ``None`` when no attempt is planned (done, dead, or stored by 0.1).
    next_attempt_at: datetime | None = None


#: What the request path did: ran the receivers, found the delivery done (or,
#: deferred, already stored), or stored it for a worker.
Outcome = Literal["dispatched", "duplicate", "accepted"]
