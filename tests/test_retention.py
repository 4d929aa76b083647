"""Purge's batches are bounded in time as well as in rows: a live callback
that resends a row of a batch waits for the batch's commit, and on a slow or
saturated machine 500 rows took most of ORDERHOOKS_DUPLICATE_WAIT."""

from __future__ import annotations

import itertools
import sqlite3
import threading
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from flask_orderhooks.store import DeliveryStore, retention
from flask_orderhooks.store.retention import (
    FIRST_BATCH,
    MIN_BATCH,
    BatchSize,
    compact_old,
    delete_old,
)
from tests.conftest import AppFactory, store_done_igv


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


def _hold(store: DeliveryStore, keys: list[str]) -> sa.Connection:
    """Another connection holding the rows of ``keys`` (provider igv), as
    live callbacks' transactions do, until it is closed."""
    holder = store.engine.connect()
    holder.begin()
    t = store.table
    # Each by its whole primary key: MySQL's REPEATABLE READ would keep a
    # lock on every row that a scan passed over.
    for key in keys:
        by_key = (t.c.provider == "igv", t.c.callback == "order-status", t.c.key == key)
        holder.execute(sa.select(t.c.key).where(*by_key).with_for_update()).scalar_one()
    return holder


def _purge_while_held(
    store: DeliveryStore, holder: sa.Connection, *, compact: bool = False, **options: Any
) -> int:
    """Purge igv's old done rows (or compact them) in another thread while
    ``holder`` keeps its locks: the rows purge wrote. A purge that waits for
    a row it did not take would block until the server's lock wait ran out
    (50 s on MariaDB)."""
    result: list[int | BaseException] = []
    older_than = datetime.now(UTC) - timedelta(days=30)

    def run() -> None:
        try:
            if compact:
                result.append(
                    compact_old(
                        store,
                        older_than=older_than,
                        provider="igv",
                        now=datetime.now(UTC),
                        **options,
                    )
                )
                return
            result.append(
                delete_old(
                    store, older_than=older_than, statuses=("done",), provider="igv", **options
                )
            )
        except BaseException as error:  # handed to the test's thread
            result.append(error)

    worker = threading.Thread(target=run)
    worker.start()
    try:
        # A hang detector, not a timing: purge here takes milliseconds.
        worker.join(timeout=30)
        assert not worker.is_alive(), "purge waited for a row a live callback holds"
    finally:
        holder.close()
        worker.join()
    (outcome,) = result
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


def _remaining(store: DeliveryStore) -> list[str]:
    t = store.table
    with store.engine.connect() as connection:
        return list(connection.execute(sa.select(t.c.key).order_by(t.c.key)).scalars())


@pytest.mark.parametrize("compact", [False, True], ids=["delete", "compact"])
@pytest.mark.parametrize("backend", ["postgresql", "mariadb"])
def test_purge_never_waits_for_a_row_it_does_not_take(make_app: AppFactory, compact: bool) -> None:
    """A live callback holds a fresh row, no candidate. On a table of a few
    rows MariaDB scans it rather than look up the batch's keys (even with
    FORCE INDEX), and a DELETE that scans waits for every row it passes, so
    each row is deleted by its key; an UPDATE at READ COMMITTED reads a held
    row as last committed, and compacts the batch in one statement."""
    app, hooks, _db = make_app()
    store = hooks.state(app).store
    with app.app_context():
        _store_old_rows(store, 5)
        with store.engine.begin() as connection:
            connection.execute(
                sa.update(store.table)
                .where(store.table.c.key == "k0004")
                .values(status="processing", updated_at=datetime.now(UTC))
            )
        holder = _hold(store, ["k0004"])
        assert _purge_while_held(store, holder, compact=compact) == 4
        if compact:
            rows = {row.key: row for row in store.list()}
            assert [key for key, row in sorted(rows.items()) if row.compacted_at] == [
                f"k000{i}" for i in range(4)
            ]
            assert rows["k0004"].body == b"{}"
        else:
            assert _remaining(store) == ["k0004"]


@pytest.mark.parametrize("backend", ["postgresql", "mariadb"])
def test_purge_passes_a_whole_batch_of_held_rows_of_one_time(make_app: AppFactory) -> None:
    """Three batches' worth of candidates share one ``updated_at``, and a
    live callback holds all of them: they are skipped and left to the next
    run; the run goes on to the later rows instead of reading the same three
    again until they are let go. The count is of the rows written."""
    app, hooks, _db = make_app()
    store = hooks.state(app).store
    with app.app_context():
        _store_old_rows(store, 5)
        t = store.table
        with store.engine.begin() as connection:
            first = connection.execute(
                sa.select(t.c.updated_at).where(t.c.key == "k0000")
            ).scalar_one()
            connection.execute(
                sa.update(t).where(t.c.key.in_(["k0001", "k0002"])).values(updated_at=first)
            )
        holder = _hold(store, ["k0000", "k0001", "k0002"])
        assert _purge_while_held(store, holder, batch=3) == 2
        assert _remaining(store) == ["k0000", "k0001", "k0002"]


