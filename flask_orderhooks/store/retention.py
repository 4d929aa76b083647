"""Retention: deleting old deliveries, or compacting them to tombstones, in
bounded batches that live callbacks never wait behind.

A tombstone keeps what replay protection needs (the key, the body's digest,
the status and the dates) and drops the body and the signed headers, which
are most of a row. A platform's resend of a tombstoned delivery is still a
duplicate (or, with another body, ignored), so a signature that never
expires (the gateway's) can be compacted safely where deleting it could not.

Each batch locks rows in one short transaction: it picks at most ``batch``
rows with ``FOR UPDATE SKIP LOCKED`` (PostgreSQL, MySQL), so a row a live
callback holds is skipped, never waited for, and taken by a later batch or,
when older than the rows the batch took, by the next run. SQLite has one
writer: a batch reads its candidates first, in a read transaction that
takes no write lock, then takes the lock only to write them. A batch never
waits for a row it did not take: each row is deleted by its primary key (a
MySQL compaction is one UPDATE for the batch, which waits for no row it
passes), and every write repeats every condition, so a row that changed
between the pick and the write (done → replayed) is left alone.

A live callback that resends a row in the batch waits for the batch's
commit, so a batch must be short in time, not only in rows: on a slow or
saturated machine 500 rows took 2.9 s, near the 3 s ``duplicate_wait``.
Batches start at :data:`FIRST_BATCH` rows, halve after one that held its
locks longer than a quarter of the store's ``duplicate_wait``, and double,
up to ``batch``, after one that held them less than half of that
(:class:`BatchSize`). A batch is timed from its first lock to its commit:
on MySQL its candidates are read before, without locks, and nobody waits
for that read. On SQLite the time includes the write's wait for the write
lock (the driver takes it inside the first write): a busy database makes
smaller batches, which is when callbacks wait for them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from .table import DONE, FAILED, MYSQL, PROCESSING, STATUS_UPDATED_INDEX, WHEN

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
    """Delete deliveries in ``statuses`` last updated before ``older_than``
    (processing ones only once their lease ran out before ``older_than``,
    failed ones only once their next attempt was due before it: no worker
    took them for that long).

    One status after the other: each batch's read is then one range of the
    (status, updated_at) index, in the order it reads. With several statuses
    in one read, no index gives their rows in ``updated_at`` order, and every
    batch read and sorted every old row of them all (200,000 rows: a full
    scan and a sort, 43 ms on PostgreSQL and 66 ms on MariaDB a batch,
    against 0.2 and 5 ms; at 10 million rows, seconds a batch).
    """
    t = store.table
    deleted = 0
    for status in statuses:
        where = _old(t, older_than, (status,), provider)
        # A processing delivery whose lease ran out, and a failed one whose
        # next attempt is due, are what the workers' due claim takes next: one
        # is deleted only when it has been so for ``older_than`` too, that is
        # when no worker took it for that long. One still held, still on the
        # retry schedule or just due would be carried to done by the workers,
        # and its platform may send it no more (a deferred one was answered
        # at its acceptance): deleting it would lose it. A processing one
        # whose worker holds it may be between its claim and its done mark,
        # which does not lock the row. Dead ones have no next attempt.
        due_before = sa.bindparam("p_due_before", older_than, type_=WHEN)
        if status == PROCESSING:
            where.append(t.c.lease_expires_at < due_before)
        elif status == FAILED:
            where.append(sa.or_(t.c.next_attempt_at.is_(None), t.c.next_attempt_at < due_before))

        def write(
            keys: sa.ColumnElement[bool], where: list[sa.ColumnElement[bool]] = where
        ) -> sa.Delete:
            return sa.delete(t).where(keys, *where)

        deleted += _in_batches(store, where, write, batch, deletes=True)
    return deleted


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
        deletes=False,
    )


def _old(
    t: sa.Table, older_than: datetime, statuses: tuple[str, ...], provider: str | None
) -> list[sa.ColumnElement[bool]]:
    # The (status, updated_at) index serves this search.
    # One bound parameter per status, not an expanding list: SQLite's
    # writes run as an executemany, which cannot expand one.
    status_params: list[sa.BindParameter[str]] = [
        sa.bindparam(f"p_status_{i}", s) for i, s in enumerate(statuses)
    ]
    # A naive ``older_than`` is UTC on every backend: WHEN takes it so.
    where = [
        t.c.status.in_(status_params),
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
    *,
    deletes: bool,
) -> int:
    t = store.table
    # A keyset cursor: each batch starts where the last one ended, so a run
    # never reads again the rows it passed over (tombstones, other
    # providers' rows). Ties on updated_at are read again: the rows written
    # are no longer candidates, the others are. A batch that wrote none of
    # them and ended where it began (on MySQL: a whole batch of one time
    # that live callbacks hold) would be read again and again until they
    # are let go; the next batch starts after that time instead, and leaves
    # the rest of it to the next run.
    from_ = sa.bindparam("p_from", type_=WHEN)
    at_or_after, after = t.c.updated_at >= from_, t.c.updated_at > from_
    size = BatchSize(batch, store.duplicate_wait / 4)
    store.prepare()
    total = 0
    start = _EPOCH
    # READ COMMITTED whatever the host's engine says. MySQL and MariaDB: so
    # that the batch's reads see what committed since the last batch and
    # take no gap locks. PostgreSQL: at REPEATABLE READ, locking a row that a
    # live callback changed since the snapshot fails the whole run with a
    # serialization error.
    options = (
        {"isolation_level": "READ COMMITTED"} if store.dialect in (*MYSQL, "postgresql") else {}
    )
    cursor = at_or_after
    with store.engine.connect().execution_options(**options) as connection:
        while True:
            rows = size.rows
            batch_run: _Batch | None
            if store.dialect == "postgresql":
                batch_run = _pick_and_write(connection, t, where, cursor, write, rows, start)
            else:
                batch_run = _read_then_write(
                    connection, store.dialect, t, where, cursor, write, rows, start, deletes
                )
            if batch_run is None:
                break
            size.took(_monotonic() - batch_run.locked_at)
            total += batch_run.done
            if len(batch_run.times) < rows:
                break
            end = max(batch_run.times)
            cursor = after if batch_run.done == 0 and end == start else at_or_after
            start = end
    return total


@dataclass(frozen=True)
class _Batch:
    """One batch: the ``updated_at`` of every row it picked (the cursor's
    next start), the rows it wrote, and when it took its first lock."""

    times: list[datetime]
    done: int
    locked_at: float


def _pick_and_write(
    connection: sa.Connection,
    t: sa.Table,
    where: list[sa.ColumnElement[bool]],
    after: sa.ColumnElement[bool],
    write: Callable[[sa.ColumnElement[bool]], Any],
    rows: int,
    start: datetime,
) -> _Batch:
    """PostgreSQL: one statement. The WITH picks and locks the batch (SKIP
    LOCKED), the write takes it; the rows its scan passes over are neither
    locked nor waited for. MATERIALIZED: a LIMIT sub-select inside IN may be
    run again by the plan, and with SKIP LOCKED each run picks other rows
    (one "batch" took 900 of 1,000 rows)."""
    pk = (t.c.provider, t.c.callback, t.c.key)
    pick = sa.select(*pk).where(*where, after).order_by(t.c.updated_at)
    pick = pick.limit(rows).with_for_update(skip_locked=True)
    picked = pick.cte("picked").prefix_with("MATERIALIZED", dialect="postgresql")
    statement = write(sa.tuple_(*pk).in_(sa.select(*picked.c))).returning(t.c.updated_at)
    locked_at = _monotonic()
    with connection.begin():
        times = list(connection.execute(statement, {"p_from": start}).scalars())
    return _Batch(times, len(times), locked_at)


def _read_then_write(
    connection: sa.Connection,
    dialect: str,
    t: sa.Table,
    where: list[sa.ColumnElement[bool]],
    after: sa.ColumnElement[bool],
    write: Callable[[sa.ColumnElement[bool]], Any],
    rows: int,
    start: datetime,
    deletes: bool,
) -> _Batch | None:
    """MySQL, MariaDB and SQLite: the candidates by a plain read, then only
    those rows written by primary key; ``None`` when there are none left.

    MySQL: a locking read locks every row its index range passes over
    (other providers' rows, tombstones), even at READ COMMITTED, until the
    batch commits; so the candidates are read without locks, then locked by
    primary key, skipping the ones a live callback holds. SQLite: a write
    statement holds the database's one write lock from its first step, so a
    pick inside it would hold off every callback while it passes over a
    year of tombstones (about 700 ms behind a million of them, on a 2-core
    machine); the read takes no lock in WAL mode."""
    pk = (t.c.provider, t.c.callback, t.c.key)
    candidates = sa.select(*pk, t.c.updated_at).where(*where, after)
    candidates = candidates.order_by(t.c.updated_at).limit(rows)
    if dialect in MYSQL:
        # The status's range in index order, stopped after a batch. Left to
        # itself MariaDB may take the primary key's provider prefix and sort
        # every old row of that provider for each batch (seen at 20,000
        # rows: "Using filesort").
        candidates = candidates.with_hint(
            t, f"FORCE INDEX ({STATUS_UPDATED_INDEX})", dialect_name=dialect
        )
    found: list[Any] = []
    if dialect not in MYSQL:
        # SQLite: a transaction of its own, so that the write below begins a
        # new one and never upgrades a read snapshot another writer made
        # stale (SQLITE_BUSY_SNAPSHOT, whatever the busy timeout).
        with connection.begin():
            found = list(connection.execute(candidates, {"p_from": start}))
    with connection.begin():
        if dialect in MYSQL:
            # READ COMMITTED: a snapshot of its own, taken without locks.
            found = list(connection.execute(candidates, {"p_from": start}))
        if not found:
            return None
        keys = [tuple(row[:3]) for row in found]
        locked_at = _monotonic()
        if dialect in MYSQL:
            locked = connection.execute(
                sa.select(*pk)
                .where(sa.tuple_(*pk).in_(keys), *where)
                .with_for_update(skip_locked=True)
            ).all()
            keys = [tuple(row) for row in locked]
        if not keys:
            done = 0
        elif dialect in MYSQL and not deletes:
            done = _write_key_list(connection, t, write, keys)
        else:
            done = _write_by_key(connection, t, write, keys)
    return _Batch([row[3] for row in found], done, locked_at)


def _write_key_list(
    connection: sa.Connection,
    t: sa.Table,
    write: Callable[[sa.ColumnElement[bool]], Any],
    keys: list[tuple[Any, ...]],
) -> int:
    """MySQL and MariaDB: an UPDATE of the rows of ``keys`` in one statement;
    how many it matched (PyMySQL's FOUND_ROWS).

    Whatever plan the server takes (on a table of a few rows MariaDB scans it
    even with ``FORCE INDEX``), an UPDATE at READ COMMITTED waits for no row
    it passes: a row another transaction holds is read as last committed
    (InnoDB's semi-consistent read), which is not one of ``keys``, held by
    this batch. About three times the rows per second of one statement per
    key (13,500 against 4,000 on a 2-core machine). A DELETE has no such read:
    :func:`_write_by_key`."""
    pk = (t.c.provider, t.c.callback, t.c.key)
    return int(connection.execute(write(sa.tuple_(*pk).in_(keys))).rowcount)


def _write_by_key(
    connection: sa.Connection,
    t: sa.Table,
    write: Callable[[sa.ColumnElement[bool]], Any],
    keys: list[tuple[Any, ...]],
) -> int:
    """SQLite's writes, and MySQL's DELETE: the rows of ``keys``, each found
    by its primary key, in one executemany; how many it wrote (PyMySQL's
    count is of matched rows, FOUND_ROWS).

    The write repeats every condition: a row that changed since the read
    (done, then replayed) is left alone. One statement per key, because a
    statement for the whole list may pass over other rows: SQLite cannot look
    up a list of row values by index, and takes the conditions'
    (status, updated_at) range instead, write lock held; MariaDB, on a table
    of a few rows, may scan it or that range, and a DELETE (no
    semi-consistent read, unlike an UPDATE) then waits for every row a live
    callback holds, the batch's locks held, until the server's lock wait
    (50 s by default) runs out. A statement for one key is a primary-key
    lookup on every backend."""
    pk = (t.c.provider, t.c.callback, t.c.key)
    names = ("k_provider", "k_callback", "k_key")
    match = sa.and_(*(column == sa.bindparam(name) for column, name in zip(pk, names, strict=True)))
    rows = [dict(zip(names, key, strict=True)) for key in keys]
    return int(connection.execute(write(match), rows).rowcount)
