"""MySQL's and MariaDB's own traps (PITFALLS.md), each on the real MariaDB:
case-insensitive collations, whole-second lock waits, lock wait timeouts and
deadlocks, utf8mb4, BLOB's 64 KiB limit, and the plans of the per-delivery
statements."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pymysql
import pytest
import sqlalchemy as sa
from flask import Flask
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.exc import DBAPIError

from flask_orderhooks import OrderHooks, order_pending_delivery
from flask_orderhooks.driver_statement import DriverStatement
from flask_orderhooks.exc import StoreUnavailable
from flask_orderhooks.store import DUE_INDEX, TABLE_NAME, DeliveryStore
from flask_orderhooks.store.mysql import MySQLStatements
from flask_orderhooks.store.statements import lost_line_suffix
from flask_orderhooks.worker import Worker
from tests.conftest import BASE_CONFIG, Recorder
from tests.test_durability import make, post, rows

RecorderFactory = Callable[..., tuple[Flask, Recorder]]

pytestmark = [pytest.mark.mariadb, pytest.mark.parametrize("backend", ["mariadb"])]


def store_of(app: Flask) -> DeliveryStore:
    with app.app_context():
        store: DeliveryStore = app.extensions["orderhooks"].store
        store.engine  # noqa: B018 - resolved inside the app context
        return store


def lock_wait_statements(engine: sa.Engine, act: Callable[[], bool]) -> list[str]:
    """The statements touching innodb_lock_wait_timeout sent on ``engine``'s
    connections while ``act`` runs (``act`` must return True).

    Read from what PyMySQL sends, not from SQLAlchemy's events, which miss
    what the store runs on the driver's cursor; a connection is ``engine``'s
    when it was checked out of its pool in the block and not detached (the
    host's engine makes the store's own connections that way)."""
    used: list[Any] = []
    sent: list[tuple[Any, str]] = []
    original = pymysql.connections.Connection._execute_command

    def spy(self: Any, command: int, sql: Any) -> Any:
        text = sql.decode(errors="replace") if isinstance(sql, bytes) else str(sql)
        if "innodb_lock_wait_timeout" in text:
            sent.append((self, text))
        return original(self, command, sql)

    def checked_out(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
        used.append(dbapi_connection)

    def detached(dbapi_connection: Any, _record: Any) -> None:
        used[:] = [c for c in used if c is not dbapi_connection]

    sa.event.listen(engine, "checkout", checked_out)
    sa.event.listen(engine, "detach", detached)
    pymysql.connections.Connection._execute_command = spy
    try:
        assert act()
    finally:
        pymysql.connections.Connection._execute_command = original
        sa.event.remove(engine, "checkout", checked_out)
        sa.event.remove(engine, "detach", detached)
    return [text for connection, text in sent if any(connection is c for c in used)]


def own_engine(store: DeliveryStore) -> sa.Engine:
    """The store's own autocommit engine (the claim's, the acceptance's)."""
    engine = store._mysql_autocommit_engine
    assert engine is not store.engine
    return engine


def test_keys_differing_in_case_or_trailing_space_are_three_deliveries(
    recorder: RecorderFactory,
) -> None:
    """utf8mb4_general_ci would make 'Abc', 'abc' and 'Abc ' one key."""
    app, rec = recorder()
    for request_id in ("Abc", "abc", "Abc "):
        assert post(app, make("igv", app, request_id=request_id)).status_code == 200
    # utf8mb4: four-byte characters (SUD's key comes from its JSON body).
    for notify_id in ("n😀", "n😁"):
        assert post(app, make("sud", app, notify_id=notify_id)).status_code == 200
    assert sorted(r.key for r in rows(app)) == sorted(["Abc", "abc", "Abc ", "n😀", "n😁"])
    assert len(rec.events) == 5


def test_a_body_of_the_largest_accepted_size_is_kept_whole(recorder: RecorderFactory) -> None:
    """BLOB holds 65,535 bytes, one short of ORDERHOOKS_MAX_BODY's default."""
    app, _rec = recorder()
    fixed = {"notify_id": "big", "order_id": "1659497694888", "nonce": "n" * 16}
    cb = make("sud", app, **fixed, payload={"pad": "x" * 60_000})
    padded = make("sud", app, **fixed, payload={"pad": "x" * (60_000 + 65_536 - len(cb.body))})
    assert len(padded.body) == 65_536
    assert post(app, padded).status_code == 200
    (row,) = [r for r in rows(app) if r.key == padded.key]
    assert row.body == padded.body


