"""The six durability rules and the batch rule, on SQLite and on PostgreSQL."""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask

from flask_orderhooks import OrderHooks, order_pending_delivery
from flask_orderhooks.provider import Delivery
from flask_orderhooks.store import Claim, DeliveryStore, StandaloneDatabase
from flask_orderhooks.testing import SignedCallback, build, sud_order
from tests.conftest import Credit, Recorder

RecorderFactory = Callable[..., tuple[Flask, Recorder]]


def make(kind: str, app: Flask, **fields: Any) -> SignedCallback:
    with app.app_context():
        return build(kind, app=app, **fields)


def post(app: Flask, cb: SignedCallback) -> Any:
    return app.test_client().post(cb.url(), data=cb.body, headers=cb.headers)


def read(app: Flask, cb: SignedCallback) -> Delivery:
    hooks: OrderHooks = app.extensions["orderhooks"]
    provider = hooks.state(app).providers[cb.provider]
    return provider.read(cb.callback, cb.body, cb.headers, now=None)


def claimed(app: Flask, cb: SignedCallback) -> tuple[DeliveryStore, Delivery, Claim]:
    """``cb`` read and claimed, as a route would before its dispatch (in an
    app context)."""
    store: DeliveryStore = app.extensions["orderhooks"].store
    delivery = read(app, cb)
    claim = store.claim(delivery)
    assert claim is not None
    return store, delivery, claim


def rows(app: Flask) -> list[Any]:
    with app.app_context():
        return list(app.extensions["orderhooks"].store.list())


def test_rule1_done_is_never_dispatched_again(recorder: RecorderFactory) -> None:
    app, rec = recorder()
    cb = make("collect", app)
    answers = [post(app, cb).status_code for _ in range(5)]
    assert answers == [200] * 5
    assert len(rec.events) == 1
    (row,) = rows(app)
    assert (row.status, row.attempts) == ("done", 1)


def test_rule1_a_new_gateway_status_is_a_new_event(recorder: RecorderFactory) -> None:
    app, rec = recorder()
    processing = make("collect", app, id="C1", status=20, payed_at=None)
    success = make("collect", app, id="C1", status=60)
    assert [post(app, c).status_code for c in (processing, success, success)] == [200, 200, 200]
    assert [e.status for _, e in rec.events] == [20, 60]
    assert sorted(r.key for r in rows(app)) == ["C1:20", "C1:60"]


@pytest.mark.parametrize("kind", ["igv", "collect", "sud"])
def test_rule2_concurrent_duplicates_dispatch_exactly_once(
    kind: str, recorder: RecorderFactory
) -> None:
    # Duplicates wait for the first one's outcome for the duplicate wait: 3 s
    # by default, which a CI machine's stalled commit (another test's heavy
    # writes on the same disk) once outlasted, answering two duplicates 503.
    # The wait is what the test gives them; waiting is what it checks.
    app, rec = recorder(ORDERHOOKS_DUPLICATE_WAIT=15.0)
    started = threading.Event()

    def slow(_event: object) -> None:
        started.set()
        time.sleep(0.3)

    rec.hook = slow
    cb = make(kind, app)
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: post(app, cb).status_code, range(8)))
    assert started.is_set()
    assert answers == [200] * 8, "duplicates wait for the first one's outcome"
    assert len(rec.events) == 1
    assert rec.credits() == 1


def _bounded_wait_app(backend: str, make_app: Callable[..., Any]) -> tuple[Flask, Recorder]:
    # On SQLite the wait is the driver's busy timeout: the extension's own
    # store sets it to ORDERHOOKS_DUPLICATE_WAIT (a host engine keeps its own).
    app, _hooks, db = make_app(host_db=backend == "postgresql", ORDERHOOKS_DUPLICATE_WAIT=0.3)
    rec = Recorder(app, db)
    order_pending_delivery.connect(rec, app, weak=False)
    return app, rec


