"""Secrets never leave: not in logs, answers, reprs, CLI output or config errors.

Every failure path of every platform runs with logging captured at DEBUG
(root and ``flask_orderhooks``), then every record, formatted with its
traceback, and every answer is searched for each secret, for its hex and
base64 forms, and for the signature each forged request *should* have
carried (an answer or log line that printed it would sign for the forger).
Failure answers carry no traceback and no internal detail.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from werkzeug.test import TestResponse

from flask_orderhooks import ConfigurationError, OrderHooks
from flask_orderhooks.builtin import BUILTIN_PROVIDERS
from flask_orderhooks.cli import orderhooks
from flask_orderhooks.config import DEFAULTS, load_settings
from flask_orderhooks.testing import (
    SignedCallback,
    gateway_collect,
    igv_order_status,
    sud_order_changed,
)

from .conftest import SECURITY_CONFIG, SIGNALS, FixedClock, Target, TargetFactory
from .support import (
    ALL_SECRETS,
    DB_PASSWORD,
    GATEWAY_KEYS,
    GATEWAY_OLD_KEY,
    IGV_OLD_SECRET,
    IGV_PATH,
    IGV_SECRET,
    MERCHANT_A,
    MERCHANT_B,
    NOW_MS,
    SUD_APP_A,
    SUD_APPS,
    SUD_OLD_SECRET,
    SUD_PATH,
    answer_of,
    contains_any,
    gateway_body,
    igv_headers,
    igv_sign,
    refused,
    sud_headers,
    sud_sign,
)

DOWN_URI = f"postgresql+psycopg://orderhooks:{DB_PASSWORD}@127.0.0.1:1/none"
KEY_A = GATEWAY_KEYS[str(MERCHANT_A)]


def _derived(secret: str) -> list[str]:
    raw = secret.encode()
    return [secret, raw.hex(), base64.b64encode(raw).decode(), secret[::-1]]


SECRET_FORMS = [form for secret in ALL_SECRETS for form in _derived(secret)]
# What a traceback or a driver message would show; none belongs in an answer.
INTERNALS = [
    "Traceback",
    'File "',
    "flask_orderhooks/",
    "site-packages",
    "Error:",
    "Exception",
    "sqlalchemy",
    "psycopg",
    "sqlite",
    "SELECT",
    "INSERT",
    "127.0.0.1:1",
    "orderhooks_deliveries",
]


class Leaks:
    """Collects every answer and the signatures forged requests should have had."""

    def __init__(self) -> None:
        self.answers: list[TestResponse] = []
        self.should_have_signed: list[str] = []

    def check_answers(self) -> None:
        for response in self.answers:
            text = response.get_data(as_text=True) + str(response.headers)
            assert contains_any(text, SECRET_FORMS + self.should_have_signed) == []
            if response.status_code != 200:
                assert contains_any(text, INTERNALS) == [], text

    def check_log(self, records: list[logging.LogRecord]) -> None:
        formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
        for record in records:
            text = formatter.format(record)
            if record.exc_info:
                text += formatter.formatException(record.exc_info)
            assert contains_any(text, SECRET_FORMS + self.should_have_signed) == [], text


@pytest.fixture
def debug_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="flask_orderhooks")
    # SQLAlchemy pins its own loggers at WARNING; open them too, so the SQL
    # and its parameters are searched as well.
    caplog.set_level(logging.DEBUG, logger="sqlalchemy")
    return caplog


@pytest.fixture(scope="module")
def guarded(make_target: TargetFactory) -> Target:
    return make_target(
        ORDERHOOKS_ALLOWED_IPS={"igv": ["198.51.100.7"], "gateway": ["203.0.113.0/24"]}
    )


@pytest.fixture(scope="module")
def deaf(make_target: TargetFactory) -> Target:
    """An app nobody listens to: its deliveries fail with 503."""
    quiet = make_target()
    for signal in SIGNALS.values():
        for receiver in list(signal.receivers_for(quiet.app)):
            signal.disconnect(receiver, quiet.app)
    return quiet


@pytest.fixture
def down(tmp_path: Path) -> Flask:
    """An app whose own store is a PostgreSQL server that is not there; its
    URL carries a password."""
    app = Flask("orderhooks_down", instance_path=str(tmp_path))
    app.config.update(SECURITY_CONFIG, ORDERHOOKS_DATABASE_URI=DOWN_URI)
    OrderHooks(app, clock=FixedClock())
    return app


def _post(
    leaks: Leaks, target: Target, path: str, body: bytes, headers: Any, **kw: Any
) -> TestResponse:
    response = target.post(path, body, headers, **kw)
    leaks.answers.append(response)
    return response


def _every_failure_path(
    leaks: Leaks, target: Target, guarded: Target, deaf: Target, down: Flask
) -> None:
    """Drive every refusal and failure the pipeline knows, on every platform."""
    igv = igv_order_status(IGV_SECRET, request_id="leak-igv", timestamp_ms=NOW_MS)
    ts, rid = igv.headers["X-Timestamp"], igv.headers["X-Request-Id"]
    leaks.should_have_signed.append(igv_sign(ts, rid, IGV_SECRET))
    for forged in ("0" * 64, "é" * 64, "€" * 64, igv_sign(ts, rid, IGV_OLD_SECRET), ""):
        _post(leaks, target, IGV_PATH, igv.body, {**igv.headers, "X-Signature": forged})
    _post(leaks, target, IGV_PATH, igv.body, {**igv.headers, "X-Request-Id": "订单"})
    stale = igv_order_status(IGV_SECRET, request_id="leak-stale", timestamp_ms=NOW_MS - 9_000_000)
    _post(leaks, target, IGV_PATH, stale.body, stale.headers)
    _post(leaks, target, IGV_PATH, b"[not json", igv_headers("leak-bad-body"))
    _post(
        leaks,
        target,
        IGV_PATH,
        b"",
        igv_headers("leak-big"),
        environ_overrides={"CONTENT_LENGTH": str(10**9)},
    )
    _post(leaks, guarded, IGV_PATH, igv.body, igv.headers, environ_base={"REMOTE_ADDR": "10.9.9.9"})

    collect = gateway_collect(KEY_A, id="LEAK-1")
    fields = {"id": "LEAK-2", "trans_id": "T", "mch_id": MERCHANT_A, "order_amount": "1.00"}
    for key in (KEY_A + "x", GATEWAY_KEYS[str(MERCHANT_B)], GATEWAY_OLD_KEY):
        _post(leaks, target, collect.url(), gateway_body({**fields, "status": 60}, key), {})
    leaks.should_have_signed.append(json.loads(gateway_body({**fields, "status": 60}))["sign"])
    tampered = collect.body.replace(b'"100.00"', b'"999.00"', 1)
    assert tampered != collect.body
    _post(leaks, target, collect.url(), tampered, collect.headers)
    _post(
        leaks, target, collect.url(), collect.body.replace(b'"bank"', b'"\\ud800"'), collect.headers
    )
    _post(leaks, target, collect.url(), b'{"sign":NaN}', collect.headers)
    _post(leaks, guarded, collect.url(), collect.body, collect.headers)

    sud = sud_order_changed(
        SUD_APPS[SUD_APP_A], app_id=SUD_APP_A, notify_id="leak-sud", timestamp_ms=NOW_MS
    )
    stamp, nonce = sud.headers["Sud-Timestamp"], sud.headers["Sud-Nonce"]
    leaks.should_have_signed.append(
        sud_sign(SUD_APP_A, stamp, nonce, sud.body, SUD_APPS[SUD_APP_A])
    )
    for forged in ("0" * 40, sud_sign(SUD_APP_A, stamp, nonce, sud.body, SUD_OLD_SECRET)):
        _post(leaks, target, SUD_PATH, sud.body, {**sud.headers, "Sud-Signature": forged})
    _post(leaks, target, SUD_PATH, sud.body, {**sud.headers, "Sud-AppId": "9999"})
    _post(leaks, target, SUD_PATH, b"{}", sud_headers(b"{}"))

    # Verified, then failing: a receiver raising, a conflict, nobody listening,
    # and a store that is down.
    target.recorder.fail_with = RuntimeError("receiver failed on purpose")
    try:
        failing = igv_order_status(IGV_SECRET, request_id="leak-fail", timestamp_ms=NOW_MS)
        _post(leaks, target, IGV_PATH, failing.body, failing.headers)
    finally:
        target.recorder.fail_with = None
    target.verified.add(("igv", "order-status", "leak-fail"))
    target.unfinished.add(("igv", "order-status", "leak-fail"))
    other_body = igv_order_status(
        IGV_SECRET, request_id="leak-fail", timestamp_ms=NOW_MS, order_id=9
    ).body
    _post(leaks, target, IGV_PATH, other_body, failing.headers)
    nobody = igv_order_status(IGV_SECRET, request_id="leak-deaf", timestamp_ms=NOW_MS)
    _post(leaks, deaf, IGV_PATH, nobody.body, nobody.headers)
    deaf.verified.add(("igv", "order-status", "leak-deaf"))
    deaf.unfinished.add(("igv", "order-status", "leak-deaf"))
    response = down.test_client().post(igv.url(), data=igv.body, headers=igv.headers)
    leaks.answers.append(response)
    target.recorder.events.clear()


def test_no_secret_in_any_answer_or_log_line(
    debug_log: pytest.LogCaptureFixture,
    target: Target,
    guarded: Target,
    deaf: Target,
    down: Flask,
) -> None:
    leaks = Leaks()
    _every_failure_path(leaks, target, guarded, deaf, down)
    statuses = sorted({r.status_code for r in leaks.answers})
    assert statuses == [400, 401, 403, 409, 413, 500, 503]
    leaks.check_answers()
    leaks.check_log(debug_log.records)
    assert len(debug_log.records) >= len(leaks.answers)


def test_failures_are_logged_with_provider_key_and_reason(
    debug_log: pytest.LogCaptureFixture, target: Target
) -> None:
    igv = igv_order_status(IGV_SECRET, request_id="log-1", timestamp_ms=NOW_MS)
    target.refuse(
        IGV_PATH,
        igv.body,
        {**igv.headers, "X-Signature": "0" * 64},
        refused("igv", 401, "The X-Signature does not match."),
    )
    collect = gateway_collect(KEY_A + "x", id="LOG-1")
    target.refuse(collect.url(), collect.body, collect.headers, (401, "fail"))
    sud = sud_order_changed(
        SUD_APPS[SUD_APP_A], app_id=SUD_APP_A, notify_id="log-1", timestamp_ms=NOW_MS
    )
    target.refuse(
        SUD_PATH, b"{}", sud.headers, refused("sud", 401, "The Sud-Signature does not match.")
    )
    warnings = [
        (r.name, r.levelno, r.getMessage())
        for r in debug_log.records
        if r.name == "flask_orderhooks" and r.levelno == logging.WARNING
    ]
    assert warnings == [
        (
            "flask_orderhooks",
            logging.WARNING,
            "igv order-status (unverified 'log-1'): refused 401 from 127.0.0.1: "
            "The X-Signature does not match.",
        ),
        (
            "flask_orderhooks",
            logging.WARNING,
            "gateway collect -: refused 401 from 127.0.0.1: The sign field does not match.",
        ),
        (
            "flask_orderhooks",
            logging.WARNING,
            "sud order-changed -: refused 401 from 127.0.0.1: The Sud-Signature does not match.",
        ),
    ]


def test_a_hostile_request_id_cannot_forge_log_lines(
    debug_log: pytest.LogCaptureFixture, target: Target
) -> None:
    # Werkzeug refuses CR and LF in a header; other controls get through.
    igv = igv_order_status(IGV_SECRET, request_id="x", timestamp_ms=NOW_MS)
    hostile = "x\x1b[2K\x0bflask_orderhooks INFO igv order-status 1: dispatched\x00" + "A" * 200
    headers = {**igv.headers, "X-Request-Id": hostile}
    target.refuse(
        IGV_PATH, igv.body, headers, refused("igv", 401, "The X-Signature does not match.")
    )
    [line] = [r.getMessage() for r in debug_log.records if r.name == "flask_orderhooks"]
    assert not any(char in line for char in "\x1b\x0b\x00\n\r")
    assert "(unverified 'x\\x1b[2K\\x0bflask_orderhooks INFO igv" in line
    assert "A" * 81 not in line


def test_failure_answers_name_no_internal(
    debug_log: pytest.LogCaptureFixture,
    target: Target,
    down: Flask,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A bug of ours, simulated: every platform's verifier raising something
    # full of internals. The answer says "retry" and nothing else.
    internals = 'File "/srv/app/flask_orderhooks/x.py", SELECT * FROM orderhooks_deliveries'
    answers = {
        "igv": refused("igv", 500, "Internal error; retry later."),
        "gateway": (500, "fail"),
        "sud": refused("sud", 500, "Internal error; retry later."),
    }
    builders: dict[str, Callable[..., SignedCallback]] = {
        "igv": igv_order_status,
        "gateway": gateway_collect,
        "sud": sud_order_changed,
    }
    for platform, provider in target.hooks.state(target.app).providers.items():

        def broken(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError(internals)

        monkeypatch.setattr(provider, "read", broken)
        cb = builders[platform](app=target.app)
        target.refuse(cb.url(), cb.body, cb.headers, answers[platform])
    # A store that is down.
    sud = sud_order_changed(SUD_APPS[SUD_APP_A], app_id=SUD_APP_A, timestamp_ms=NOW_MS)
    response = down.test_client().post(sud.url(), data=sud.body, headers=sud.headers)
    assert answer_of("sud", response) == refused("sud", 503, "The store is unavailable.")
    # The detail is in the log, for the operator, at WARNING or above.
    messages = [
        (r.levelno, r.getMessage()) for r in debug_log.records if r.name == "flask_orderhooks"
    ]
    assert (logging.ERROR, "gateway collect -: unexpected error") in messages
    assert (
        logging.WARNING,
        f"sud order-changed {sud.key}: store unavailable: OperationalError",
    ) in messages


def _with_provider_defaults(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` completed as ``init_app`` completes it."""
    for cls in BUILTIN_PROVIDERS:
        config = {**cls.config_defaults, **config}
    return config


