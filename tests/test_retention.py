"""Purge's batches are bounded in time as well as in rows: a live callback
that resends a row of a batch waits for the batch's commit, and on a slow or
saturated machine 500 rows took most of ORDERHOOKS_DUPLICATE_WAIT."""

from __future__ import annotations

import itertools
import sqlite3
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from flask_orderhooks.store import DeliveryStore, retention
from flask_orderhooks.store.retention import FIRST_BATCH, MIN_BATCH, BatchSize, delete_old
from tests.conftest import AppFactory


def test_a_batch_halves_after_a_slow_one_and_doubles_after_a_quick_one() -> None:
    size = BatchSize(500, target=0.75)
    seen = []
    for seconds in (0.1, 0.1, 0.1, 0.1, 1.0, 1.0, 0.5, 0.2, 5, 5, 5, 5, 5, 5):
        seen.append(size.rows)
        size.took(seconds)
    # Up from FIRST_BATCH to the limit, down by halves to MIN_BATCH; between
    # half the target and the target it stays.
    assert seen == [100, 200, 400, 500, 500, 250, 125, 125, 250, 125, 62, 31, 15, 10]
    assert (FIRST_BATCH, MIN_BATCH) == (100, 10)


def test_a_smaller_limit_bounds_every_batch() -> None:
    size = BatchSize(50, target=0.75)
    assert size.rows == 50
    size.took(0.0)
    assert size.rows == 50
    tiny = BatchSize(3, target=0.75)
    tiny.took(9.0)
    assert tiny.rows == 3


def _store_old_rows(store: DeliveryStore, count: int, *, provider: str = "igv") -> None:
    old = datetime.now(UTC) - timedelta(days=400)
    store.prepare()
    with store.engine.begin() as connection:
        connection.execute(
            sa.insert(store.table),
            [
                {
                    "provider": provider,
                    "callback": "order-status",
                    "key": f"k{i:04d}",
                    "status": "done",
                    "attempts": 1,
                    "claim_token": "t",
                    "lease_expires_at": old,
                    "body": b"{}",
                    "body_sha256": "0" * 64,
                    "headers": "{}",
                    "created_at": old,
                    "updated_at": old + timedelta(seconds=i),
                }
                for i in range(count)
            ],
        )


def _batch_sizes(
    store: DeliveryStore, monkeypatch: pytest.MonkeyPatch, clock: Callable[[], float]
) -> tuple[int, Counter[int]]:
    """Purge every row, the batches timed by ``clock``: (rows deleted, how
    many batches of each size)."""
    monkeypatch.setattr(retention, "_monotonic", clock)
    sizes: Counter[int] = Counter()
    taken = BatchSize.took

    def record(self: BatchSize, seconds: float) -> None:
        sizes[self.rows] += 1
        taken(self, seconds)

    monkeypatch.setattr(BatchSize, "took", record)
    deleted = delete_old(
        store,
        older_than=datetime.now(UTC) - timedelta(days=30),
        statuses=("done",),
        provider="igv",
    )
    assert list(store.list()) == []
    return deleted, sizes


@pytest.mark.parametrize("backend", ["sqlite"])
def test_a_run_whose_batches_are_slow_takes_smaller_ones(
    make_app: AppFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every batch seems to take 1 s against a 3 s duplicate wait (target
    0.75 s): 100 rows, then 50, 25, 12, then 10 at a time, every row deleted."""
    app, hooks, _db = make_app()
    store = hooks.state(app).store
    with app.app_context():
        _store_old_rows(store, 300)
        ticks = itertools.count()
        deleted, sizes = _batch_sizes(store, monkeypatch, lambda: float(next(ticks)))
    assert deleted == 300
    # 100 + 50 + 25 + 12 = 187, then 12 batches of 10 (the last finds 3).
    assert sizes == {100: 1, 50: 1, 25: 1, 12: 1, 10: 12}


@pytest.mark.parametrize("backend", ["sqlite", "mariadb"])
def test_a_batch_is_timed_from_its_first_lock(
    make_app: AppFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nobody waits for the candidates' read (MySQL: lock-free; SQLite: no
    write lock), so a batch's time starts at its first lock: MySQL's locking
    read, SQLite's write. On a clock where that read takes 1 s and every
    other statement 0.1 s, batches hold their locks at most 0.2 s, under half
    the 0.75 s target, and double: 100 rows, then 200. Timed from the read,
    each would take 1.1 s or more and halve."""
    app, hooks, _db = make_app()
    store = hooks.state(app).store
    clock = [0.0]

    def advance(_c: Any, _cursor: Any, statement: str, *_: Any) -> None:
        text = statement.lstrip().upper()
        reads = text.startswith("SELECT") and "FOR UPDATE" not in text
        clock[0] += 1.0 if reads else 0.1

    with app.app_context():
        _store_old_rows(store, 300)
        sa.event.listen(store.engine, "before_cursor_execute", advance)
        try:
            deleted, sizes = _batch_sizes(store, monkeypatch, lambda: clock[0])
        finally:
            sa.event.remove(store.engine, "before_cursor_execute", advance)
    assert deleted == 300
    # 100, then the other 200; the third read finds nothing and ends the run.
    assert sizes == {100: 1, 200: 1}


@pytest.mark.parametrize("backend", ["sqlite"])
def test_sqlite_purge_passes_over_tombstones_without_the_write_lock(
    make_app: AppFactory, tmp_path: Path
) -> None:
    """SQLite (in WAL mode) has one writer: a batch that picked its rows
    inside its write statement would hold off every callback while it
    passed over a year of tombstones. Another connection writes at every 100th step of SQLite's
    machine during the run, which compacts one row behind 3,000 tombstones:
    it is refused only during the short write by primary key, never during
    the read that passes over them."""
    app, hooks, _db = make_app()
    store = hooks.state(app).store
    old = datetime.now(UTC) - timedelta(days=400)
    other = sqlite3.connect(tmp_path / "host.sqlite3", timeout=0, isolation_level=None)
    # As deployment.rst asks of a shop on SQLite: outside WAL mode any
    # reader holds off a writer's commit, whatever purge does.
    assert other.execute("PRAGMA journal_mode=WAL").fetchone() == ("wal",)
    with app.app_context():
        _store_old_rows(store, 3_001, provider="gateway")
        with store.engine.begin() as connection:
            t = store.table
            connection.execute(
                sa.update(t).where(t.c.key != "k3000").values(compacted_at=old, body=b"")
            )
        other.execute("CREATE TABLE scratch (n INTEGER)")
        steps = Counter[str]()

        def step() -> int:
            try:
                other.execute("INSERT INTO scratch VALUES (1)")
            except sqlite3.OperationalError:
                steps["refused"] += 1
            else:
                steps["written"] += 1
            return 0

        def watch(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
            dbapi_connection.set_progress_handler(step, 100)

        def unwatch(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.set_progress_handler(None, 100)

        sa.event.listen(store.engine, "checkout", watch)
        sa.event.listen(store.engine, "checkin", unwatch)
        try:
            compacted = store.compact(
                older_than=datetime.now(UTC) - timedelta(days=30), provider="gateway"
            )
        finally:
            sa.event.remove(store.engine, "checkout", watch)
            sa.event.remove(store.engine, "checkin", unwatch)
            other.close()
    assert compacted == 1
    # The read passed over 3,000 rows: hundreds of steps, every one of them
    # free for the other writer; the write of one row by its key, a few.
    assert steps["written"] >= 100, steps
    assert steps["refused"] <= steps["written"] / 20, steps
