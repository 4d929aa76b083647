"""Shared fixtures: apps on every store backend, signed requests, PostgreSQL.

Tests marked ``postgres`` need the server at ``ORDERHOOKS_TEST_POSTGRES_URL``
(default ``postgresql+psycopg://postgres@127.0.0.1:5432/test``). Without it
they skip with a loud reason, unless ``ORDERHOOKS_REQUIRE_POSTGRES=1`` (set by
``.ci/run``), which turns the skip into a failure.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask
from flask.testing import FlaskClient
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from flask_orderhooks import OrderHooks
from flask_orderhooks.store import TABLE_NAME, DeliveryStore
from flask_orderhooks.store.table import MYSQL

PG_URL = os.environ.get(
    "ORDERHOOKS_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
MARIADB_URL = os.environ.get(
    "ORDERHOOKS_TEST_MARIADB_URL", "mysql+pymysql://root@127.0.0.1:3306/test?charset=utf8mb4"
)

IGV_SECRET = "aBcDeFgHiJkLmNoPqRsTuVwXyZ012345"
GATEWAY_KEYS = {"10001": "merchant-key"}
SUD_APP_ID = "1461564080052506636"
SUD_APPS = {SUD_APP_ID: "app-secret"}

BASE_CONFIG: dict[str, Any] = {
    "TESTING": True,
    "ORDERHOOKS_IGV_SECRET": IGV_SECRET,
    "ORDERHOOKS_GATEWAY_KEY": GATEWAY_KEYS,
    "ORDERHOOKS_SUD_APPS": SUD_APPS,
}

#: What the run's summary prints, by section: the loud skip banners and the
#: system tests' counts. Under pytest-xdist each worker process fills its own
#: and hands them to the controller at its end (``workeroutput``), which
#: prints them: this is the only conftest the controller loads.
_SUMMARY: dict[str, list[str]] = {}
#: The sections printed as a red banner, their first line only.
BANNERS = ("POSTGRESQL TESTS SKIPPED", "MARIADB TESTS SKIPPED", "BROWSER TESTS SKIPPED")
_WORKER_OUTPUT = "orderhooks_summary"


def summary(section: str) -> list[str]:
    """The lines of ``section`` in the run's summary, to append to."""
    return _SUMMARY.setdefault(section, [])


_skipped_postgres = summary("POSTGRESQL TESTS SKIPPED")
_skipped_mariadb = summary("MARIADB TESTS SKIPPED")


def _server_error(url: str) -> str | None:
    try:
        engine = sa.create_engine(url)
        with engine.connect() as connection:
            connection.execute(sa.text("SELECT 1"))
        engine.dispose()
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
    return None


def _require_server(url: str, name: str, switch: str, part: str, skipped: list[str]) -> None:
    """Skip loudly when the server at ``url`` is down, or fail the test when
    ``ORDERHOOKS_REQUIRE_<switch>=1`` (as ``.ci/run`` sets)."""
    error = _server_error(url)
    if error is None:
        return
    message = (
        f"{name} is NOT AVAILABLE at {url} ({error}); {part} of the suite did not run. "
        f"Start {name} or set ORDERHOOKS_TEST_{switch}_URL."
    )
    if os.environ.get(f"ORDERHOOKS_REQUIRE_{switch}") == "1":
        pytest.fail(f"ORDERHOOKS_REQUIRE_{switch}=1: " + message, pytrace=False)
    skipped.append(message)
    pytest.skip(message)


@contextmanager
def connected(app: Flask, *receivers: tuple[Any, Callable[..., Any]]) -> Iterator[None]:
    """Each ``(signal, receiver)`` connected for ``app`` during the block only."""
    for signal, receiver in receivers:
        signal.connect(receiver, app)
    try:
        yield
    finally:
        for signal, receiver in receivers:
            signal.disconnect(receiver, app)


def ledger_is_down(sender: Flask, **extra: Any) -> None:
    """A receiver that fails every delivery it gets."""
    raise RuntimeError("the ledger is down")


def chat_is_down(sender: Flask, **extra: Any) -> None:
    """An operator's receiver that raises (a chat webhook that is down)."""
    raise RuntimeError("the chat webhook is down")


def stored_row(
    dialect: str,
    *,
    provider: str,
    callback: str,
    key: str,
    status: str,
    when: datetime,
    due: datetime | None = None,
    reference: str | None = None,
    body: bytes = b"{}",
) -> dict[str, Any]:
    """A whole row of the deliveries table, received and last updated at
    ``when``: for loading a table at size without the HTTP path."""
    if reference is not None and dialect in MYSQL:
        # The column holds bytes on MySQL (store/table.py: REFERENCE).
        stored_reference: str | bytes | None = reference.encode()
    else:
        stored_reference = reference
    return {
        "provider": provider,
        "callback": callback,
        "key": key,
        "status": status,
        "attempts": 1,
        "claim_token": "0" * 32,
        "lease_expires_at": when,
        "body": body,
        "body_sha256": "0" * 64,
        "headers": "{}",
        "error": None,
        "created_at": when,
        "updated_at": when,
        "next_attempt_at": due,
        "reference": stored_reference,
        "failures": None,
    }