def test_reprs_show_no_secret(target: Target, down: Flask) -> None:
    rotating_config = _with_provider_defaults(
        {
            **DEFAULTS,
            "ORDERHOOKS_IGV_SECRET": [IGV_OLD_SECRET, IGV_SECRET],
            "ORDERHOOKS_GATEWAY_KEY": {str(MERCHANT_A): [GATEWAY_OLD_KEY, KEY_A]},
            "ORDERHOOKS_SUD_APPS": {SUD_APP_A: [SUD_OLD_SECRET, SUD_APPS[SUD_APP_A]]},
            "ORDERHOOKS_DATABASE_URI": DOWN_URI,
        }
    )
    rotating = [load_settings(rotating_config)] + [
        cls.from_config(rotating_config) for cls in BUILTIN_PROVIDERS
    ]
    shown: list[str] = [repr(rotating), str(rotating)]
    shown += [repr(vars(provider)) for provider in rotating[1:] if provider is not None]
    for app, hooks in ((target.app, target.hooks), (down, down.extensions["orderhooks"])):
        state = hooks.state(app)
        shown += [repr(hooks), str(hooks), repr(state), repr(state.settings), str(state.settings)]
        shown += [repr(state.store), repr(state.standalone), repr(dict(state.providers))]
        shown += [repr(vars(provider)) for provider in state.providers.values()]
    for text in shown:
        assert contains_any(text, SECRET_FORMS) == [], text
    assert "<Secrets: 2 hidden>" in repr(vars(rotating[1]))


