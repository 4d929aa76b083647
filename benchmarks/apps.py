"""The three applications the benchmarks compare, on the same URL.

``bare``
    A Flask route that parses the JSON body and answers 200: the floor set
    by Flask, gunicorn and the HTTP round trip.
``naive``
    What a user writes by hand for the iGV callback with Flask-SQLAlchemy:
    check the HMAC, insert the request id, commit, send a blinker signal,
    answer 200. A primary-key violation on commit is taken as "a retry" and
    answered 200. It has no failure handling (a receiver that raises loses the
    callback after it was committed) and no body storage: the lower bound of
    what exactly-once delivery could cost.
``orderhooks``
    ``OrderHooks(app, db=db)`` with a no-op receiver on
    ``order_pending_delivery`` (a route without receivers answers 503).
``orderhooks-deferred``
    The same with ``ORDERHOOKS_DISPATCH = "deferred"``: the route verifies the
    callback, stores it as pending (a synchronous commit) and answers; a
    worker (``flask orderhooks worker`` on this app) runs the receiver later.
    Its receiver does what the naive endpoint does: ``db.session.add()`` of
    the request id into the same ``naive_callbacks`` table, committed in the
    delivery's own transaction (``db=``), so a drain costs the same write per
    callback as a naive request.

Every app runs on SQLite, PostgreSQL and MariaDB/MySQL (PyMySQL) alike: the
database is the URI's, the code the same.

Under gunicorn (and ``flask --app 'benchmarks.apps:create_app()'``, for the
workers) the app is chosen by environment variables (``BENCH_APP``,
``BENCH_DATABASE_URI``); :func:`make_app` builds the same apps in-process.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import sqlalchemy as sa
from blinker import Namespace
from flask import Flask, request
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from flask_orderhooks import OrderHooks, OrderPendingDelivery, order_pending_delivery
from flask_orderhooks.store import TABLE_NAME, deliveries_table
from flask_orderhooks.testing import SignedCallback, igv_order_status

Kind = Literal["bare", "naive", "orderhooks", "orderhooks-deferred"]
KINDS: tuple[Kind, ...] = ("bare", "naive", "orderhooks", "orderhooks-deferred")
#: The apps whose rows live in the extension's deliveries table.
ORDERHOOKS_KINDS: tuple[Kind, ...] = ("orderhooks", "orderhooks-deferred")

#: Every app answers on the extension's iGV route, so wrk sends the same requests.
PATH = "/orderhooks/igv/order-status"
#: A 32-character alphanumeric secret, like the ones iGV issues.
SECRET = "bEnChMaRkSeCrEt0123456789abcdefg"

NAIVE_TABLE = "naive_callbacks"


class NaiveBase(DeclarativeBase):
    pass


class ReceivedCallback(NaiveBase):
    """The naive app's dedupe table: one row per iGV request id."""

    __tablename__ = NAIVE_TABLE
    request_id: Mapped[str] = mapped_column(sa.String(64), primary_key=True)


class OrderhooksBase(DeclarativeBase):
    # The host app's own models would live here; the extension adds its table.
    pass


class DeferredBase(DeclarativeBase):
    # A metadata of its own: the extension adds its table to it, and the
    # naive app's metadata must not gain that table.
    pass


class DrainedCallback(DeferredBase):
    """What the deferred app's receiver writes: the naive app's row, in the
    same table, one per iGV request id."""

    __tablename__ = NAIVE_TABLE
    request_id: Mapped[str] = mapped_column(sa.String(64), primary_key=True)


# A user's own signal, as the naive app would declare it.
_naive_signals = Namespace()
order_received = _naive_signals.signal("naive.order-received")


def _noop(sender: Flask, **kwargs: Any) -> None:
    pass


_signed_count = 0


def fresh_id() -> str:
    """An iGV request id no other call in this process returned."""
    global _signed_count  # noqa: PLW0603 - ids unique across the whole run
    _signed_count += 1
    return f"9{_signed_count:018d}"


def signed(n: int) -> list[SignedCallback]:
    """``n`` iGV callbacks, each a first delivery, signed with :data:`SECRET`."""
    return [igv_order_status(SECRET, request_id=fresh_id()) for _ in range(n)]


