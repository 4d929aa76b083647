"""The shop's one page: what arrived and what it changed."""

from __future__ import annotations

import sqlalchemy as sa
from flask import Blueprint, render_template

from flask_orderhooks import get_extension

from .models import GameOrder, Order, Payment, Payout, db

shop = Blueprint("shop", __name__)

#: How many rows of each table the page shows.
RECENT = 20


@shop.get("/")
def index() -> str:
    # The store ends its read with a rollback: read it before the shop's rows
    # so that they are not expired under the template.
    deliveries = get_extension().store.list(limit=RECENT)
    session = db.session
    return render_template(
        "index.html",
        deliveries=deliveries,
        orders=session.scalars(sa.select(Order).order_by(Order.id.desc()).limit(RECENT)).all(),
        payments=session.scalars(
            sa.select(Payment).order_by(Payment.id.desc()).limit(RECENT)
        ).all(),
        payouts=session.scalars(sa.select(Payout).order_by(Payout.id.desc()).limit(RECENT)).all(),
        game_orders=session.scalars(
            sa.select(GameOrder).order_by(GameOrder.id.desc()).limit(RECENT)
        ).all(),
    )
