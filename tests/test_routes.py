"""Every row of the answers table, for every route, on every store backend."""

from __future__ import annotations

import gc
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from flask_orderhooks import OrderHooks, logtext, payout_finished
from flask_orderhooks.sud import sud_signature
from flask_orderhooks.testing import SignedCallback, build
from tests.conftest import BASE_CONFIG, SUD_APP_ID, Recorder

KINDS = ["igv", "collect", "payout", "sud", "sud-batch"]
RecorderFactory = Callable[..., tuple[Flask, Recorder]]


def expected_body(kind: str, status: int, reason: str = "") -> Any:
    """The platform's documented answer form for ``status``."""
    if kind in ("collect", "payout"):
        return "success" if status == 200 else "fail"
    if kind.startswith("sud"):
        if status == 200:
            return {"ret_code": 0, "ret_msg": "SUCCESS"}
        return {"ret_code": status, "ret_msg": reason}
    return "OK" if status == 200 else reason


def body_of(kind: str, response: Any) -> Any:
    if kind.startswith("sud"):
        assert response.mimetype == "application/json"
        return json.loads(response.data)
    assert response.mimetype == "text/plain"
    return response.get_data(as_text=True)


def post(app: Flask, cb: SignedCallback, *, body: bytes | None = None, **headers: str) -> Any:
    return app.test_client().post(
        cb.url(), data=cb.body if body is None else body, headers={**cb.headers, **headers}
    )


def make(kind: str, app: Flask, **fields: Any) -> SignedCallback:
    with app.app_context():
        return build(kind, app=app, **fields)


@pytest.mark.parametrize("kind", KINDS)
def test_first_delivery_dispatches_and_answers_success(
    kind: str, recorder: RecorderFactory
) -> None:
    app, rec = recorder()
    response = post(app, make(kind, app))
    assert response.status_code == 200
    assert body_of(kind, response) == expected_body(kind, 200)
    assert len(rec.events) == (2 if kind == "sud-batch" else 1)
    assert rec.credits() == len(rec.events)


@pytest.mark.parametrize("kind", KINDS)
def test_duplicate_answers_success_without_dispatch(kind: str, recorder: RecorderFactory) -> None:
    app, rec = recorder()
    cb = make(kind, app)
    first, second = post(app, cb), post(app, cb)
    assert (first.status_code, second.status_code) == (200, 200)
    assert body_of(kind, second) == expected_body(kind, 200)
    assert len(rec.events) == (2 if kind == "sud-batch" else 1)


def forge(kind: str, cb: SignedCallback) -> tuple[bytes, dict[str, str]]:
    """The same callback with a signature that does not match."""
    headers = dict(cb.headers)
    if kind == "igv":
        sig = headers["X-Signature"]
        headers["X-Signature"] = sig[:-1] + ("0" if sig[-1] != "0" else "1")
        return cb.body, headers
    if kind.startswith("sud"):
        sig = headers["Sud-Signature"]
        headers["Sud-Signature"] = sig[:-1] + ("0" if sig[-1] != "0" else "1")
        return cb.body, headers
    data = json.loads(cb.body)
    data["sign"] = "0" * 32
    return json.dumps(data).encode(), headers


REASONS_401 = {
    "igv": "The X-Signature does not match.",
    "collect": "The sign field does not match.",
    "payout": "The sign field does not match.",
    "sud": "The Sud-Signature does not match.",
    "sud-batch": "The Sud-Signature does not match.",
}


@pytest.mark.parametrize("kind", KINDS)
def test_bad_signature_is_401_and_nothing_is_stored(
    kind: str, recorder: RecorderFactory, caplog: pytest.LogCaptureFixture
) -> None:
    app, rec = recorder()
    body, headers = forge(kind, make(kind, app))
    cb = make(kind, app)
    with caplog.at_level(logging.WARNING, "flask_orderhooks"):
        response = app.test_client().post(cb.url(), data=body, headers=headers)
    assert response.status_code == 401
    assert body_of(kind, response) == expected_body(kind, 401, REASONS_401[kind])
    assert rec.events == []
    with app.app_context():
        assert app.extensions["orderhooks"].store.list() == []
    assert REASONS_401[kind] in caplog.text
    assert "refused 401" in caplog.text


