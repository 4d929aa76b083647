"""Standard Webhooks: Svix's header names, one HMAC per secret; the kit signs as the provider reads.

- Svix, and the services that send through it (Resend, Clerk), name the
  headers ``svix-id``, ``svix-timestamp`` and ``svix-signature`` unless an
  account has them white-labelled to ``webhook-*``; the provider read only
  ``webhook-*``, so every message of the senders the docs name was a 401.
- The signature was computed again for every ``v1,`` entry of the header: a
  forged header of a thousand entries made the server hash the body a
  thousand times before answering 401.
- The kit's ``standard_webhook`` promised a ``ValueError`` for a
  ``timestamp`` that is not whole Unix seconds, but ``int()`` let through
  ``"1_767_225_600"``, ``"+…"``, ``"-5"`` and padded text, which it then
  sent as the header (refused 400 by the route), and other scripts' digits,
  which raised ``UnicodeEncodeError`` from inside the signing.
- The kit decoded ``secret=`` leniently (``base64.b64decode`` without
  ``validate``): a secret the provider refuses at start-up signed silently
  with another key (characters dropped) or with an empty one, or raised
  ``binascii.Error: Incorrect padding``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from flask import Flask
from standardwebhooks.webhooks import Webhook

from flask_orderhooks import OrderHooks, StandardWebhook, webhook_received
from flask_orderhooks import standard_webhooks as module
from flask_orderhooks.testing import standard_webhook
from tests.conftest import AppFactory

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
NEW_SECRET = "whsec_dGhlLXJvdGF0ZWQtaW4tc2VjcmV0LW9mLTMyLWJ5dGU="
#: 2026-05-04T12:30:00Z: the frozen "now".
NOW = int(datetime(2026, 5, 4, 12, 30, tzinfo=UTC).timestamp())
BODY = json.dumps({"type": "email.delivered", "data": {"email_id": "em_1"}})
OK = (200, "OK")


class Hooked:
    def __init__(self, app: Flask, hooks: OrderHooks) -> None:
        self.app = app
        self.hooks = hooks
        self.events: list[StandardWebhook] = []

    def receive(self, sender: Flask, *, event: StandardWebhook, **extra: Any) -> None:
        self.events.append(event)

    def answer(self, headers: dict[str, str], body: str = BODY) -> tuple[int, str]:
        response = self.app.test_client().post(
            "/orderhooks/standard/mail", data=body.encode(), headers=headers
        )
        return response.status_code, response.get_data(as_text=True)


@pytest.fixture
def hooked(make_app: AppFactory) -> Iterator[Callable[..., Hooked]]:
    made: list[Hooked] = []

    def factory(secrets: Any = SECRET, **config: Any) -> Hooked:
        app, hooks, _db = make_app(
            hooks_options={"clock": lambda: float(NOW)},
            ORDERHOOKS_STANDARD_WEBHOOKS={"mail": secrets},
            **config,
        )
        result = Hooked(app, hooks)
        webhook_received.connect(result.receive, app, weak=False)
        made.append(result)
        return result

    try:
        yield factory
    finally:
        for result in made:
            webhook_received.disconnect(result.receive, result.app)


def svix_headers(
    msg_id: str = "msg_svix_1", *, secret: str = SECRET, at: int = NOW, body: str = BODY
) -> dict[str, str]:
    """The headers Svix (Resend, Clerk…) sends, signed by the reference library."""
    signature = Webhook(secret).sign(msg_id, datetime.fromtimestamp(at, UTC), body)
    return {
        "Content-Type": "application/json",
        "svix-id": msg_id,
        "svix-timestamp": str(at),
        "svix-signature": signature,
    }


# -- 1. Svix-branded headers ------------------------------------------------------


def test_a_message_with_svix_branded_headers_is_verified_and_dispatched_once(
    hooked: Callable[..., Hooked],
) -> None:
    h = hooked()
    headers = svix_headers()
    assert h.answer(headers) == OK
    assert h.answer(headers) == OK, "the sender's retry is a duplicate"
    (event,) = h.events
    assert (event.source, event.id, event.type) == ("mail", "msg_svix_1", "email.delivered")
    assert event.timestamp == datetime(2026, 5, 4, 12, 30, tzinfo=UTC)
    with h.app.app_context():
        (row,) = h.hooks.store.list()
    assert (row.key, row.status, row.attempts) == ("msg_svix_1", "done", 1)
    assert row.headers == {
        "svix-id": "msg_svix_1",
        "svix-timestamp": str(NOW),
        "svix-signature": headers["svix-signature"],
    }


def test_a_stored_svix_delivery_verifies_again_for_a_worker_attempt(
    hooked: Callable[..., Hooked],
) -> None:
    h = hooked(ORDERHOOKS_DISPATCH="deferred")
    assert h.answer(svix_headers("msg_later")) == OK
    assert h.events == []
    with h.app.app_context():
        assert h.hooks.process_due() == 1
        (row,) = h.hooks.store.list()
    assert (row.status, row.attempts) == ("done", 1)
    assert [e.id for e in h.events] == ["msg_later"]


def test_svix_branded_headers_are_checked_like_the_standard_ones(
    hooked: Callable[..., Hooked],
) -> None:
    h = hooked()
    good = svix_headers()
    assert h.answer({**good, "svix-signature": "v1,bm90IGl0"}) == (
        401,
        "The svix-signature does not match.",
    )
    assert h.answer(good, body=BODY.replace("em_1", "em_2")) == (
        401,
        "The svix-signature does not match.",
    )
    assert h.answer({k: v for k, v in good.items() if k != "svix-timestamp"}) == (
        401,
        "The svix-timestamp header is missing or empty.",
    )
    assert h.answer(svix_headers(at=NOW - 301)) == (
        401,
        "The svix-timestamp is older than 300 seconds.",
    )
    assert h.answer(svix_headers(at=NOW + 301)) == (
        401,
        "The svix-timestamp is more than 300 seconds in the future.",
    )
    assert h.events == []


def test_the_standard_headers_win_over_svix_ones_in_one_request(
    hooked: Callable[..., Hooked],
) -> None:
    # A request with both: the webhook-* ones are the standard's, and only
    # they are read (a forged svix-* set beside them changes nothing).
    h = hooked()
    svix = svix_headers("msg_a")
    standard = {
        "webhook-id": "msg_b",
        "webhook-timestamp": svix["svix-timestamp"],
        "webhook-signature": Webhook(SECRET).sign("msg_b", datetime.fromtimestamp(NOW, UTC), BODY),
    }
    assert h.answer({**svix, **standard}) == OK
    assert [e.id for e in h.events] == ["msg_b"]
    forged = {**standard, "webhook-signature": "v1,bm90IGl0"}
    assert h.answer({**svix_headers("msg_c"), **forged}) == (
        401,
        "The webhook-signature does not match.",
    )


def test_a_whole_svix_set_is_read_beside_a_partial_standard_one(
    hooked: Callable[..., Hooked],
) -> None:
    # A stray webhook-id (a relay's own, a partial set forwarded): Svix's
    # libraries read the svix-* set when the webhook-* one is not whole, and
    # so does the provider; the key is the id of the set read.
    h = hooked()
    assert h.answer({**svix_headers("msg_d"), "webhook-id": "msg_stray"}) == OK
    partial = {"webhook-id": "msg_stray", "webhook-timestamp": str(NOW)}
    assert h.answer({**svix_headers("msg_e"), **partial}) == OK
    assert [e.id for e in h.events] == ["msg_d", "msg_e"]
    # Neither set whole: the standard's names are the ones the reason gives.
    assert h.answer({"webhook-id": "msg_f", "svix-timestamp": str(NOW)}) == (
        401,
        "The webhook-timestamp header is missing or empty.",
    )


# -- 2. one HMAC per secret, not per signature entry --------------------------------


def test_the_signature_is_computed_once_per_secret_whatever_the_entries(
    hooked: Callable[..., Hooked], monkeypatch: pytest.MonkeyPatch
) -> None:
    h = hooked([SECRET, NEW_SECRET])
    calls: list[bytes] = []
    real = module.standard_signature

    def counted(msg_id: str, timestamp: str, body: bytes, secret: bytes) -> str:
        calls.append(secret)
        return real(msg_id, timestamp, body, secret)

    monkeypatch.setattr(module, "standard_signature", counted)
    forged = " ".join(f"v1,{n:04d}" for n in range(1000))
    headers = {
        "webhook-id": "msg_many",
        "webhook-timestamp": str(NOW),
        "webhook-signature": forged,
    }
    assert h.answer(headers) == (401, "The webhook-signature does not match.")
    assert len(calls) == 2, "one signature per configured secret"
    calls.clear()
    good = Webhook(SECRET).sign("msg_many", datetime.fromtimestamp(NOW, UTC), BODY)
    assert h.answer({**headers, "webhook-signature": f"{forged} {good}"}) == OK
    assert len(calls) == 2


# -- 3. the kit's timestamp= is whole Unix seconds, as documented --------------------

WHOLE_SECONDS = "timestamp must be whole Unix seconds of a year from 1 to 9999"


@pytest.mark.parametrize(
    "timestamp",
    ["1_767_225_600", "+1767225600", "-5", -5, " 1767225600", "1767225600\n", "\u0661\u0667"],
)
def test_the_kit_refuses_a_timestamp_that_is_not_whole_unix_seconds(timestamp: Any) -> None:
    with pytest.raises(ValueError, match=WHOLE_SECONDS) as caught:
        standard_webhook(SECRET, source="mail", timestamp=timestamp)
    assert str(caught.value).endswith(f"not {str(timestamp)!r}.")


def test_the_kit_still_takes_whole_seconds_as_int_or_text() -> None:
    for timestamp in (NOW, str(NOW)):
        cb = standard_webhook(SECRET, source="mail", msg_id="m", timestamp=timestamp)
        assert cb.headers["webhook-timestamp"] == str(NOW)


# -- 4. the kit's secret= is read as the provider reads a configured one -------------


@pytest.mark.parametrize(
    ("secret", "reason"),
    [
        ("whsec_abc", 'a secret is not base64 after its "whsec_" prefix.'),
        ("whsec_not base64!!", 'a secret is not base64 after its "whsec_" prefix.'),
        (SECRET + "\n", 'a secret is not base64 after its "whsec_" prefix.'),
        ("v1," + SECRET, 'a secret is not base64 after its "whsec_" prefix.'),
        ("whsec_", "a secret is empty."),
    ],
)
def test_the_kit_refuses_a_secret_the_provider_would_refuse(secret: str, reason: str) -> None:
    with pytest.raises(ValueError) as caught:
        standard_webhook(secret, source="mail", timestamp=NOW)
    assert str(caught.value) == f"secret: {reason}"


def test_the_kit_signs_with_the_key_the_provider_decodes() -> None:
    cb = standard_webhook(SECRET.removeprefix("whsec_"), source="mail", msg_id="m", timestamp=NOW)
    reference = Webhook(SECRET).sign("m", datetime.fromtimestamp(NOW, UTC), cb.body.decode())
    assert cb.headers["webhook-signature"] == reference