def store_done_igv(store: DeliveryStore, received: Mapping[str, datetime]) -> None:
    """Done iGV deliveries, each key received and last updated at its time,
    stored without the HTTP path (the table made first)."""
    store.prepare()
    with store.engine.begin() as connection:
        connection.execute(
            sa.insert(store.table),
            [
                stored_row(
                    store.dialect,
                    provider="igv",
                    callback="order-status",
                    key=key,
                    status="done",
                    when=when,
                )
                for key, when in received.items()
            ],
        )


def session_not_in_utc(backend: str) -> dict[str, Any]:
    """``SQLALCHEMY_ENGINE_OPTIONS`` for a database session whose time zone
    is not UTC, as a PostgreSQL server initialised on a machine set to New
    York's time has by default."""
    if backend == "postgresql":
        return {"connect_args": {"options": "-c timezone=America/New_York"}}
    if backend == "mariadb":
        return {"connect_args": {"init_command": "SET time_zone = '-05:00'"}}
    return {}


def refresh_statistics(connection: sa.Connection) -> None:
    """ANALYZE the deliveries table, so its backend plans as it would at size."""
    dialect = connection.dialect.name
    if dialect == "postgresql":
        connection.exec_driver_sql(f"ANALYZE {TABLE_NAME}")
    elif dialect == "sqlite":
        connection.exec_driver_sql("ANALYZE")
    else:
        connection.exec_driver_sql(f"ANALYZE TABLE {TABLE_NAME}")


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A PostgreSQL URL on a database of this test process's own."""
    _require_server(PG_URL, "PostgreSQL", "POSTGRES", "the PostgreSQL half", _skipped_postgres)
    with private_postgres_database(PG_URL, "orderhooks_test") as url:
        yield url


@contextmanager
def private_postgres_database(base_url: str, prefix: str) -> Iterator[str]:
    """``base_url`` on a fresh PostgreSQL database, dropped afterwards.

    A database, not a schema of the shared one: VACUUM marks a page
    all-visible (what an index-only scan needs) only once no transaction of
    the same database can still miss its rows (PostgreSQL 14+ keeps that
    horizon per database), so a snapshot held by another xdist worker's test
    in a shared database turned the chart's index-only plan into a plain
    index scan (tests/console/test_plans.py, seen on CI).
    """
    base = sa.make_url(base_url)
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield base.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            # FORCE: the session's engines may still pool idle connections.
            connection.exec_driver_sql(f'DROP DATABASE "{name}" WITH (FORCE)')
        admin.dispose()


@contextmanager
def private_schema(base_url: str, prefix: str) -> Iterator[str]:
    """``base_url`` with its connections' ``search_path`` on a fresh schema,
    dropped afterwards: the server is shared with every other test."""
    base = sa.make_url(base_url)
    schema = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(base.difference_update_query(["options"]))
    with admin.begin() as connection:
        connection.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    try:
        url = base.update_query_dict({"options": f"-csearch_path={schema}"})
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as connection:
            # Bounded: a connection left hanging must fail the teardown, not hang it.
            connection.execute(sa.text("SET LOCAL lock_timeout = '20s'"))
            connection.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture(scope="session")
def mariadb_url() -> Iterator[str]:
    """A MariaDB (or MySQL) URL on a database of its own, dropped afterwards."""
    _require_server(MARIADB_URL, "MariaDB", "MARIADB", "the MariaDB third", _skipped_mariadb)
    with private_database(MARIADB_URL, "orderhooks_test") as url:
        yield url


