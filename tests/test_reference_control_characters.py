"""A signed body's order id that no database column can hold.

The idempotency key is refused (400) when it holds a control character; the
``reference`` (the order id the console searches by) is taken from the body
as well, and PostgreSQL refuses NUL in text: every attempt of such a
delivery failed as "store unavailable" (503), so a verified callback was
never stored, and the platform's retries met the same fate.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from flask import Flask

from flask_orderhooks.testing import gateway_collect, igv_order_status, sud_order_changed
from tests.conftest import GATEWAY_KEYS, IGV_SECRET, SUD_APP_ID, SUD_APPS, Recorder


@pytest.mark.parametrize("char", ["\x00", "\n", "\x1b", "\x85"], ids=repr)
def test_a_reference_with_a_control_character_is_stored_without_it(
    recorder: Callable[..., tuple[Flask, Recorder]], char: str
) -> None:
    app, rec = recorder()
    client = app.test_client()
    callbacks = [
        gateway_collect(GATEWAY_KEYS["10001"], id="REF-1", trans_id=f"T{char}1"),
        sud_order_changed(SUD_APPS[SUD_APP_ID], app_id=SUD_APP_ID, out_order_id=f"O{char}1"),
        # Any status but Pending Delivery takes orderId as it comes.
        igv_order_status(IGV_SECRET, seller_order_status=2, extra={"orderId": f"I{char}1"}),
    ]
    hooks = app.extensions["orderhooks"]
    for cb in callbacks:
        response = client.post(cb.url(), data=cb.body, headers=cb.headers)
        assert response.status_code == 200, response.data
        with app.app_context():
            (row,) = hooks.state(app).store.get(cb.key, provider=cb.provider, callback=cb.callback)
        assert (row.status, row.reference) == ("done", None)
    assert [name for name, _ in rec.events] == [
        "PaymentCollected",
        "GameOrderChanged",
        "UnhandledCallback",
    ]