@pytest.mark.parametrize(
    "config",
    [
        {"ORDERHOOKS_IGV_SECRET": [IGV_SECRET, 7]},
        {"ORDERHOOKS_IGV_SECRET": [IGV_SECRET, " "]},
        {"ORDERHOOKS_GATEWAY_KEY": {str(MERCHANT_A): [KEY_A, None]}},
        {"ORDERHOOKS_GATEWAY_KEY": {1.5: KEY_A}},
        {"ORDERHOOKS_SUD_APPS": {SUD_APP_A: {"secret": SUD_APPS[SUD_APP_A]}}},
        {"ORDERHOOKS_SUD_APPS": {"": SUD_APPS[SUD_APP_A]}},
        {"ORDERHOOKS_GATEWAY_SIGN_TEMPLATE": "{params}&key={key}&" + KEY_A + "{x}"},
    ],
)
def test_configuration_errors_name_the_key_not_the_secret(config: dict[str, Any]) -> None:
    app = Flask(__name__)
    app.config.update({**SECURITY_CONFIG, **config, "ORDERHOOKS_DATABASE_URI": DOWN_URI})
    with pytest.raises(ConfigurationError) as info:
        OrderHooks(app)
    assert contains_any(str(info.value), SECRET_FORMS) == []
    assert str(info.value).startswith(next(iter(config)))