def test_rule2_duplicates_wait_no_longer_than_the_duplicate_wait(
    backend: str, make_app: Callable[..., Any]
) -> None:
    app, rec = _bounded_wait_app(backend, make_app)
    release = threading.Event()
    rec.hook = lambda _event: (release.wait(10), None)[1]
    cb = make("igv", app)
    try:
        with ThreadPoolExecutor(4) as pool:
            first = pool.submit(lambda: post(app, cb))
            while not rec.events:
                time.sleep(0.01)
            duplicates = [pool.submit(lambda: post(app, cb)) for _ in range(3)]
            busy = [d.result(timeout=30) for d in duplicates]
            release.set()
            assert first.result(timeout=30).status_code == 200
        assert [(r.status_code, r.get_data(as_text=True)) for r in busy] == [
            (503, "The store is busy; retry later.")
        ] * 3
        assert len(rec.events) == 1
        # Once the first is done, a resend is a plain duplicate.
        assert post(app, cb).status_code == 200
        assert len(rec.events) == 1
    finally:
        release.set()
        order_pending_delivery.disconnect(rec, app)


def test_rule3_failure_is_stored_rolled_back_and_retried(recorder: RecorderFactory) -> None:
    app, rec = recorder()
    rec.fail_next = 1
    cb = make("igv", app)
    assert post(app, cb).status_code == 500
    (row,) = rows(app)
    assert row.status == "failed"
    assert row.attempts == 1
    assert row.body == cb.body
    assert row.headers == {k: cb.headers[k] for k in ("X-Request-Id", "X-Signature", "X-Timestamp")}
    assert row.error == "RuntimeError: receiver exploded on purpose"
    assert rec.credits() == 0
    assert post(app, cb).status_code == 200
    (row,) = rows(app)
    assert (row.status, row.attempts) == ("done", 2)
    assert row.error == "RuntimeError: receiver exploded on purpose", "the first error is kept"
    assert rec.credits() == 1
    assert len(rec.events) == 2


def test_rule3_the_claim_is_committed_before_any_receiver_runs(
    recorder: RecorderFactory, database_uri: str
) -> None:
    """Stored before anything can fail: the claim is committed before the
    dispatch, and is what another worker sees while the receivers run."""
    app, rec = recorder()
    other = sa.create_engine(database_uri)
    seen: list[tuple[str, int]] = []

    def look(_event: object) -> None:
        with other.connect() as connection:
            status, attempts = connection.execute(
                sa.text("SELECT status, attempts FROM orderhooks_deliveries")
            ).one()
        seen.append((status, attempts))

    rec.hook = look
    try:
        assert post(app, make("igv", app)).status_code == 200
    finally:
        other.dispose()
    assert seen == [("processing", 1)]


def test_rule4_a_dead_claim_is_taken_over_after_the_lease(
    recorder: RecorderFactory,
) -> None:
    now = [1_795_000_000.0]
    app, rec = recorder(
        hooks_options={"clock": lambda: now[0]},
        ORDERHOOKS_DUPLICATE_WAIT=0.1,
        ORDERHOOKS_CLAIM_TIMEOUT=30,
        ORDERHOOKS_IGV_MAX_AGE=None,
    )
    cb = make("igv", app)
    with app.app_context():
        # A worker claims the delivery, then dies before dispatching it.
        claim = app.extensions["orderhooks"].store.claim(read(app, cb))
    assert claim is not None and claim.attempt == 1
    response = post(app, cb)
    assert (response.status_code, response.get_data(as_text=True)) == (
        503,
        "Another worker is handling this delivery; retry later.",
    )
    assert rec.events == []
    now[0] += 31
    assert post(app, cb).status_code == 200
    assert len(rec.events) == 1
    (row,) = rows(app)
    assert (row.status, row.attempts) == ("done", 2)


def test_rule4_a_late_worker_cannot_finish_a_claim_it_lost(recorder: RecorderFactory) -> None:
    now = [1_795_000_000.0]
    app, rec = recorder(hooks_options={"clock": lambda: now[0]}, ORDERHOOKS_IGV_MAX_AGE=None)
    cb = make("igv", app)
    with app.app_context():
        store = app.extensions["orderhooks"].store
        stale = store.claim(read(app, cb))
        assert stale is not None
        now[0] += 31
        assert post(app, cb).status_code == 200
        from flask_orderhooks.exc import StoreUnavailable

        with pytest.raises(StoreUnavailable, match="The claim on this delivery expired"):
            store.dispatch(read(app, cb), stale, lambda: None)
    assert len(rec.events) == 1


