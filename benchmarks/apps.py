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

Under gunicorn the app is chosen by environment variables (``BENCH_APP``,
``BENCH_DATABASE_URI``); :func:`make_app` builds the same apps in-process.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from typing import Any, Literal

import sqlalchemy as sa
from blinker import Namespace
from flask import Flask, request
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from flask_orderhooks import OrderHooks, order_pending_delivery
from flask_orderhooks.store import TABLE_NAME, deliveries_table
from flask_orderhooks.testing import SignedCallback, igv_order_status

Kind = Literal["bare", "naive", "orderhooks"]
KINDS: tuple[Kind, ...] = ("bare", "naive", "orderhooks")

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
    finally:
        engine.dispose()


def stored_keys(kind: Kind, database_uri: str) -> list[str]:
    """The request ids the app stored as done (nothing for ``bare``)."""
    if kind == "bare":
        return []
    engine = sa.create_engine(database_uri)
    try:
        with engine.connect() as connection:
            if kind == "naive":
                rows = connection.execute(sa.select(ReceivedCallback.request_id))
            else:
                table = deliveries_table(sa.MetaData())
                rows = connection.execute(sa.select(table.c.key).where(table.c.status == "done"))
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
