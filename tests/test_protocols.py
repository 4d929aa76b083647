"""The three signature schemes (test vectors, rotation, variants) and the events."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from flask import Flask

from flask_orderhooks.events import (
    GameOrderChanged,
    OrderPendingDelivery,
    PaymentCollected,
    PayoutFinished,
    UnhandledCallback,
)
from flask_orderhooks.gateway import gateway_sign_string
from flask_orderhooks.igv import igv_signature
from flask_orderhooks.jsonbody import parse_object, render_value
from flask_orderhooks.provider import signature_matches
from flask_orderhooks.sud import sud_signature
from flask_orderhooks.testing import (
    SignedCallback,
    build,
    gateway_collect,
    gateway_payout,
    igv_order_status,
    sud_order,
    sud_order_batch_changed,
    sud_order_changed,
)
from tests.conftest import IGV_SECRET, SUD_APP_ID, Recorder

RecorderFactory = Callable[..., tuple[Flask, Recorder]]


def post(app: Flask, cb: SignedCallback) -> Any:
    return app.test_client().post(cb.url(), data=cb.body, headers=cb.headers)


# -- iGV ---------------------------------------------------------------------


def test_igv_test_vector() -> None:
    assert (
        igv_signature("1734850099000", "2002986662652579841", IGV_SECRET.encode())
        == "fd3b0ee18d6a018a553de2b3a2e4f380daa87917401e4981f302d2abee7abd8e"
    )


def test_igv_test_vector_is_accepted_in_either_case(recorder: RecorderFactory) -> None:
    now = 1734850099.0
    app, rec = recorder(hooks_options={"clock": lambda: now})
    body = (
        b'{"createdAt":"2025-12-17T13:44:16","orderId":1689644928115784,'
        b'"orderNum":"SO1689644928115784","sellerOrderStatus":1,"buyerId":"1907369850568257537"}'
    )
    signature = "fd3b0ee18d6a018a553de2b3a2e4f380daa87917401e4981f302d2abee7abd8e"
    for request_id, sig in (
        ("2002986662652579841", signature),
        ("2002986662652579841", signature.upper()),
    ):
        response = app.test_client().post(
            "/orderhooks/igv/order-status",
            data=body,
            headers={
                "X-Request-Id": request_id,
                "X-Timestamp": "1734850099000",
                "X-Signature": sig,
            },
        )
        assert response.status_code == 200
    ((_, event),) = rec.events
    assert event == OrderPendingDelivery(
        request_id="2002986662652579841",
        timestamp=datetime(2024, 12, 22, 6, 48, 19, tzinfo=UTC),
        order_id=1689644928115784,
        order_num="SO1689644928115784",
        seller_order_status=1,
        buyer_id="1907369850568257537",
        created_at="2025-12-17T13:44:16",
        raw=json.loads(body),
    )
    assert event.timestamp.tzinfo is UTC


def test_igv_other_status_goes_to_callback_unhandled(recorder: RecorderFactory) -> None:
    app, rec = recorder()
    with app.app_context():
        cb = igv_order_status(seller_order_status=3, request_id="r-3", app=app)
    assert post(app, cb).status_code == 200
    assert rec.events == [
        (
            "UnhandledCallback",
            UnhandledCallback(
                provider="igv",
                callback="order-status",
                key="r-3",
                kind="sellerOrderStatus=3",
                raw=cb.json,
            ),
        )
    ]


def test_igv_rotated_secrets_accept_old_and_new(recorder: RecorderFactory) -> None:
    old, new = "o" * 32, "n" * 32
    app, rec = recorder(ORDERHOOKS_IGV_SECRET=[old, new])
    with app.app_context():
        assert post(app, igv_order_status(old, app=app)).status_code == 200
        assert post(app, igv_order_status(new, app=app)).status_code == 200
        assert post(app, igv_order_status("x" * 32, app=app)).status_code == 401
    assert len(rec.events) == 2


def test_igv_big_order_ids_stay_exact(recorder: RecorderFactory) -> None:
    app, rec = recorder()
    big = 2**70 + 1
    with app.app_context():
        assert post(app, igv_order_status(order_id=big, app=app)).status_code == 200
    assert rec.events[0][1].order_id == big


def test_unknown_fields_are_kept_in_raw(recorder: RecorderFactory) -> None:
    app, rec = recorder()
    with app.app_context():
        for kind in ("igv", "collect", "payout"):
            assert post(app, build(kind, app=app, extra={"futureField": [1, 2]})).status_code == 200
        # A SUD event's raw is its order; unknown top-level fields are accepted too.
        sud = build("sud", app=app, futureField=[1, 2], extra={"futureTop": True})
        assert post(app, sud).status_code == 200
    assert [e.raw["futureField"] for _, e in rec.events] == [[1, 2]] * 4


# -- gateway -------------------------------------------------------------------


def test_gateway_sign_string_drops_empty_values_and_sorts() -> None:
    fields = parse_object(
        b'{"status":60,"id":"C1","payed_at":null,"channel":"","mch_id":10001,'
        b'"order_amount":"100.00","payed_amount":100.50,"sign":"x"}'
    )
    assert (
        gateway_sign_string(fields, "KEY", "{params}&key={key}")
        == "id=C1&mch_id=10001&order_amount=100.00&payed_amount=100.50&status=60&key=KEY"
    )
    assert (
        gateway_sign_string(fields, "KEY", "{key}&{params}")
        == "KEY&id=C1&mch_id=10001&order_amount=100.00&payed_amount=100.50&status=60"
    )


def test_gateway_numbers_are_signed_as_written_not_as_floats() -> None:
    as_written = parse_object(b'{"a":100.00,"b":1e5,"c":-0.10}')
    assert (
        gateway_sign_string(as_written, "K", "{params}&key={key}") == "a=100.00&b=1e5&c=-0.10&key=K"
    )


def test_gateway_render_value_keeps_nested_numbers_as_json_numbers() -> None:
    """render_value promises numbers as their JSON text and nested objects
    and arrays as compact JSON. Nested numbers used to be quoted
    (json.dumps encodes again what its ``default=`` returns, a str):
    {"fee":1.50} was signed as {"fee":"1.50"}, a text no signer produces,
    so a signed body carrying a nested number was refused 401. Strings,
    literals and non-ASCII text stay as json.dumps writes them."""
    data = parse_object(
        b'{"extra":{"fee":1.50,"n":[1,2.0,-0.10,1e5],"s":"\\u00e9\\"\\n","t":true,"z":null}}'
    )
    assert render_value(data["extra"]) == (
        '{"fee":1.50,"n":[1,2.0,-0.10,1e5],"s":"\u00e9\\"\\n","t":true,"z":null}'
    )
    assert (
        render_value(parse_object(b'{"a":[[],{},[{"b":[0.0]}]]}')["a"]) == '[[],{},[{"b":[0.0]}]]'
    )


@pytest.mark.parametrize("template", ["{params}&key={key}", "{key}&{params}"])
def test_gateway_both_key_placements(template: str, recorder: RecorderFactory) -> None:
    app, rec = recorder(ORDERHOOKS_GATEWAY_SIGN_TEMPLATE=template)
    with app.app_context():
        assert post(app, gateway_collect(app=app)).status_code == 200
        other = "{key}&{params}" if template.startswith("{params}") else "{params}&key={key}"
        assert post(app, gateway_collect(app=app, template=other)).status_code == 401
    assert len(rec.events) == 1


def test_gateway_collect_event_fields_with_string_amounts(recorder: RecorderFactory) -> None:
    app, rec = recorder()
    with app.app_context():
        cb = gateway_collect(
            id="C9", trans_id="T9", order_amount="100.00", payed_amount="99.00", app=app
        )
    assert post(app, cb).status_code == 200
    ((_, event),) = rec.events
    assert event == PaymentCollected(
        id="C9",
        trans_id="T9",
        mch_id=10001,
        order_amount=Decimal("100.00"),
        payed_amount=Decimal("99.00"),
        channel="bank",
        status=60,
        created_at="2026-05-04 10:05:00",
        payed_at="2026-05-04 10:06:10",
        raw=cb.json,
    )
    assert event.succeeded and not event.amount_matches
    assert type(event.order_amount) is Decimal


def test_gateway_collect_old_form_numbers_and_processing_status(recorder: RecorderFactory) -> None:
    app, rec = recorder()
    with app.app_context():
        cb = gateway_collect(
            order_amount=Decimal("100.00"),
            payed_amount=Decimal("100.00"),
            status=20,
            payed_at=None,
            app=app,
        )
    assert b'"order_amount":100.00' in cb.body
    assert post(app, cb).status_code == 200
    event = rec.events[0][1]
    assert event.order_amount == Decimal("100.00") and event.amount_matches
    assert not event.succeeded and event.payed_at is None


def test_gateway_collect_with_an_empty_payed_amount_is_not_paid(recorder: RecorderFactory) -> None:
    """The signing rule leaves out "" like null, so the gateway may send ""
    for an amount not paid yet: it is no amount, not a malformed one. The
    order's own amount cannot be empty."""
    app, rec = recorder()
    with app.app_context():
        processing = gateway_collect(id="C-EMPTY", payed_amount="", status=20, app=app)
        no_order_amount = gateway_collect(id="C-NONE", order_amount="", payed_amount="1", app=app)
    assert b'"payed_amount":""' in processing.body
    assert post(app, processing).status_code == 200
    event = rec.events[0][1]
    assert event.payed_amount is None and not event.amount_matches and not event.succeeded
    response = post(app, no_order_amount)
    assert (response.status_code, response.data) == (400, b"fail")
    assert len(rec.events) == 1