def test_rule5_receiver_writes_commit_with_the_done_mark(recorder: RecorderFactory) -> None:
    app, rec = recorder()
    cb = make("collect", app)
    duplicate_key = {"n": 0}

    def conflicting_write(_event: object) -> None:
        # The first attempt also adds a row that breaks a unique constraint at
        # commit time: the done mark and every write must roll back together.
        if duplicate_key["n"] == 0:
            assert rec.db is not None
            rec.db.session.add(Credit(key="same"))
            rec.db.session.add(Credit(key="same"))
        duplicate_key["n"] += 1

    rec.hook = conflicting_write
    assert post(app, cb).status_code == 500
    assert rec.credits() == 0
    (row,) = rows(app)
    assert row.status == "failed"
    assert row.error is not None and row.error.startswith("IntegrityError")
    assert post(app, cb).status_code == 200
    assert rec.credits() == 1
    assert rows(app)[0].status == "done"


def test_rule6_nothing_unverified_is_stored(recorder: RecorderFactory) -> None:
    app, rec = recorder()
    cb = make("sud", app)
    headers = dict(cb.headers, **{"Sud-Signature": "0" * 40})
    response = app.test_client().post(cb.url(), data=cb.body, headers=headers)
    assert response.status_code == 401
    assert rows(app) == []
    assert rec.events == []


def test_batch_is_all_or_nothing(recorder: RecorderFactory) -> None:
    app, rec = recorder()
    orders = [sud_order(order_id=str(n)) for n in range(3)]
    cb = make("sud-batch", app, orders=orders)

    def third_fails(event: Any) -> None:
        if event.order_id == "2" and len(rec.events) == 3:
            raise RuntimeError("third order failed")

    rec.hook = third_fails
    assert post(app, cb).status_code == 500
    assert rec.credits() == 0, "the first two orders' writes rolled back too"
    assert post(app, cb).status_code == 200
    assert rec.credits() == 3
    assert [e.order_id for _, e in rec.events[3:]] == ["0", "1", "2"], "in order"


def test_a_key_stored_with_another_body_is_a_conflict(recorder: RecorderFactory) -> None:
    app, rec = recorder()
    rec.fail_next = 1
    cb = make("igv", app)
    assert post(app, cb).status_code == 500
    tampered = app.test_client().post(
        cb.url(), data=cb.body.replace(b'"buyerId":"', b'"buyerId":"9'), headers=cb.headers
    )
    assert (tampered.status_code, tampered.get_data(as_text=True)) == (
        409,
        "This key is stored with a different body.",
    )
    assert post(app, cb).status_code == 200
    # Done: another body with the same request id is answered 200, never dispatched.
    assert (
        app.test_client()
        .post(cb.url(), data=cb.body.replace(b"SO", b"XX"), headers=cb.headers)
        .status_code
        == 200
    )
    assert len(rec.events) == 2
    assert all(e.order_num.startswith("SO") for _, e in rec.events)


@pytest.mark.postgres
def test_pitfall_postgres_claim_does_not_trust_rowcount(postgres_url: str, tmp_path: Path) -> None:
    """psycopg 3 reports rowcount -1 for INSERT without RETURNING: a claim
    decided from rowcount would call every first delivery a duplicate."""
    app = Flask("pg", instance_path=str(tmp_path))
    app.config.update(ORDERHOOKS_IGV_SECRET="s" * 32, ORDERHOOKS_DATABASE_URI=postgres_url)
    hooks = OrderHooks(app)
    seen: list[object] = []

    def receiver(sender: Flask, *, event: object) -> None:
        seen.append(event)

    order_pending_delivery.connect(receiver, app)
    try:
        cb = make("igv", app)
        with app.app_context():
            delivery = read(app, cb)
            assert hooks.store.deliver(delivery, lambda: seen.append(1)) == "dispatched"
            assert hooks.store.deliver(delivery, lambda: seen.append(2)) == "duplicate"
        assert seen == [1]
    finally:
        order_pending_delivery.disconnect(receiver, app)
        standalone = hooks.state(app).standalone
        assert standalone is not None
        standalone.metadata.drop_all(standalone.engine)
        standalone.engine.dispose()


