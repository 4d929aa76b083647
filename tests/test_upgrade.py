"""Upgrading from 0.1.0: a deliveries table with rows in every 0.1.0 status
meets 0.2, on SQLite and on PostgreSQL.

- The extension's own store (``OrderHooks(app)``) upgrades the table on first
  use, keeps every row, and goes on working with them (resends, replay, the
  CLI, inline and deferred dispatch).
- Several processes coming up on the same 0.1.0 table at once all succeed.
- With ``db=`` the host's Flask-Migrate autogenerates exactly the column and
  the index, and the app works with the migrated table.

Each test has a database of its own (a file, or a PostgreSQL schema): the
0.1.0 table has the same name as the one other tests create.
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
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from werkzeug.test import TestResponse

from flask_orderhooks import OrderHooks, signals
from flask_orderhooks.cli import orderhooks
from flask_orderhooks.store import DUE_INDEX, StandaloneDatabase
from flask_orderhooks.testing import SignedCallback, build
from tests.conftest import BASE_CONFIG, PG_URL, private_schema
from tests.legacy_schema import (
    LEGACY_COLUMNS,
    LEGACY_INDEX,
    TABLE_NAME,
    LegacyRow,
    fill_legacy_table,
    read_rows,
)

#: The platform's success answer, per provider.
SUCCESS = {"igv": "OK", "gateway": "success", "sud": '{"ret_code": 0, "ret_msg": "SUCCESS"}'}
UPGRADE_WARNING = f"OrderHooks: upgraded the table {TABLE_NAME}: added next_attempt_at, {DUE_INDEX}"
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
    """The table is 0.2's: 0.1.0's columns, PK and index, plus the new ones."""
    inspector = sa.inspect(engine)
    columns = {c["name"]: c for c in inspector.get_columns(TABLE_NAME)}
    assert list(columns) == [*LEGACY_COLUMNS, "next_attempt_at"]
    added = columns["next_attempt_at"]
    assert added["nullable"] is True
    assert isinstance(added["type"], sa.DateTime)
    if engine.dialect.name == "postgresql":
        assert added["type"].timezone is True, "timestamp with time zone, as every other time"
    assert [c["name"] for c in columns.values() if not c["nullable"]] == [
        n for n in LEGACY_COLUMNS if n != "error"
    ]
    indexes = {
        i["name"]: (i["column_names"], bool(i["unique"]), partial(i))
        for i in inspector.get_indexes(TABLE_NAME)
    }
    assert indexes == {
        LEGACY_INDEX: (["status", "updated_at"], False, None),
        # Partial: done and dead rows (NULL) are not in it.
        DUE_INDEX: (["next_attempt_at"], False, "next_attempt_at IS NOT NULL"),
    }
    assert inspector.get_pk_constraint(TABLE_NAME)["constrained_columns"] == [
        "provider",
        "callback",
        "key",
    ]


def partial(index: Any) -> str | None:
    """A reflected index's WHERE clause, as text without its parentheses."""
    options = index.get("dialect_options", {})
    where = options.get("postgresql_where", options.get("sqlite_where"))
    return None if where is None else str(where).strip("()")


def as_upgraded(old: dict[str, LegacyRow]) -> dict[str, dict[str, Any]]:
    """What 0.1.0's rows must read as after the upgrade: unchanged, no due time."""
    return {row.key: {**row.values(), "next_attempt_at": None} for row in old.values()}


# -- fixtures -------------------------------------------------------------------


