"""Standard Webhooks, the built-in provider: signed with the spec's reference
library (``standardwebhooks``), on every store backend where the store is
involved."""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from standardwebhooks.webhooks import Webhook
from werkzeug.test import TestResponse

from flask_orderhooks import (
    BUILTIN_PROVIDERS,
    ConfigurationError,
    OrderHooks,
    StandardWebhook,
    StandardWebhooksProvider,
    webhook_received,
)
from flask_orderhooks.cli import orderhooks as orderhooks_cli
from flask_orderhooks.replay import replay
from flask_orderhooks.standard_webhooks import standard_signature
from flask_orderhooks.store import StoredDelivery
from flask_orderhooks.testing import SignedCallback, build, standard_webhook
from tests.conftest import BASE_CONFIG, AppFactory

#: The spec's published example (standardwebhooks.com, the reference libraries' tests).
SPEC_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SPEC_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
SPEC_TIMESTAMP = 1614265330
SPEC_PAYLOAD = '{"test": 2432232314}'
SPEC_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="

SECRET = SPEC_SECRET
OTHER_SECRET = "whsec_" + base64.b64encode(b"billing-secret-32-bytes-long!!!!").decode()
NEW_SECRET = "whsec_" + base64.b64encode(b"the-rotated-in-secret-of-32-byte").decode()
#: 2026-05-04T12:30:00Z: the frozen "now" of these tests.
NOW = int(datetime(2026, 5, 4, 12, 30, tzinfo=UTC).timestamp())
PAYLOAD: dict[str, Any] = {
    "type": "invoice.paid",
    "timestamp": "2026-05-04T12:30:00Z",
    "data": {"id": "inv_1", "amount": 1200, "customer": {"email": "a@example.com"}},
}
OK = (200, "OK")
NO_MATCH = (401, "The webhook-signature does not match.")


class Clock:
    """The extension's clock, moved by hand."""

    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def signed(
    secret: str = SECRET,
    *,
    source: str = "shop",
    msg_id: str = "msg_1",
    at: int = NOW,
    payload: Any = PAYLOAD,
    text: str | None = None,
) -> SignedCallback:
    """A message signed by the reference library (``text``: the exact body)."""
    data = text if text is not None else json.dumps(payload)
    signature = Webhook(secret).sign(msg_id, datetime.fromtimestamp(at, UTC), data)
    headers = {
        "Content-Type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(at),
        "webhook-signature": signature,
    }
    return SignedCallback("standard", source, f"/standard/{source}", data.encode(), headers, msg_id)


@dataclass
class Hooked:
    """An app with Standard Webhooks on and a receiver on ``webhook_received``."""

    app: Flask
    hooks: OrderHooks
    clock: Clock
    events: list[StandardWebhook] = field(default_factory=list)
    fail_next: int = 0

    def receive(self, sender: Flask, *, event: StandardWebhook, **extra: Any) -> None:
        assert sender is self.app and not extra
        self.events.append(event)
        if self.fail_next:
            self.fail_next -= 1
            raise RuntimeError("receiver exploded on purpose")

    def post(self, cb: SignedCallback, **headers: str | None) -> TestResponse:
        sent = {**cb.headers, **headers}
        return self.app.test_client().post(
            cb.url(),
            data=cb.body,
            headers={name: value for name, value in sent.items() if value is not None},
        )

    def answer(self, cb: SignedCallback, **headers: str | None) -> tuple[int, str]:
        response = self.post(cb, **headers)
        assert response.mimetype == "text/plain"
        return response.status_code, response.get_data(as_text=True)

    def rows(self) -> list[StoredDelivery]:
        with self.app.app_context():
            return self.hooks.store.list()

    def row(self, cb: SignedCallback) -> StoredDelivery:
        with self.app.app_context():
            (row,) = self.hooks.store.get(cb.key, provider="standard", callback=cb.callback)
        return row


StandardFactory = Callable[..., Hooked]