@pytest.mark.parametrize(
    "server",
    [
        pytest.param("postgres_url", marks=pytest.mark.postgres),
        pytest.param("mariadb_url", marks=pytest.mark.mariadb),
    ],
)
def test_pitfall_concurrent_create_all(server: str, request: pytest.FixtureRequest) -> None:
    """Several workers creating the table at once must all come up."""
    url = str(request.getfixturevalue(server))
    stores = [StandaloneDatabase(url, busy_timeout=1, engine_options={}) for _ in range(6)]
    barrier = threading.Barrier(len(stores))
    errors: list[BaseException] = []

    def boot(store: StandaloneDatabase) -> None:
        barrier.wait()
        try:
            store.ensure_table()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=boot, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    try:
        assert errors == []
        assert sa.inspect(stores[0].engine).has_table("orderhooks_deliveries")
    finally:
        stores[0].metadata.drop_all(stores[0].engine)
        for s in stores:
            s.engine.dispose()


def test_standalone_store_creates_its_sqlite_file_in_wal_mode(tmp_path: Path) -> None:
    app = Flask("own", instance_path=str(tmp_path / "instance"))
    app.config.update(ORDERHOOKS_IGV_SECRET="s" * 32)
    hooks = OrderHooks(app)
    got: list[object] = []

    def receiver(sender: Flask, *, event: object) -> None:
        got.append(event)

    order_pending_delivery.connect(receiver, app)
    try:
        assert post(app, make("igv", app)).status_code == 200
    finally:
        order_pending_delivery.disconnect(receiver, app)
    path = tmp_path / "instance" / "orderhooks.sqlite3"
    assert path.exists()
    standalone = hooks.state(app).standalone
    assert standalone is not None
    with standalone.engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    standalone.engine.dispose()
    assert len(got) == 1


def test_a_failure_report_never_overwrites_a_committed_done(recorder: RecorderFactory) -> None:
    """After a COMMIT whose answer was lost, the worker reports a failure over
    a row that is in fact done: the report must not reopen it for dispatch."""
    app, rec = recorder()
    cb = make("igv", app)
    with app.app_context():
        store, delivery, claim = claimed(app, cb)
        store.dispatch(delivery, claim, lambda: None)
        store._mark_failed(delivery, claim, ConnectionError("commit answer lost"))
    (row,) = rows(app)
    assert (row.status, row.error) == ("done", None)
    assert post(app, cb).status_code == 200
    assert rec.events == []