def test_gateway_payout_success_and_cancel(recorder: RecorderFactory) -> None:
    app, rec = recorder()
    with app.app_context():
        ok = gateway_payout(id="P1", app=app)
        canceled = gateway_payout(id="P2", status=50, app=app)
    assert [post(app, c).status_code for c in (ok, canceled)] == [200, 200]
    (_, first), (_, second) = rec.events
    assert isinstance(first, PayoutFinished) and first.succeeded and not first.canceled
    assert first.payed_at == "2026-05-04 10:15:00" and first.canceled_at is None
    assert second.canceled and not second.succeeded and second.canceled_at == "2026-05-04 10:23:00"


@pytest.mark.parametrize(
    "keys",
    [
        "merchant-key",
        ["retired", "merchant-key"],
        {"10001": ["retired", "merchant-key"]},
        {10001: "merchant-key"},
    ],
)
def test_gateway_key_config_forms(keys: Any, recorder: RecorderFactory) -> None:
    app, rec = recorder(ORDERHOOKS_GATEWAY_KEY=keys)
    with app.app_context():
        assert post(app, gateway_collect("merchant-key", app=app)).status_code == 200
        assert post(app, gateway_collect("wrong", app=app)).status_code == 401
    assert len(rec.events) == 1


def test_gateway_right_signature_for_another_merchant_is_refused(recorder: RecorderFactory) -> None:
    app, rec = recorder(ORDERHOOKS_GATEWAY_KEY={"10001": "key-a", "10002": "key-b"})
    with app.app_context():
        response = post(app, gateway_collect("key-a", mch_id=10002, app=app))
        unknown = post(app, gateway_collect("key-a", mch_id=10003, app=app))
    assert (response.status_code, response.get_data(as_text=True)) == (401, "fail")
    assert (unknown.status_code, unknown.get_data(as_text=True)) == (401, "fail")
    assert rec.events == []