@pytest.fixture
def standard(make_app: AppFactory) -> Iterator[StandardFactory]:
    """``standard(sources=..., now=..., **config)``: a :class:`Hooked` app."""
    connected: list[Hooked] = []

    def factory(
        sources: dict[str, Any] | None = None, *, now: float = NOW, **config: Any
    ) -> Hooked:
        clock = Clock(now)
        app, hooks, _db = make_app(
            hooks_options={"clock": clock},
            ORDERHOOKS_STANDARD_WEBHOOKS=sources if sources is not None else {"shop": SECRET},
            **config,
        )
        hooked = Hooked(app, hooks, clock)
        webhook_received.connect(hooked.receive, app, weak=False)
        connected.append(hooked)
        return hooked

    try:
        yield factory
    finally:
        for hooked in connected:
            webhook_received.disconnect(hooked.receive, hooked.app)


def plain_app(tmp_path: Path, **config: Any) -> Flask:
    app = Flask("standard_config", instance_path=str(tmp_path))
    app.config.update(BASE_CONFIG, **config)
    return app


# -- the spec's vector ---------------------------------------------------------


def test_the_spec_vector_matches_standard_signature() -> None:
    secret = base64.b64decode(SPEC_SECRET.removeprefix("whsec_"))
    assert (
        standard_signature(SPEC_ID, str(SPEC_TIMESTAMP), SPEC_PAYLOAD.encode(), secret)
        == SPEC_SIGNATURE
    )
    # The reference library agrees: the two sign the same bytes.
    reference = Webhook(SPEC_SECRET).sign(
        SPEC_ID, datetime.fromtimestamp(SPEC_TIMESTAMP, UTC), SPEC_PAYLOAD
    )
    assert reference == SPEC_SIGNATURE


def test_the_spec_vector_through_the_route(standard: StandardFactory) -> None:
    hooked = standard({"spec": SPEC_SECRET}, now=SPEC_TIMESTAMP)
    cb = SignedCallback(
        "standard",
        "spec",
        "/standard/spec",
        SPEC_PAYLOAD.encode(),
        {
            "webhook-id": SPEC_ID,
            "webhook-timestamp": str(SPEC_TIMESTAMP),
            "webhook-signature": SPEC_SIGNATURE,
        },
        SPEC_ID,
    )
    assert hooked.answer(cb) == OK
    assert hooked.events == [
        StandardWebhook(
            source="spec",
            id=SPEC_ID,
            timestamp=datetime(2021, 2, 25, 15, 2, 10, tzinfo=UTC),
            type=None,
            data=None,
            raw={"test": 2432232314},
        )
    ]
    row = hooked.row(cb)
    assert (row.status, row.attempts, row.body) == ("done", 1, SPEC_PAYLOAD.encode())
    assert row.headers == {
        "webhook-id": SPEC_ID,
        "webhook-timestamp": str(SPEC_TIMESTAMP),
        "webhook-signature": SPEC_SIGNATURE,
    }


# -- delivery, duplicates, conflicts ------------------------------------------


def test_a_reference_signed_message_is_dispatched_once_with_its_fields(
    standard: StandardFactory,
) -> None:
    hooked = standard()
    cb = signed(msg_id="msg_2Yh0")
    assert hooked.answer(cb) == OK
    (event,) = hooked.events
    assert event == StandardWebhook(
        source="shop",
        id="msg_2Yh0",
        timestamp=datetime(2026, 5, 4, 12, 30, tzinfo=UTC),
        type="invoice.paid",
        data={"id": "inv_1", "amount": 1200, "customer": {"email": "a@example.com"}},
        raw=PAYLOAD,
    )
    assert event.timestamp.tzinfo is UTC
    with pytest.raises(AttributeError):
        event.type = "other"  # type: ignore[misc]
    # The same message again, as the sender's retry: acknowledged, not dispatched.
    assert hooked.answer(cb) == OK
    assert len(hooked.events) == 1
    (row,) = hooked.rows()
    assert (row.provider, row.callback, row.key, row.status, row.attempts) == (
        "standard",
        "shop",
        "msg_2Yh0",
        "done",
        1,
    )


def test_a_resend_signed_again_later_is_a_duplicate(standard: StandardFactory) -> None:
    # Senders sign every retry anew: same id and body, a new timestamp and signature.
    hooked = standard()
    assert hooked.answer(signed(at=NOW - 100)) == OK
    hooked.clock.now = NOW + 60
    retry = signed(at=NOW + 60)
    assert hooked.answer(retry) == OK
    assert len(hooked.events) == 1
    assert hooked.row(retry).attempts == 1


