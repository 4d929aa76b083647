"""Upgrading to 0.3: a deliveries table made by 0.1.0 or by 0.2, with rows in
every status that version had, meets the current version.

- The extension's own store (``OrderHooks(app)``) upgrades the table on first
  use, keeps every row, and goes on working with them (resends, replay, the
  CLI, inline and deferred dispatch).
- Several processes coming up on the same old table at once all succeed.
- With ``db=`` the host's Flask-Migrate autogenerates exactly the missing
  columns and indexes, and the app works with the migrated table.

A 0.2 table is tested on SQLite, PostgreSQL and MariaDB; a 0.1.0 table on
SQLite and PostgreSQL only, the two databases 0.1.0 ran on (its store refused
any other, so no 0.1.0 table exists on MariaDB).

Each test has a database of its own (a file, a PostgreSQL schema or a MariaDB
database): the old table has the same name as the one other tests create.
"""

from __future__ import annotations

import ast
import logging
import logging.config
import multiprocessing
import threading
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from queue import Empty
from typing import Any

import flask_migrate
import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from click.testing import Result
from flask import Flask
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.dialects import mysql
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from werkzeug.test import TestResponse

from flask_orderhooks import OrderHooks, signals
from flask_orderhooks.cli import orderhooks
from flask_orderhooks.store import DUE_INDEX, StandaloneDatabase
from flask_orderhooks.testing import SignedCallback, build
from tests.conftest import (
    BASE_CONFIG,
)
from tests.legacy_schema import (
    COLUMNS,
    LEGACY_COLUMNS,
    LEGACY_INDEX,
    TABLE_NAME,
    LegacyRow,
    fill_legacy_table,
    read_rows,
)

#: (version of the old table, backend): 0.1.0 never ran on MariaDB.
pytestmark = pytest.mark.parametrize(
    ("version", "backend"),
    [
        pytest.param("0.1", "sqlite", id="0.1-sqlite"),
        pytest.param("0.1", "postgresql", id="0.1-postgresql", marks=pytest.mark.postgres),
        pytest.param("0.2", "sqlite", id="0.2-sqlite"),
        pytest.param("0.2", "postgresql", id="0.2-postgresql", marks=pytest.mark.postgres),
        pytest.param("0.2", "mariadb", id="0.2-mariadb", marks=pytest.mark.mariadb),
    ],
)

CREATED_INDEX = "ix_orderhooks_deliveries_created"
REFERENCE_INDEX = "ix_orderhooks_deliveries_reference"
STATUS_CREATED_INDEX = "ix_orderhooks_deliveries_status_created"
#: What the first use adds to each version's table, in the warning's order:
#: the columns in the table's order, then the indexes by name.
ADDED = {
    "0.1": (
        "next_attempt_at",
        "reference",
        "failures",
        "compacted_at",
        CREATED_INDEX,
        DUE_INDEX,
        REFERENCE_INDEX,
        STATUS_CREATED_INDEX,
    ),
    "0.2": (
        "reference",
        "failures",
        "compacted_at",
        CREATED_INDEX,
        REFERENCE_INDEX,
        STATUS_CREATED_INDEX,
    ),
}

#: The platform's success answer, per provider.
SUCCESS = {"igv": "OK", "gateway": "success", "sud": '{"ret_code": 0, "ret_msg": "SUCCESS"}'}
UPGRADE_WARNING = {
    "0.1": (
        "OrderHooks: upgraded the table orderhooks_deliveries: added next_attempt_at, "
        "reference, failures, compacted_at, ix_orderhooks_deliveries_created, "
        "ix_orderhooks_deliveries_due, ix_orderhooks_deliveries_reference, "
        "ix_orderhooks_deliveries_status_created"
    ),
    "0.2": (
        "OrderHooks: upgraded the table orderhooks_deliveries: added reference, failures, "
        "compacted_at, ix_orderhooks_deliveries_created, ix_orderhooks_deliveries_reference, "
        "ix_orderhooks_deliveries_status_created"
    ),
}
INDEXES_ADDED_BY_0_2_AND_0_3 = (DUE_INDEX, CREATED_INDEX, REFERENCE_INDEX, STATUS_CREATED_INDEX)
#: The current table's columns, in order: 0.1.0's, 0.2's due time, 0.3's three.
CURRENT_COLUMNS = [*LEGACY_COLUMNS, "next_attempt_at", "reference", "failures", "compacted_at"]
_DELIVERY_SIGNALS = (
    signals.order_pending_delivery,
    signals.payment_collected,
    signals.payout_finished,
    signals.game_order_changed,
    signals.callback_unhandled,
)


class ShopBase(DeclarativeBase):
    pass


class ShopCredit(ShopBase):
    """The host's own table: one row per event a receiver handled."""

    __tablename__ = "upgrade_shop_credits"
    id: Mapped[int] = mapped_column(primary_key=True)
    key: Mapped[str] = mapped_column(sa.String(200), unique=True)


