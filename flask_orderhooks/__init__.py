"""flask-orderhooks: verified, exactly-once order and payment callbacks for Flask."""

from __future__ import annotations

from .events import (
    GameOrderChanged,
    OrderPendingDelivery,
    PaymentCollected,
    PayoutFinished,
    UnhandledCallback,
)
from .exc import (
    BadSignature,
    CallbackError,
    ConfigurationError,
    KeyConflict,
    MalformedPayload,
    NoReceiver,
    OrderHooksError,
    PayloadTooLarge,
    ReceiverFailed,
    RequestRefused,
    SignatureExpired,
    SourceForbidden,
    StaleSnapshot,
    StoreUnavailable,
)
from .extension import OrderHooks, get_extension
from .signals import (
    callback_unhandled,
    delivery_dead,
    delivery_failed,
    game_order_changed,
    order_pending_delivery,
    payment_collected,
    payout_finished,
)

__all__ = [
    "BadSignature",
    "CallbackError",
    "ConfigurationError",
    "GameOrderChanged",
    "KeyConflict",
    "MalformedPayload",
    "NoReceiver",
    "OrderHooks",
    "OrderHooksError",
    "OrderPendingDelivery",
    "PayloadTooLarge",
    "PaymentCollected",
    "PayoutFinished",
    "ReceiverFailed",
    "RequestRefused",
    "SignatureExpired",
    "SourceForbidden",
    "StaleSnapshot",
    "StoreUnavailable",
    "UnhandledCallback",
    "callback_unhandled",
    "delivery_dead",
    "delivery_failed",
    "game_order_changed",
    "get_extension",
    "order_pending_delivery",
    "payment_collected",
    "payout_finished",
]
