"""What the shop does with each verified callback.

Receivers run inside the transaction that marks the delivery done: they write
through ``db.session`` and never commit. If one raises, its writes and the
"done" mark roll back together, the platform gets a failure answer, and its
retry runs the receiver again. So a receiver only has to be correct once.
"""

from __future__ import annotations

import logging
from typing import TypeVar

import sqlalchemy as sa
from flask import Flask

from flask_orderhooks import (
    GameOrderChanged,
    OrderPendingDelivery,
    PaymentCollected,
    PayoutFinished,
    StandardWebhook,
    UnhandledCallback,
    callback_unhandled,
    delivery_dead,
    game_order_changed,
    order_pending_delivery,
    payment_collected,
    payout_finished,
    webhook_received,
)
from flask_orderhooks.events import GATEWAY_SUCCESS
from flask_orderhooks.store import StoredDelivery

from .models import NEW, READY_FOR_DELIVERY, Base, GameOrder, Order, Payment, Payout, db

logger = logging.getLogger(__name__)

_Model = TypeVar("_Model", bound=Base)

#: SUD statuses after which an order never changes again.
_FINAL_GAME_STATUSES = frozenset({"EXECUTE_SUCCESS", "EXECUTE_FAIL"})
#: ``Payout.state`` of a payout the gateway finished (success or canceled).
_FINAL_PAYOUT_STATES = frozenset({"paid", "canceled"})


def _one(model: type[_Model], where: sa.ColumnElement[bool]) -> _Model | None:
    return db.session.execute(sa.select(model).where(where)).scalar_one_or_none()


def on_order_pending_delivery(sender: Flask, *, event: OrderPendingDelivery) -> None:
    """iGV: the order is paid and passed risk review; queue it for delivery."""
    # iGV signs only the request id and timestamp, never the body. A real
    # seller confirms the order (and what was bought) through iGV's Order
    # Query API before handing out a key; the example trusts the body.
    order = _one(Order, Order.igv_order_id == event.order_id)
    if order is None:
        order = Order(
            igv_order_id=event.order_id, order_num=event.order_num, buyer_id=event.buyer_id
        )
        db.session.add(order)
    elif order.delivery_state not in (None, NEW, READY_FOR_DELIVERY):
        # Only forward: a new push for an order delivered already (another
        # request id, a forced replay) must not hand out a second key.
        logger.warning(
            "order %s (iGV %d) is %s already; not queued for delivery again",
            order.order_num,
            event.order_id,
            order.delivery_state,
        )
        return
    order.delivery_state = READY_FOR_DELIVERY
    logger.info("order %s (iGV %d) is ready for delivery", event.order_num, event.order_id)


def on_payment_collected(sender: Flask, *, event: PaymentCollected) -> None:
    """Gateway collect result: credit the payment only if paid in full."""
    payment = _one(Payment, Payment.gateway_id == event.id)
    if payment is None:
        payment = Payment(gateway_id=event.id, trans_id=event.trans_id, credited=False)
        db.session.add(payment)
    elif payment.credited:
        # Defence in depth: the store already drops duplicates, and a credited
        # payment is final whatever status arrives later.
        return
    elif payment.status == GATEWAY_SUCCESS and not event.succeeded:
        # A late "processing" notice (the gateway's retry of one the shop
        # failed at first) must not undo the paid result, nor hide its
        # amount mismatch from the staff.
        logger.info(
            "payment %s for %s: status %s arrived after the paid result; kept it",
            event.id,
            event.trans_id,
            event.status,
        )
        return
    payment.order_amount = str(event.order_amount)
    payment.payed_amount = None if event.payed_amount is None else str(event.payed_amount)
    payment.status = event.status
    # Another gateway order of the same shop order, credited already.
    credited_before = (
        db.session.execute(
            sa.select(Payment.gateway_id).where(
                Payment.trans_id == event.trans_id,
                Payment.credited.is_(True),
                Payment.gateway_id != event.id,
            )
        )
        .scalars()
        .first()
        if event.succeeded
        else None
    )
    if credited_before is not None:
        # One shop order, two gateway orders paid (the shop asked twice, the
        # customer paid twice): credit once, and have staff refund the other.
        # A real shop locks its own order row (SELECT ... FOR UPDATE) before
        # this check, so that two such callbacks at once cannot both credit.
        payment.note = (
            f"{event.trans_id} was credited already ({credited_before}); not credited: refund it"
        )
    # Compare what was paid, not only the status: a customer can pay a
    # different amount than ordered, and the gateway still reports success.
    elif event.succeeded and event.amount_matches:
        payment.credited = True
        payment.note = "credited"
    elif event.succeeded:
        payment.note = (
            f"amount mismatch: paid {payment.payed_amount} of {payment.order_amount}; not credited"
        )
    else:
        payment.note = f"not paid yet (gateway status {event.status})"
    logger.info("payment %s for %s: %s", event.id, event.trans_id, payment.note)