def event_key(event: Any) -> str:
    """The idempotency key of the delivery an event came from."""
    for name in ("request_id", "notify_id"):
        if hasattr(event, name):
            return str(getattr(event, name))
    if hasattr(event, "id"):
        return f"{event.id}:{event.status}"
    return str(event.key)  # callback_unhandled


class Sink:
    """Connected to every delivery signal of one app while in a ``with``
    block: records each event's delivery key and, with a host db, writes one
    :class:`ShopCredit` through ``db.session`` (committed with the delivery)."""

    def __init__(self, app: Flask, db: SQLAlchemy | None = None) -> None:
        self.app = app
        self.db = db
        self.keys: list[str] = []

    def __call__(self, sender: Flask, *, event: Any, **extra: Any) -> None:
        assert sender is self.app
        self.keys.append(event_key(event))
        if self.db is not None:
            self.db.session.add(ShopCredit(key=f"{event_key(event)}#{len(self.keys)}"))

    def __enter__(self) -> Sink:
        for signal in _DELIVERY_SIGNALS:
            signal.connect(self, self.app, weak=False)
        return self

    def __exit__(self, *exc: object) -> None:
        for signal in _DELIVERY_SIGNALS:
            signal.disconnect(self, self.app)

    def credits(self) -> list[str]:
        assert self.db is not None
        with self.app.app_context():
            return sorted(
                k.partition("#")[0] for k in self.db.session.scalars(sa.select(ShopCredit.key))
            )


def make(app: Flask, kind: str, **fields: Any) -> SignedCallback:
    with app.app_context():
        return build(kind, app=app, **fields)


def post(app: Flask, cb: SignedCallback) -> TestResponse:
    return app.test_client().post(cb.url(), data=cb.body, headers=cb.headers)


def answer(response: TestResponse) -> tuple[int, str]:
    return response.status_code, response.get_data(as_text=True)


def run(app: Flask, *args: str) -> Result:
    return app.test_cli_runner().invoke(orderhooks, list(args))


def assert_upgraded(engine: sa.Engine) -> None:
    """The table is 0.3's: the old columns, PK and indexes, plus the new ones."""
    inspector = sa.inspect(engine)
    columns = {c["name"]: c for c in inspector.get_columns(TABLE_NAME)}
    dialect = dialect_of(engine)
    assert list(columns) == CURRENT_COLUMNS
    for name in ("next_attempt_at", "compacted_at"):
        added = columns[name]
        assert added["nullable"] is True, name
        assert isinstance(added["type"], sa.DateTime), name
        if dialect == "postgresql":
            assert added["type"].timezone is True, "timestamp with time zone, as every other time"
        if dialect == "mariadb":
            assert isinstance(added["type"], mysql.DATETIME), name
            assert added["type"].fsp == 6, "microseconds, as every other time"
    reference = columns["reference"]
    assert reference["nullable"] is True
    if dialect != "mariadb":
        assert isinstance(reference["type"], sa.String)
        assert reference["type"].length == 191
    failures = columns["failures"]
    assert failures["nullable"] is True
    if dialect == "mariadb":
        # Order ids compared byte for byte; a history past TEXT's 65,535 bytes.
        # VARBINARY like the key: utf8mb4_bin would pad trailing spaces.
        assert isinstance(reference["type"], mysql.VARBINARY)
        assert reference["type"].length == 764
        assert type(failures["type"]) is mysql.MEDIUMTEXT
        # 0.2's own types are kept.
        assert isinstance(columns["key"]["type"], mysql.VARBINARY)
        assert columns["key"]["type"].length == 764
        assert isinstance(columns["body"]["type"], mysql.MEDIUMBLOB)
    else:
        assert isinstance(failures["type"], sa.Text)
    assert [c["name"] for c in columns.values() if not c["nullable"]] == [
        n for n in LEGACY_COLUMNS if n != "error"
    ]
    indexes = {
        i["name"]: (i["column_names"], bool(i["unique"]), partial(i))
        for i in inspector.get_indexes(TABLE_NAME)
    }
    assert indexes == {
        LEGACY_INDEX: (["status", "updated_at"], False, None),
        # Partial: done and dead rows (NULL) are not in it (MySQL has no
        # partial indexes).
        DUE_INDEX: (
            ["next_attempt_at"],
            False,
            None if dialect == "mariadb" else "next_attempt_at IS NOT NULL",
        ),
        CREATED_INDEX: (["created_at"], False, None),
        REFERENCE_INDEX: (["reference"], False, None),
        STATUS_CREATED_INDEX: (["status", "created_at"], False, None),
    }
    assert inspector.get_pk_constraint(TABLE_NAME)["constrained_columns"] == [
        "provider",
        "callback",
        "key",
    ]