# -- SUD -------------------------------------------------------------------------


def test_sud_signature_covers_the_raw_body() -> None:
    body = b'{"a": 1}'
    expected = sud_signature("app", "1647844976502", "nonce", body, b"secret")
    assert expected == sud_signature("app", "1647844976502", "nonce", b'{"a": 1}', b"secret")
    assert expected != sud_signature("app", "1647844976502", "nonce", b'{"a":1}', b"secret")
    assert len(expected) == 40 and expected == expected.lower()


def test_sud_single_event_fields(recorder: RecorderFactory) -> None:
    app, rec = recorder()
    with app.app_context():
        cb = sud_order_changed(
            notify_id="n-1",
            order_id="1659497694888",
            out_group_id="g1",
            game_round_id="r1",
            app=app,
        )
    assert post(app, cb).status_code == 200
    ((_, event),) = rec.events
    assert isinstance(event, GameOrderChanged)
    assert (event.notify_id, event.app_id, event.order_id, event.out_order_id) == (
        "n-1",
        SUD_APP_ID,
        "1659497694888",
        "OUT-1659497694888",
    )
    assert (event.out_group_id, event.game_round_id, event.value, event.seq) == ("g1", "r1", 1, 0)
    assert event.payload == {"score": 1} and event.succeeded
    assert event.notify_time.tzinfo is UTC
    assert event.notify_event == "sud.mg.merchant.order.changed"


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"round_id": "r-zh"}, "r-zh"),
        ({"game_round_id": "r-en"}, "r-en"),
        ({"game_round_id": "r-en", "round_id": "r-zh"}, "r-en"),
        ({}, None),
    ],
)
def test_sud_reads_the_round_under_either_of_its_names(
    recorder: RecorderFactory, fields: dict[str, str], expected: str | None
) -> None:
    """SUD's Chinese docs name the field round_id, the English ones game_round_id."""
    app, rec = recorder()
    order = {k: v for k, v in sud_order().items() if k != "game_round_id"} | fields
    with app.app_context():
        cb = sud_order_batch_changed(orders=[order], app=app)
    assert post(app, cb).status_code == 200
    ((_, event),) = rec.events
    assert event.game_round_id == expected
    assert event.raw == order


