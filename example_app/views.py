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
    # The store ends its own read with a rollback: read it before the shop's
    # rows so that they are not expired before the template uses them.
    deliveries = get_extension().store.list(limit=RECENT)
    recent = {
        name: db.session.execute(
            sa.select(model).order_by(model.id.desc()).limit(RECENT)
        ).scalars().all()
        for name, model in (
            ("orders", Order),
            ("payments", Payment),
            ("payouts", Payout),
            ("game_orders", GameOrder),
        )
    }
    return render_template("index.html", deliveries=deliveries, **recent)