def test_the_same_id_with_another_body_is_a_conflict(standard: StandardFactory) -> None:
    hooked = standard()
    hooked.fail_next = 1
    first = signed(msg_id="msg_c")
    assert hooked.answer(first) == (500, "A receiver failed; the delivery will be retried.")
    other = signed(msg_id="msg_c", payload={**PAYLOAD, "data": {"id": "inv_2"}})
    assert hooked.answer(other) == (409, "This key is stored with a different body.")
    assert len(hooked.events) == 1
    row = hooked.row(first)
    assert (row.status, row.body) == ("failed", first.body)


def test_another_body_under_a_done_id_is_ignored(
    standard: StandardFactory, caplog: pytest.LogCaptureFixture
) -> None:
    # Once done, the store keeps its answer: the sender stops, nothing runs twice.
    hooked = standard()
    assert hooked.answer(signed(msg_id="msg_d")) == OK
    other = signed(msg_id="msg_d", payload={**PAYLOAD, "data": {"id": "inv_2"}})
    with caplog.at_level(logging.WARNING, "flask_orderhooks"):
        assert hooked.answer(other) == OK
    assert len(hooked.events) == 1
    assert (
        "standard shop msg_d: already done; a resend with a different body was ignored"
        in caplog.messages
    )


# -- rotation and signature entries --------------------------------------------


def test_both_secrets_of_a_rotation_list_verify(standard: StandardFactory) -> None:
    hooked = standard({"shop": [SECRET, NEW_SECRET]})
    assert hooked.answer(signed(SECRET, msg_id="old")) == OK
    assert hooked.answer(signed(NEW_SECRET, msg_id="new")) == OK
    assert hooked.answer(signed(OTHER_SECRET, msg_id="neither")) == NO_MATCH
    assert [e.id for e in hooked.events] == ["old", "new"]


def test_one_matching_entry_among_several_is_enough(standard: StandardFactory) -> None:
    hooked = standard({"shop": NEW_SECRET})
    cb = signed(NEW_SECRET)
    good = cb.headers["webhook-signature"]
    wrong_old = signed(SECRET).headers["webhook-signature"]
    wrong_other = signed(OTHER_SECRET).headers["webhook-signature"]
    assert hooked.answer(cb, **{"webhook-signature": f"{wrong_old} {good} {wrong_other}"}) == OK
    assert len(hooked.events) == 1


@pytest.mark.parametrize(
    "others",
    ["v1a,{sig}", "v2,{sig}", "v1a,bm90LWEtc2lnbmF0dXJl", "v1x,{sig}"],
)
def test_entries_of_other_versions_are_ignored(others: str, standard: StandardFactory) -> None:
    hooked = standard()
    cb = signed()
    good = cb.headers["webhook-signature"]
    other = others.format(sig=good.removeprefix("v1,"))
    # Beside a v1 entry that matches: accepted.
    assert hooked.answer(cb, **{"webhook-signature": f"{other} {good}"}) == OK
    # Alone, even carrying the right digest: no v1 signature.
    assert hooked.answer(signed(msg_id="alone"), **{"webhook-signature": other}) == (
        401,
        "The webhook-signature header has no v1 signature.",
    )
    assert len(hooked.events) == 1


# -- refusals before anything is stored ----------------------------------------


def test_a_bad_signature_is_401(standard: StandardFactory) -> None:
    hooked = standard()
    cb = signed()
    good = cb.headers["webhook-signature"]
    flipped = good[:-2] + ("A" if good[-2] != "A" else "B") + good[-1]
    assert hooked.answer(cb, **{"webhook-signature": flipped}) == NO_MATCH
    assert hooked.answer(cb, **{"webhook-signature": "v1,not*base64!"}) == NO_MATCH
    assert hooked.answer(cb, **{"webhook-signature": "garbage"}) == (
        401,
        "The webhook-signature header has no v1 signature.",
    )
    assert hooked.answer(cb, **{"webhook-signature": "v1,"}) == NO_MATCH
    # The body, id or timestamp changed under a valid signature.
    tampered = SignedCallback(
        cb.provider, cb.callback, cb.path, cb.body.replace(b"1200", b"9999"), cb.headers, cb.key
    )
    assert hooked.answer(tampered) == NO_MATCH
    assert hooked.answer(cb, **{"webhook-id": "msg_other"}) == NO_MATCH
    assert hooked.answer(cb, **{"webhook-timestamp": str(NOW + 1)}) == NO_MATCH
    # Signed by another secret.
    assert hooked.answer(signed(OTHER_SECRET)) == NO_MATCH
    assert hooked.events == [] and hooked.rows() == []


