"""flask_orderhooks.testing and the ``orderhooks`` pytest fixture."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest
from flask import Flask

from flask_orderhooks import OrderHooks
from flask_orderhooks.pytest_plugin import OrderHooksClient
from flask_orderhooks.testing import (
    KINDS,
    build,
    gateway_collect,
    igv_order_status,
    standard_webhook,
    sud_order_changed,
)
from tests.conftest import BASE_CONFIG, AppFactory, Recorder

RecorderFactory = Callable[..., tuple[Flask, Recorder]]

#: A Standard Webhooks source for the ``orderhooks`` fixture's app: BASE_CONFIG
#: has none (tests/test_routes.py expects "standard off" with it).
STANDARD_SOURCE = {"shop": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"}


@pytest.fixture
def app(make_app: AppFactory) -> Flask:
    """The conftest app, with every built-in platform on (standard included)."""
    return make_app(ORDERHOOKS_STANDARD_WEBHOOKS=STANDARD_SOURCE)[0]


@pytest.mark.parametrize(
    "kind",
    KINDS,
)
def test_fixture_delivers_every_kind_and_captures_its_events(
    kind: str, orderhooks: OrderHooksClient
) -> None:
    with orderhooks.captured() as events:
        response = orderhooks.deliver(kind)
    assert response.status_code == 200
    expected = {
        "igv": ["orderhooks.order-pending-delivery"],
        "collect": ["orderhooks.payment-collected"],
        "payout": ["orderhooks.payout-finished"],
        "sud": ["orderhooks.game-order-changed"],
        "sud-batch": ["orderhooks.game-order-changed"] * 2,
        "standard": ["orderhooks.webhook-received"],
    }[kind]
    assert [e.signal for e in events] == expected


def test_deliver_twice_dispatches_once(orderhooks: OrderHooksClient) -> None:
    with orderhooks.captured() as events:
        first, second = orderhooks.deliver_twice("collect", trans_id="T1", payed_amount="99.00")
    assert (first.status_code, second.status_code) == (200, 200)
    assert second.get_data(as_text=True) == "success"
    (only,) = events
    assert only.event.trans_id == "T1" and only.event.payed_amount == Decimal("99.00")
    assert not only.event.amount_matches


def test_captured_disconnects_after_the_block(orderhooks: OrderHooksClient) -> None:
    with orderhooks.captured():
        pass
    response = orderhooks.deliver("igv")
    assert response.status_code == 503, "nothing is connected any more"


def test_builders_with_explicit_secrets_need_no_app() -> None:
    cb = igv_order_status("s" * 32, request_id="r1", timestamp_ms=1734850099000)
    assert cb.key == "r1" and cb.url() == "/orderhooks/igv/order-status"
    assert cb.url("/hooks/") == "/hooks/igv/order-status"
    assert cb.headers["X-Timestamp"] == "1734850099000"
    pay = gateway_collect("merchant-key", id="C1", status=20)
    assert pay.key == "C1:20" and pay.json["sign"] and pay.json["mch_id"] == 10001
    game = sud_order_changed("app-secret", app_id="42", notify_id="n9", value=7)
    assert game.key == "n9" and game.json["data"]["value"] == 7
    assert game.headers["Sud-AppId"] == "42"


def test_decimal_amounts_are_written_as_json_numbers() -> None:
    cb = gateway_collect("k", order_amount=Decimal("100.00"), payed_amount=Decimal("1e5"))
    assert b'"order_amount":100.00' in cb.body and b'"payed_amount":1E+5' in cb.body
    assert cb.json["order_amount"] == Decimal("100.00")


def test_the_gateway_kit_signs_nested_numbers_as_written() -> None:
    """The kit signs the way the verifier reads: a number inside a nested
    value is signed bare, with its own text. The expected sign string is
    written out here, not taken from the verifier."""
    cb = gateway_collect(
        "k",
        id="C1",
        payed_at=None,
        extra={"extra": {"fee": Decimal("1.50"), "n": [1, Decimal("2.0")]}},
    )
    assert b'"extra":{"fee":1.50,"n":[1,2.0]}' in cb.body
    text = (
        'channel=bank&created_at=2026-05-04 10:05:00&extra={"fee":1.50,"n":[1,2.0]}&id=C1'
        "&mch_id=10001&order_amount=100.00&payed_amount=100.00&status=60&trans_id=ORDER-10001"
        "&key=k"
    )
    assert cb.json["sign"] == hashlib.md5(text.encode(), usedforsecurity=False).hexdigest()


def test_sud_kit_signs_in_the_configured_timestamp_unit(recorder: RecorderFactory) -> None:
    """With ORDERHOOKS_SUD_TIMESTAMP_UNIT = "s" the kit (sud_order_changed,
    build("sud"), the pytest plugin's deliver, ``flask orderhooks send``)
    stamped Sud-Timestamp in milliseconds, so the app refused its own
    callbacks 401 as 1000x in the future; and passing seconds made it write
    notify_time in seconds, which PROTOCOLS.md gives in ms whatever the
    header's unit. The header now follows the configured unit; notify_time
    stays in milliseconds."""
    now = 1_795_000_000.0
    app, rec = recorder(ORDERHOOKS_SUD_TIMESTAMP_UNIT="s", hooks_options={"clock": lambda: now})
    with app.app_context():
        cb = sud_order_changed(app=app)
        assert build("sud").headers["Sud-Timestamp"] == "1795000000"
    assert (cb.headers["Sud-Timestamp"], cb.json["notify_time"]) == ("1795000000", "1795000000000")
    response = app.test_client().post(cb.url(), data=cb.body, headers=cb.headers)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert OrderHooksClient(app).deliver("sud-batch").status_code == 200
    assert [event.notify_time for _, event in rec.events] == [datetime.fromtimestamp(now, UTC)] * 3
    # An explicit unit wins; without an app the unit is SUD's default, ms.
    ms = sud_order_changed("s", app_id="42", timestamp_ms=1_795_000_000_123, timestamp_unit="ms")
    assert ms.headers["Sud-Timestamp"] == "1795000000123"
    assert sud_order_changed("s", app_id="42", timestamp_ms=5).headers["Sud-Timestamp"] == "5"


def test_builders_explain_what_is_missing(tmp_path: Path) -> None:
    app = Flask("kit", instance_path=str(tmp_path))
    app.config.update(BASE_CONFIG, ORDERHOOKS_IGV_SECRET=None, ORDERHOOKS_SUD_APPS=None)
    OrderHooks(app)
    with app.app_context():
        with pytest.raises(LookupError, match="ORDERHOOKS_IGV_SECRET is not configured"):
            build("igv")
        with pytest.raises(LookupError, match="ORDERHOOKS_SUD_APPS is not configured"):
            build("sud")
        with pytest.raises(LookupError, match="No ORDERHOOKS_GATEWAY_KEY for mch_id 5"):
            build("collect", mch_id=5)
        with pytest.raises(ValueError, match="Unknown callback kind 'paypal'"):
            build("paypal")


def test_sud_builder_refuses_an_unknown_app(app: Flask) -> None:
    with (
        app.app_context(),
        pytest.raises(LookupError, match="App '7' is not in ORDERHOOKS_SUD_APPS"),
    ):
        sud_order_changed(app_id="7")


@pytest.mark.parametrize("timestamp", ["abc", "", 10**14])
def test_a_standard_webhook_timestamp_that_is_no_time_is_refused_by_name(
    timestamp: str | int,
) -> None:
    with pytest.raises(ValueError) as refused:
        standard_webhook("whsec_c2VjcmV0", source="shop", timestamp=timestamp)
    assert str(refused.value) == (
        "timestamp must be whole Unix seconds of a year from 1 to 9999, such as "
        f"1767225600, not {str(timestamp)!r}."
    )