def on_payout_finished(sender: Flask, *, event: PayoutFinished) -> None:
    """Gateway payout result: record that the money went out, or did not."""
    if event.succeeded:
        state, finished_at = "paid", event.payed_at
    elif event.canceled:
        state, finished_at = "canceled", event.canceled_at
    else:
        state, finished_at = f"status {event.status}", None
    payout = _one(Payout, Payout.gateway_id == event.id)
    if payout is None:
        payout = Payout(gateway_id=event.id, trans_id=event.trans_id, amount="", state="")
        db.session.add(payout)
    elif payout.state in _FINAL_PAYOUT_STATES and state in _FINAL_PAYOUT_STATES:
        if state != payout.state:
            # Paid and canceled both: the gateway contradicts itself. Keep
            # the first (money may have gone out) and have staff look.
            logger.warning(
                "payout %s for %s: %s arrived after %s; kept %s (staff: check it with the gateway)",
                event.id,
                event.trans_id,
                state,
                payout.state,
                payout.state,
            )
        return
    elif payout.state in _FINAL_PAYOUT_STATES:
        # A late "processing" notice (the gateway's retry of one the shop
        # failed at first) must not turn a finished payout back into one
        # in progress.
        logger.info(
            "payout %s for %s: %s arrived after %s; kept %s",
            event.id,
            event.trans_id,
            state,
            payout.state,
            payout.state,
        )
        return
    # A canceled payout's amount goes back to the user's balance here, in a
    # real shop: this is the first move into a final state (a finished
    # payout returned above), so it happens once.
    payout.amount = str(event.order_amount)
    payout.state = state
    payout.finished_at = finished_at
    logger.info("payout %s for %s: %s", event.id, event.trans_id, state)


def on_game_order_changed(sender: Flask, *, event: GameOrderChanged) -> None:
    """SUD: one game order changed (a batch sends this once per order, all in
    one transaction). Idempotent by the shop's own ``out_order_id``."""
    game_order = _one(GameOrder, GameOrder.out_order_id == event.out_order_id)
    if game_order is None:
        game_order = GameOrder(
            out_order_id=event.out_order_id,
            order_id=event.order_id,
            cmd=event.cmd,
            from_uid=event.from_uid,
            to_uid=event.to_uid,
            value=event.value,
            status=event.status,
            notify_id=event.notify_id,
        )
        db.session.add(game_order)
    elif game_order.status in _FINAL_GAME_STATUSES:
        # A late "in progress" notice must not undo a final result, and a
        # contradicting final one is kept out too: the first one counts.
        if event.status in _FINAL_GAME_STATUSES and event.status != game_order.status:
            logger.warning(
                "game order %s (%s): %s arrived after %s; kept %s (staff: check it with SUD)",
                event.out_order_id,
                event.cmd,
                event.status,
                game_order.status,
                game_order.status,
            )
        return
    else:
        game_order.status = event.status
        game_order.notify_id = event.notify_id
    logger.info("game order %s (%s): %s", event.out_order_id, event.cmd, event.status)


def on_callback_unhandled(sender: Flask, *, event: UnhandledCallback) -> None:
    """A verified callback the shop has no code for yet (a new iGV status, a
    SUD room event...). It is answered as done, so the platform stops
    retrying, and its body stays in the deliveries table: log it so someone
    notices, and ``flask orderhooks replay KEY --force`` once it is handled."""
    logger.warning(
        "unhandled %s %s callback %s (%s); acknowledged without action",
        event.provider,
        event.callback,
        event.key,
        event.kind,
    )


def on_webhook_received(sender: Flask, *, event: StandardWebhook) -> None:
    """A Standard Webhooks message from a billing service (Svix, Resend…):
    the shop only notes it; a real one would act on ``event.type``."""
    logger.info("%s webhook %s: %s", event.source, event.id, event.type or "(no type)")


def on_delivery_dead(sender: Flask, *, delivery: StoredDelivery, error: str) -> None:
    """Every local attempt failed: a person must look. A real shop pages
    someone here (Sentry, chat, mail); the delivery waits in the store, and
    ``flask orderhooks replay KEY`` dispatches it once the cause is fixed.
    Runs after the failure was recorded, outside the delivery's transaction."""
    logger.error(
        "ALERT: %s %s %s is dead after %d attempts (%s); fix the cause, then "
        "`flask orderhooks replay %s`",
        delivery.provider,
        delivery.callback,
        delivery.key,
        delivery.attempts,
        error,
        delivery.key,
    )


def register_receivers(app: Flask) -> None:
    """Connect the shop's receivers to the OrderHooks signals sent by ``app``."""
    # Module-level functions stay alive, so blinker's weak references hold.
    order_pending_delivery.connect(on_order_pending_delivery, app)
    payment_collected.connect(on_payment_collected, app)
    payout_finished.connect(on_payout_finished, app)
    game_order_changed.connect(on_game_order_changed, app)
    callback_unhandled.connect(on_callback_unhandled, app)
    webhook_received.connect(on_webhook_received, app)
    delivery_dead.connect(on_delivery_dead, app)