def test_sud_batch_fills_batch_level_fields(recorder: RecorderFactory) -> None:
    app, rec = recorder()
    entry = {k: v for k, v in sud_order(order_id="7").items() if k not in ("mg_id", "room_id")}
    with app.app_context():
        cb = sud_order_batch_changed(
            orders=[entry, sud_order(order_id="8", status="EXECUTE_FAIL")], app=app
        )
    assert post(app, cb).status_code == 200
    (_, first), (_, second) = rec.events
    assert (first.order_id, first.mg_id, first.room_id) == ("7", "1461564080052506636", "9009")
    assert first.raw == entry
    assert not second.succeeded and second.status == "EXECUTE_FAIL"


def test_sud_unknown_event_goes_to_callback_unhandled(recorder: RecorderFactory) -> None:
    app, rec = recorder()
    with app.app_context():
        cb = build("sud", app=app, extra={"notify_event": "sud.mg.merchant.room.changed"})
    assert post(app, cb).status_code == 200
    ((name, event),) = rec.events
    assert name == "UnhandledCallback" and event.kind == "sud.mg.merchant.room.changed"


def test_sud_body_app_id_must_match_header(recorder: RecorderFactory) -> None:
    app, rec = recorder(ORDERHOOKS_SUD_APPS={SUD_APP_ID: "app-secret", "2": "other"})
    with app.app_context():
        cb = sud_order_changed(app_id="2", extra={"app_id": SUD_APP_ID}, app=app)
    response = post(app, cb)
    assert response.status_code == 401
    assert response.json == {
        "ret_code": 401,
        "ret_msg": "The body's app_id is not the Sud-AppId header's.",
    }
    assert rec.events == []