@pytest.mark.parametrize("missing", ["webhook-id", "webhook-timestamp", "webhook-signature"])
@pytest.mark.parametrize("value", [None, ""])
def test_a_missing_header_is_401(
    missing: str, value: str | None, standard: StandardFactory
) -> None:
    hooked = standard()
    assert hooked.answer(signed(), **{missing: value}) == (
        401,
        f"The {missing} header is missing or empty.",
    )
    assert hooked.events == [] and hooked.rows() == []


@pytest.mark.parametrize(
    ("offset", "expected"),
    [
        (-300, OK),
        (-301, (401, "The webhook-timestamp is older than 300 seconds.")),
        (300, OK),
        (301, (401, "The webhook-timestamp is more than 300 seconds in the future.")),
        (-86400, (401, "The webhook-timestamp is older than 300 seconds.")),
        (0, OK),
    ],
)
def test_the_timestamp_window_is_five_minutes_both_ways(
    offset: int, expected: tuple[int, str], standard: StandardFactory
) -> None:
    hooked = standard()
    assert hooked.answer(signed(at=NOW + offset)) == expected
    assert len(hooked.events) == (1 if expected == OK else 0)
    assert len(hooked.rows()) == len(hooked.events)


def test_the_window_is_configurable(standard: StandardFactory) -> None:
    hooked = standard(ORDERHOOKS_STANDARD_WEBHOOKS_TOLERANCE=60)
    assert hooked.answer(signed(msg_id="a", at=NOW - 60)) == OK
    assert hooked.answer(signed(msg_id="b", at=NOW + 60)) == OK
    assert hooked.answer(signed(msg_id="c", at=NOW - 61)) == (
        401,
        "The webhook-timestamp is older than 60 seconds.",
    )
    assert hooked.answer(signed(msg_id="d", at=NOW + 61)) == (
        401,
        "The webhook-timestamp is more than 60 seconds in the future.",
    )
    with hooked.app.app_context():
        provider = hooked.hooks.state().providers["standard"]
    # 60 s both ways: a request stamped 60 s ahead is accepted until 120 s after it arrived.
    assert provider.replay_window == 120


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("not json", "The body is not valid JSON (Expecting value at character 0)."),
        ("[1, 2]", "The body must be a JSON object, not an array."),
        ('{"type": "a", "type": "b"}', "The body repeats the key 'type'."),
        ('{"amount": NaN}', "The body contains NaN, which is not JSON."),
    ],
)
def test_a_body_that_is_not_a_json_object_is_400(
    text: str, reason: str, standard: StandardFactory
) -> None:
    hooked = standard()
    assert hooked.answer(signed(text=text)) == (400, reason)
    assert hooked.events == [] and hooked.rows() == []


def test_a_timestamp_that_is_not_unix_seconds_is_400(standard: StandardFactory) -> None:
    # Signed over exactly that text, so only the parse refuses it.
    hooked = standard()
    cb = signed()
    for stamp in ("1.5e9", f"{NOW}.0", "-1", " 1777897800"):
        entry = standard_signature(
            cb.key, stamp, cb.body, base64.b64decode(SECRET.removeprefix("whsec_"))
        )
        headers = {"webhook-timestamp": stamp, "webhook-signature": entry}
        assert hooked.answer(cb, **headers) == (
            400,
            "The webhook-timestamp header is not a Unix timestamp.",
        )
    assert hooked.rows() == []


def test_a_webhook_id_past_191_characters_is_400(standard: StandardFactory) -> None:
    hooked = standard()
    assert hooked.answer(signed(msg_id="m" * 191)) == OK
    assert hooked.answer(signed(msg_id="m" * 192)) == (
        400,
        "The idempotency key is longer than 191.",
    )
    assert [len(e.id) for e in hooked.events] == [191]
    assert [len(r.key) for r in hooked.rows()] == [191]


# -- sources -------------------------------------------------------------------