def test_cli_output_shows_no_secret(target: Target, down: Flask) -> None:
    failing = igv_order_status(IGV_SECRET, request_id="cli-fail", timestamp_ms=NOW_MS)
    target.recorder.fail_with = RuntimeError("receiver failed on purpose")
    try:
        target.post(IGV_PATH, failing.body, failing.headers)
    finally:
        target.recorder.fail_with = None
    target.verified.add(("igv", "order-status", "cli-fail"))
    target.accept_cb(gateway_collect(KEY_A, id="CLI-OK"))
    runner = target.app.test_cli_runner()
    outputs = []
    for args in (
        ["deliveries"],
        ["deliveries", "--status", "failed"],
        ["show", "cli-fail"],
        ["show", "CLI-OK:60"],
        ["replay", "cli-fail"],
        ["replay", "--failed"],
        # The store's rows carry the frozen clock's time; a purge cut-off from
        # the wall clock must not delete them (nothing is that old).
        ["purge", "--older-than", "5000w"],
        ["send", "igv", "--url", "http://127.0.0.1:9"],
        ["send", "collect", "--url", "http://127.0.0.1:9"],
        ["send", "sud", "--url", "http://127.0.0.1:9"],
    ):
        result = runner.invoke(orderhooks, args)
        outputs.append(result.output + (str(result.exception) if result.exception else ""))
    down_result = down.test_cli_runner().invoke(orderhooks, ["deliveries"])
    outputs.append(down_result.output + str(down_result.exception))
    for text in outputs:
        assert contains_any(text, SECRET_FORMS) == [], text
    assert "cli-fail: replayed, attempt 2: done." in outputs[4]
