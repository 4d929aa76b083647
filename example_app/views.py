"""The shop's pages: a public one, and the staff's view of what arrived and
what it changed (:func:`recent_records`, shown by ``staff.py`` after a login)."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from flask import Blueprint, current_app, render_template

from flask_orderhooks import get_extension

from .models import GameOrder, Order, Payment, Payout, db

shop = Blueprint("shop", __name__)

#: How many rows of each table the staff page shows.
RECENT = 20


@shop.get("/")
def index() -> str:
    # Public: a shop's front page shows nothing of anyone's orders or payments.
    return render_template("index.html", staff_on="staff" in current_app.blueprints)


def recent_records() -> dict[str, Any]:
    """The newest deliveries and shop rows, as the staff page's template names them."""
    # The store ends its read with a rollback: read it before the shop's rows
    # so that they are not expired under the template.
    deliveries = get_extension().store.list(limit=RECENT)
    session = db.session
    return {
        "deliveries": deliveries,
        "orders": session.scalars(sa.select(Order).order_by(Order.id.desc()).limit(RECENT)).all(),
        "payments": session.scalars(
            sa.select(Payment).order_by(Payment.id.desc()).limit(RECENT)
        ).all(),
        "payouts": session.scalars(
            sa.select(Payout).order_by(Payout.id.desc()).limit(RECENT)
        ).all(),
        "game_orders": session.scalars(
            sa.select(GameOrder).order_by(GameOrder.id.desc()).limit(RECENT)
        ).all(),
    }
