"""The shop's own tables, in the Flask-SQLAlchemy ``db`` that OrderHooks shares.

``OrderHooks(app, db=db)`` adds its ``orderhooks_deliveries`` table to this
same metadata, so ``db.create_all()`` (or a Flask-Migrate migration) creates
it beside the shop's tables, and a receiver's writes commit in one
transaction with the record that the delivery is done.
"""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


db = SQLAlchemy(model_class=Base)

#: ``Order.delivery_state`` of an order iGV has not passed on yet.
NEW = "new"
#: ``Order.delivery_state`` of an order that is paid and waits for its key.
READY_FOR_DELIVERY = "ready_for_delivery"


def _now() -> datetime:
    return datetime.now(UTC)


# Amounts are stored as the exact decimal text the gateway sent ("100.00"):
# never as floats, and SQLite has no decimal type.
_Amount = sa.String(32)


class Order(Base):
    """An iGV marketplace order: a game key the shop has to deliver."""

    __tablename__ = "shop_orders"
    id: Mapped[int] = mapped_column(primary_key=True)
    # iGV order ids do not fit in 32 bits.
    igv_order_id: Mapped[int] = mapped_column(sa.BigInteger, unique=True)
    order_num: Mapped[str] = mapped_column(sa.String(64))
    buyer_id: Mapped[str] = mapped_column(sa.String(64))
    delivery_state: Mapped[str] = mapped_column(sa.String(32), default=NEW)
    updated_at: Mapped[datetime] = mapped_column(
        sa.DateTime(timezone=True), default=_now, onupdate=_now
    )


class Payment(Base):
    """A gateway collect order: money a customer paid the shop."""

    __tablename__ = "shop_payments"
    id: Mapped[int] = mapped_column(primary_key=True)
    gateway_id: Mapped[str] = mapped_column(sa.String(64), unique=True)
    trans_id: Mapped[str] = mapped_column(sa.String(64))
    order_amount: Mapped[str] = mapped_column(_Amount)
    payed_amount: Mapped[str | None] = mapped_column(_Amount)
    status: Mapped[int]
    credited: Mapped[bool] = mapped_column(default=False)
    note: Mapped[str] = mapped_column(sa.String(200), default="")


class Payout(Base):
    """A gateway payout order: money the shop paid out (a withdrawal)."""

    __tablename__ = "shop_payouts"
    id: Mapped[int] = mapped_column(primary_key=True)
    gateway_id: Mapped[str] = mapped_column(sa.String(64), unique=True)
    trans_id: Mapped[str] = mapped_column(sa.String(64))
    amount: Mapped[str] = mapped_column(_Amount)
    state: Mapped[str] = mapped_column(sa.String(32))
    finished_at: Mapped[str | None] = mapped_column(sa.String(32))


class GameOrder(Base):
    """A SUD mini-game order (a gift, a bet...), one row per ``out_order_id``."""

    __tablename__ = "shop_game_orders"
    id: Mapped[int] = mapped_column(primary_key=True)
    out_order_id: Mapped[str] = mapped_column(sa.String(128), unique=True)
    order_id: Mapped[str] = mapped_column(sa.String(128))
    cmd: Mapped[str] = mapped_column(sa.String(64))
    from_uid: Mapped[str] = mapped_column(sa.String(64))
    to_uid: Mapped[str] = mapped_column(sa.String(64))
    value: Mapped[int | None]
    status: Mapped[str] = mapped_column(sa.String(32))
    notify_id: Mapped[str] = mapped_column(sa.String(128))
