"""Defects of the request path: a receiver that answers with an awaitable,
an init_app whose registration fails half-way, and the key a refusal's log
line names."""

from __future__ import annotations

import gc
import io
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Blueprint, Flask
from flask_sqlalchemy import SQLAlchemy
from gunicorn.http import errors as gunicorn_errors  # type: ignore[import-untyped]
from prometheus_client import CollectorRegistry

from flask_orderhooks import (
    OrderHooks,
    console,
    delivery_dead,
    extension,
    get_extension,
    payment_collected,
)
from flask_orderhooks.logtext import quoted
from flask_orderhooks.replay import replay
from flask_orderhooks.store import StoredDelivery
from flask_orderhooks.testing import SignedCallback, gateway_collect, igv_order_status
from tests.conftest import (
    BASE_CONFIG,
    IGV_SECRET,
    AppFactory,
    Credit,
    connected,
    ledger_is_down,
)

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


@pytest.mark.usefixtures("no_unawaited_coroutine")
def test_a_replay_with_an_async_callable_receiver_fails(make_app: AppFactory) -> None:
    """``flask orderhooks replay`` and the console's button send through the
    same send(): the replay fails and says why."""
    app, hooks, db = make_app()
    assert db is not None
    ledger = AsyncLedger()
    cb = _collect(app, "A5")
    with connected(app, (payment_collected, ledger)):
        assert _post(app, cb) == (500, "fail")
        with app.app_context():
            outcome = replay(app, hooks.state(app), _row(app, cb), force=False)
    assert ledger.ran == []
    assert outcome.status == "failed"
    assert outcome.message.startswith(
        "failed: attempt 2 failed (TypeError: The receiver <AsyncLedger> of "
        "orderhooks.payment-collected returned an awaitable (coroutine), which nothing awaits"
    )
    row = _row(app, cb)
    assert (row.status, row.attempts) == ("failed", 2)
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


# -- 2. init_app whose registration fails ---------------------------------------------
#
# init_app stored its per-app state and app.extensions["orderhooks"] before
# registering its blueprints: when Flask refused one (a blueprint name the host
# had taken, an app that had handled a request), the app kept an OrderHooks
# whose routes were not all served, the metrics stayed in their registry, and a
# second init_app, once the cause was fixed, was refused ("already registered").


def _app(tmp_path: Path, **config: Any) -> Flask:
    app = Flask("reqpath_init_app", instance_path=str(tmp_path))
    app.config.update(BASE_CONFIG)
    app.config.update(config)
    return app


def _orderhooks_metrics(registry: CollectorRegistry) -> list[str]:
    return [m.name for m in registry.collect() if m.name.startswith("orderhooks")]


def _clash_message(name: str, what: str) -> str:
    return (
        f"The app already has a blueprint named {name!r}, the name of OrderHooks' {what}. "
        "Register the app's own under another name (app.register_blueprint(blueprint, "
        "name=...)) before calling init_app."
    )


def test_a_blueprint_named_like_the_callback_routes_is_refused_before_anything(
    tmp_path: Path,
) -> None:
    shared = CollectorRegistry()
    app = _app(tmp_path, ORDERHOOKS_METRICS_URL="/metrics", ORDERHOOKS_METRICS_REGISTRY=shared)
    hosts = Blueprint("orderhooks", __name__)
    app.register_blueprint(hosts)
    hooks = OrderHooks()
    with pytest.raises(RuntimeError) as info:
        hooks.init_app(app)
    assert str(info.value) == _clash_message("orderhooks", "callback routes")
    assert "orderhooks" not in app.extensions
    assert "orderhooks_metrics" not in app.extensions
    assert app.blueprints == {"orderhooks": hosts}
    assert _orderhooks_metrics(shared) == []
    assert repr(hooks) == "<OrderHooks db=own apps=0>"
    # The registry was left as it was: another app shares it.
    other = _app(
        tmp_path / "other", ORDERHOOKS_METRICS_URL="/metrics", ORDERHOOKS_METRICS_REGISTRY=shared
    )
    hooks.init_app(other)
    assert other.test_client().get("/metrics").status_code == 200