def test_a_held_row_lock_is_busy_never_a_500_nor_a_second_dispatch(
    recorder: RecorderFactory,
) -> None:
    app, rec = recorder(ORDERHOOKS_DUPLICATE_WAIT=1)
    cb = make("igv", app)
    rec.fail_next = 1
    assert post(app, cb).status_code == 500
    store = store_of(app)
    with store.engine.connect() as holder:
        # Another transaction holds the failed delivery's row.
        holder.exec_driver_sql(
            f"SELECT status FROM {TABLE_NAME} WHERE `key` = %s FOR UPDATE", (cb.key,)
        ).all()
        response = post(app, cb)
        holder.rollback()
    assert (response.status_code, response.get_data(as_text=True)) == (
        503,
        "The store is busy; retry later.",
    )
    assert len(rec.events) == 1
    assert post(app, cb).status_code == 200
    assert len(rec.events) == 2
    assert rows(app)[0].status == "done"


def test_a_deadlock_is_tried_again(recorder: RecorderFactory, monkeypatch: Any) -> None:
    """InnoDB breaks a deadlock by rolling one transaction back (1213): the
    claim is simply tried again while the duplicate wait lasts."""
    app, rec = recorder()
    store = store_of(app)
    claim = store._sql.claim
    broken = {"left": 1}
    original = claim.first

    def deadlock_once(connection: Any, params: Any) -> Any:
        if broken["left"]:
            broken["left"] -= 1
            orig = pymysql.err.OperationalError(1213, "Deadlock found when trying to get lock")
            raise DBAPIError.instance("INSERT …", None, orig, pymysql.err.Error)
        return original(connection, params)

    monkeypatch.setattr(claim, "first", deadlock_once)
    assert post(app, make("collect", app)).status_code == 200
    assert broken["left"] == 0
    assert len(rec.events) == 1
    assert rows(app)[0].attempts == 1