def test_each_source_has_its_route_and_its_secret(standard: StandardFactory) -> None:
    hooked = standard({"shop": SECRET, "billing": OTHER_SECRET})
    assert hooked.answer(signed(SECRET, source="shop")) == OK
    assert hooked.answer(signed(OTHER_SECRET, source="billing")) == OK
    # Same id, two sources: two deliveries, each dispatched once.
    assert [(e.source, e.id) for e in hooked.events] == [("shop", "msg_1"), ("billing", "msg_1")]
    # Each source's secret verifies that source only.
    assert hooked.answer(signed(OTHER_SECRET, source="shop", msg_id="x")) == NO_MATCH
    assert hooked.answer(signed(SECRET, source="billing", msg_id="x")) == NO_MATCH
    unknown = hooked.post(signed(source="payroll"))
    assert unknown.status_code == 404
    assert sorted((r.callback, r.key) for r in hooked.rows()) == [
        ("billing", "msg_1"),
        ("shop", "msg_1"),
    ]


def test_sources_that_differ_by_dash_and_underscore_are_refused(tmp_path: Path) -> None:
    # Their routes' endpoints would be one (standard_a_b): refused at start-up
    # with the key named, rather than Flask's AssertionError.
    app = plain_app(tmp_path, ORDERHOOKS_STANDARD_WEBHOOKS={"a-b": SECRET, "a_b": OTHER_SECRET})
    with pytest.raises(ConfigurationError) as caught:
        OrderHooks(app)
    assert str(caught.value) == (f"{KEY}: the sources 'a-b' and 'a_b' differ only in - and _.")
    assert "orderhooks" not in app.extensions


@pytest.mark.parametrize("secret", [SECRET, SECRET.removeprefix("whsec_")])
def test_a_secret_with_or_without_its_prefix(secret: str, standard: StandardFactory) -> None:
    hooked = standard({"shop": secret})
    assert hooked.answer(signed(SECRET)) == OK
    # The reference library takes both forms too.
    assert hooked.answer(signed(secret, msg_id="again")) == OK
    assert len(hooked.events) == 2


# -- configuration -------------------------------------------------------------

KEY = "ORDERHOOKS_STANDARD_WEBHOOKS"
MAPPING = 'must be a non-empty mapping {"<source>": "whsec_..." or a list}.'


@pytest.mark.parametrize(
    ("value", "key", "message"),
    [
        ([SECRET], KEY, MAPPING),
        (SECRET, KEY, MAPPING),
        ({}, KEY, MAPPING),
        (
            {"a/b": SECRET},
            KEY,
            "source names are 1 to 32 letters, digits, '-' or '_', not 'a/b'.",
        ),
        ({"": SECRET}, KEY, "source names are 1 to 32 letters, digits, '-' or '_', not ''."),
        (
            {"s" * 33: SECRET},
            KEY,
            f"source names are 1 to 32 letters, digits, '-' or '_', not '{'s' * 33}'.",
        ),
        ({1: SECRET}, KEY, "source names are 1 to 32 letters, digits, '-' or '_', not 1."),
        (
            {"shop": "whsec_not*base64!" + SECRET[6:]},
            f"{KEY}['shop']",
            'a secret is not base64 after its "whsec_" prefix.',
        ),
        (
            {"shop": [SECRET, "whsec_" + SECRET[7:]]},
            f"{KEY}['shop']",
            'a secret is not base64 after its "whsec_" prefix.',
        ),
        ({"shop": []}, f"{KEY}['shop']", "the list of secrets is empty; give at least one."),
        ({"shop": "whsec_"}, f"{KEY}['shop']", "a secret is empty."),
        ({"shop": "  "}, f"{KEY}['shop']", 'every secret must be a "whsec_..." string.'),
        ({"shop": b"raw"}, f"{KEY}['shop']", 'every secret must be a "whsec_..." string.'),
        ({"shop": [SECRET, 7]}, f"{KEY}['shop']", 'every secret must be a "whsec_..." string.'),
    ],
)
def test_config_errors_name_the_key_and_never_the_secret(
    value: Any, key: str, message: str, tmp_path: Path
) -> None:
    app = plain_app(tmp_path, ORDERHOOKS_STANDARD_WEBHOOKS=value)
    with pytest.raises(ConfigurationError) as caught:
        OrderHooks(app)
    assert (caught.value.key, str(caught.value)) == (key, f"{key}: {message}")
    text = str(caught.value)
    for secret in (SECRET, SECRET.removeprefix("whsec_"), SECRET[7:], SECRET[6:]):
        assert secret not in text
    assert "orderhooks" not in app.extensions


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (-1, "must be a finite number of seconds, zero or more."),
        (float("inf"), "must be a finite number of seconds, zero or more."),
        ("300", "must be a number of seconds, not str."),
        (True, "must be a number of seconds, not bool."),
    ],
)
def test_a_wrong_tolerance_names_its_key(value: Any, message: str, tmp_path: Path) -> None:
    app = plain_app(
        tmp_path,
        ORDERHOOKS_STANDARD_WEBHOOKS={"shop": SECRET},
        ORDERHOOKS_STANDARD_WEBHOOKS_TOLERANCE=value,
    )
    with pytest.raises(ConfigurationError) as caught:
        OrderHooks(app)
    assert str(caught.value) == f"ORDERHOOKS_STANDARD_WEBHOOKS_TOLERANCE: {message}"