@pytest.mark.parametrize(
    ("config", "name", "what", "fix"),
    [
        pytest.param(
            {"ORDERHOOKS_CONSOLE_URL": "/ops", "SECRET_KEY": "k"},
            "orderhooks_console",
            "operator console",
            "ORDERHOOKS_CONSOLE_URL",
            id="console",
        ),
        pytest.param(
            {"ORDERHOOKS_METRICS_URL": "/metrics"},
            "orderhooks_metrics",
            "metrics route",
            "ORDERHOOKS_METRICS_URL",
            id="metrics",
        ),
    ],
)
def test_init_app_works_once_a_blueprint_name_clash_is_fixed(
    tmp_path: Path, config: dict[str, Any], name: str, what: str, fix: str
) -> None:
    app = _app(tmp_path, **config)
    app.register_blueprint(Blueprint(name, __name__))
    hooks = OrderHooks()
    with pytest.raises(RuntimeError) as info:
        hooks.init_app(app)
    assert str(info.value) == _clash_message(name, what)
    assert "orderhooks" not in app.extensions
    assert set(app.blueprints) == {name}
    app.config[fix] = None  # the host does without that part
    hooks.init_app(app)
    assert set(app.blueprints) == {name, "orderhooks"}
    cb = _collect(app, "B1")
    with connected(app, (payment_collected, ledger_is_down)):
        assert _post(app, cb) == (500, "fail")
    assert _row(app, cb).status == "failed"


def test_an_app_that_handled_a_request_is_refused_and_left_as_it_was(tmp_path: Path) -> None:
    """Flask refuses every setup method once the app handled a request: the
    first registration raises before it changes anything, and the metrics
    prepared before it leave their (shared) registry."""
    shared = CollectorRegistry()
    config = {"ORDERHOOKS_METRICS_URL": "/metrics", "ORDERHOOKS_METRICS_REGISTRY": shared}
    app = _app(tmp_path, **config)
    assert app.test_client().get("/").status_code == 404
    hooks = OrderHooks()
    for _ in range(2):  # the second time the same error, not "already registered"
        with pytest.raises(AssertionError) as info:
            hooks.init_app(app)
        assert str(info.value).startswith(
            "The setup method 'register_blueprint' can no longer be called on the application."
        )
        assert "orderhooks" not in app.extensions
        assert "orderhooks_metrics" not in app.extensions
        assert app.blueprints == {}
        assert _orderhooks_metrics(shared) == []
        assert info.value.__notes__ == [
            "OrderHooks.init_app left the app as it was: fix the cause and call "
            "init_app(app) again."
        ]
    with pytest.raises(RuntimeError, match="OrderHooks is not registered on this app"):
        hooks.state(app)
    # Set up before its first request, as it should be, the app works.
    fixed = _app(tmp_path / "fixed", **config)
    hooks.init_app(fixed)
    assert fixed.test_client().get("/metrics").status_code == 200
    assert repr(hooks) == "<OrderHooks db=own apps=1>"


def test_a_registration_failing_after_the_first_says_what_is_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """None of Flask's known refusals, but a later blueprint failing all the
    same: Flask cannot unregister the first, and the error says so; the
    metrics are gone from their registry and nothing is in app.extensions."""
    shared = CollectorRegistry()
    app = _app(
        tmp_path,
        ORDERHOOKS_CONSOLE_URL="/ops",
        SECRET_KEY="k",
        ORDERHOOKS_METRICS_URL="/metrics",
        ORDERHOOKS_METRICS_REGISTRY=shared,
    )

    def console_fails(*args: Any) -> None:
        raise OSError("the templates are gone")

    monkeypatch.setattr(console, "register_console", console_fails)
    with pytest.raises(OSError, match="the templates are gone") as info:
        OrderHooks(app)
    assert "orderhooks" not in app.extensions
    assert "orderhooks_metrics" not in app.extensions
    assert _orderhooks_metrics(shared) == []
    assert info.value.__notes__ == [
        "OrderHooks.init_app had registered the blueprints ['orderhooks'] on the app "
        "already, which Flask cannot unregister: set up a new app."
    ]


def test_the_blueprint_names_checked_are_those_registered(tmp_path: Path) -> None:
    app = _app(
        tmp_path, ORDERHOOKS_CONSOLE_URL="/ops", SECRET_KEY="k", ORDERHOOKS_METRICS_URL="/metrics"
    )
    OrderHooks(app)
    assert set(app.blueprints) == {
        extension._CALLBACKS_BLUEPRINT[0],
        extension._CONSOLE_BLUEPRINT[0],
        extension._METRICS_BLUEPRINT[0],
    }
    assert extension._CONSOLE_BLUEPRINT[0] == console.BLUEPRINT


# -- 3. a body the server's parser refuses ---------------------------------------------
#
# tests/system/test_chunked_body.py sends malformed chunked bodies to a real
# gunicorn; here the rule's edge: only gunicorn's request parse errors it would
# answer with a 4xx are the client's.