def make_app(kind: Kind, database_uri: str | None = None) -> Flask:
    """Build one of the benchmarked apps (``database_uri`` is unused by ``bare``)."""
    if kind == "bare":
        return _bare_app()
    if database_uri is None:
        raise ValueError(f"The {kind} app needs a database URI.")
    if kind == "naive":
        return _naive_app(database_uri)
    if kind == "orderhooks":
        return _orderhooks_app(database_uri)
    if kind == "orderhooks-deferred":
        return _deferred_app(database_uri)
    raise ValueError(f"Unknown app kind {kind!r}; use one of {', '.join(KINDS)}.")


def create_app() -> Flask:
    """The gunicorn entry point: ``benchmarks.apps:create_app()``."""
    kind = os.environ.get("BENCH_APP", "")
    if kind not in KINDS:
        raise RuntimeError(f"Set BENCH_APP to one of {', '.join(KINDS)}, not {kind!r}.")
    return make_app(kind, os.environ.get("BENCH_DATABASE_URI"))


def _bare_app() -> Flask:
    app = Flask("bench_bare")

    @app.post(PATH)
    def igv_order_status() -> tuple[str, int]:
        request.get_json()
        return "OK", 200

    return app


def _naive_app(database_uri: str) -> Flask:
    app = Flask("bench_naive")
    app.config["SQLALCHEMY_DATABASE_URI"] = database_uri
    db = SQLAlchemy(app, model_class=NaiveBase)
    secret = SECRET.encode()
    order_received.connect(_noop, app, weak=False)

    @app.post(PATH)
    def igv_order_status() -> tuple[str, int]:
        timestamp = request.headers.get("X-Timestamp", "")
        request_id = request.headers.get("X-Request-Id", "")
        given = request.headers.get("X-Signature", "").lower()
        expected = hmac.new(
            secret, (timestamp + request_id).encode() + secret, hashlib.sha256
        ).hexdigest()
        if not hmac.compare_digest(expected.encode(), given.encode()):
            return "Bad signature", 401
        order = request.get_json()
        db.session.add(ReceivedCallback(request_id=request_id))
        try:
            db.session.commit()
        except IntegrityError:
            db.session.rollback()
            return "OK", 200
        order_received.send(app, order=order)
        return "OK", 200

    return app


def _orderhooks_app(database_uri: str) -> Flask:
    app = Flask("bench_orderhooks")
    app.config["SQLALCHEMY_DATABASE_URI"] = database_uri
    app.config["ORDERHOOKS_IGV_SECRET"] = SECRET
    db = SQLAlchemy(app, model_class=OrderhooksBase)
    OrderHooks(app, db=db)
    order_pending_delivery.connect(_noop, app, weak=False)
    return app


def _deferred_app(database_uri: str) -> Flask:
    app = Flask("bench_orderhooks_deferred")
    app.config["SQLALCHEMY_DATABASE_URI"] = database_uri
    app.config["ORDERHOOKS_IGV_SECRET"] = SECRET
    app.config["ORDERHOOKS_DISPATCH"] = "deferred"
    db = SQLAlchemy(app, model_class=DeferredBase)
    OrderHooks(app, db=db)

    def receive(sender: Flask, *, event: OrderPendingDelivery, **kwargs: Any) -> None:
        # The naive endpoint's write; committed with the delivery's done mark.
        db.session.add(DrainedCallback(request_id=event.request_id))

    order_pending_delivery.connect(receive, app, weak=False)
    return app


def ready_app(kind: Kind, database_uri: str) -> Flask:
    """:func:`make_app` with its table in place.

    A file or server database gets it from :func:`create_tables` first; an
    in-memory SQLite database only exists on the app's own connection, so
    the table is created there.
    """
    if database_uri != "sqlite://" or kind == "bare":
        create_tables(kind, database_uri)
        return make_app(kind, database_uri)
    app = make_app(kind, database_uri)
    with app.app_context():
        db = app.extensions["sqlalchemy"]
        assert isinstance(db, SQLAlchemy)
        db.create_all()
    return app


