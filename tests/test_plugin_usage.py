"""The README's "Testing your receivers" example, as it is printed there: a
host application's tests written with the ``orderhooks`` pytest fixture."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from flask import Flask

from example_app import create_app, db
from example_app.models import Payment
from flask_orderhooks.pytest_plugin import OrderHooksClient


@pytest.fixture
def app(tmp_path: Path) -> Iterator[Flask]:
    app = create_app({"TESTING": True, "SHOP_DEMO_SECRETS": True}, instance_path=tmp_path)
    yield app
    with app.app_context():
        db.engine.dispose()


def test_a_retried_payment_is_handled_once(orderhooks: OrderHooksClient) -> None:
    with orderhooks.captured() as events:
        first, retry = orderhooks.deliver_twice("collect", id="C1", payed_amount="100.00")
    assert first.data == retry.data == b"success"
    assert [e.signal for e in events] == ["orderhooks.payment-collected"]


def test_an_underpaid_order_is_not_credited(app: Flask, orderhooks: OrderHooksClient) -> None:
    response = orderhooks.deliver("collect", order_amount="100.00", payed_amount="90.00")
    assert response.data == b"success"
    with app.app_context():
        payment = db.session.scalars(sa.select(Payment)).one()
    assert (payment.credited, payment.payed_amount) == (False, "90.00")