class RaisingStream(io.RawIOBase):
    """A server's input stream that raises ``error`` at the first read."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        raise self.error


def _post_reading(app: Flask, cb: SignedCallback, error: Exception) -> tuple[int, str]:
    environ = {"CONTENT_LENGTH": str(len(cb.body)), "wsgi.input": RaisingStream(error)}
    response = app.test_client().post(cb.url(), headers=cb.headers, environ_overrides=environ)
    return response.status_code, response.get_data(as_text=True)


@pytest.mark.parametrize(
    "error",
    [
        gunicorn_errors.InvalidChunkSize(b"zz"),
        gunicorn_errors.ChunkMissingTerminator(b"XY"),
        # A trailer section (after the last chunk) too long: its framing too.
        gunicorn_errors.LimitRequestHeaders("limit request trailer section size"),
    ],
    ids=lambda error: type(error).__name__,
)
def test_gunicorns_refusal_of_the_body_is_a_400(
    app: Flask, caplog: pytest.LogCaptureFixture, error: Exception
) -> None:
    cb = igv_order_status(IGV_SECRET, request_id="G1")
    reason = f"The body's chunked transfer coding is malformed ({type(error).__name__})."
    with caplog.at_level(logging.INFO, logger="flask_orderhooks"):
        assert _post_reading(app, cb, error) == (400, reason)
    line = f"igv order-status (unverified 'G1'): refused 400 from 127.0.0.1: {reason}"
    assert [(r.levelname, r.getMessage(), r.exc_info) for r in caplog.records] == [
        ("WARNING", line, None)
    ]


@pytest.mark.parametrize(
    "error",
    [
        gunicorn_errors.ConfigurationProblem("forwarded-allow-ips"),  # its code: 500
        RuntimeError("a bug of the server's reader"),
    ],
)
def test_another_failure_while_reading_the_body_stays_a_retry(
    app: Flask, caplog: pytest.LogCaptureFixture, error: Exception
) -> None:
    """A 400 would tell the platform not to retry: only the client's errors get one."""
    cb = igv_order_status(IGV_SECRET, request_id="G2")
    with caplog.at_level(logging.INFO, logger="flask_orderhooks"):
        assert _post_reading(app, cb, error) == (500, "Internal error; retry later.")
    [record] = caplog.records
    assert record.getMessage() == "igv order-status (unverified 'G2'): unexpected error"
    assert record.exc_info is not None and record.exc_info[1] is error


# -- 4. the key a refusal's log line names ---------------------------------------------
#
# Before there is a delivery, the line names the provider's key header. It was
# always "(unverified '...')", also for a request whose signature matched and
# whose body was then refused: the key was verified, the line said otherwise.


def _refusal_line(
    app: Flask, caplog: pytest.LogCaptureFixture, cb: SignedCallback, body: bytes, **headers: str
) -> tuple[int, str]:
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="flask_orderhooks"):
        response = app.test_client().post(cb.url(), data=body, headers={**cb.headers, **headers})
    [record] = caplog.records
    assert record.levelname == "WARNING"
    reason = response.get_data(as_text=True)
    prefix, _, said = record.getMessage().partition(": refused ")
    assert said == f"{response.status_code} from 127.0.0.1: {reason}"
    return response.status_code, prefix


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"{not json", id="not-json"),
        pytest.param(b'{"sellerOrderStatus": "1"}', id="wrong-type"),
        pytest.param(b'{"sellerOrderStatus": 1, "orderId": 5}', id="field-missing"),
    ],
)
def test_a_verified_request_whose_body_is_refused_names_its_key_as_verified(
    app: Flask, caplog: pytest.LogCaptureFixture, body: bytes
) -> None:
    cb = igv_order_status(IGV_SECRET, request_id="req-7")
    assert _refusal_line(app, caplog, cb, body) == (400, "igv order-status req-7")


def test_a_request_whose_signature_fails_is_still_unverified(
    app: Flask, caplog: pytest.LogCaptureFixture
) -> None:
    cb = igv_order_status(IGV_SECRET, request_id="req-8")
    assert _refusal_line(app, caplog, cb, b"{not json", **{"X-Signature": "0" * 64}) == (
        401,
        "igv order-status (unverified 'req-8')",
    )
    # Signed, but outside the timestamp window: refused as a bad signature
    # too (an iGV timestamp moved a digit into the request id is one).
    old = igv_order_status(IGV_SECRET, request_id="req-9", timestamp_ms=1_700_000_000_000)
    assert _refusal_line(app, caplog, old, old.body) == (
        401,
        "igv order-status (unverified 'req-9')",
    )


def test_a_verified_key_with_control_characters_is_quoted(
    app: Flask, caplog: pytest.LogCaptureFixture
) -> None:
    """Written as a delivery's key is: raw only when printable, otherwise
    quoted and cut short, so no key forges or hides a log line."""
    hostile = "req-10\x1b[2J\x85" + "x" * 200
    cb = igv_order_status(IGV_SECRET, request_id=hostile)
    status, prefix = _refusal_line(app, caplog, cb, b"[]")
    assert (status, prefix) == (400, f"igv order-status {quoted(hostile)}")
    assert prefix == f"igv order-status 'req-10\\x1b[2J\\x85{'x' * 69}'"
