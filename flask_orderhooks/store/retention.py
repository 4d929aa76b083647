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

A live callback that resends a row in the batch waits for the batch's
commit, so a batch must be short in time, not only in rows: on a slow or
saturated machine 500 rows took 2.9 s, near the 3 s ``duplicate_wait``.
Batches start at :data:`FIRST_BATCH` rows, halve after one that held its
locks longer than a quarter of the store's ``duplicate_wait``, and double,
up to ``batch``, after one that took less than half of that
(:class:`BatchSize`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from .table import DONE, MYSQL, WHEN

if TYPE_CHECKING:
    from .delivery_store import DeliveryStore

logger = logging.getLogger("flask_orderhooks")

#: Rows per batch at most: one batch holds its locks for a few milliseconds.
BATCH = 500
#: What batches are timed with.
_monotonic = time.monotonic
#: Rows of a run's first batch, before its time is known.
FIRST_BATCH = 100
#: Rows a batch takes at least (or ``batch``, if smaller): on MySQL the run's
#: cursor passes rows a live callback holds only when a batch holds others
#: too, so a batch of one would read a held row again until it is let go.
MIN_BATCH = 10


class BatchSize:
    """How many rows the next batch takes: up to ``limit``, halved after a
    batch that took longer than ``target`` seconds (down to
    :data:`MIN_BATCH`), doubled after one that took less than half of it."""

    def __init__(self, limit: int, target: float) -> None:
        self.limit = max(1, limit)
        self.target = target
        self.least = min(self.limit, MIN_BATCH)
        self.rows = min(self.limit, FIRST_BATCH)

    def took(self, seconds: float) -> None:
        if seconds > self.target:
            self.rows = max(self.least, self.rows // 2)
        elif seconds < self.target / 2:
            self.rows = min(self.limit, self.rows * 2)


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


#: Where a run's keyset cursor starts: before any stored time.
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _in_batches(
    store: DeliveryStore,
    where: list[sa.ColumnElement[bool]],
    write: Callable[[sa.ColumnElement[bool]], Any],
    batch: int,
) -> int:
    t = store.table
    pk = (t.c.provider, t.c.callback, t.c.key)
    # A keyset cursor: each batch starts where the last one ended, so a run
    # never reads again the rows it passed over (tombstones, other
    # providers' rows). Ties on updated_at are read again and skipped by
    # the conditions, which every write repeats.
    after = t.c.updated_at >= sa.bindparam("p_from", type_=WHEN)
    size = BatchSize(batch, store.duplicate_wait / 4)
    store.prepare()
    total = 0
    start = _EPOCH
    # MySQL and MariaDB: READ COMMITTED, so that the batch's reads see
    # what committed since the last batch and take no gap locks.
    options = {"isolation_level": "READ COMMITTED"} if store.dialect in MYSQL else {}
    with store.engine.connect().execution_options(**options) as connection:
        while True:
            rows = size.rows
            began = _monotonic()
            with connection.begin():
                if store.dialect in MYSQL:
                    # A locking read there locks every row its index range
                    # passes over (other providers' rows, tombstones), even
                    # at READ COMMITTED, until the batch commits. So: the
                    # candidates by a plain (consistent, lock-free) read,
                    # then only those rows locked by primary key, skipping
                    # the ones a live callback holds, then the write.
                    candidates = sa.select(*pk, t.c.updated_at).where(*where, after)
                    candidates = candidates.order_by(t.c.updated_at).limit(rows)
                    found = connection.execute(candidates, {"p_from": start}).all()
                    picked = [tuple(row) for row in found]
                    if not picked:
                        break
                    keys = [row[:3] for row in picked]
                    locked = connection.execute(
                        sa.select(*pk)
                        .where(sa.tuple_(*pk).in_(keys), *where)
                        .with_for_update(skip_locked=True)
                    ).all()
                    done = 0
                    if locked:
                        chosen = sa.tuple_(*pk).in_([tuple(row) for row in locked])
                        # PyMySQL's count is of matched rows (FOUND_ROWS).
                        done = connection.execute(write(chosen)).rowcount
                    times = [row[3] for row in picked]
                else:
                    # One statement: the WITH picks and locks the batch
                    # (SKIP LOCKED on PostgreSQL), the write takes it.
                    # MATERIALIZED: a LIMIT sub-select inside IN may be run
                    # again by the plan, and with SKIP LOCKED each run picks
                    # other rows (one "batch" took 900 of 1,000 rows).
                    pick = sa.select(*pk).where(*where, after).order_by(t.c.updated_at)
                    pick = pick.limit(rows).with_for_update(skip_locked=True)
                    picked_cte = pick.cte("picked").prefix_with(
                        "MATERIALIZED", dialect="postgresql"
                    )
                    chosen = sa.tuple_(*pk).in_(sa.select(*picked_cte.c))
                    statement = write(chosen).returning(t.c.updated_at)
                    times = list(connection.execute(statement, {"p_from": start}).scalars())
                    done = len(times)
                    picked = times
            size.took(_monotonic() - began)
            total += done
            if len(picked) < rows:
                break
            start = max(times)
    return total