@pytest.fixture
def url(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[str]:
    """A database of this test's own holding nothing yet."""
    if backend == "postgresql":
        request.getfixturevalue("postgres_url")  # skips (loudly) without a server
        with private_schema(PG_URL, "orderhooks_upgrade") as schema_url:
            yield schema_url
    else:
        yield f"sqlite:///{tmp_path / 'orderhooks.sqlite3'}"


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


def test_own_store_upgrades_a_0_1_table_on_first_use_and_keeps_working(
    engine: sa.Engine, standalone_app: StandaloneFactory, caplog: pytest.LogCaptureFixture
) -> None:
    app, hooks = standalone_app()
    old = fill_legacy_table(engine, app)
    assert read_rows(engine) == {row.key: row.values() for row in old.values()}
    caplog.set_level(logging.WARNING, logger="flask_orderhooks")

    with Sink(app) as sink:
        # First use: the platform resends the delivery that 0.1.0 finished.
        done = old["done"]
        assert answer(post(app, done.callback)) == (200, SUCCESS["gateway"])
        assert sink.keys == [], "a done delivery is never dispatched again"
        assert [r.getMessage() for r in caplog.records if r.name == "flask_orderhooks"] == [
            UPGRADE_WARNING
        ]
        assert_upgraded(engine)
        assert read_rows(engine) == as_upgraded(old), "every 0.1.0 row kept as it was"

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
        assert shown[:3] + shown[5:] == [
            f"igv order-status {failed.key}",
            "  status:   failed",
            "  attempts: 1",
            "  next:     - (none planned: replay it)",
            "  error:    RuntimeError: receiver exploded on purpose",
            *[f"  header:   {name}: {value}" for name, value in sorted(failed.headers.items())],
            "  body:     " + failed.callback.body.decode(),
        ]

        # The platform's resend of the failed delivery dispatches it.
        assert answer(post(app, failed.callback)) == (200, SUCCESS["igv"])
        assert sink.keys == [failed.key]
        (stored,) = hooks.state(app).store.get(failed.key)
        assert (stored.status, stored.attempts, stored.error, stored.next_attempt_at) == (
            "done",
            2,
            failed.error,
            None,
        )

        # An operator replays the other failed one.
        replayed = old["failed_replay"]
        result = run(app, "replay", replayed.key)
        assert (result.exit_code, result.output) == (
            0,
            f"gateway payout {replayed.key}: replayed, attempt 3: done.\n",
        )
        assert sink.keys == [failed.key, replayed.key]

        # 0.1.0's worker died holding this one: a resend takes it over.
        expired = old["expired"]
        assert answer(post(app, expired.callback)) == (200, SUCCESS["sud"])
        assert sink.keys == [failed.key, replayed.key, expired.key]
        (stored,) = hooks.state(app).store.get(expired.key)
        assert (stored.status, stored.attempts) == ("done", 2)

        # 0.1.0's worker is still at this one: the resend waits, then "retry".
        live = old["live"]
        assert answer(post(app, live.callback)) == (
            503,
            '{"ret_code": 503, "ret_msg": '
            '"Another worker is handling this delivery; retry later."}',
        )
        assert len(sink.keys) == 3

        # New deliveries, inline.
        fresh = make(app, "igv")
        assert answer(post(app, fresh)) == (200, SUCCESS["igv"])
        assert sink.keys[3:] == [fresh.key]
        with app.app_context():
            assert hooks.process_due() == 0, "nothing is due: all done, or leased to a live worker"

    rows = read_rows(engine)
    assert rows[fresh.key]["status"] == "done"
    untouched = as_upgraded(old)
    for role in ("done", "live"):
        assert rows[old[role].key] == untouched[old[role].key]
    assert {rows[old[r].key]["status"] for r in ("failed", "failed_replay", "expired")} == {"done"}

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
    finished = read_rows(engine)[later.key]
    assert (finished["status"], finished["attempts"], finished["next_attempt_at"]) == (
        "done",
        1,
        None,
    )
    assert set(as_upgraded(old)) <= set(read_rows(engine)), "no 0.1.0 row lost"


def test_deferred_dispatch_carries_resent_0_1_deliveries_to_done(
    engine: sa.Engine, standalone_app: StandaloneFactory
) -> None:
    """In deferred mode a resend is answered success at once, so whatever it
    answers for a 0.1.0 row a worker must carry to done: the platform will
    not send it again."""
    app, hooks = standalone_app(ORDERHOOKS_DISPATCH="deferred")
    old = fill_legacy_table(engine, app)
    with Sink(app) as sink:
        for role in ("done", "failed", "expired"):
            cb = old[role].callback
            assert answer(post(app, cb)) == (200, SUCCESS[cb.provider]), role
        assert sink.keys == []
        with app.app_context():
            hooks.process_due()
        assert old["failed"].key in sink.keys
        assert read_rows(engine)[old["failed"].key]["status"] == "done"
        expired_key = old["expired"].key
        assert expired_key in sink.keys, (
            "a 0.1.0 delivery whose worker died was answered 200 to the platform's resend, "
            "but no worker pass dispatches it"
        )
    assert sorted(sink.keys) == sorted([old["failed"].key, expired_key]), "each once"
    expired = read_rows(engine)[expired_key]
    assert (expired["status"], expired["attempts"]) == ("done", 2)


# -- several processes upgrading at once --------------------------------------------

PROCESSES = 4
ROUNDS = 3


def _upgrading_process(url: str, index: int, instance: str, barrier: Any, results: Any) -> None:
    """One of several workers booting on a 0.1.0 table at once, ROUNDS times.

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


def test_processes_booting_on_a_0_1_table_at_once_all_come_up(
    url: str, engine: sa.Engine, standalone_app: StandaloneFactory, tmp_path: Path
) -> None:
    signer, _hooks = standalone_app()  # signs the 0.1.0 rows; never opens the store
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
            old = fill_legacy_table(engine, signer)
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
    url: str, engine: sa.Engine, standalone_app: StandaloneFactory
) -> None:
    """The interleaving the processes above meet by chance, forced: two
    workers (engines of their own) both find the 0.1.0 table; the first adds
    the column, the second tries to, while the first is creating the index.

    On PostgreSQL the second waits for the first's advisory lock instead, so
    each wait below runs out after WAIT and the upgrades simply take turns.
    """
    signer, _hooks = standalone_app()
    old = fill_legacy_table(engine, signer)
    first = StandaloneDatabase(url, busy_timeout=5, engine_options={})
    second = StandaloneDatabase(url, busy_timeout=5, engine_options={})
    first_altering, second_altering = threading.Event(), threading.Event()
    first_indexing, second_finished = threading.Event(), threading.Event()
    wait = 1.0

    def first_steps(_conn: Any, _cursor: Any, statement: str, *_rest: Any) -> None:
        if statement.startswith("ALTER TABLE"):
            first_altering.set()
            second_altering.wait(wait)
        elif statement.startswith(f"CREATE INDEX {DUE_INDEX}"):
            first_indexing.set()
            second_finished.wait(wait)

    def second_steps(_conn: Any, _cursor: Any, statement: str, *_rest: Any) -> None:
        if statement.startswith("ALTER TABLE"):
            second_altering.set()
            first_indexing.wait(wait)

    sa.event.listen(first.engine, "before_cursor_execute", first_steps)
    sa.event.listen(second.engine, "before_cursor_execute", second_steps)
    errors: dict[str, str] = {}

    def boot(name: str, database: StandaloneDatabase, finished: threading.Event) -> None:
        try:
            database.ensure_table()
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
        assert_upgraded(engine)
        assert read_rows(engine) == as_upgraded(old)
    finally:
        first.engine.dispose()
        second.engine.dispose()


# -- with db=: the host's Flask-Migrate ------------------------------------------------

#: The due index is partial on both backends (store/table.py: due_index).
_WHERE = (
    "postgresql_where=sa.text('next_attempt_at IS NOT NULL'), "
    "sqlite_where=sa.text('next_attempt_at IS NOT NULL')"
)
#: The new column's type: microseconds on MySQL and MariaDB (store/table.py:
#: WHEN_COLUMN), rendered with SQLAlchemy's own types only.
_TYPE = (
    "sa.DateTime(timezone=True).with_variant(mysql.DATETIME(fsp=6), 'mariadb')"
    ".with_variant(mysql.DATETIME(fsp=6), 'mysql')"
)
_UPGRADE_OPS = {
    # Flask-Migrate's default (render_as_batch=True).
    True: [
        f"with op.batch_alter_table('{TABLE_NAME}', schema=None) as batch_op:",
        f"batch_op.add_column(sa.Column('next_attempt_at', {_TYPE}, nullable=True))",
        f"batch_op.create_index('{DUE_INDEX}', ['next_attempt_at'], unique=False, {_WHERE})",
    ],
    False: [
        f"op.add_column('{TABLE_NAME}', sa.Column('next_attempt_at', {_TYPE}, nullable=True))",
        f"op.create_index('{DUE_INDEX}', '{TABLE_NAME}', ['next_attempt_at'], unique=False, "
        f"{_WHERE})",
    ],
}
_DOWNGRADE_OPS = {
    True: [
        f"with op.batch_alter_table('{TABLE_NAME}', schema=None) as batch_op:",
        f"batch_op.drop_index('{DUE_INDEX}', {_WHERE})",
        "batch_op.drop_column('next_attempt_at')",
    ],
    False: [
        f"op.drop_index('{DUE_INDEX}', table_name='{TABLE_NAME}', {_WHERE})",
        f"op.drop_column('{TABLE_NAME}', 'next_attempt_at')",
    ],
}
#: The DDL ``flask db upgrade`` runs (besides Alembic's own alembic_version).
_UPGRADE_DDL = {
    "sqlite": [
        f"ALTER TABLE {TABLE_NAME} ADD COLUMN next_attempt_at DATETIME",
        f"CREATE INDEX {DUE_INDEX} ON {TABLE_NAME} (next_attempt_at) "
        "WHERE next_attempt_at IS NOT NULL",
    ],
    "postgresql": [
        f"ALTER TABLE {TABLE_NAME} ADD COLUMN next_attempt_at TIMESTAMP WITH TIME ZONE",
        f"CREATE INDEX {DUE_INDEX} ON {TABLE_NAME} (next_attempt_at) "
        "WHERE next_attempt_at IS NOT NULL",
    ],
}


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
def test_flask_migrate_autogenerates_exactly_the_0_2_changes(
    url: str,
    engine: sa.Engine,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    render_as_batch: bool,
) -> None:
    app, db, _hooks = host_app(url, tmp_path)
    flask_migrate.Migrate(app, db, render_as_batch=render_as_batch)
    # The host's own tables exist already; the deliveries table is 0.1.0's.
    ShopBase.metadata.create_all(
        engine, tables=[t for t in ShopBase.metadata.sorted_tables if t.name != TABLE_NAME]
    )
    old = fill_legacy_table(engine, app)
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
            flask_migrate.migrate(directory=directory, message="orderhooks 0.2")
            (script,) = (Path(directory) / "versions").glob("*.py")
            source = script.read_text()
            assert operations(source, "upgrade") == _UPGRADE_OPS[render_as_batch]
            assert operations(source, "downgrade") == _DOWNGRADE_OPS[render_as_batch]
            sa.event.listen(db.engine, "before_cursor_execute", record)
            try:
                flask_migrate.upgrade(directory=directory)
            finally:
                sa.event.remove(db.engine, "before_cursor_execute", record)
            assert ddl == _UPGRADE_DDL[engine.dialect.name], "no table copy, nothing else"
            with db.engine.connect() as connection:
                # The migrated table is exactly what 0.2 declares.
                assert compare_metadata(MigrationContext.configure(connection), db.metadata) == []
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
        try:
            with Sink(deferred, deferred_db) as deferred_sink:
                later = make(deferred, "sud")
                assert answer(post(deferred, later)) == (200, SUCCESS["sud"])
                assert read_rows(engine)[later.key]["status"] == "pending"
                with deferred.app_context():
                    assert deferred_hooks.process_due() == 1
                assert deferred_sink.keys == [later.key]
            assert read_rows(engine)[later.key]["status"] == "done"
            assert sink.credits() == sorted([failed.key, later.key])
        finally:
            with deferred.app_context():
                deferred_db.engine.dispose()
        assert set(as_upgraded(old)) <= set(read_rows(engine)), "no 0.1.0 row lost"
    finally:
        with app.app_context():
            db.engine.dispose()
