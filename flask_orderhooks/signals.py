"""The signals host code subscribes to.

Each is sent with the Flask application object as sender (connect with
``signal.connect_via(app)`` or ``signal.connect(receiver, app)``) and exactly
one keyword argument, ``event``, an object from :mod:`flask_orderhooks.events`.
Receivers run inside the delivery's transaction: with ``OrderHooks(db=db)``
their ``db.session`` writes commit together with the delivery record, and an
exception rolls them back and makes the platform retry.
"""

from __future__ import annotations

from blinker import Namespace

_signals = Namespace()

#: iGV order status became Pending Delivery. ``event``: :class:`~.events.OrderPendingDelivery`.
order_pending_delivery = _signals.signal("orderhooks.order-pending-delivery")
#: Gateway collect order result. ``event``: :class:`~.events.PaymentCollected`.
payment_collected = _signals.signal("orderhooks.payment-collected")
#: Gateway payout order result. ``event``: :class:`~.events.PayoutFinished`.
payout_finished = _signals.signal("orderhooks.payout-finished")
#: SUD game order changed, once per order. ``event``: :class:`~.events.GameOrderChanged`.
game_order_changed = _signals.signal("orderhooks.game-order-changed")
#: A Standard Webhooks message, from any configured source. ``event``:
#: :class:`~.events.StandardWebhook` (tell sources apart by ``event.source``).
webhook_received = _signals.signal("orderhooks.webhook-received")
#: A verified delivery no other signal covers. ``event``: :class:`~.events.UnhandledCallback`.
callback_unhandled = _signals.signal("orderhooks.callback-unhandled")

# Operators' signals: sent after the store recorded what happened, never
# inside the delivery's transaction, so a receiver that raises (a chat
# webhook that is down) changes nothing about the delivery; it is logged.

#: An attempt failed. Keywords: ``delivery`` (the stored
#: :class:`~flask_orderhooks.store.StoredDelivery`, as recorded), ``error``
#: (the error text), ``next_attempt_at`` (aware UTC ``datetime``, or ``None``
#: when no local attempt is left).
delivery_failed = _signals.signal("orderhooks.delivery-failed")
#: The last local attempt failed: the delivery is ``dead`` until a platform's
#: resend or ``flask orderhooks replay`` revives it. Keywords: ``delivery``,
#: ``error``. Sent once each time a delivery gives up.
delivery_dead = _signals.signal("orderhooks.delivery-dead")