@pytest.mark.parametrize("kind", ["igv", "collect", "sud"])
def test_missing_signature_is_401(kind: str, recorder: RecorderFactory) -> None:
    app, rec = recorder()
    cb = make(kind, app)
    headers = {k: v for k, v in cb.headers.items() if k not in ("X-Signature", "Sud-Signature")}
    body = cb.body
    if kind == "collect":
        data = json.loads(cb.body)
        del data["sign"]
        body = json.dumps(data).encode()
    response = app.test_client().post(cb.url(), data=body, headers=headers)
    reason = {
        "igv": "The X-Signature header is missing or empty.",
        "collect": "The body has no sign field.",
        "sud": "The Sud-Signature header is missing or empty.",
    }[kind]
    assert response.status_code == 401
    assert body_of(kind, response) == expected_body(kind, 401, reason)
    assert rec.events == []


@pytest.mark.parametrize("kind", ["igv", "sud"])
@pytest.mark.parametrize(
    ("offset_s", "reason"),
    [
        (-3601, "The {h} is older than 3600 seconds."),
        (301, "The {h} is more than 300 seconds in the future."),
    ],
)
def test_timestamp_outside_window_is_401(
    kind: str, offset_s: int, reason: str, recorder: RecorderFactory
) -> None:
    now = 1_795_000_000.0
    app, rec = recorder(hooks_options={"clock": lambda: now})
    cb = make(kind, app, timestamp_ms=int((now + offset_s) * 1000))
    response = post(app, cb)
    header = "X-Timestamp" if kind == "igv" else "Sud-Timestamp"
    assert response.status_code == 401
    assert body_of(kind, response) == expected_body(kind, 401, reason.format(h=header))
    assert rec.events == []


@pytest.mark.parametrize("kind", ["igv", "sud"])
def test_timestamp_inside_window_edges_are_accepted(kind: str, recorder: RecorderFactory) -> None:
    now = 1_795_000_000.0
    app, rec = recorder(hooks_options={"clock": lambda: now})
    for offset in (-3600, 300):
        assert (
            post(app, make(kind, app, timestamp_ms=int((now + offset) * 1000))).status_code == 200
        )
    assert len(rec.events) == 2


def test_igv_max_age_none_disables_the_window(recorder: RecorderFactory) -> None:
    app, rec = recorder(ORDERHOOKS_IGV_MAX_AGE=None)
    # The oldest 13-digit Unix millisecond time (2001-09-09): only that
    # length is accepted (tests/security/test_replay.py says why).
    assert post(app, make("igv", app, timestamp_ms=1_000_000_000_000)).status_code == 200
    assert len(rec.events) == 1


def malformed(kind: str, app: Flask) -> tuple[SignedCallback, bytes, dict[str, str]]:
    """A request whose signature is right but whose body is not the platform's."""
    cb = make(kind, app)
    if kind == "igv":
        return cb, b'{"sellerOrderStatus": "one"}', cb.headers
    if kind in ("collect", "payout"):
        return cb, b"[1, 2]", cb.headers
    body = b'{"notify_id": 5}'
    headers = dict(cb.headers)
    headers["Sud-Signature"] = sud_signature(
        SUD_APP_ID, headers["Sud-Timestamp"], headers["Sud-Nonce"], body, b"app-secret"
    )
    return cb, body, headers


MALFORMED_REASONS = {
    "igv": "The field 'sellerOrderStatus' must be an integer.",
    "collect": "The body must be a JSON object, not an array.",
    "payout": "The body must be a JSON object, not an array.",
    "sud": "The field 'app_id' must be a non-empty string.",
}


@pytest.mark.parametrize("kind", ["igv", "collect", "payout", "sud"])
def test_malformed_body_is_400(kind: str, recorder: RecorderFactory) -> None:
    app, rec = recorder()
    cb, body, headers = malformed(kind, app)
    response = app.test_client().post(cb.url(), data=body, headers=headers)
    assert response.status_code == 400
    assert body_of(kind, response) == expected_body(kind, 400, MALFORMED_REASONS[kind])
    assert rec.events == []


@pytest.mark.parametrize("kind", ["igv", "collect", "payout", "sud"])
def test_too_large_is_413(kind: str, recorder: RecorderFactory) -> None:
    app, rec = recorder(ORDERHOOKS_MAX_BODY=1024)
    cb = make(kind, app, extra={"padding": "x" * 2000})
    response = post(app, cb)
    assert response.status_code == 413
    assert body_of(kind, response) == expected_body(
        kind, 413, "The body is larger than 1024 bytes."
    )
    assert rec.events == []