def sent_to_the_server(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every command PyMySQL sends from now on, as text (the store's own
    statements run on the driver cursor, which SQLAlchemy's events miss)."""
    seen: list[str] = []
    original = pymysql.connections.Connection._execute_command

    def spy(self: Any, command: int, sql: Any) -> Any:
        seen.append(sql.decode(errors="replace") if isinstance(sql, bytes) else str(sql))
        return original(self, command, sql)

    monkeypatch.setattr(pymysql.connections.Connection, "_execute_command", spy)
    return seen


def as_mysql_8(store: DeliveryStore) -> None:
    """The statements MySQL 8 gets (it has no SET STATEMENT), run on MariaDB:
    the lock wait set on the session around the claim."""
    store.__dict__["_sql"] = MySQLStatements(
        store.table, store.engine.dialect, statement_lock_wait=False
    )


def test_mariadb_bounds_the_lock_wait_in_the_statement_in_whole_seconds(
    recorder: RecorderFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """innodb_lock_wait_timeout refuses 0.5 (error 1232): a 0.5 s duplicate
    wait becomes 1 s. On MariaDB the writes that may wait carry it (SET
    STATEMENT … FOR), so the session, which may be the host's, never changes."""
    app, _rec = recorder(ORDERHOOKS_DUPLICATE_WAIT=0.5)
    store = store_of(app)
    cb = make("igv", app)
    seen = sent_to_the_server(monkeypatch)
    assert post(app, cb).status_code == 200
    waits = [sql for sql in seen if "innodb_lock_wait_timeout" in sql]
    assert len(waits) == 1, seen
    assert waits[0].startswith("SET STATEMENT innodb_lock_wait_timeout = 1 FOR INSERT INTO")
    assert not [sql for sql in seen if sql.startswith("SET SESSION")]
    with store.engine.connect() as connection:
        session, server = connection.exec_driver_sql(
            "SELECT @@SESSION.innodb_lock_wait_timeout, @@GLOBAL.innodb_lock_wait_timeout"
        ).one()
    assert session == server


def _ignore(_sender: object, **_event: object) -> None:
    pass


def test_mariadb_deferred_acceptance_bounds_its_wait_in_the_statement(
    backend: str, mariadb_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The acceptance waits at most 0.1 s for a row lock, 1 s in whole
    seconds. Here it is the first statement of an app whose engine never
    connected before (its table made by another engine): the dialect tells
    MariaDB from MySQL only at its first connection."""
    assert backend == "mariadb"
    app = Flask("fresh_mariadb")
    app.config.update(
        BASE_CONFIG, SQLALCHEMY_DATABASE_URI=mariadb_url, ORDERHOOKS_DISPATCH="deferred"
    )
    db = SQLAlchemy(app)
    OrderHooks(app, db=db)
    order_pending_delivery.connect(_ignore, app, weak=False)
    other = sa.create_engine(mariadb_url)
    db.metadata.create_all(other)
    try:
        cb = make("igv", app)
        seen = sent_to_the_server(monkeypatch)
        assert post(app, cb).status_code == 200
    finally:
        order_pending_delivery.disconnect(_ignore, app)
        db.metadata.drop_all(other)
        other.dispose()
        with app.app_context():
            db.engine.dispose()
    waits = [sql for sql in seen if "innodb_lock_wait_timeout" in sql]
    assert len(waits) == 1, seen
    assert waits[0].startswith("SET STATEMENT innodb_lock_wait_timeout = 1 FOR INSERT INTO")


def test_mysql_8_lock_waits_are_whole_seconds_and_given_back(recorder: RecorderFactory) -> None:
    """Without SET STATEMENT the session's value is set, in whole seconds: on
    the store's own autocommit connections (the claim) once, and kept; on a
    connection of the host's (the failure record, in a transaction) around
    the statement, and given back afterwards."""
    app, rec = recorder(ORDERHOOKS_DUPLICATE_WAIT=0.5)
    store = store_of(app)
    as_mysql_8(store)

    def delivered() -> bool:
        return bool(post(app, make("igv", app)).status_code == 200)

    def on_both(act: Callable[[], bool]) -> tuple[list[str], list[str]]:
        """What ``act`` set on the own engine's connections and on the host's."""
        host: list[str] = []

        def act_on_host() -> bool:
            host.extend(lock_wait_statements(store.engine, act))
            return True

        return lock_wait_statements(own_engine(store), act_on_host), host

    assert on_both(delivered) == (["SET SESSION innodb_lock_wait_timeout = 1"], [])
    assert on_both(delivered) == ([], [])  # the own connection kept it
    rec.fail_next = 1
    failed = on_both(lambda: post(app, make("igv", app)).status_code == 500)
    assert failed == (
        [],
        [
            "SET @orderhooks_hosts_lock_wait = @@SESSION.innodb_lock_wait_timeout, "
            "SESSION innodb_lock_wait_timeout = 1",
            "SET SESSION innodb_lock_wait_timeout = @orderhooks_hosts_lock_wait",
        ],
    )
    with store.engine.connect() as connection:
        session, server = connection.exec_driver_sql(
            "SELECT @@SESSION.innodb_lock_wait_timeout, @@GLOBAL.innodb_lock_wait_timeout"
        ).one()
    assert session == server


def test_concurrent_first_deliveries_of_one_key_dispatch_once(
    recorder: RecorderFactory,
) -> None:
    """INSERT … ON DUPLICATE KEY UPDATE takes next-key locks: copies racing on
    a new key wait for (or deadlock with) each other, and still one wins."""
    app, rec = recorder()
    gate = threading.Barrier(6)
    answers: list[int] = []
    cb = make("sud", app)

    def send() -> None:
        gate.wait()
        answers.append(post(app, cb).status_code)

    threads = [threading.Thread(target=send) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert set(answers) <= {200, 503}
    assert 200 in answers
    assert len(rec.events) == 1


def _plan(store: DeliveryStore, statement: DriverStatement, params: dict[str, Any]) -> list[Any]:
    # EXPLAIN the statement itself, without the lock wait MariaDB's carries.
    sql = statement.sql.split(" FOR ", 1)[1] if statement.sql.startswith("SET ") else statement.sql
    with store.engine.connect() as connection:
        cursor = connection.connection.cursor()
        try:
            cursor.execute("EXPLAIN " + sql, {**statement._defaults, **params})
            names = [d[0] for d in cursor.description]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
        finally:
            cursor.close()


def test_per_delivery_statements_use_the_primary_key(recorder: RecorderFactory) -> None:
    app, _rec = recorder()
    for _ in range(50):
        post(app, make("igv", app))
    existing = rows(app)[0].key
    store = store_of(app)
    sql: Any = store._sql
    now = datetime.now(UTC).replace(tzinfo=None)
    params = {
        "p_provider": "igv",
        "p_callback": "order-status",
        "p_key": existing,
        "p_token": "t",
        "p_lost_token": "l",
        "p_now": now,
        "p_lease": now,
        "p_status": "failed",
        "p_error": "e",
        "p_attempts": 1,
        "p_failure": "{}\n",
        "p_next": now,
    }
    for statement in (sql.state, sql.mark_done.update, sql.mark_failed.update):
        (access,) = _plan(store, statement, params)
        assert access["key"] == "PRIMARY", (statement, access)
    (due,) = _plan(store, sql.claim_due.find, params)
    assert due["key"] == DUE_INDEX, due


def test_the_own_store_sets_its_lock_wait_once(recorder: RecorderFactory) -> None:
    """Without db= the engine is the store's alone: on MySQL 8 the session
    keeps its lock wait, set once per connection instead of twice per claim."""
    app, _rec = recorder(host_db=False, ORDERHOOKS_DUPLICATE_WAIT=2.5)
    store = store_of(app)
    post(app, make("igv", app))
    as_mysql_8(store)
    seen = lock_wait_statements(
        own_engine(store),
        lambda: all(post(app, make("igv", app)).status_code == 200 for _ in range(3)),
    )
    assert seen == ["SET SESSION innodb_lock_wait_timeout = 3"]


def _reads_back(seen: list[str]) -> list[str]:
    return [sql for sql in seen if sql.startswith("SELECT")]


def test_an_upsert_that_inserted_reads_nothing_back(
    recorder: RecorderFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The claim's insert id says it inserted its row (LAST_INSERT_ID(1)): a
    first delivery sends no SELECT after it. A duplicate, and a resend that
    takes a failed delivery over, read the row once: only the read knows its
    token, attempts and state."""
    app, rec = recorder()
    # The store's own engine reads the server's settings at its first connect.
    assert post(app, make("igv", app)).status_code == 200
    cb = make("igv", app)
    seen = sent_to_the_server(monkeypatch)
    assert post(app, cb).status_code == 200
    assert _reads_back(seen) == [], seen
    assert sorted(row.attempts for row in rows(app)) == [1, 1]

    seen.clear()
    assert post(app, cb).status_code == 200
    assert len(_reads_back(seen)) == 1, seen  # the claim's row, with its state
    assert len(rec.events) == 2

    rec.fail_next = 1
    failed = make("igv", app)
    assert post(app, failed).status_code == 500
    seen.clear()
    assert post(app, failed).status_code == 200
    assert len(_reads_back(seen)) == 1, seen  # the takeover's row: attempt 2
    assert sorted(row.attempts for row in rows(app)) == [1, 1, 2]
    assert len(rec.events) == 4


def test_a_deferred_acceptance_that_inserted_reads_nothing_back(
    recorder: RecorderFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    app, rec = recorder(ORDERHOOKS_DISPATCH="deferred")
    # The store's own engine reads the server's settings at its first connect.
    assert post(app, make("igv", app)).status_code == 200
    cb = make("igv", app)
    seen = sent_to_the_server(monkeypatch)
    assert post(app, cb).status_code == 200
    # One command: the upsert, which commits itself (autocommit).
    assert len(seen) == 1 and " INSERT INTO " in seen[0], seen
    seen.clear()
    assert post(app, cb).status_code == 200
    # The upsert, then the row with its state: no COMMIT, no ROLLBACK.
    assert len(seen) == 2 and seen[1].startswith("SELECT"), seen
    assert [(row.status, row.attempts) for row in rows(app)] == [("pending", 0)] * 2
    assert rec.events == []


@pytest.mark.parametrize("kind", ["claim", "accept"])
def test_a_duplicate_key_never_reports_the_inserted_id(
    recorder: RecorderFactory, kind: str
) -> None:
    """What the shortcut rests on, asked of the server: on one connection,
    after an upsert that inserted (insert id 1), an upsert of the same key
    (left alone, or taken over) reports 2 or more, and the next new key 1
    again. Were a duplicate ever reported as inserted, it would be dispatched
    twice."""
    app, _rec = recorder()
    store = store_of(app)
    statement = getattr(store._sql, kind).upsert
    now = datetime.now(UTC)

    def upsert(connection: sa.Connection, key: str, token: str) -> tuple[int, int | None]:
        params = {
            "p_provider": "igv",
            "p_callback": "order-status",
            "p_key": key,
            "p_token": token,
            "p_digest": "d" * 64,
            "p_body": b"{}",
            "p_headers": "{}",
            "p_reference": None,
            "p_now": now,
            "p_lease": now,
            "p_takeover": "failed",
            "p_seen_attempts": -1,
            "p_seen_created": now,
            "p_lost_line": lost_line_suffix(now),
            "p_lock_wait": 1,
        }
        ran = statement.run(connection, params)
        return ran.rowcount, ran.lastrowid

    with app.app_context(), store.engine.connect() as connection:
        connection.begin()
        assert upsert(connection, "k1", "t1") == (1, 1)
        left_alone = upsert(connection, "k1", "t2")
        assert left_alone[1] is not None and left_alone[1] >= 2, left_alone
        connection.execute(
            sa.update(store.table).where(store.table.c.key == "k1").values(status="failed")
        )
        taken_over = upsert(connection, "k1", "t3")
        assert taken_over[0] == 2 and taken_over[1] is not None and taken_over[1] >= 2
        assert upsert(connection, "k2", "t4") == (1, 1)
        connection.rollback()


def test_mysql_8_gives_the_hosts_own_lock_wait_back(recorder: RecorderFactory) -> None:
    """MySQL 8 sets innodb_lock_wait_timeout on the host's session around the
    claim. Before, it set it back with ``= DEFAULT``, the server's global
    value, not the one the host's connections had (here 7 s, from PyMySQL's
    init_command): every pooled connection the store touched left with the
    host's lock wait changed to 50 s."""
    app, _rec = recorder(
        SQLALCHEMY_ENGINE_OPTIONS={
            "pool_size": 1,
            "max_overflow": 0,
            "connect_args": {"init_command": "SET SESSION innodb_lock_wait_timeout = 7"},
        }
    )
    store = store_of(app)
    as_mysql_8(store)
    with store.engine.connect() as connection:
        assert connection.exec_driver_sql("SELECT @@SESSION.innodb_lock_wait_timeout").scalar() == 7
    assert post(app, make("igv", app)).status_code == 200
    with store.engine.connect() as connection:
        after = connection.exec_driver_sql("SELECT @@SESSION.innodb_lock_wait_timeout").scalar()
    assert after == 7, "the store left the host's connection with the server's default lock wait"


# -- a server that is down at first use -----------------------------------------
# These need no MariaDB server (nothing listens on port 1); ``backend`` is only
# the module's parametrization.


def _down_mysql_app() -> tuple[Flask, OrderHooks]:
    """A host app on MariaDB/MySQL whose server is not (yet) up."""
    app = Flask("orderhooks_down_mysql")
    app.config.update(
        BASE_CONFIG,
        SQLALCHEMY_DATABASE_URI="mysql+pymysql://root@127.0.0.1:1/test",
        ORDERHOOKS_DISPATCH="deferred",
        ORDERHOOKS_IGV_MAX_AGE=None,
    )
    db = SQLAlchemy(app)
    return app, OrderHooks(app, db=db)


def test_a_worker_on_a_mysql_store_that_is_down_keeps_looking(backend: str) -> None:
    """``DeliveryStore._sql`` connects once on MySQL/MariaDB to learn the
    server's flavour (MariaDB's SET STATEMENT), and ``claim_due`` read it
    outside ``_store_errors``: a pass while the database is down raised a raw
    OperationalError instead of StoreUnavailable, the error that tells a
    worker (and ``flask orderhooks worker``) to look again. (The store's
    part: flask_orderhooks/store/delivery_store.py.)"""
    app, hooks = _down_mysql_app()
    with app.app_context(), pytest.raises(StoreUnavailable):
        hooks.process_due()


def test_a_worker_started_while_its_mysql_store_is_down_does_not_exit(backend: str) -> None:
    """The same, seen from ``Worker.run``: the OperationalError ended the loop
    (``flask orderhooks worker`` exited 1), where on PostgreSQL and SQLite the
    worker logs "the store is unavailable" and looks again."""
    app, hooks = _down_mysql_app()
    worker = Worker(app, hooks.state(app), poll_interval=0.05)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            with app.app_context():
                worker.run()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    # Alive after a few polls: it logged "store unavailable" and looked again.
    thread.join(0.5)
    still_running = thread.is_alive()
    worker.stop()
    thread.join(5)
    assert errors == []
    assert still_running


def test_a_deferred_callback_on_a_mysql_store_that_is_down_is_answered_503(
    backend: str,
) -> None:
    """The deferred acceptance evaluated ``self._sql.accept`` outside any
    error handling too: the platform got the generic 500 "Internal error"
    (and a traceback in the log) where a down store is a 503, which it
    retries."""
    app, _hooks = _down_mysql_app()

    def receiver(_sender: Flask, **_kw: Any) -> None:
        pass

    order_pending_delivery.connect(receiver, app, weak=False)
    try:
        response = post(app, make("igv", app))
    finally:
        order_pending_delivery.disconnect(receiver, app)
    assert (response.status_code, response.get_data(as_text=True)) == (
        503,
        "The store is unavailable.",
    )