def dialect_of(engine: sa.Engine) -> str:
    """``sqlite``, ``postgresql`` or ``mariadb`` (SQLAlchemy names MariaDB
    ``mysql`` until its first connection)."""
    with engine.connect():
        pass
    return "mariadb" if engine.dialect.name in ("mysql", "mariadb") else engine.dialect.name


def partial(index: Any) -> str | None:
    """A reflected index's WHERE clause, as text without its parentheses."""
    options = index.get("dialect_options", {})
    where = options.get("postgresql_where", options.get("sqlite_where"))
    return None if where is None else str(where).strip("()")


def as_upgraded(old: dict[str, LegacyRow]) -> dict[str, dict[str, Any]]:
    """What old rows must read as after the upgrade: unchanged, 0.2's due time
    (none for 0.1.0's), and none of 0.3's columns."""
    return {
        row.key: {
            **row.values(),
            "next_attempt_at": row.next_attempt_at,
            "reference": None,
            "failures": None,
            "compacted_at": None,
        }
        for row in old.values()
    }


# -- fixtures -------------------------------------------------------------------


@pytest.fixture
def url(empty_database_url: str) -> str:
    return empty_database_url


@pytest.fixture
def engine(url: str) -> Iterator[sa.Engine]:
    """The test's own look at the database, beside the app's engines."""
    engine = sa.create_engine(url)
    yield engine
    engine.dispose()


StandaloneFactory = Callable[..., tuple[Flask, OrderHooks]]


@pytest.fixture
def standalone_app(url: str, tmp_path: Path) -> Iterator[StandaloneFactory]:
    """``standalone_app(**config)``: an app with the extension's own store at ``url``."""
    made: list[tuple[Flask, OrderHooks]] = []

    def factory(**config: Any) -> tuple[Flask, OrderHooks]:
        app = Flask(f"upgrade_{len(made)}", instance_path=str(tmp_path / "instance"))
        app.config.update(BASE_CONFIG)
        app.config.update(ORDERHOOKS_DATABASE_URI=url, ORDERHOOKS_DUPLICATE_WAIT=0.2)
        app.config.update(config)
        hooks = OrderHooks(app)
        made.append((app, hooks))
        return app, hooks

    yield factory
    for app, hooks in made:
        standalone = hooks.state(app).standalone
        assert standalone is not None
        standalone.engine.dispose()


# -- the extension's own store ----------------------------------------------------


