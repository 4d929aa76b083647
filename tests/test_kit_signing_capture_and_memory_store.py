"""The testing kit as docs/testing.rst describes it, and a standalone store
that must be a database on disk (found by the session-13 review of the docs
against the code).

- The builders given ``secret=`` inside an app's context sign the way that app
  verifies (docs/testing.rst: "the app's configured secret (app= or the
  current app), or with secret=").
- ``captured(*signals)`` records signals that send no ``event``, such as the
  operators' ``delivery_failed`` and ``delivery_dead``.
- An in-memory SQLite ``ORDERHOOKS_DATABASE_URI`` is refused at start-up.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from blinker import NamedSignal
from flask import Flask

from flask_orderhooks import (
    ConfigurationError,
    OrderHooks,
    delivery_dead,
    delivery_failed,
    game_order_changed,
    order_pending_delivery,
    payment_collected,
    payout_finished,
    webhook_received,
)
from flask_orderhooks.pytest_plugin import CapturedEvent, OrderHooksClient
from flask_orderhooks.testing import (
    SignedCallback,
    gateway_collect,
    gateway_payout,
    igv_order_status,
    standard_webhook,
    sud_order_batch_changed,
    sud_order_changed,
)
from tests.conftest import (
    BASE_CONFIG,
    GATEWAY_KEYS,
    IGV_SECRET,
    SUD_APP_ID,
    SUD_APPS,
    connected,
    ledger_is_down,
)

#: A frozen clock two weeks from the machine's: a builder that took the
#: machine's time instead of the app's would be refused as too old or new.
FROZEN_NOW = 1_795_000_000.0
STANDARD_SECRET = "whsec_c2VjcmV0LWtleS1mb3ItdGhlLXNob3A="


def make(tmp_path: Path, **config: Any) -> Flask:
    app = Flask("kit_fixes_s13", instance_path=str(tmp_path))
    app.config.update(BASE_CONFIG)
    app.config.update(config)
    return app


def _accept(sender: Flask, **extra: Any) -> None:
    return None


def _post(app: Flask, callback: SignedCallback) -> tuple[int, bytes]:
    response = app.test_client().post(callback.url(), data=callback.body, headers=callback.headers)
    return response.status_code, response.data


@pytest.fixture
def accepting() -> Iterator[Callable[[Flask, NamedSignal], None]]:
    """Connect a receiver that accepts everything, disconnected after the test."""
    connected: list[tuple[NamedSignal, Flask]] = []

    def connect(app: Flask, signal: NamedSignal) -> None:
        signal.connect(_accept, app)
        connected.append((signal, app))

    yield connect
    for signal, app in connected:
        signal.disconnect(_accept, app)


# -- 8. secret= inside the current app's context ---------------------------------------


def test_gateway_collect_with_secret_uses_the_current_apps_sign_template(
    tmp_path: Path,
) -> None:
    app = make(
        tmp_path,
        ORDERHOOKS_GATEWAY_KEY="merchant-key",
        ORDERHOOKS_GATEWAY_SIGN_TEMPLATE="{key}&{params}",
    )
    hooks = OrderHooks(app)
    payment_collected.connect(_accept, app)
    try:
        with app.app_context():
            callback = gateway_collect(secret="merchant-key")
        response = app.test_client().post(
            callback.url(), data=callback.body, headers=callback.headers
        )
        assert (response.status_code, response.data) == (200, b"success")
    finally:
        payment_collected.disconnect(_accept, app)
        hooks.state(app).store.engine.dispose()


@pytest.mark.parametrize(
    ("builder", "signal"),
    [(gateway_collect, payment_collected), (gateway_payout, payout_finished)],
    ids=["collect", "payout"],
)
def test_a_gateway_key_given_inside_the_app_signs_as_app_equals_app_does(
    tmp_path: Path,
    accepting: Callable[[Flask, NamedSignal], None],
    builder: Callable[..., SignedCallback],
    signal: NamedSignal,
) -> None:
    app = make(tmp_path, ORDERHOOKS_GATEWAY_SIGN_TEMPLATE="{key}&{params}")
    hooks = OrderHooks(app)
    accepting(app, signal)
    try:
        with app.app_context():
            given = builder(GATEWAY_KEYS["10001"], id="G1")
        configured = builder(app=app, id="G1")
        # One signature, whichever way the key came.
        assert given.body == configured.body
        assert _post(app, given) == (200, b"success")
    finally:
        hooks.state(app).store.engine.dispose()


def test_a_gateway_key_given_without_any_app_uses_the_default_template() -> None:
    # No app to read a template from: the gateway's default, "{params}&key={key}".
    plain = gateway_collect("k", id="G2")
    explicit = gateway_collect("k", id="G2", template="{params}&key={key}")
    assert plain.body == explicit.body


def test_a_gateway_key_given_for_an_app_without_the_extension_uses_the_default_template(
    tmp_path: Path,
) -> None:
    bare = Flask("bare", instance_path=str(tmp_path))
    with bare.app_context():
        in_context = gateway_collect("k", id="G3")
    assert in_context.body == gateway_collect("k", id="G3").body
    assert gateway_collect("k", id="G3", app=bare).body == in_context.body


_WITH_SECRET: list[Any] = [
    pytest.param(lambda: igv_order_status(IGV_SECRET), order_pending_delivery, b"OK", id="igv"),
    pytest.param(
        lambda: gateway_collect(GATEWAY_KEYS["10001"]), payment_collected, b"success", id="collect"
    ),
    pytest.param(
        lambda: gateway_payout(GATEWAY_KEYS["10001"]), payout_finished, b"success", id="payout"
    ),
    pytest.param(
        lambda: sud_order_changed(SUD_APPS[SUD_APP_ID], app_id=SUD_APP_ID),
        game_order_changed,
        None,
        id="sud",
    ),
    pytest.param(
        lambda: sud_order_batch_changed(SUD_APPS[SUD_APP_ID], app_id=SUD_APP_ID),
        game_order_changed,
        None,
        id="sud-batch",
    ),
    pytest.param(
        lambda: standard_webhook(STANDARD_SECRET, source="shop"),
        webhook_received,
        None,
        id="standard",
    ),
]


@pytest.mark.parametrize(("build", "signal", "answer"), _WITH_SECRET)
def test_every_builder_given_its_secret_inside_the_app_is_accepted_by_that_app(
    tmp_path: Path,
    accepting: Callable[[Flask, NamedSignal], None],
    build: Callable[[], SignedCallback],
    signal: NamedSignal,
    answer: bytes | None,
) -> None:
    # Every setting that shapes a signed request is the app's: its clock,
    # the gateway's template, SUD's timestamp unit.
    app = make(
        tmp_path,
        ORDERHOOKS_GATEWAY_SIGN_TEMPLATE="{key}&{params}",
        ORDERHOOKS_SUD_TIMESTAMP_UNIT="s",
        ORDERHOOKS_STANDARD_WEBHOOKS={"shop": STANDARD_SECRET},
    )
    hooks = OrderHooks(app, clock=lambda: FROZEN_NOW)
    accepting(app, signal)
    try:
        with app.app_context():
            callback = build()
        status, data = _post(app, callback)
        assert status == 200, data
        if answer is not None:
            assert data == answer
        if callback.provider == "sud":
            assert callback.headers["Sud-Timestamp"] == str(int(FROZEN_NOW))
    finally:
        hooks.state(app).store.engine.dispose()


# -- 9. captured(*signals) with signals that send no ``event`` --------------------------


def test_captured_records_the_operator_signals_it_is_given(tmp_path: Path) -> None:
    app = make(tmp_path, ORDERHOOKS_RETRY_DELAYS=[])
    hooks = OrderHooks(app)
    try:
        with connected(app, (payment_collected, ledger_is_down)):
            client = OrderHooksClient(app)
            with client.captured(delivery_dead) as events:
                assert client.deliver("collect", id="C3").status_code == 500
            assert "orderhooks.delivery-dead" in [e.signal for e in events]
    finally:
        hooks.state(app).store.engine.dispose()


def test_a_captured_operator_signal_keeps_every_keyword(tmp_path: Path) -> None:
    app = make(tmp_path, ORDERHOOKS_RETRY_DELAYS=[])
    hooks = OrderHooks(app)
    try:
        with connected(app, (payment_collected, ledger_is_down)):
            client = OrderHooksClient(app)
            with client.captured(delivery_failed, delivery_dead) as captured:
                assert client.deliver("collect", id="C4").status_code == 500
            operators = [c for c in captured if c.signal != "orderhooks.payment-collected"]
            assert [c.signal for c in operators] == [
                "orderhooks.delivery-failed",
                "orderhooks.delivery-dead",
            ]
            failed, dead = operators
            assert (failed.event, dead.event) == (None, None)
            assert set(failed.kwargs) == {"delivery", "error", "next_attempt_at"}
            assert set(dead.kwargs) == {"delivery", "error"}
            assert failed.kwargs["next_attempt_at"] is None
            for item in operators:
                assert item.kwargs["delivery"].key == "C4:60"
                assert item.kwargs["delivery"].status == "dead"
                assert item.kwargs["error"] == "RuntimeError: the ledger is down"
    finally:
        hooks.state(app).store.engine.dispose()


def test_a_captured_event_signal_is_as_before_with_its_keywords(tmp_path: Path) -> None:
    app = make(tmp_path)
    hooks = OrderHooks(app)
    payment_collected.connect(_accept, app)
    try:
        client = OrderHooksClient(app)
        with client.captured() as captured:
            assert client.deliver("collect", id="C5").data == b"success"
        [item] = captured
        assert item.signal == "orderhooks.payment-collected"
        assert item.event.trans_id == "ORDER-10001"
        assert item.kwargs == {"event": item.event}
        # Compared as before: built from its two fields, it equals what was recorded.
        assert CapturedEvent(item.signal, item.event) == item
    finally:
        payment_collected.disconnect(_accept, app)
        hooks.state(app).store.engine.dispose()


def test_captured_records_a_hosts_signal_with_any_keywords(tmp_path: Path) -> None:
    from blinker import Namespace

    shipped = Namespace().signal("shop.parcel-shipped")
    app = make(tmp_path)
    hooks = OrderHooks(app)
    try:
        client = OrderHooksClient(app)
        with client.captured(shipped) as captured:
            shipped.send(app, parcel="P1", carrier="post")
            shipped.send(Flask("another_app"), parcel="P2")  # not this app's: not recorded
        assert [(c.signal, c.event, c.kwargs) for c in captured] == [
            ("shop.parcel-shipped", None, {"parcel": "P1", "carrier": "post"})
        ]
        # Hashable as before, whatever the keywords hold.
        assert len({captured[0], CapturedEvent("shop.parcel-shipped", None, {"p": ["x"]})}) == 1
        assert not shipped.receivers  # disconnected at the block's end
    finally:
        hooks.state(app).store.engine.dispose()


# -- 10. An in-memory SQLite ORDERHOOKS_DATABASE_URI -----------------------------------


def test_an_in_memory_sqlite_store_is_refused_or_serves_every_thread(tmp_path: Path) -> None:
    app = make(tmp_path, ORDERHOOKS_DATABASE_URI="sqlite://")
    try:
        hooks = OrderHooks(app)
    except ConfigurationError as exc:
        refused_key = exc.key
        assert refused_key == "ORDERHOOKS_DATABASE_URI"
        return
    payment_collected.connect(_accept, app)
    statuses: list[int] = []

    def post(order: str) -> None:
        callback = gateway_collect(app=app, id=order)
        response = app.test_client().post(
            callback.url(), data=callback.body, headers=callback.headers
        )
        statuses.append(response.status_code)

    try:
        post("M1")
        thread = threading.Thread(target=post, args=("M2",))
        thread.start()
        thread.join()
        assert statuses == [200, 200]
    finally:
        payment_collected.disconnect(_accept, app)
        hooks.state(app).store.engine.dispose()


_IN_MEMORY = [
    "sqlite://",
    "sqlite:///",
    "sqlite:///:memory:",
    "sqlite+pysqlite://",
    "sqlite+pysqlite:///:memory:",
    "sqlite:///:memory:?uri=true",
    "sqlite:///file::memory:?uri=true",
    "sqlite:///file::memory:?cache=shared&uri=true",
    "sqlite:///file:memdb1?mode=memory&cache=shared&uri=true",
    "sqlite:///file:/shop.db?mode=ro&mode=memory&uri=1",
    "sqlite:///file:/shop.db?vfs=memdb&uri=true",
    "sqlite:///file:?uri=true",  # a temporary file, deleted when its connection closes
    "sqlite:///file://localhost?uri=true",
]


@pytest.mark.parametrize("uri", _IN_MEMORY)
def test_every_in_memory_sqlite_spelling_is_refused_at_init(tmp_path: Path, uri: str) -> None:
    app = make(tmp_path, ORDERHOOKS_DATABASE_URI=uri)
    hooks = OrderHooks()
    with pytest.raises(ConfigurationError) as refused:
        hooks.init_app(app)
    assert refused.value.key == "ORDERHOOKS_DATABASE_URI"
    assert str(refused.value) == (
        "ORDERHOOKS_DATABASE_URI: an in-memory or temporary SQLite database is not a durable "
        "store: it lives only as long as one connection, so every recorded delivery is lost "
        "with the process (a retried payment would be credited again), and each thread gets "
        'one of its own, without the table. Use a SQLite file, such as "sqlite:////var/lib/'
        'shop/orderhooks.sqlite3" (in tests, one in a temporary folder), or leave it unset '
        "for orderhooks.sqlite3 in the instance folder."
    )
    assert "orderhooks" not in app.extensions
    assert repr(hooks) == "<OrderHooks db=own apps=0>"


def test_uri_mode_given_in_engine_options_is_seen_too(tmp_path: Path) -> None:
    app = make(tmp_path, ORDERHOOKS_DATABASE_URI="sqlite:///file::memory:")
    with pytest.raises(ConfigurationError) as refused:
        OrderHooks(app, engine_options={"connect_args": {"uri": True}})
    assert refused.value.key == "ORDERHOOKS_DATABASE_URI"


#: SQLite files, as URLs (``{folder}`` is the test's folder) and the file each opens.
_FILES = [
    pytest.param("sqlite:///{folder}/plain.sqlite3", "plain.sqlite3", id="plain"),
    pytest.param("sqlite+pysqlite:///{folder}/driver.sqlite3", "driver.sqlite3", id="driver"),
    pytest.param(
        "sqlite:///file:{folder}/uri.sqlite3?mode=rwc&uri=true", "uri.sqlite3", id="uri-mode"
    ),
    pytest.param(
        "sqlite:///file://localhost{folder}/host.sqlite3?uri=true", "host.sqlite3", id="authority"
    ),
    # Without uri=true, pysqlite opens a file of that very name.
    pytest.param("sqlite:///{folder}/file::memory:", "file::memory:", id="no-uri-mode"),
]


@pytest.mark.parametrize(("uri", "filename"), _FILES)
def test_a_sqlite_file_serves_every_thread(
    tmp_path: Path, accepting: Callable[[Flask, NamedSignal], None], uri: str, filename: str
) -> None:
    app = make(tmp_path, ORDERHOOKS_DATABASE_URI=uri.format(folder=tmp_path))
    hooks = OrderHooks(app)
    accepting(app, payment_collected)
    statuses: list[int] = []

    def post(order: str) -> None:
        statuses.append(_post(app, gateway_collect(app=app, id=order))[0])

    try:
        post("F1")
        thread = threading.Thread(target=post, args=("F2",))
        thread.start()
        thread.join()
        assert statuses == [200, 200]
        assert [row.status for row in hooks.state(app).store.get("F2:60")] == ["done"]
    finally:
        hooks.state(app).store.engine.dispose()
    assert (tmp_path / filename).is_file()