@pytest.mark.parametrize("kind", KINDS)
def test_receiver_raising_is_500_and_the_retry_dispatches(
    kind: str, recorder: RecorderFactory
) -> None:
    app, rec = recorder()
    rec.fail_next = 1
    cb = make(kind, app)
    first = post(app, cb)
    assert first.status_code == 500
    reason = "A receiver failed; the delivery will be retried."
    assert body_of(kind, first) == expected_body(kind, 500, reason)
    assert rec.credits() == 0, "the failed attempt's writes were rolled back"
    second = post(app, cb)
    assert second.status_code == 200
    assert rec.credits() == (2 if kind == "sud-batch" else 1)


def test_store_down_is_503_in_the_platform_form(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    app = Flask("down", instance_path=str(tmp_path))
    app.config.update(BASE_CONFIG)
    # Port 9 (discard) refuses connections on this loopback: a database that is down.
    app.config["ORDERHOOKS_DATABASE_URI"] = "postgresql+psycopg://postgres@127.0.0.1:9/test"
    OrderHooks(app)
    for kind in KINDS:
        with caplog.at_level(logging.WARNING, "flask_orderhooks"):
            response = post(app, make(kind, app))
        assert response.status_code == 503
        assert body_of(kind, response) == expected_body(kind, 503, "The store is unavailable.")
    assert "store unavailable: OperationalError" in caplog.text


@pytest.mark.parametrize("kind", ["payout", "sud"])
def test_no_receiver_connected_is_503_and_the_delivery_is_kept(
    kind: str, make_app: Callable[..., Any]
) -> None:
    app, hooks, _db = make_app()
    response = post(app, make(kind, app))
    assert response.status_code == 503
    with app.app_context():
        (row,) = hooks.store.list()
    assert row.status == "failed"
    assert row.error is not None and "No receiver is connected" in row.error


def test_a_weakly_connected_receiver_that_was_collected_is_503_and_kept(
    make_app: Callable[..., Any],
) -> None:
    """blinker holds receivers weakly unless told otherwise: a local function
    connected without weak=False is gone after the next collection. The
    delivery must then be kept failed and answered "retry", never done with
    nothing run; connected for good, the retry dispatches it."""
    app, hooks, _db = make_app()
    seen: list[object] = []

    def local_receiver(sender: Flask, *, event: object) -> None:
        seen.append(event)

    payout_finished.connect(local_receiver, app)
    del local_receiver
    gc.collect()
    cb = make("payout", app)
    assert post(app, cb).status_code == 503
    with app.app_context():
        (row,) = hooks.store.list()
    assert (row.status, seen) == ("failed", [])

    def kept(sender: Flask, *, event: object) -> None:
        seen.append(event)

    payout_finished.connect(kept, app, weak=False)
    try:
        assert post(app, cb).status_code == 200
    finally:
        payout_finished.disconnect(kept, app)
    assert len(seen) == 1


@pytest.mark.parametrize(
    ("unset", "path"),
    [
        ("ORDERHOOKS_IGV_SECRET", "/orderhooks/igv/order-status"),
        ("ORDERHOOKS_GATEWAY_KEY", "/orderhooks/gateway/collect"),
        ("ORDERHOOKS_GATEWAY_KEY", "/orderhooks/gateway/payout"),
        ("ORDERHOOKS_SUD_APPS", "/orderhooks/sud/order-changed"),
    ],
)
def test_unconfigured_platform_has_no_route(
    unset: str, path: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    app = Flask("partial", instance_path=str(tmp_path))
    app.config.update(BASE_CONFIG)
    app.config[unset] = None
    with caplog.at_level(logging.INFO, "flask_orderhooks"):
        OrderHooks(app)
    assert app.test_client().post(path, data=b"{}").status_code == 404
    platform = {"ORDERHOOKS_IGV_SECRET": "igv", "ORDERHOOKS_GATEWAY_KEY": "gateway"}.get(
        unset, "sud"
    )
    # Standard Webhooks is off too: BASE_CONFIG configures no source.
    assert f"OrderHooks: {platform}, standard off (no credentials configured)" in caplog.text


def test_get_is_not_allowed(app: Flask) -> None:
    assert app.test_client().get("/orderhooks/igv/order-status").status_code == 405


def test_url_prefix_is_configurable(recorder: RecorderFactory) -> None:
    app, rec = recorder(ORDERHOOKS_URL_PREFIX="/hooks/v1/")
    cb = make("igv", app)
    assert (
        app.test_client().post(cb.url("/hooks/v1"), data=cb.body, headers=cb.headers).status_code
        == 200
    )
    assert post(app, cb).status_code == 404
    assert len(rec.events) == 1


def test_refusal_log_names_the_unverified_key_safely(
    recorder: RecorderFactory, caplog: pytest.LogCaptureFixture
) -> None:
    app, _rec = recorder()
    cb = make("igv", app, request_id="req-42\x1b[2J" + "x" * 200)
    headers = dict(cb.headers, **{"X-Signature": "0" * 64})
    with caplog.at_level(logging.WARNING, "flask_orderhooks"):
        response = app.test_client().post(cb.url(), data=cb.body, headers=headers)
    assert response.status_code == 401
    (record,) = caplog.records
    assert record.getMessage() == (
        f"igv order-status (unverified 'req-42\\x1b[2J{'x' * 70}'): refused 401 from 127.0.0.1: "
        "The X-Signature does not match."
    )


def test_a_key_refused_for_its_control_characters_is_not_logged_raw(
    recorder: RecorderFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """The store refuses a key with a newline because it would forge log
    lines, but it does so after the provider has read the delivery, and the
    refusal's log line used to write that same delivery.key unquoted. With
    ORDERHOOKS_SUD_VERIFY = False anyone chooses the notify_id, and so could
    write whole log lines. A key is now written raw only when it is
    printable; otherwise quoted and cut short, like an unverified one."""
    app, rec = recorder(ORDERHOOKS_SUD_VERIFY=False)
    forged_line = "flask_orderhooks INFO sud order-changed n-2: dispatched"
    cb = make("sud", app, app_id=SUD_APP_ID, notify_id=f"n-1\n{forged_line}")
    caplog.clear()  # the ORDERHOOKS_SUD_VERIFY warning
    with caplog.at_level(logging.DEBUG, logger="flask_orderhooks"):
        response = post(app, cb)
    assert response.status_code == 400
    lines = [r.getMessage() for r in caplog.records if r.name == "flask_orderhooks"]
    assert lines == [
        f"sud order-changed 'n-1\\n{forged_line}': refused 400 from 127.0.0.1: "
        "The idempotency key holds a control character."
    ]
    assert rec.events == []


def test_a_stored_key_with_an_invisible_character_is_logged_quoted(
    recorder: RecorderFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """The store takes a key with a right-to-left override or a soft hyphen
    (format characters, not controls), but a log line that holds one raw
    reads as something else: such a key is quoted in every line, the
    success line included; a plain key is written as it is."""
    app, rec = recorder(ORDERHOOKS_SUD_VERIFY=False)
    with caplog.at_level(logging.INFO, logger="flask_orderhooks"):
        for key in ("n-\u202e1", "n-\xad2" + "x" * 100, "n-3 é"):
            assert post(app, make("sud", app, app_id=SUD_APP_ID, notify_id=key)).status_code == 200
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.INFO] == [
        "sud order-changed 'n-\\u202e1': dispatched",
        f"sud order-changed 'n-\\xad2{'x' * 76}': dispatched",
        "sud order-changed n-3 é: dispatched",
    ]
    assert len(rec.events) == 3


def test_the_stores_and_the_dead_letters_log_lines_quote_an_invisible_key(
    recorder: RecorderFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Past the view, the lines the store and the dead-letter alert write
    (a receiver failed, no retries left: dead) quote such a key too."""
    app, rec = recorder(ORDERHOOKS_SUD_VERIFY=False, ORDERHOOKS_RETRY_DELAYS=[])
    rec.fail_next = 1
    with caplog.at_level(logging.INFO, logger="flask_orderhooks"):
        cb = make("sud", app, app_id=SUD_APP_ID, notify_id="n-\u202e9")
        assert post(app, cb).status_code == 500
    dead = [r.getMessage() for r in caplog.records if "dead after" in r.getMessage()]
    assert len(dead) == 1
    assert dead[0].startswith("sud order-changed 'n-\\u202e9': dead after 1 attempts:")
    assert not any("\u202e" in r.getMessage() for r in caplog.records)


def test_every_character_the_store_refuses_in_a_key_is_quoted_in_logs() -> None:
    """The store's refused set and the log rule must not drift apart: each
    character a key cannot hold is also one a log line never holds raw."""
    from flask_orderhooks.store import delivery_store

    refused = [chr(c) for c in range(0x110000) if logtext.UNSTORABLE.match(chr(c))]
    assert len(refused) == 0x20 + 0x21 + 0x800
    assert not any(logtext.loggable(f"k{char}") for char in refused)
    assert all(char not in logtext.quoted(f"k{char}") for char in refused)
    # The store refuses keys with this very pattern (imported, not copied).
    assert vars(delivery_store)["UNSTORABLE"] is logtext.UNSTORABLE
