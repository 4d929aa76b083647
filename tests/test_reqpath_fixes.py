"""Defects of the request path: a receiver that answers with an awaitable,
an init_app whose registration fails half-way, and the key a refusal's log
line names."""

from __future__ import annotations

import gc
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask
from flask_sqlalchemy import SQLAlchemy

from flask_orderhooks import delivery_dead, get_extension, payment_collected
from flask_orderhooks.store import StoredDelivery
from flask_orderhooks.testing import SignedCallback, gateway_collect
from tests.conftest import AppFactory, Credit, connected, ledger_is_down

RECEIVER_FAILED = "A receiver failed; the delivery will be retried."


def _post(app: Flask, cb: SignedCallback) -> tuple[int, str]:
    response = app.test_client().post(cb.url(), data=cb.body, headers=cb.headers)
    return response.status_code, response.get_data(as_text=True)


def _collect(app: Flask, order_id: str) -> SignedCallback:
    with app.app_context():
        return gateway_collect(app=app, id=order_id)


def _row(app: Flask, cb: SignedCallback) -> StoredDelivery:
    with app.app_context():
        [row] = get_extension(app).store.get(cb.key, provider=cb.provider, callback=cb.callback)
    return row


def _credits(app: Flask, db: SQLAlchemy) -> list[str]:
    with app.app_context():
        return list(db.session.scalars(sa.select(Credit.key)))


# -- 1. a receiver that returns an awaitable ------------------------------------------
#
# blinker's send() refuses a coroutine function, but an object whose __call__ is
# async def passes its check: send() called it and returned the coroutine nobody
# awaits, and the delivery was marked done (a lost callback, and a RuntimeWarning
# "coroutine ... was never awaited" at the next garbage collection).


class AsyncLedger:
    """A receiver whose ``__call__`` is ``async def``: what it means to do never runs."""

    def __init__(self) -> None:
        self.ran: list[Any] = []

    async def __call__(self, sender: Flask, **extra: Any) -> None:
        self.ran.append(extra)  # never reached: nothing awaits the coroutine

    def __repr__(self) -> str:
        return "<AsyncLedger>"


class Writer:
    """A plain receiver that writes one Credit row through the host's session."""

    def __init__(self, db: SQLAlchemy) -> None:
        self.db = db
        self.calls = 0

    def __call__(self, sender: Flask, *, event: Any, **extra: Any) -> None:
        self.calls += 1
        self.db.session.add(Credit(key=f"{event.id}:{self.calls}"))


async def _pay_later(event: Any) -> None:
    raise AssertionError("never awaited, never run")


def returns_a_coroutine(sender: Flask, *, event: Any, **extra: Any) -> Any:
    """A plain function (blinker's check passes it) that returns a coroutine."""
    return _pay_later(event)


def _unawaited_error(receiver: str) -> str:
    return (
        f"TypeError: The receiver {receiver} of orderhooks.payment-collected returned an "
        "awaitable (coroutine), which nothing awaits: signals call their receivers "
        "synchronously, so its work did not run. Make it a plain function, or run the "
        "coroutine to its end inside it (asyncio.run)."
    )


@pytest.fixture
def no_unawaited_coroutine() -> Iterator[None]:
    """The test leaves no coroutine to be collected unawaited: its RuntimeWarning
    (an unraisable warning, an error under filterwarnings) shows at this collection."""
    yield
    gc.collect()


@pytest.mark.usefixtures("no_unawaited_coroutine")
def test_an_async_callable_receiver_fails_the_delivery_and_rolls_its_writes_back(
    make_app: AppFactory, caplog: pytest.LogCaptureFixture
) -> None:
    app, _hooks, db = make_app()
    assert db is not None
    ledger, writer = AsyncLedger(), Writer(db)
    cb = _collect(app, "A1")
    with (
        connected(app, (payment_collected, writer), (payment_collected, ledger)),
        caplog.at_level(logging.INFO, logger="flask_orderhooks"),
    ):
        assert _post(app, cb) == (500, "fail")
    assert ledger.ran == []
    # The plain receiver ran in the same transaction: rolled back with it.
    assert writer.calls == 1
    assert _credits(app, db) == []
    row = _row(app, cb)
    assert (row.status, row.attempts) == ("failed", 1)
    assert row.error == _unawaited_error("<AsyncLedger>")
    [record] = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert (record.levelname, record.getMessage()) == (
        "ERROR",
        f"gateway collect {cb.key}: {RECEIVER_FAILED}",
    )
    assert record.exc_info is not None and isinstance(record.exc_info[1], TypeError)

    # The platform's resend, once the receiver is a plain one, dispatches it.
    with connected(app, (payment_collected, writer)):
        assert _post(app, cb) == (200, "success")
    assert _credits(app, db) == ["A1:2"]
    assert (_row(app, cb).status, _row(app, cb).attempts) == ("done", 2)


@pytest.mark.usefixtures("no_unawaited_coroutine")
def test_a_function_returning_a_coroutine_fails_the_delivery(make_app: AppFactory) -> None:
    app, _hooks, db = make_app()
    assert db is not None
    cb = _collect(app, "A2")
    with connected(app, (payment_collected, returns_a_coroutine)):
        assert _post(app, cb) == (500, "fail")
    row = _row(app, cb)
    assert row.status == "failed"
    assert row.error == _unawaited_error(repr(returns_a_coroutine))


@pytest.mark.usefixtures("no_unawaited_coroutine")
def test_a_worker_attempt_with_an_async_callable_receiver_fails(make_app: AppFactory) -> None:
    """Deferred dispatch: the worker sends through the same send(), and its
    attempt fails and is recorded the same way."""
    app, hooks, db = make_app(ORDERHOOKS_DISPATCH="deferred")
    assert db is not None
    ledger, writer = AsyncLedger(), Writer(db)
    cb = _collect(app, "A3")
    with connected(app, (payment_collected, writer), (payment_collected, ledger)):
        assert _post(app, cb) == (200, "success")
        assert _row(app, cb).status == "pending"
        with app.app_context():
            assert hooks.process_due() == 1
    assert ledger.ran == []
    assert _credits(app, db) == []
    row = _row(app, cb)
    assert (row.status, row.attempts) == ("failed", 1)
    assert row.error == _unawaited_error("<AsyncLedger>")


def test_an_async_callable_operator_receiver_is_logged_and_closed(
    make_app: AppFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Operator signals call their receivers one by one: an awaitable one
    returns is closed (no "never awaited" warning) and logged at ERROR, and
    the other receivers still hear of the dead delivery."""
    app, _hooks, _db = make_app(ORDERHOOKS_RETRY_DELAYS=[])
    pager = AsyncLedger()
    paged: list[str] = []

    def page_someone(sender: Flask, delivery: Any, **extra: Any) -> None:
        paged.append(delivery.key)

    cb = _collect(app, "A4")
    with connected(
        app,
        (delivery_dead, pager),
        (delivery_dead, page_someone),
        (payment_collected, ledger_is_down),
    ):
        assert _post(app, cb) == (500, "fail")
        gc.collect()  # an unawaited coroutine warns here (an error under filterwarnings)
    assert paged == [cb.key]
    assert pager.ran == []
    assert (
        f"gateway collect {cb.key}: a receiver of orderhooks.delivery-dead returned an "
        "awaitable (<AsyncLedger>, a coroutine) that nothing awaits; operator signals call "
        "their receivers synchronously, so its work did not run"
    ) in [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