def create_tables(kind: Kind, database_uri: str) -> None:
    """Create the app's table before gunicorn starts, so that no worker races
    another to create it."""
    if kind == "bare":
        return
    engine = sa.create_engine(database_uri)
    try:
        if engine.dialect.name == "sqlite":
            with engine.connect() as connection:
                # WAL is a property of the file: set once, every connection uses it.
                connection.exec_driver_sql("PRAGMA journal_mode=WAL")
        if kind == "naive":
            NaiveBase.metadata.create_all(engine)
        else:
            deliveries_table(sa.MetaData()).create(engine, checkfirst=True)
        if kind == "orderhooks-deferred":
            # The receivers' table (the workers write it).
            DeferredBase.metadata.tables[NAIVE_TABLE].create(engine, checkfirst=True)
    finally:
        engine.dispose()


def stored_status(kind: Kind) -> str:
    """The status the request path leaves a first delivery in."""
    return "pending" if kind == "orderhooks-deferred" else "done"


def stored_keys(kind: Kind, database_uri: str) -> list[str]:
    """The request ids the app's request path stored: done (inline), pending
    (deferred), a row of its own (naive); nothing for ``bare``."""
    if kind == "bare":
        return []
    engine = sa.create_engine(database_uri)
    try:
        with engine.connect() as connection:
            if kind == "naive":
                rows = connection.execute(sa.select(ReceivedCallback.request_id))
            else:
                table = deliveries_table(sa.MetaData())
                rows = connection.execute(
                    sa.select(table.c.key).where(table.c.status == stored_status(kind))
                )
            return [str(row[0]) for row in rows]
    finally:
        engine.dispose()


def stored_count(kind: Kind, database_uri: str) -> int:
    """Every row of the app's table, whatever its status."""
    if kind == "bare":
        return 0
    name = NAIVE_TABLE if kind == "naive" else TABLE_NAME
    engine = sa.create_engine(database_uri)
    try:
        with engine.connect() as connection:
            return int(connection.execute(sa.text(f"SELECT count(*) FROM {name}")).scalar_one())
    finally:
        engine.dispose()


def status_counts(database_uri: str) -> dict[str, int]:
    """Rows of the deliveries table per status."""
    table = deliveries_table(sa.MetaData())
    engine = sa.create_engine(database_uri)
    try:
        with engine.connect() as connection:
            rows = connection.execute(
                sa.select(table.c.status, sa.func.count()).group_by(table.c.status)
            )
            return {str(status): int(n) for status, n in rows}
    finally:
        engine.dispose()


def undrained_count(connection: sa.Connection) -> int:
    """Deliveries a worker still has to take or finish (pending, processing).

    Ends its transaction: a SQLite reader must not keep an old snapshot.
    """
    table = deliveries_table(sa.MetaData())
    query = sa.select(sa.func.count()).where(table.c.status.in_(("pending", "processing")))
    try:
        return int(connection.execute(query).scalar_one())
    finally:
        connection.rollback()


@dataclass(frozen=True)
class Drained:
    """The deliveries table after a drain, as the harness checks it."""

    #: Unix times of the done marks (``updated_at`` of every done row).
    done_at: list[float]
    #: Done rows taken in more than one attempt (a failure or a lost lease).
    retried: int
    #: Rows the receivers wrote (``naive_callbacks``).
    receiver_rows: int
    #: Done deliveries without a receiver row (must be none).
    missing_receiver_rows: int


def drained(database_uri: str) -> Drained:
    table = deliveries_table(sa.MetaData())
    received = DeferredBase.metadata.tables[NAIVE_TABLE]
    engine = sa.create_engine(database_uri)
    try:
        with engine.connect() as connection:
            done = connection.execute(
                sa.select(table.c.updated_at, table.c.attempts).where(table.c.status == "done")
            ).all()
            receiver_rows = connection.execute(sa.select(sa.func.count()).select_from(received))
            missing = connection.execute(
                sa.select(sa.func.count())
                .select_from(table)
                .outerjoin(received, received.c.request_id == table.c.key)
                .where(table.c.status == "done", received.c.request_id.is_(None))
            )
            return Drained(
                done_at=sorted(_unix(row[0]) for row in done),
                retried=sum(1 for row in done if row[1] != 1),
                receiver_rows=int(receiver_rows.scalar_one()),
                missing_receiver_rows=int(missing.scalar_one()),
            )
    finally:
        engine.dispose()


def _unix(value: datetime) -> float:
    # SQLite hands back naive datetimes; the store writes UTC.
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()
