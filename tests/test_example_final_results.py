"""The example shop: a final result is never overwritten by another one (a
paid payout turned canceled, a SUD bet's success turned fail, a delivered
iGV order queued again), and one shop order is credited once however many
payments the gateway reports for it. Each is what a host copies."""

from __future__ import annotations

import logging

import pytest
import sqlalchemy as sa
from flask import Flask

from example_app.models import GameOrder, Order, Payment, Payout, db
from flask_orderhooks.pytest_plugin import OrderHooksClient
from tests.test_example_app import app, rows

__all__ = ["app"]  # the shop's fixture, on every backend


def _shop_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "example_app.receivers" and r.levelno >= logging.WARNING
    ]


@pytest.mark.parametrize(("first", "then"), [(60, 50), (50, 60)], ids=["paid", "canceled"])
def test_a_finished_payout_keeps_its_first_result(
    app: Flask,
    orderhooks: OrderHooksClient,
    caplog: pytest.LogCaptureFixture,
    first: int,
    then: int,
) -> None:
    state = {60: "paid", 50: "canceled"}
    assert orderhooks.deliver("payout", id="P1", trans_id="WDL-1", status=first).status_code == 200
    with caplog.at_level(logging.WARNING, logger="example_app.receivers"):
        other = orderhooks.deliver("payout", id="P1", trans_id="WDL-1", status=then)
    assert other.status_code == 200
    assert [(p.gateway_id, p.state) for p in rows(app, Payout)] == [("P1", state[first])]
    assert _shop_warnings(caplog) == [
        f"payout P1 for WDL-1: {state[then]} arrived after {state[first]}; kept "
        f"{state[first]} (staff: check it with the gateway)"
    ]


@pytest.mark.parametrize(
    ("first", "then"),
    [("EXECUTE_SUCCESS", "EXECUTE_FAIL"), ("EXECUTE_FAIL", "EXECUTE_SUCCESS")],
)
def test_a_finished_game_order_keeps_its_first_result(
    app: Flask,
    orderhooks: OrderHooksClient,
    caplog: pytest.LogCaptureFixture,
    first: str,
    then: str,
) -> None:
    order = {"order_id": "G-1", "out_order_id": "OUT-1", "cmd": "bet", "value": 5}
    assert orderhooks.deliver("sud", notify_id="N-1", status=first, **order).status_code == 200
    with caplog.at_level(logging.WARNING, logger="example_app.receivers"):
        other = orderhooks.deliver("sud", notify_id="N-2", status=then, **order)
    assert other.status_code == 200
    assert [(g.out_order_id, g.status, g.notify_id) for g in rows(app, GameOrder)] == [
        ("OUT-1", first, "N-1")
    ]
    assert _shop_warnings(caplog) == [
        f"game order OUT-1 (bet): {then} arrived after {first}; kept {first} "
        "(staff: check it with SUD)"
    ]


def test_a_delivered_igv_order_is_not_queued_for_delivery_again(
    app: Flask, orderhooks: OrderHooksClient, caplog: pytest.LogCaptureFixture
) -> None:
    with app.app_context():
        db.session.add(
            Order(igv_order_id=7, order_num="SO7", buyer_id="B-7", delivery_state="delivered")
        )
        db.session.commit()
    with caplog.at_level(logging.WARNING, logger="example_app.receivers"):
        response = orderhooks.deliver("igv", order_id=7, order_num="SO7", buyer_id="B-7")
    assert response.status_code == 200
    assert [(o.igv_order_id, o.delivery_state) for o in rows(app, Order)] == [(7, "delivered")]
    assert _shop_warnings(caplog) == [
        "order SO7 (iGV 7) is delivered already; not queued for delivery again"
    ]


def test_one_shop_order_is_credited_once_whatever_the_payments(
    app: Flask, orderhooks: OrderHooksClient
) -> None:
    # The shop's create-collect call timed out and it asked again, or the
    # customer paid twice: two gateway orders, both paid, one shop order.
    assert orderhooks.deliver("collect", id="C1", trans_id="SHOP-1").status_code == 200
    assert orderhooks.deliver("collect", id="C2", trans_id="SHOP-1").status_code == 200
    with app.app_context():
        payments = db.session.scalars(sa.select(Payment).order_by(Payment.gateway_id)).all()
        got = [(p.gateway_id, p.credited, p.note) for p in payments]
    assert got == [
        ("C1", True, "credited"),
        ("C2", False, "SHOP-1 was credited already (C1); not credited: refund it"),
    ]