def test_off_without_sources(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    app = plain_app(tmp_path)
    with caplog.at_level(logging.INFO, "flask_orderhooks"):
        OrderHooks(app)
    assert StandardWebhooksProvider in BUILTIN_PROVIDERS
    assert app.config["ORDERHOOKS_STANDARD_WEBHOOKS"] is None
    assert app.config["ORDERHOOKS_STANDARD_WEBHOOKS_TOLERANCE"] == 300
    assert app.test_client().post("/orderhooks/standard/shop", data=b"{}").status_code == 404
    assert (
        "OrderHooks: standard off (no credentials configured); their routes answer 404."
        in caplog.messages
    )


def test_the_provider_repr_hides_the_secrets(tmp_path: Path) -> None:
    app = plain_app(tmp_path, ORDERHOOKS_STANDARD_WEBHOOKS={"shop": [SECRET, NEW_SECRET]})
    hooks = OrderHooks(app)
    provider = hooks.state(app).providers["standard"]
    assert isinstance(provider, StandardWebhooksProvider)
    assert repr(provider) == "<StandardWebhooksProvider 'standard'>"
    assert repr(provider.sources) == "{'shop': <Secrets: 2 hidden>}"
    assert provider.routes == {"shop": "/standard/shop"}


# -- dispatch modes, failures, replay ------------------------------------------


def test_deferred_dispatch(standard: StandardFactory) -> None:
    hooked = standard(ORDERHOOKS_DISPATCH="deferred")
    cb = signed()
    assert hooked.answer(cb) == OK
    assert hooked.events == []
    assert hooked.row(cb).status == "pending"
    # A resend before the worker ran: stored once, dispatched once.
    assert hooked.answer(cb) == OK
    with hooked.app.app_context():
        assert hooked.hooks.process_due() == 1
        assert hooked.hooks.process_due() == 0
    assert [(e.source, e.id, e.type) for e in hooked.events] == [("shop", "msg_1", "invoice.paid")]
    row = hooked.row(cb)
    assert (row.status, row.attempts) == ("done", 1)


def test_a_failed_receiver_is_500_kept_failed_then_replayed(standard: StandardFactory) -> None:
    hooked = standard(ORDERHOOKS_RETRY_DELAYS=[60])
    hooked.fail_next = 1
    cb = signed(msg_id="msg_fail")
    assert hooked.answer(cb) == (500, "A receiver failed; the delivery will be retried.")
    row = hooked.row(cb)
    assert (row.status, row.attempts) == ("failed", 1)
    assert row.error == "RuntimeError: receiver exploded on purpose"
    # An hour later, far outside the timestamp window: a replay verifies the
    # stored signature without the window.
    hooked.clock.now = NOW + 3600
    result = hooked.app.test_cli_runner().invoke(orderhooks_cli, ["replay", "msg_fail"])
    assert result.exit_code == 0, result.output
    assert result.output == "standard shop msg_fail: replayed, attempt 2: done.\n"
    assert [e.id for e in hooked.events] == ["msg_fail", "msg_fail"]
    assert hooked.row(cb).status == "done"
    # The sender's late resend is outside the window: refused, nothing runs.
    assert hooked.answer(cb) == (401, "The webhook-timestamp is older than 300 seconds.")
    assert len(hooked.events) == 2


def test_a_failed_delivery_is_retried_by_the_workers(standard: StandardFactory) -> None:
    hooked = standard(ORDERHOOKS_RETRY_DELAYS=[10])
    hooked.fail_next = 1
    cb = signed()
    assert hooked.answer(cb)[0] == 500
    with hooked.app.app_context():
        assert hooked.hooks.process_due() == 0
        hooked.clock.now = NOW + 10
        assert hooked.hooks.process_due() == 1
    row = hooked.row(cb)
    assert (row.status, row.attempts) == ("done", 2)
    assert len(hooked.events) == 2


def test_a_stored_delivery_of_a_removed_source_fails_its_attempt(
    standard: StandardFactory,
) -> None:
    """Stored while the source was configured, attempted after it was removed:
    nothing can verify it, which is a failed attempt (retried, then dead),
    not a KeyError that stops the worker and leaves the row processing."""
    before = standard(
        {"shop": SECRET, "billing": OTHER_SECRET},
        ORDERHOOKS_DISPATCH="deferred",
        ORDERHOOKS_RETRY_DELAYS=[60],
    )
    cb = signed()
    assert before.answer(cb) == OK
    after = standard({"billing": OTHER_SECRET}, ORDERHOOKS_RETRY_DELAYS=[60])
    with after.app.app_context():
        assert after.hooks.process_due() == 1
    row = after.row(cb)
    assert (row.status, row.attempts) == ("failed", 1)
    assert row.error == "BadSignature: The source 'shop' is not configured."
    assert after.events == []
    # The CLI and the console look only under configured routes; replay()
    # itself, given the row, answers the same way.
    with after.app.app_context():
        outcome = replay(after.app, after.hooks.state(after.app), row, force=False)
    assert (outcome.status, outcome.message) == (
        "failed",
        "failed: The source 'shop' is not configured.",
    )


def test_no_receiver_is_503_and_kept(make_app: AppFactory) -> None:
    app, hooks, _db = make_app(
        hooks_options={"clock": Clock()}, ORDERHOOKS_STANDARD_WEBHOOKS={"shop": SECRET}
    )
    cb = signed()
    response = app.test_client().post(cb.url(), data=cb.body, headers=cb.headers)
    assert (response.status_code, response.get_data(as_text=True)) == (
        503,
        "No receiver is connected to orderhooks.webhook-received; the delivery was kept.",
    )
    with app.app_context():
        (row,) = hooks.store.list()
    assert row.status == "failed"


# -- the testing kit -------------------------------------------------------------


def test_the_kit_builds_a_message_the_route_accepts(standard: StandardFactory) -> None:
    hooked = standard({"shop": [OTHER_SECRET, SECRET], "billing": OTHER_SECRET})
    with hooked.app.app_context():
        cb = build("standard", app=hooked.app)
        billing = build("standard", app=hooked.app, source="billing", type="charge.failed")
    # The first source, its newest secret, the app's clock.
    assert (cb.provider, cb.callback, cb.path) == ("standard", "shop", "/standard/shop")
    assert cb.headers["webhook-timestamp"] == str(NOW)
    assert cb.key == cb.headers["webhook-id"]
    assert hooked.answer(cb) == OK
    assert hooked.answer(billing) == OK
    assert [(e.source, e.id, e.type) for e in hooked.events] == [
        ("shop", cb.key, "order.paid"),
        ("billing", billing.key, "charge.failed"),
    ]
    assert hooked.events[0].data == cb.json["data"]


def test_the_kit_signs_like_the_reference_library() -> None:
    cb = standard_webhook(
        SECRET, source="shop", msg_id="msg_k", timestamp=NOW, data={"id": "ord_1"}
    )
    reference = Webhook(SECRET).sign("msg_k", datetime.fromtimestamp(NOW, UTC), cb.body.decode())
    assert cb.headers["webhook-signature"] == reference
    assert cb.url() == "/orderhooks/standard/shop"
    assert cb.json == {
        "type": "order.paid",
        "timestamp": "2026-05-04T12:30:00+00:00",
        "data": {"id": "ord_1"},
    }