@pytest.mark.parametrize(
    # SQLite locks the whole file, and its busy timeout bounds every wait.
    "backend",
    [
        pytest.param("postgresql", marks=pytest.mark.postgres),
        pytest.param("mariadb", marks=pytest.mark.mariadb),
    ],
)
def test_a_failure_record_waits_for_a_held_row_no_longer_than_a_duplicate(
    recorder: RecorderFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A backend whose client vanished mid-dispatch (a partition) still holds
    the row's lock, for hours with default keepalives. Recording the failed
    attempt waits at most ORDERHOOKS_DUPLICATE_WAIT (whole seconds on
    MariaDB), logs that it could not, and leaves the lease to run out."""
    app, _rec = recorder(ORDERHOOKS_DUPLICATE_WAIT=0.5)
    cb = make("igv", app)
    with app.app_context():
        store, delivery, claim = claimed(app, cb)
        t = store.table
        with store.engine.connect() as orphan:
            # Another connection's uncommitted write holds the row's lock.
            orphan.execute(sa.update(t).where(t.c.key == delivery.key).values(error="held"))
            finished = threading.Event()

            def record() -> None:
                store.record_failure(delivery, claim, "RuntimeError: boom")
                finished.set()

            started = time.monotonic()
            thread = threading.Thread(target=record)
            thread.start()
            waited = finished.wait(timeout=30)
            took = time.monotonic() - started
            orphan.rollback()
            thread.join(timeout=30)
        assert waited, "the failure record kept waiting for the held row"
        assert took < 10, took
    assert "could not record the failed attempt 1" in caplog.text
    (row,) = rows(app)
    assert (row.status, row.error) == ("processing", None)


def test_a_busy_sqlite_store_does_not_strand_a_claim(tmp_path: Path) -> None:
    """Another writer holds SQLite's lock when the dispatch starts: the dispatch
    waits it out instead of leaving the claim 'processing' until its lease."""
    app = Flask("busy", instance_path=str(tmp_path))
    app.config.update(ORDERHOOKS_IGV_SECRET="s" * 32, ORDERHOOKS_DUPLICATE_WAIT=2)
    # A driver busy timeout shorter than the other writer's hold: the dispatch
    # itself has to wait it out.
    hooks = OrderHooks(app, engine_options={"connect_args": {"timeout": 0.05}})
    cb = make("igv", app)
    standalone = hooks.state(app).standalone
    assert standalone is not None
    with app.app_context():
        store, delivery, claim = claimed(app, cb)
        blocker = standalone.engine.raw_connection()
        blocker.cursor().execute("BEGIN IMMEDIATE")
        timer = threading.Timer(0.3, blocker.rollback)
        timer.start()
        try:
            store.dispatch(delivery, claim, lambda: None)
        finally:
            timer.join()
            blocker.close()
        (row,) = store.get(cb.key)
    assert (row.status, row.attempts) == ("done", 1)
    standalone.engine.dispose()


@pytest.mark.parametrize(
    "backend", [pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True
)
def test_a_done_mark_that_fails_hands_the_claim_back(
    recorder: RecorderFactory, database_uri: str
) -> None:
    """The done mark fails after the claim committed (a trigger refuses it):
    503, and the claim is recorded as a failed attempt at once (not held
    until its lease runs out), so the platform's retry dispatches it."""
    app, rec = recorder()
    admin = sa.create_engine(database_uri)
    with admin.begin() as connection:
        connection.exec_driver_sql(
            "CREATE FUNCTION refuse_done() RETURNS trigger LANGUAGE plpgsql AS $$"
            " BEGIN RAISE EXCEPTION 'done refused on purpose'; END $$"
        )
        connection.exec_driver_sql(
            "CREATE TRIGGER refuse_done BEFORE UPDATE ON orderhooks_deliveries"
            " FOR EACH ROW WHEN (NEW.status = 'done') EXECUTE FUNCTION refuse_done()"
        )
    cb = make("igv", app)
    try:
        answer = post(app, cb)
        assert (answer.status_code, answer.text) == (503, "The store is unavailable.")
        assert rec.events == []
        with admin.connect() as connection:
            status, attempts, error = connection.execute(
                sa.text("SELECT status, attempts, error FROM orderhooks_deliveries")
            ).one()
        assert (status, attempts) == ("failed", 1)
        assert "done refused on purpose" in error
    finally:
        with admin.begin() as connection:
            connection.exec_driver_sql("DROP TRIGGER refuse_done ON orderhooks_deliveries")
            connection.exec_driver_sql("DROP FUNCTION refuse_done()")
        admin.dispose()
    assert post(app, cb).status_code == 200
    assert len(rec.events) == 1
    assert rec.credits() == 1


@pytest.mark.parametrize(
    "backend", [pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True
)
def test_postgres_dispatch_commits_synchronously(recorder: RecorderFactory) -> None:
    """The claim's COMMIT may skip the WAL flush; the dispatch's, which makes
    the receivers' writes and the done mark durable, never does."""
    app, rec = recorder()
    seen: list[str] = []

    def check(_event: object) -> None:
        assert rec.db is not None
        seen.append(str(rec.db.session.execute(sa.text("SHOW synchronous_commit")).scalar()))

    rec.hook = check
    assert post(app, make("igv", app)).status_code == 200
    assert seen == ["on"]


def test_sqlite_claim_relaxes_sync_only_for_itself(tmp_path: Path) -> None:
    """In WAL mode the claim commits at synchronous=NORMAL; the connection goes
    back to the pool at its own level, so the dispatch's commit stays FULL."""
    app = Flask("sync", instance_path=str(tmp_path))
    app.config.update(ORDERHOOKS_IGV_SECRET="s" * 32)
    hooks = OrderHooks(app, engine_options={"poolclass": sa.pool.StaticPool})
    standalone = hooks.state(app).standalone
    assert standalone is not None
    hooks.create_all(app)
    statements: list[str] = []
    # StaticPool: the store's one connection, traced by SQLite itself (the
    # store's statements bypass SQLAlchemy's execute events).
    proxy = standalone.engine.raw_connection()
    driver = proxy.driver_connection
    assert isinstance(driver, sqlite3.Connection)
    driver.set_trace_callback(statements.append)
    proxy.close()

    def receiver(sender: Flask, *, event: object) -> None:
        pass

    order_pending_delivery.connect(receiver, app)
    try:
        assert post(app, make("igv", app)).status_code == 200
    finally:
        order_pending_delivery.disconnect(receiver, app)
        driver.set_trace_callback(None)
    with standalone.engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == 2
    standalone.engine.dispose()
    wanted = ("PRAGMA synchronous", "INSERT", "BEGIN", "UPDATE", "COMMIT")
    kinds = [" ".join(sql.split()[:4]) for sql in statements if sql.startswith(wanted)]
    # Each transaction takes the write lock at its BEGIN (see test_sqlite_busy.py).
    assert kinds == [
        "PRAGMA synchronous",
        "PRAGMA synchronous = 1",
        "BEGIN IMMEDIATE",
        "INSERT INTO orderhooks_deliveries (provider,",
        "COMMIT",
        "PRAGMA synchronous = 2",
        "BEGIN IMMEDIATE",
        "UPDATE orderhooks_deliveries SET status='done',",
        "COMMIT",
    ], "claim at NORMAL, dispatch at FULL"


def _fails_once_then_dispatches(
    recorder: RecorderFactory, misbehave: Callable[[Any], None], error: str
) -> None:
    """The first attempt's receiver calls ``misbehave(db)``: a failed
    attempt whose error starts with ``error``, answered 500, nothing written;
    the retry dispatches once and a resend is a duplicate."""
    app, rec = recorder()
    assert rec.db is not None
    db = rec.db
    first = [True]

    def hook(_event: object) -> None:
        if first[0]:
            first[0] = False
            misbehave(db)

    rec.hook = hook
    cb = make("igv", app)
    response = post(app, cb)
    assert (response.status_code, response.get_data(as_text=True)) == (
        500,
        "A receiver failed; the delivery will be retried.",
    )
    (row,) = rows(app)
    assert (row.status, row.attempts) == ("failed", 1)
    assert (row.error or "").startswith(error)
    assert rec.credits() == 0
    assert post(app, cb).status_code == 200
    assert post(app, cb).status_code == 200
    (row,) = rows(app)
    assert (row.status, row.attempts) == ("done", 2)
    assert rec.credits() == 1


@pytest.mark.parametrize(
    "backend", [pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True
)
def test_a_receiver_that_swallows_a_database_error_fails_the_delivery(
    recorder: RecorderFactory,
) -> None:
    """PostgreSQL answers the COMMIT of a transaction in error with a ROLLBACK
    that psycopg reports as a success: answered 200, the delivery would stay
    processing with nothing done. It is a failed attempt instead, retried."""

    def swallow(db: Any) -> None:
        with contextlib.suppress(sa.exc.DBAPIError):
            db.session.execute(sa.text("SELECT 1 / 0"))

    _fails_once_then_dispatches(recorder, swallow, "AbortedTransaction:")


@pytest.mark.parametrize(
    "backend", [pytest.param("mariadb", marks=pytest.mark.mariadb)], indirect=True
)
def test_a_receiver_that_swallows_a_deadlock_fails_the_delivery(
    recorder: RecorderFactory, database_uri: str
) -> None:
    """On a deadlock (1213) InnoDB rolls back the whole transaction, done mark
    included, and begins a new one for the next statement: a receiver that
    catches the error and carries on would have only what followed
    committed, the request answered done, and the delivery dispatched again
    by a worker after its lease. It is a failed attempt instead, retried."""
    other = sa.create_engine(database_uri)
    with other.begin() as connection:
        connection.exec_driver_sql("CREATE TABLE acct (id INT PRIMARY KEY, n INT) ENGINE=InnoDB")
        connection.exec_driver_sql("INSERT INTO acct VALUES (1, 0), (2, 0)")
        connection.exec_driver_sql("CREATE TABLE filler (id INT PRIMARY KEY, v INT) ENGINE=InnoDB")
        values = ", ".join(f"({i}, 0)" for i in range(50))
        connection.exec_driver_sql(f"INSERT INTO filler VALUES {values}")

    def the_other_transaction(ready: threading.Event) -> None:
        # Locks row 2, then waits for row 1, which the receiver holds. Fifty
        # more rows changed first make it the heavier of the two, which
        # InnoDB keeps: the receiver's transaction is the one rolled back.
        with other.connect() as connection:
            connection.exec_driver_sql("UPDATE filler SET v = v + 1")
            connection.exec_driver_sql("UPDATE acct SET n = n + 1 WHERE id = 2")
            ready.set()
            connection.exec_driver_sql("UPDATE acct SET n = n + 1 WHERE id = 1")
            connection.commit()

    def deadlock(db: Any) -> None:
        db.session.execute(sa.text("UPDATE acct SET n = n + 1 WHERE id = 1"))
        ready = threading.Event()
        thread = threading.Thread(target=the_other_transaction, args=(ready,))
        thread.start()
        assert ready.wait(10)
        # The other transaction is about to wait for row 1; give it time to.
        time.sleep(0.3)
        with contextlib.suppress(sa.exc.OperationalError):
            db.session.execute(sa.text("UPDATE acct SET n = n + 1 WHERE id = 2"))
        thread.join(10)
        assert not thread.is_alive()

    try:
        _fails_once_then_dispatches(recorder, deadlock, "AbortedTransaction:")
    finally:
        with other.begin() as connection:
            connection.exec_driver_sql("DROP TABLE acct, filler")
        other.dispose()


def test_a_receiver_that_rolls_back_the_session_fails_the_delivery(
    recorder: RecorderFactory,
) -> None:
    """db.session.rollback() in a receiver takes the done mark with it: the
    callback must not be answered done (a worker would dispatch it again
    after its lease). What the receiver wrote afterwards is rolled back too,
    the attempt is failed, and the retry dispatches once."""

    def roll_back(db: Any) -> None:
        db.session.rollback()
        db.session.add(Credit(key="written after the rollback"))

    _fails_once_then_dispatches(recorder, roll_back, "EndedTransaction:")


def test_a_receiver_that_commits_the_session_fails_the_delivery(
    recorder: RecorderFactory,
) -> None:
    """db.session.commit() in a receiver raises ReceiverCommit: committed
    there, the done mark would make the delivery done before the other
    receivers ran, and a failure after it could neither be rolled back nor
    retried (the rest of the work lost). Nothing is committed; the attempt
    is failed and retried."""

    def commit(db: Any) -> None:
        db.session.add(Credit(key="written before the commit"))
        db.session.commit()

    _fails_once_then_dispatches(
        recorder, commit, "ReceiverCommit: db.session.commit() inside a receiver"
    )


def test_a_receiver_that_rolls_back_then_commits_fails_the_delivery(
    recorder: RecorderFactory,
) -> None:
    """The "except IntegrityError: rollback, then write and commit" pattern:
    before, every attempt was failed and retried while its own commit kept
    what it wrote, one credit per attempt."""

    def roll_back_then_commit(db: Any) -> None:
        db.session.rollback()
        db.session.add(Credit(key="written after the rollback"))
        db.session.commit()

    _fails_once_then_dispatches(recorder, roll_back_then_commit, "ReceiverCommit:")


def test_a_receiver_that_commits_the_sessions_connection_fails_the_delivery(
    recorder: RecorderFactory,
) -> None:
    """``db.session.connection().commit()`` goes around the session's commit:
    before, it committed the done mark with what the receiver had flushed,
    so a receiver failing after it got a 500 while the row was done, and the
    platform's retry was a "duplicate" (the rest of the work lost). It raises
    ReceiverCommit like the session's commit: nothing committed, retried."""

    def commit_the_connection(db: Any) -> None:
        db.session.add(Credit(key="written before the commit"))
        db.session.flush()
        db.session.connection().commit()

    _fails_once_then_dispatches(
        recorder, commit_the_connection, "ReceiverCommit: a commit of db.session's connection"
    )


def test_a_receiver_that_rolls_back_then_commits_the_connection_fails_the_delivery(
    recorder: RecorderFactory,
) -> None:
    """After a rollback the session begins on a connection the dispatch never
    saw: its commit is refused too."""

    def roll_back_then_commit_the_connection(db: Any) -> None:
        db.session.rollback()
        db.session.add(Credit(key="written after the rollback"))
        db.session.flush()
        db.session.connection().commit()

    _fails_once_then_dispatches(recorder, roll_back_then_commit_the_connection, "ReceiverCommit:")


def test_the_host_commits_its_sessions_connection_after_a_dispatch(
    recorder: RecorderFactory,
) -> None:
    """The guard lasts as long as the dispatch: the same connection's commit
    is the host's again once the request is answered."""
    app, rec = recorder()
    assert rec.db is not None
    db = rec.db
    assert post(app, make("igv", app)).status_code == 200
    with app.app_context():
        db.session.add(Credit(key="the host's own"))
        db.session.flush()
        db.session.connection().commit()
    assert rec.credits() == 2


def test_a_receivers_savepoint_commits_with_the_delivery(recorder: RecorderFactory) -> None:
    """begin_nested() savepoints are the receiver's to commit: only the
    session's own transaction is the extension's."""
    app, rec = recorder()
    assert rec.db is not None
    db = rec.db

    def savepoint(_event: object) -> None:
        with db.session.begin_nested():
            db.session.add(Credit(key="in a savepoint"))

    rec.hook = savepoint
    assert post(app, make("igv", app)).status_code == 200
    (row,) = rows(app)
    assert (row.status, row.attempts) == ("done", 1)
    assert rec.credits() == 2


def test_a_receiver_that_rolls_back_while_another_worker_finishes_it_commits_nothing(
    recorder: RecorderFactory,
) -> None:
    """A receiver rolls back (the done mark and the row lock go with it), its
    lease runs out meanwhile, and another worker takes the delivery over and
    finishes it. The row is done, but not by this claim: what this receiver
    writes afterwards must not be committed (before, it was, and the answer
    was 200: two credits)."""
    now = [1_795_000_000.0]
    app, rec = recorder(hooks_options={"clock": lambda: now[0]}, ORDERHOOKS_CLAIM_TIMEOUT=30)
    assert rec.db is not None
    db = rec.db
    hooks: OrderHooks = app.extensions["orderhooks"]
    first = [True]

    def roll_back_and_be_overtaken(_event: object) -> None:
        if not first[0]:
            return
        first[0] = False
        db.session.rollback()
        now[0] += 31
        with app.app_context():
            assert hooks.process_due() == 1
        db.session.add(Credit(key="written after the other worker finished"))

    rec.hook = roll_back_and_be_overtaken
    response = post(app, make("igv", app))
    assert (response.status_code, response.get_data(as_text=True)) == (
        500,
        "A receiver failed; the delivery will be retried.",
    )
    (row,) = rows(app)
    assert (row.status, row.attempts) == ("done", 2)
    assert len(rec.events) == 2
    assert rec.credits() == 1


@pytest.mark.parametrize(
    "backend",
    [
        pytest.param("postgresql", marks=pytest.mark.postgres),
        pytest.param("mariadb", marks=pytest.mark.mariadb),
    ],
)
@pytest.mark.parametrize("flush_in_receiver", [True, False])
def test_a_receivers_bad_write_is_a_receiver_failure_whether_or_not_it_flushed(
    recorder: RecorderFactory, flush_in_receiver: bool
) -> None:
    """A receiver writes a value too long for its column. Flushed by the
    receiver, the DataError is a receiver failure (500). Left to the
    extension's commit, which flushes it, only IntegrityError is taken for
    the receivers': the DataError is re-raised as a database error and
    answered 503 "The store is unavailable", logged as a store outage."""
    app, rec = recorder()
    db = rec.db
    assert db is not None

    def too_long(_event: object) -> None:
        db.session.add(Credit(key="k" * 300))  # the column holds 200
        if flush_in_receiver:
            db.session.flush()

    rec.hook = too_long
    with app.app_context():
        cb = build("igv", app=app)
    response = app.test_client().post(cb.url(), data=cb.body, headers=cb.headers)
    assert (response.status_code, response.text) == (
        500,
        "A receiver failed; the delivery will be retried.",
    )
    with app.app_context():
        (row,) = app.extensions["orderhooks"].store.list()
    assert row.status == "failed"
