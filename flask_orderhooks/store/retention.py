"""Retention: deleting old deliveries, or compacting them to tombstones, in
bounded batches that live callbacks never wait behind.

A tombstone keeps what replay protection needs (the key, the body's digest,
the status and the dates) and drops the body and the signed headers, which
are most of a row. A platform's resend of a tombstoned delivery is still a
duplicate (or, with another body, ignored), so a signature that never
expires (the gateway's) can be compacted safely where deleting it could not.

Each batch is one short transaction: it picks at most ``batch`` rows with
``FOR UPDATE SKIP LOCKED`` (PostgreSQL, MySQL; SQLite has one writer and
takes its write lock only for the batch's few milliseconds), so a row a live
callback holds is skipped, never waited for, and taken by a later batch.
The batch's statement repeats every condition, so a row that changed
between the pick and the write (done → replayed) is left alone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from .table import DONE, MYSQL, WHEN

if TYPE_CHECKING:
    from .delivery_store import DeliveryStore

logger = logging.getLogger("flask_orderhooks")

#: Rows per batch: one batch holds its locks for a few milliseconds.
BATCH = 500


@dataclass(frozen=True)
class Retained:
    """What a purge did: rows deleted, and done rows compacted to tombstones."""

    deleted: int = 0
    compacted: int = 0

    def __add__(self, other: Retained) -> Retained:
        return Retained(self.deleted + other.deleted, self.compacted + other.compacted)


def delete_old(
    store: DeliveryStore,
    *,
    older_than: datetime,
    statuses: tuple[str, ...],
    provider: str | None,
    batch: int = BATCH,
) -> int:
    """Delete deliveries in ``statuses`` last updated before ``older_than``."""
    t = store.table
    where = _old(t, older_than, statuses, provider)
    return _in_batches(store, where, lambda keys: sa.delete(t).where(keys, *where), batch)


def compact_old(
    store: DeliveryStore,
    *,
    older_than: datetime,
    provider: str | None,
    now: datetime,
    batch: int = BATCH,
) -> int:
    """Turn done deliveries last updated before ``older_than`` into tombstones."""
    t = store.table
    where = [*_old(t, older_than, (DONE,), provider), t.c.compacted_at.is_(None)]
    return _in_batches(
        store,
        where,
        lambda keys: (
            sa.update(t)
            .where(keys, *where)
            .values(
                body=b"",
                headers="{}",
                compacted_at=sa.bindparam("p_compacted", now, type_=WHEN),
            )
        ),
        batch,
    )


def _old(
    t: sa.Table, older_than: datetime, statuses: tuple[str, ...], provider: str | None
) -> list[sa.ColumnElement[bool]]:
    # The (status, updated_at) index serves this search.
    where = [
        t.c.status.in_(statuses),
        t.c.updated_at < sa.bindparam("p_older_than", older_than, type_=WHEN),
    ]
    if provider is not None:
        where.append(t.c.provider == provider)
    return where


def _in_batches(
    store: DeliveryStore,
    where: list[sa.ColumnElement[bool]],
    write: Callable[[sa.ColumnElement[bool]], Any],
    batch: int,
) -> int:
    t = store.table
    pk = (t.c.provider, t.c.callback, t.c.key)
    pick = (
        sa.select(*pk)
        .where(*where)
        .order_by(t.c.updated_at)
        .limit(batch)
        .with_for_update(skip_locked=True)
    )
    store.prepare()
    total = 0
    with store.engine.connect() as connection:
        while True:
            with connection.begin():
                keys = [tuple(row) for row in connection.execute(pick)]
                if not keys:
                    break
                statement = write(sa.tuple_(*pk).in_(keys))
                if store.dialect in MYSQL:
                    # No RETURNING there; PyMySQL's matched-rows count is exact.
                    total += connection.execute(statement).rowcount
                else:
                    total += len(connection.execute(statement.returning(t.c.key)).all())
            if len(keys) < batch:
                break
    return total
