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
#: A verified delivery no other signal covers. ``event``: :class:`~.events.UnhandledCallback`.
callback_unhandled = _signals.signal("orderhooks.callback-unhandled")
