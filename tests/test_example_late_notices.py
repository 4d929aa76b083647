"""The example shop: a gateway notice that arrives after the final one (the
platform's retry of an earlier "processing" callback the shop failed at
first) must not undo the final result, as a late SUD notice does not."""

from __future__ import annotations

import logging

import pytest
from flask import Flask

from example_app.models import Payout
from flask_orderhooks.pytest_plugin import OrderHooksClient
from tests.test_example_app import app, payment_state, rows

__all__ = ["app"]  # the shop's fixture, on every backend


@pytest.mark.parametrize(
    ("final", "state", "finished_at"),
    [(60, "paid", "2026-05-04 10:15:00"), (50, "canceled", "2026-05-04 10:23:00")],
)
def test_a_late_processing_payout_notice_keeps_the_final_result(
    app: Flask,
    orderhooks: OrderHooksClient,
    caplog: pytest.LogCaptureFixture,
    final: int,
    state: str,
    finished_at: str,
) -> None:
    assert orderhooks.deliver("payout", id="P1", trans_id="WDL-1", status=final).status_code == 200
    with caplog.at_level(logging.INFO, logger="example_app.receivers"):
        late = orderhooks.deliver("payout", id="P1", trans_id="WDL-1", status=20)
    assert (late.status_code, late.data) == (200, b"success")
    assert [(p.gateway_id, p.state, p.finished_at) for p in rows(app, Payout)] == [
        ("P1", state, finished_at)
    ]
    assert [r.getMessage() for r in caplog.records if r.name == "example_app.receivers"] == [
        f"payout P1 for WDL-1: status 20 arrived after {state}; kept {state}"
    ]


def test_a_late_processing_collect_notice_keeps_the_amount_mismatch(
    app: Flask, orderhooks: OrderHooksClient
) -> None:
    paid = orderhooks.deliver(
        "collect", id="C1", trans_id="SHOP-1", order_amount="50.00", payed_amount="45.00"
    )
    assert paid.status_code == 200
    late = orderhooks.deliver(
        "collect",
        id="C1",
        trans_id="SHOP-1",
        order_amount="50.00",
        payed_amount="",
        status=20,
        payed_at=None,
    )
    assert late.status_code == 200
    assert payment_state(app) == [
        (
            "C1",
            "SHOP-1",
            "50.00",
            "45.00",
            60,
            False,
            "amount mismatch: paid 45.00 of 50.00; not credited",
        )
    ]