def test_own_store_upgrades_an_old_table_on_first_use_and_keeps_working(
    version: str,
    engine: sa.Engine,
    standalone_app: StandaloneFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    app, hooks = standalone_app()
    old = fill_legacy_table(engine, app, version=version)
    assert read_rows(engine) == {row.key: row.values() for row in old.values()}
    assert [c["name"] for c in sa.inspect(engine).get_columns(TABLE_NAME)] == list(COLUMNS[version])
    caplog.set_level(logging.WARNING, logger="flask_orderhooks")

    with Sink(app) as sink:
        # First use: the platform resends the delivery that the old version finished.
        done = old["done"]
        assert answer(post(app, done.callback)) == (200, SUCCESS["gateway"])
        assert sink.keys == [], "a done delivery is never dispatched again"
        assert [r.getMessage() for r in caplog.records if r.name == "flask_orderhooks"] == [
            UPGRADE_WARNING[version]
        ]
        assert_upgraded(engine)
        assert read_rows(engine) == as_upgraded(old), "every old row kept as it was"

        # The operators' view reads the old rows.
        listing = run(app, "deliveries")
        assert listing.exit_code == 0, listing.output
        lines = listing.output.splitlines()
        assert len(lines) == 1 + len(old)
        for row in old.values():
            (line,) = [line for line in lines if f" {row.key} " in line]
            assert line.split()[2:7] == [
                row.callback.provider,
                row.callback.callback,
                row.key,
                row.status,
                str(row.attempts),
            ]
        failed_only = run(app, "deliveries", "--status", "failed")
        assert failed_only.exit_code == 0, failed_only.output
        assert sorted(line.split()[4] for line in failed_only.output.splitlines()[1:]) == sorted(
            [old["failed"].key, old["failed_replay"].key]
        )
        failed = old["failed"]
        show = run(app, "show", failed.key)
        assert show.exit_code == 0, show.output
        shown = show.output.splitlines()
        assert datetime.fromisoformat(shown[3].split(None, 1)[1]) == failed.created_at
        assert datetime.fromisoformat(shown[4].split(None, 1)[1]) == failed.updated_at
        if version == "0.1":
            planned = "- (none planned: replay it)"
        else:
            assert failed.next_attempt_at is not None
            planned = f"{failed.next_attempt_at.isoformat()}, due now"
        assert shown[:3] + shown[5:] == [
            f"igv order-status {failed.key}",
            "  status:   failed",
            "  attempts: 1",
            f"  next:     {planned}",
            "  error:    RuntimeError: receiver exploded on purpose",
            *[f"  header:   {name}: {value}" for name, value in sorted(failed.headers.items())],
            "  body:     " + failed.callback.body.decode(),
        ]

        # The platform's resend of the failed delivery dispatches it.
        assert answer(post(app, failed.callback)) == (200, SUCCESS["igv"])
        assert sink.keys == [failed.key]
        (stored,) = hooks.state(app).store.get(failed.key)
        assert (
            stored.status,
            stored.attempts,
            stored.error,
            stored.next_attempt_at,
            stored.reference,
            stored.failed_attempts,
            stored.compacted_at,
        ) == ("done", 2, failed.error, None, None, (), None)

        # An operator replays the other failed one.
        replayed = old["failed_replay"]
        result = run(app, "replay", replayed.key)
        assert (result.exit_code, result.output) == (
            0,
            f"gateway payout {replayed.key}: replayed, attempt 3: done.\n",
        )
        assert sink.keys == [failed.key, replayed.key]

        # The old worker died holding this one: a resend takes it over.
        expired = old["expired"]
        assert answer(post(app, expired.callback)) == (200, SUCCESS["sud"])
        assert sink.keys == [failed.key, replayed.key, expired.key]
        (stored,) = hooks.state(app).store.get(expired.key)
        assert (stored.status, stored.attempts) == ("done", 2)

        # The old worker is still at this one: the resend waits, then "retry".
        live = old["live"]
        assert answer(post(app, live.callback)) == (
            503,
            '{"ret_code": 503, "ret_msg": '
            '"Another worker is handling this delivery; retry later."}',
        )
        assert len(sink.keys) == 3

        revived = []
        if version == "0.2":
            # 0.2's own statuses: a resend dispatches a pending and a dead one.
            for role, attempts in (("pending", 1), ("dead", 8)):
                row = old[role]
                assert answer(post(app, row.callback)) == (200, SUCCESS["gateway"]), role
                (stored,) = hooks.state(app).store.get(row.key)
                assert (stored.status, stored.attempts, stored.error) == (
                    "done",
                    attempts,
                    row.error,
                ), role
                revived.append(row.key)
            assert sink.keys[3:] == revived

        # New deliveries, inline.
        fresh = make(app, "igv")
        assert answer(post(app, fresh)) == (200, SUCCESS["igv"])
        assert sink.keys[3 + len(revived) :] == [fresh.key]
        (stored,) = hooks.state(app).store.get(fresh.key)
        assert stored.reference == str(fresh.json["orderId"]), "0.3's column is written"
        with app.app_context():
            assert hooks.process_due() == 0, "nothing is due: all done, or leased to a live worker"

    rows = read_rows(engine)
    assert rows[fresh.key]["status"] == "done"
    untouched = as_upgraded(old)
    for role in ("done", "live"):
        assert rows[old[role].key] == untouched[old[role].key]
    finished = ["failed", "failed_replay", "expired", *(["pending", "dead"] if revived else [])]
    assert {rows[old[r].key]["status"] for r in finished} == {"done"}

    # New deliveries, deferred: stored pending, then dispatched by a worker pass.
    deferred_app, deferred_hooks = standalone_app(ORDERHOOKS_DISPATCH="deferred")
    with Sink(deferred_app) as deferred_sink:
        later = make(deferred_app, "collect")
        assert answer(post(deferred_app, later)) == (200, SUCCESS["gateway"])
        assert deferred_sink.keys == []
        pending = read_rows(engine)[later.key]
        assert (pending["status"], pending["attempts"]) == ("pending", 0)
        assert pending["next_attempt_at"] is not None
        with deferred_app.app_context():
            assert deferred_hooks.process_due() == 1
        assert deferred_sink.keys == [later.key]
    finished_row = read_rows(engine)[later.key]
    assert (finished_row["status"], finished_row["attempts"], finished_row["next_attempt_at"]) == (
        "done",
        1,
        None,
    )
    assert set(as_upgraded(old)) <= set(read_rows(engine)), "no old row lost"


def test_deferred_dispatch_carries_resent_old_deliveries_to_done(
    version: str, engine: sa.Engine, standalone_app: StandaloneFactory
) -> None:
    """In deferred mode a resend is answered success at once, so whatever it
    answers for an old row a worker must carry to done: the platform will
    not send it again."""
    app, hooks = standalone_app(ORDERHOOKS_DISPATCH="deferred")
    old = fill_legacy_table(engine, app, version=version)
    resent = ["done", "failed", "expired", *(["dead"] if version == "0.2" else [])]
    with Sink(app) as sink:
        for role in resent:
            cb = old[role].callback
            assert answer(post(app, cb)) == (200, SUCCESS[cb.provider]), role
        assert sink.keys == []
        with app.app_context():
            hooks.process_due()
        assert old["failed"].key in sink.keys
        assert read_rows(engine)[old["failed"].key]["status"] == "done"
        expired_key = old["expired"].key
        assert expired_key in sink.keys, (
            "an old delivery whose worker died was answered 200 to the platform's resend, "
            "but no worker pass dispatches it"
        )
    # 0.2's pending delivery and its second failed one were due already;
    # its dead one was revived.
    dispatched = [old[r].key for r in resent[1:]]
    if version == "0.2":
        dispatched += [old["pending"].key, old["failed_replay"].key]
    assert sorted(sink.keys) == sorted(dispatched), "each once"
    expired = read_rows(engine)[expired_key]
    assert (expired["status"], expired["attempts"]) == ("done", 2)
    if version == "0.2":
        rows = read_rows(engine)
        assert (rows[old["dead"].key]["status"], rows[old["dead"].key]["attempts"]) == ("done", 8)
        assert (rows[old["pending"].key]["status"], rows[old["pending"].key]["attempts"]) == (
            "done",
            1,
        )


# -- several processes upgrading at once --------------------------------------------

PROCESSES = 4
ROUNDS = 3


def _upgrading_process(url: str, index: int, instance: str, barrier: Any, results: Any) -> None:
    """One of several workers booting on an old table at once, ROUNDS times.

    Each round is a fresh app (a fresh boot). Even workers create the table
    eagerly (``hooks.create_all``, as an app factory may at boot), odd ones
    on their first delivery; then each takes one new delivery.
    """
    for round_ in range(ROUNDS):
        app = Flask(f"boot_{index}", instance_path=instance)
        app.config.update(BASE_CONFIG)
        app.config.update(ORDERHOOKS_DATABASE_URI=url)
        hooks = OrderHooks(app)
        cb = make(app, "igv", request_id=f"r{round_}-p{index}")
        try:
            barrier.wait(timeout=120)
        except threading.BrokenBarrierError:
            return
        try:
            with Sink(app) as sink:
                if index % 2 == 0:
                    hooks.create_all(app)
                status, body = answer(post(app, cb))
            outcome = f"{status} {body}, dispatched {len(sink.keys)}"
        except Exception as exc:
            outcome = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
        finally:
            standalone = hooks.state(app).standalone
            assert standalone is not None
            standalone.engine.dispose()
        results.put((round_, index, outcome))


def test_processes_booting_on_an_old_table_at_once_all_come_up(
    version: str, url: str, engine: sa.Engine, standalone_app: StandaloneFactory, tmp_path: Path
) -> None:
    signer, _hooks = standalone_app()  # signs the old rows; never opens the store
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(PROCESSES + 1)
    results = context.Queue()
    workers = [
        context.Process(
            target=_upgrading_process,
            args=(url, index, str(tmp_path / "instance"), barrier, results),
        )
        for index in range(PROCESSES)
    ]
    for worker in workers:
        worker.start()
    try:
        for round_ in range(ROUNDS):
            with engine.begin() as connection:
                connection.exec_driver_sql(f"DROP TABLE IF EXISTS {TABLE_NAME}")
            old = fill_legacy_table(engine, signer, version=version)
            barrier.wait(timeout=120)
            try:
                this_round = sorted(results.get(timeout=60) for _ in range(PROCESSES))
            except Empty:
                pytest.fail(f"round {round_}: a worker did not answer within 60 s")
            assert [outcome for _r, _i, outcome in this_round] == [
                f"200 {SUCCESS['igv']}, dispatched 1"
            ] * PROCESSES, f"round {round_}: " + "; ".join(
                f"worker {index}: {outcome}" for _r, index, outcome in this_round
            )
            assert_upgraded(engine)
            rows = read_rows(engine)
            assert {key: rows[key] for key in as_upgraded(old)} == as_upgraded(old)
            assert {
                k: (r["status"], r["attempts"]) for k, r in rows.items() if k.startswith("r")
            } == {f"r{round_}-p{index}": ("done", 1) for index in range(PROCESSES)}
    finally:
        barrier.abort()
        for worker in workers:
            worker.join(30)
            if worker.is_alive():
                worker.terminate()
                worker.join()


def test_an_upgrade_overtaken_between_its_steps_still_comes_up(
    version: str, url: str, engine: sa.Engine, standalone_app: StandaloneFactory
) -> None:
    """The interleaving the processes above meet by chance, forced: two
    workers (engines of their own) both find the old table; the first adds
    the columns, the second tries to, while the first is creating the indexes.

    On PostgreSQL (advisory lock) and MariaDB (named lock) the second waits
    for the first's lock instead, so each wait below runs out after WAIT and
    the upgrades simply take turns.
    """
    signer, _hooks = standalone_app()
    old = fill_legacy_table(engine, signer, version=version)
    first = StandaloneDatabase(url, busy_timeout=5, engine_options={})
    second = StandaloneDatabase(url, busy_timeout=5, engine_options={})
    first_altering, second_altering = threading.Event(), threading.Event()
    first_indexing, second_finished = threading.Event(), threading.Event()
    wait = 1.0

    def first_steps(_conn: Any, _cursor: Any, statement: str, *_rest: Any) -> None:
        if statement.startswith("ALTER TABLE"):
            first_altering.set()
            second_altering.wait(wait)
        elif statement.startswith("CREATE INDEX") and not first_indexing.is_set():
            first_indexing.set()
            second_finished.wait(wait)

    def second_steps(_conn: Any, _cursor: Any, statement: str, *_rest: Any) -> None:
        if statement.startswith("ALTER TABLE"):
            second_altering.set()
            first_indexing.wait(wait)

    sa.event.listen(first.engine, "before_cursor_execute", first_steps)
    sa.event.listen(second.engine, "before_cursor_execute", second_steps)
    errors: dict[str, str] = {}
    # What each saw when ensure_table() returned: it never looks again.
    ready: dict[str, tuple[list[str], list[str]]] = {}

    def boot(name: str, database: StandaloneDatabase, finished: threading.Event) -> None:
        try:
            database.ensure_table()
            with database.engine.connect() as connection:
                inspector = sa.inspect(connection)
                ready[name] = (
                    [c["name"] for c in inspector.get_columns(TABLE_NAME)],
                    sorted(str(i["name"]) for i in inspector.get_indexes(TABLE_NAME)),
                )
        except Exception as exc:
            errors[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
        finally:
            finished.set()

    threads = [
        threading.Thread(target=boot, args=("first", first, threading.Event())),
        threading.Thread(target=boot, args=("second", second, second_finished)),
    ]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert errors == {}
        whole = (CURRENT_COLUMNS, sorted([LEGACY_INDEX, *INDEXES_ADDED_BY_0_2_AND_0_3]))
        assert ready == {"first": whole, "second": whole}, "ready only once the table is whole"
        assert_upgraded(engine)
        assert read_rows(engine) == as_upgraded(old)
    finally:
        first.engine.dispose()
        second.engine.dispose()


# -- with db=: the host's Flask-Migrate ------------------------------------------------

#: The due index is partial on SQLite and PostgreSQL (store/table.py: due_index).
_WHERE = (
    "postgresql_where=sa.text('next_attempt_at IS NOT NULL'), "
    "sqlite_where=sa.text('next_attempt_at IS NOT NULL')"
)
#: The new columns' types, rendered with SQLAlchemy's own types only: times
#: in microseconds on MySQL and MariaDB (store/table.py: WHEN_COLUMN), the
#: order id byte for byte (a VARBINARY), the history in a MEDIUMTEXT (HISTORY).
_WHEN_TYPE = (
    "sa.DateTime(timezone=True).with_variant(mysql.DATETIME(fsp=6), 'mariadb')"
    ".with_variant(mysql.DATETIME(fsp=6), 'mysql')"
)
_REFERENCE_TYPE = (
    "sa.String(length=191).with_variant(sa.VARBINARY(length=764), 'mariadb')"
    ".with_variant(sa.VARBINARY(length=764), 'mysql')"
)
_HISTORY_TYPE = (
    "sa.Text().with_variant(mysql.MEDIUMTEXT(), 'mariadb')"
    ".with_variant(mysql.MEDIUMTEXT(), 'mysql')"
)
#: (column, its type) in the table's order, per version of the old table.
_NEW_COLUMNS = {
    "0.1": [
        ("next_attempt_at", _WHEN_TYPE),
        ("reference", _REFERENCE_TYPE),
        ("failures", _HISTORY_TYPE),
        ("compacted_at", _WHEN_TYPE),
    ],
    "0.2": [
        ("reference", _REFERENCE_TYPE),
        ("failures", _HISTORY_TYPE),
        ("compacted_at", _WHEN_TYPE),
    ],
}
#: (index, its columns, its options) by name, per version of the old table.
_NEW_INDEXES: dict[str, list[tuple[str, tuple[str, ...], str]]] = {
    "0.1": [
        (CREATED_INDEX, ("created_at",), ""),
        (DUE_INDEX, ("next_attempt_at",), f", {_WHERE}"),
        (REFERENCE_INDEX, ("reference",), ""),
        (STATUS_CREATED_INDEX, ("status", "created_at"), ""),
    ],
    "0.2": [
        (CREATED_INDEX, ("created_at",), ""),
        (REFERENCE_INDEX, ("reference",), ""),
        (STATUS_CREATED_INDEX, ("status", "created_at"), ""),
    ],
}


def upgrade_ops(version: str, batch: bool) -> list[str]:
    """The upgrade() autogenerate must write for ``version``'s table."""
    if batch:  # Flask-Migrate's default (render_as_batch=True).
        return [
            f"with op.batch_alter_table('{TABLE_NAME}', schema=None) as batch_op:",
            *[
                f"batch_op.add_column(sa.Column('{name}', {type_}, nullable=True))"
                for name, type_ in _NEW_COLUMNS[version]
            ],
            *[
                f"batch_op.create_index('{name}', {list(columns)!r}, unique=False{options})"
                for name, columns, options in _NEW_INDEXES[version]
            ],
        ]
    return [
        *[
            f"op.add_column('{TABLE_NAME}', sa.Column('{name}', {type_}, nullable=True))"
            for name, type_ in _NEW_COLUMNS[version]
        ],
        *[
            f"op.create_index('{name}', '{TABLE_NAME}', {list(columns)!r}, unique=False{options})"
            for name, columns, options in _NEW_INDEXES[version]
        ],
    ]


def downgrade_ops(version: str, batch: bool) -> list[str]:
    """The downgrade() autogenerate must write: the upgrade, undone in reverse."""
    indexes = list(reversed(_NEW_INDEXES[version]))
    columns = [name for name, _type in reversed(_NEW_COLUMNS[version])]
    if batch:
        return [
            f"with op.batch_alter_table('{TABLE_NAME}', schema=None) as batch_op:",
            *[f"batch_op.drop_index('{name}'{options})" for name, _c, options in indexes],
            *[f"batch_op.drop_column('{name}')" for name in columns],
        ]
    return [
        *[
            f"op.drop_index('{name}', table_name='{TABLE_NAME}'{options})"
            for name, _c, options in indexes
        ],
        *[f"op.drop_column('{TABLE_NAME}', '{name}')" for name in columns],
    ]


#: The DDL ``flask db upgrade`` runs (besides Alembic's own alembic_version),
#: per dialect: each new column's DDL type, and the partial due index's WHERE.
_DDL_TYPES = {
    "sqlite": {
        "next_attempt_at": "DATETIME",
        "reference": "VARCHAR(191)",
        "failures": "TEXT",
        "compacted_at": "DATETIME",
    },
    "postgresql": {
        "next_attempt_at": "TIMESTAMP WITH TIME ZONE",
        "reference": "VARCHAR(191)",
        "failures": "TEXT",
        "compacted_at": "TIMESTAMP WITH TIME ZONE",
    },
    "mariadb": {
        "next_attempt_at": "DATETIME(6)",
        "reference": "VARBINARY(764)",
        "failures": "MEDIUMTEXT",
        "compacted_at": "DATETIME(6)",
    },
}


def upgrade_ddl(version: str, dialect: str) -> list[str]:
    where = "" if dialect == "mariadb" else " WHERE next_attempt_at IS NOT NULL"
    return [
        *[
            f"ALTER TABLE {TABLE_NAME} ADD COLUMN {name} {_DDL_TYPES[dialect][name]}"
            for name, _type in _NEW_COLUMNS[version]
        ],
        *[
            f"CREATE INDEX {name} ON {TABLE_NAME} ({', '.join(columns)})"
            + (where if name == DUE_INDEX else "")
            for name, columns, _options in _NEW_INDEXES[version]
        ],
    ]


def operations(source: str, function: str) -> list[str]:
    """The statements of a migration's ``upgrade()`` or ``downgrade()``,
    normalised by ``ast.unparse`` (comments dropped)."""
    (body,) = [
        node.body
        for node in ast.parse(source).body
        if isinstance(node, ast.FunctionDef) and node.name == function
    ]
    found: list[str] = []

    def walk(statements: list[ast.stmt]) -> None:
        for node in statements:
            if isinstance(node, ast.With):
                found.extend(f"with {ast.unparse(item)}:" for item in node.items)
                walk(node.body)
            elif isinstance(node, ast.Expr):
                found.append(ast.unparse(node.value))
            elif not isinstance(node, ast.Pass):
                found.append(ast.unparse(node))

    walk(body)
    return found


def host_app(url: str, tmp_path: Path, **config: Any) -> tuple[Flask, SQLAlchemy, OrderHooks]:
    app = Flask("upgrade_host", instance_path=str(tmp_path / "instance"))
    app.config.update(BASE_CONFIG)
    app.config.update(SQLALCHEMY_DATABASE_URI=url, ORDERHOOKS_DUPLICATE_WAIT=0.2)
    app.config.update(config)
    db = SQLAlchemy(app, model_class=ShopBase)
    return app, db, OrderHooks(app, db=db)


# Flask-Migrate 4.1's env.py tries db.get_engine() (Flask-SQLAlchemy < 3) before
# db.engine; Flask-SQLAlchemy 3.1 warns about it. Every host sees that warning.
@pytest.mark.filterwarnings("ignore:'get_engine' is deprecated:DeprecationWarning")
@pytest.mark.parametrize("render_as_batch", [True, False], ids=["batch-default", "plain-ops"])
def test_flask_migrate_autogenerates_exactly_the_missing_changes(
    version: str,
    url: str,
    engine: sa.Engine,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    render_as_batch: bool,
) -> None:
    app, db, _hooks = host_app(url, tmp_path)
    flask_migrate.Migrate(app, db, render_as_batch=render_as_batch)
    # The host's own tables exist already; the deliveries table is the old version's.
    ShopBase.metadata.create_all(
        engine, tables=[t for t in ShopBase.metadata.sorted_tables if t.name != TABLE_NAME]
    )
    old = fill_legacy_table(engine, app, version=version)
    old_indexes = reflected_indexes(engine)
    # env.py runs logging.config.fileConfig(alembic.ini), which would disable
    # every logger it does not name (flask_orderhooks among them) for the rest
    # of the session; the migration itself is untouched.
    monkeypatch.setattr(logging.config, "fileConfig", lambda *args, **kwargs: None)
    directory = str(tmp_path / "migrations")
    ddl: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_rest: Any) -> None:
        text = " ".join(statement.split())
        if text.startswith(("ALTER", "CREATE", "DROP")) and "alembic_version" not in text:
            ddl.append(text)

    try:
        with app.app_context():
            flask_migrate.init(directory=directory)
            flask_migrate.migrate(directory=directory, message="orderhooks 0.3")
            (script,) = (Path(directory) / "versions").glob("*.py")
            source = script.read_text()
            assert operations(source, "upgrade") == upgrade_ops(version, render_as_batch)
            assert operations(source, "downgrade") == downgrade_ops(version, render_as_batch)
            sa.event.listen(db.engine, "before_cursor_execute", record)
            try:
                flask_migrate.upgrade(directory=directory)
            finally:
                sa.event.remove(db.engine, "before_cursor_execute", record)
            assert ddl == upgrade_ddl(version, dialect_of(engine)), "no table copy, nothing else"
            with db.engine.connect() as connection:
                # The migrated table is exactly what 0.3 declares.
                assert compare_metadata(MigrationContext.configure(connection), db.metadata) == []
            assert_upgraded(engine)
            assert read_rows(engine) == as_upgraded(old)

            # The downgrade gives the old table back, every row as it was.
            flask_migrate.downgrade(directory=directory)
            assert [c["name"] for c in sa.inspect(engine).get_columns(TABLE_NAME)] == list(
                COLUMNS[version]
            )
            assert reflected_indexes(engine) == old_indexes
            assert read_rows(engine) == {row.key: row.values() for row in old.values()}
            flask_migrate.upgrade(directory=directory)
        assert_upgraded(engine)
        assert read_rows(engine) == as_upgraded(old)

        with Sink(app, db) as sink:
            done = old["done"]
            assert answer(post(app, done.callback)) == (200, SUCCESS["gateway"])
            assert sink.keys == []
            failed = old["failed"]
            assert answer(post(app, failed.callback)) == (200, SUCCESS["igv"])
            assert sink.keys == [failed.key]
            assert sink.credits() == [failed.key], "the receiver's write committed with it"
        row = read_rows(engine)[failed.key]
        assert (row["status"], row["attempts"], row["next_attempt_at"]) == ("done", 2, None)

        deferred, deferred_db, deferred_hooks = host_app(
            url, tmp_path, ORDERHOOKS_DISPATCH="deferred"
        )
        # 0.2's rows that were due already: a worker carries them on too.
        due = (
            [old[r].key for r in ("failed_replay", "expired", "pending")]
            if version == "0.2"
            else []
        )
        try:
            with Sink(deferred, deferred_db) as deferred_sink:
                later = make(deferred, "sud")
                assert answer(post(deferred, later)) == (200, SUCCESS["sud"])
                assert read_rows(engine)[later.key]["status"] == "pending"
                with deferred.app_context():
                    assert deferred_hooks.process_due() == 1 + len(due)
                assert sorted(deferred_sink.keys) == sorted([later.key, *due])
            rows = read_rows(engine)
            assert {key: rows[key]["status"] for key in [later.key, *due]} == dict.fromkeys(
                [later.key, *due], "done"
            )
            assert sink.credits() == sorted([failed.key, later.key, *due])
        finally:
            with deferred.app_context():
                deferred_db.engine.dispose()
        assert set(as_upgraded(old)) <= set(read_rows(engine)), "no old row lost"
    finally:
        with app.app_context():
            db.engine.dispose()


def reflected_indexes(engine: sa.Engine) -> dict[str, tuple[list[str], bool, str | None]]:
    """The deliveries table's indexes: columns, uniqueness, partial WHERE."""
    return {
        str(i["name"]): ([str(c) for c in i["column_names"]], bool(i["unique"]), partial(i))
        for i in sa.inspect(engine).get_indexes(TABLE_NAME)
    }