def test_sud_verify_off_is_loud_and_skips_headers(
    recorder: RecorderFactory, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("WARNING", "flask_orderhooks"):
        app, rec = recorder(ORDERHOOKS_SUD_VERIFY=False)
    assert "ORDERHOOKS_SUD_VERIFY is False" in caplog.text
    with app.app_context():
        cb = sud_order_changed(app=app)
    response = app.test_client().post(cb.url(), data=cb.body, headers={})
    assert response.status_code == 200
    assert len(rec.events) == 1


def test_sud_seconds_timestamps_when_configured(recorder: RecorderFactory) -> None:
    """With ORDERHOOKS_SUD_TIMESTAMP_UNIT = "s" a Sud-Timestamp in seconds is
    on time and one in milliseconds 1000x in the future. notify_time is in
    milliseconds either way (the kit takes the time in ms and writes the
    header in the app's unit unless told otherwise)."""
    now = 1_795_000_000.0
    app, rec = recorder(ORDERHOOKS_SUD_TIMESTAMP_UNIT="s", hooks_options={"clock": lambda: now})
    ms = int(now * 1000)
    with app.app_context():
        seconds = sud_order_changed(timestamp_ms=ms, timestamp_unit="s", app=app)
        assert seconds.headers["Sud-Timestamp"] == str(int(now))
        assert post(app, seconds).status_code == 200
        millis = sud_order_changed(timestamp_ms=ms, timestamp_unit="ms", app=app)
        assert millis.headers["Sud-Timestamp"] == str(ms)
        assert post(app, millis).status_code == 401
    assert len(rec.events) == 1


def test_sud_failures_keep_the_pipelines_status_unless_configured(
    recorder: RecorderFactory,
) -> None:
    """SUD reads ret_code; which HTTP status it wants on a failure is not
    documented, so it is ORDERHOOKS_SUD_FAILURE_HTTP_STATUS: by default the
    pipeline's own, or one status for every failure (ret_code unchanged)."""
    for config, http_status in (({}, 401), ({"ORDERHOOKS_SUD_FAILURE_HTTP_STATUS": 200}, 200)):
        app, rec = recorder(**config)
        with app.app_context():
            good = sud_order_changed(app=app)
        forged = {**good.headers, "Sud-Signature": "0" * 40}
        response = app.test_client().post(good.url(), data=good.body, headers=forged)
        assert response.status_code == http_status
        assert response.json == {"ret_code": 401, "ret_msg": "The Sud-Signature does not match."}
        done = post(app, good)
        assert (done.status_code, done.json) == (200, {"ret_code": 0, "ret_msg": "SUCCESS"})
        assert len(rec.events) == 1


# -- comparison ---------------------------------------------------------------------


@pytest.mark.parametrize("given", ["é" * 64, "\u20ac" * 64, "", "zz", "ab" * 40])
def test_signature_comparison_never_raises(given: str) -> None:
    assert signature_matches("ab" * 32, given) is False


def test_non_ascii_signature_header_is_401_not_500(recorder: RecorderFactory) -> None:
    app, rec = recorder()
    with app.app_context():
        cb = igv_order_status(app=app)
    headers = dict(cb.headers, **{"X-Signature": "é" * 64})
    response = app.test_client().post(cb.url(), data=cb.body, headers=headers)
    assert (response.status_code, response.get_data(as_text=True)) == (
        401,
        "The X-Signature does not match.",
    )
    assert rec.events == []


def test_signals_reach_only_receivers_of_that_app(recorder: RecorderFactory) -> None:
    """Sent with the real app object: a receiver for another app hears nothing."""
    from flask_orderhooks import order_pending_delivery

    app, rec = recorder()
    other = Flask("other")
    heard: list[object] = []

    def elsewhere(sender: Flask, **kwargs: object) -> None:
        heard.append(kwargs)

    order_pending_delivery.connect(elsewhere, other)
    try:
        with app.app_context():
            assert post(app, igv_order_status(app=app)).status_code == 200
    finally:
        order_pending_delivery.disconnect(elsewhere, other)
    assert heard == []
    assert len(rec.events) == 1
