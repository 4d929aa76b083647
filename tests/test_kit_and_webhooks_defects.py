"""Defects found reviewing the Standard Webhooks provider and the testing kit.

- The signature was computed again for every ``v1,`` entry of the header: a
  forged header of a thousand entries made the server hash the body a
  thousand times before answering 401.
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
