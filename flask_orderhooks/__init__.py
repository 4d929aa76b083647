"""flask-orderhooks: verified, exactly-once order and payment callbacks for Flask."""

from __future__ import annotations

from .builtin import BUILTIN_PROVIDERS
from .events import (
    GameOrderChanged,
    OrderPendingDelivery,
    PaymentCollected,
    PayoutFinished,
    StandardWebhook,
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
    ReceiverCommit,
    ReceiverFailed,
    RequestRefused,
    SignatureExpired,
    SourceForbidden,
    StaleSnapshot,
    StoreUnavailable,
)
from .extension import OrderHooks, get_extension
from .gateway import GatewayProvider
from .igv import IGVProvider
from .provider import Delivery, Dispatch, Provider
from .signals import (
    callback_unhandled,
    delivery_dead,
    delivery_failed,
    game_order_changed,
    order_pending_delivery,
    payment_collected,
    payout_finished,
    webhook_received,
)
from .standard_webhooks import StandardWebhooksProvider
from .sud import SUDProvider

__all__ = [
    "BUILTIN_PROVIDERS",
    "BadSignature",
    "CallbackError",
    "ConfigurationError",
    "Delivery",
    "Dispatch",
    "GameOrderChanged",
    "GatewayProvider",
    "IGVProvider",
    "KeyConflict",
    "MalformedPayload",
    "NoReceiver",
    "OrderHooks",
    "OrderHooksError",
    "OrderPendingDelivery",
    "PayloadTooLarge",
    "PaymentCollected",
    "PayoutFinished",
    "Provider",
    "ReceiverCommit",
    "ReceiverFailed",
    "RequestRefused",
    "SUDProvider",
    "SignatureExpired",
    "SourceForbidden",
    "StaleSnapshot",
    "StandardWebhook",
    "StandardWebhooksProvider",
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
    "webhook_received",
]