@contextmanager
def private_database(base_url: str, prefix: str) -> Iterator[str]:
    """``base_url`` on a fresh MariaDB/MySQL database, dropped afterwards."""
    base = sa.make_url(base_url)
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(base)
    with admin.begin() as connection:
        connection.exec_driver_sql(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
    try:
        yield base.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.begin() as connection:
            connection.exec_driver_sql("SET SESSION lock_wait_timeout = 20")
            connection.exec_driver_sql(f"DROP DATABASE `{name}`")
        admin.dispose()


def pytest_sessionfinish(session: pytest.Session) -> None:
    output = getattr(session.config, "workeroutput", None)
    if output is not None:  # a pytest-xdist worker
        output[_WORKER_OUTPUT] = {name: list(lines) for name, lines in _SUMMARY.items()}


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    """pytest-xdist's controller, as a worker ends: take its summary."""
    for name, lines in getattr(node, "workeroutput", {}).get(_WORKER_OUTPUT, {}).items():
        summary(name).extend(lines)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for name, lines in _SUMMARY.items():
        if not lines:
            continue
        if name in BANNERS:
            terminalreporter.write_sep("!", name, red=True, bold=True)
            terminalreporter.write_line(lines[0], red=True)
        else:
            terminalreporter.write_sep("-", name)
            for line in lines:
                terminalreporter.write_line(line)


class Base(DeclarativeBase):
    pass


class Credit(Base):
    """What the test receivers write: one row per effect, unique per key."""

    __tablename__ = "test_credits"
    id: Mapped[int] = mapped_column(primary_key=True)
    key: Mapped[str] = mapped_column(sa.String(200), unique=True)
    note: Mapped[str] = mapped_column(sa.String(200), default="")


BACKENDS = [
    "sqlite",
    pytest.param("postgresql", marks=pytest.mark.postgres),
    pytest.param("mariadb", marks=pytest.mark.mariadb),
]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def empty_database_url(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[str]:
    """A database of the test's own holding nothing yet, on ``backend``, in
    which the table has the name other tests use (the upgrade tests)."""
    if backend == "postgresql":
        request.getfixturevalue("postgres_url")  # skips (loudly) without a server
        with private_schema(PG_URL, "orderhooks_upgrade") as schema_url:
            yield schema_url
    elif backend == "mariadb":
        request.getfixturevalue("mariadb_url")  # skips (loudly) without a server
        with private_database(MARIADB_URL, "orderhooks_upgrade") as database_url:
            yield database_url
    else:
        yield f"sqlite:///{tmp_path / 'orderhooks.sqlite3'}"


@pytest.fixture
def database_uri(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    if backend == "postgresql":
        return str(request.getfixturevalue("postgres_url"))
    if backend == "mariadb":
        return str(request.getfixturevalue("mariadb_url"))
    return f"sqlite:///{tmp_path / 'host.sqlite3'}"


AppFactory = Callable[..., tuple[Flask, OrderHooks, SQLAlchemy | None]]


@pytest.fixture
def make_app(database_uri: str, tmp_path: Path) -> Iterator[AppFactory]:
    """Build an app. ``host_db=True``: the table lives in the host's db
    (``OrderHooks(app, db=db)``); otherwise the extension's own store on the
    same database URL."""
    created: list[tuple[Flask, OrderHooks, SQLAlchemy | None]] = []

    def factory(
        *, host_db: bool = True, hooks_options: dict[str, Any] | None = None, **config: Any
    ) -> tuple[Flask, OrderHooks, SQLAlchemy | None]:
        app = Flask("orderhooks_test", instance_path=str(tmp_path / "instance"))
        app.config.update(BASE_CONFIG)
        app.config["SQLALCHEMY_DATABASE_URI"] = database_uri
        if not host_db:
            app.config["ORDERHOOKS_DATABASE_URI"] = database_uri
        app.config.update(config)
        db: SQLAlchemy | None = SQLAlchemy(app, model_class=Base) if host_db else None
        hooks = OrderHooks(app, db=db, **(hooks_options or {}))
        with app.app_context():
            if db is not None:
                db.create_all()
            else:
                hooks.create_all()
        created.append((app, hooks, db))
        return app, hooks, db

    yield factory
    for app, hooks, db in created:
        with app.app_context():
            if db is not None:
                db.drop_all()
                db.engine.dispose()
            else:
                standalone = hooks.state(app).standalone
                assert standalone is not None
                standalone.metadata.drop_all(standalone.engine)
                standalone.engine.dispose()


@pytest.fixture
def app(make_app: AppFactory) -> Flask:
    return make_app()[0]


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def app_ctx(app: Flask) -> Iterator[None]:
    with app.app_context():
        yield


class Recorder:
    """Connected to every signal of one app; records events and, with a host
    db, writes one :class:`Credit` row per event through ``db.session``."""

    def __init__(self, app: Flask, db: SQLAlchemy | None) -> None:
        self.app = app
        self.db = db
        self.events: list[tuple[str, Any]] = []
        self.fail_next = 0
        self.hook: Callable[[Any], None] | None = None

    def __call__(self, sender: Flask, *, event: Any, **extra: Any) -> None:
        assert sender is self.app, "signals must be sent with the real app object"
        assert not extra, "signals carry the event keyword only"
        self.events.append((type(event).__name__, event))
        if self.db is not None:
            key = getattr(event, "order_id", None) or getattr(event, "id", None)
            self.db.session.add(Credit(key=f"{type(event).__name__}:{key}:{len(self.events)}"))
        if self.hook is not None:
            self.hook(event)
        if self.fail_next:
            self.fail_next -= 1
            raise RuntimeError("receiver exploded on purpose")

    def credits(self) -> int:
        assert self.db is not None
        with self.app.app_context():
            return int(self.db.session.scalar(sa.select(sa.func.count()).select_from(Credit)) or 0)


@pytest.fixture
def recorder(make_app: AppFactory) -> Iterator[Callable[..., tuple[Flask, Recorder]]]:
    """``recorder(**config)`` → an app whose every signal goes to a Recorder."""
    from flask_orderhooks import signals

    connected: list[tuple[Any, Recorder, Flask]] = []

    def factory(**options: Any) -> tuple[Flask, Recorder]:
        app, _hooks, db = make_app(**options)
        rec = Recorder(app, db)
        for signal in (
            signals.order_pending_delivery,
            signals.payment_collected,
            signals.payout_finished,
            signals.game_order_changed,
            signals.callback_unhandled,
        ):
            signal.connect(rec, app, weak=False)
            connected.append((signal, rec, app))
        return app, rec

    try:
        yield factory
    finally:
        for signal, rec, app in connected:
            signal.disconnect(rec, app)