@pytest.mark.parametrize("backend", ["sqlite", "mariadb"])
def test_a_row_replayed_between_the_read_and_the_write_is_left_alone(
    make_app: AppFactory,
) -> None:
    """SQLite and MySQL read a batch's candidates before they write them. A
    resend that takes one of them over in between (done → processing, its
    time now) must find it whole: the write repeats every condition."""
    app, hooks, _db = make_app()
    store = hooks.state(app).store
    t = store.table
    replayed: list[bool] = []

    def replay(_c: Any, _cursor: Any, statement: str, *_: Any) -> None:
        text = statement.lstrip().upper()
        if replayed or not text.startswith("SELECT") or "FOR UPDATE" in text:
            return
        # Another connection, as a live callback: committed before the write.
        with store.engine.begin() as other:
            other.execute(
                sa.update(t)
                .where(t.c.key == "k0002")
                .values(status="processing", updated_at=datetime.now(UTC))
            )
        replayed.append(True)

    with app.app_context():
        if store.dialect == "sqlite":
            # As deployment.rst asks: outside WAL mode the callback's commit
            # would wait for purge's read to end, and come after it anyway.
            with store.engine.connect() as connection:
                mode = connection.exec_driver_sql("PRAGMA journal_mode=WAL").scalar()
                assert mode == "wal"
        _store_old_rows(store, 5)
        sa.event.listen(store.engine, "after_cursor_execute", replay)
        try:
            deleted = delete_old(
                store,
                older_than=datetime.now(UTC) - timedelta(days=30),
                statuses=("done",),
                provider="igv",
            )
        finally:
            sa.event.remove(store.engine, "after_cursor_execute", replay)
        assert replayed
        assert deleted == 4
        assert _remaining(store) == ["k0002"]
        (row,) = store.list()
        assert (row.status, row.body) == ("processing", b"{}")


#: An aware time in another zone than UTC: the same instant, other wall clock.
_PLUS_TWO = timezone(timedelta(hours=2))


def test_purge_compares_an_aware_cutoff_as_an_instant(make_app: AppFactory) -> None:
    """``purge(older_than=...)`` takes a datetime; an aware one in another
    zone names the same instant. On SQLite the store keeps UTC wall-clock
    text and SQLAlchemy's SQLite DATETIME drops the bound value's tzinfo
    (WHEN has a UTC-normalising variant for MySQL only), so the cutoff is
    compared as its +02:00 wall clock: two hours later than meant, and a
    delivery done 30 minutes ago is deleted by "older than one hour"."""
    app, hooks, _db = make_app()
    store = hooks.state(app).store
    now = datetime.now(UTC)
    with app.app_context():
        store_done_igv(store, {"done-30-minutes-ago": now - timedelta(minutes=30)})
        cutoff = (now - timedelta(hours=1)).astimezone(_PLUS_TWO)
        deleted = store.purge(older_than=cutoff)
        assert deleted == 0, "purge deleted a delivery newer than its cutoff"
        # The console's and CLI's time filter reads the same way.
        assert [r.key for r in store.list(since=cutoff)] == ["done-30-minutes-ago"]


@pytest.mark.parametrize(
    "backend",
    [
        pytest.param("postgresql", marks=pytest.mark.postgres),
        pytest.param("mariadb", marks=pytest.mark.mariadb),
    ],
)
def test_purge_reads_committed_on_a_repeatable_read_host_engine(make_app: AppFactory) -> None:
    """A host engine at REPEATABLE READ (MySQL's default): purge's batches
    run at READ COMMITTED all the same. On PostgreSQL a batch that locked a
    row a live callback had changed since its snapshot failed the whole run
    with a serialization error; on MySQL the reads took gap locks."""
    app, hooks, _db = make_app(SQLALCHEMY_ENGINE_OPTIONS={"isolation_level": "REPEATABLE READ"})
    store = hooks.state(app).store
    levels: list[str] = []

    def level_of(connection: sa.Connection) -> None:
        levels.append(connection.get_isolation_level())

    with app.app_context():
        sa.event.listen(store.engine, "begin", level_of)
        try:
            store.purge(older_than=datetime.now(UTC))
        finally:
            sa.event.remove(store.engine, "begin", level_of)
    assert levels
    assert set(levels) == {"READ COMMITTED"}, levels
