"""The typed, immutable events that signals carry as ``event=``.

Every event keeps the platform's parsed body (or, for a SUD batch, this
order's dict) in ``raw``, so fields the platform adds later are never lost.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

#: Gateway status of a successful collect or payout.
GATEWAY_SUCCESS = 60
#: Gateway status of a canceled payout.
GATEWAY_CANCELED = 50
#: SUD status of an order that executed.
SUD_EXECUTE_SUCCESS = "EXECUTE_SUCCESS"


@dataclass(frozen=True)
class OrderPendingDelivery:
    """iGV: an order was paid and passed risk review; deliver it.

    ``created_at`` is kept exactly as sent: the platform does not say which
    time zone it is in.
    """

    request_id: str
    timestamp: datetime
    order_id: int
    order_num: str
    seller_order_status: int
    buyer_id: str
    created_at: str | None
    raw: dict[str, Any] = field(repr=False)


@dataclass(frozen=True)
class PaymentCollected:
    """Payment gateway: a collect order reached a result.

    Credit only when ``succeeded and amount_matches``: the user may have paid a
    different amount than ordered.
    """

    id: str
    trans_id: str
    mch_id: int
    order_amount: Decimal
    payed_amount: Decimal | None
    channel: str | None
    status: int
    created_at: str | None
    payed_at: str | None
    raw: dict[str, Any] = field(repr=False)

    @property
    def succeeded(self) -> bool:
        return self.status == GATEWAY_SUCCESS

    @property
    def amount_matches(self) -> bool:
        return self.payed_amount is not None and self.payed_amount == self.order_amount


@dataclass(frozen=True)
class PayoutFinished:
    """Payment gateway: a payout order reached its final result."""

    id: str
    trans_id: str
    mch_id: int
    order_amount: Decimal
    status: int
    created_at: str | None
    payed_at: str | None
    canceled_at: str | None
    raw: dict[str, Any] = field(repr=False)

    @property
    def succeeded(self) -> bool:
        return self.status == GATEWAY_SUCCESS

    @property
    def canceled(self) -> bool:
        return self.status == GATEWAY_CANCELED


@dataclass(frozen=True)
class GameOrderChanged:
    """SUD: one game order changed. A batch notification sends one per order."""

    notify_id: str
    notify_time: datetime
    app_id: str
    notify_event: str
    order_id: str
    out_order_id: str
    out_group_id: str | None
    mg_id: str
    room_id: str
    game_round_id: str | None
    cmd: str
    from_uid: str
    to_uid: str
    value: int | None
    seq: int | None
    payload: dict[str, Any] | None
    status: str
    raw: dict[str, Any] = field(repr=False)

    @property
    def succeeded(self) -> bool:
        return self.status == SUD_EXECUTE_SUCCESS


@dataclass(frozen=True)
class UnhandledCallback:
    """A verified delivery that no specific signal covers: an iGV status other
    than Pending Delivery, or a SUD event other than an order change.

    :param provider: ``"igv"``, ``"gateway"`` or ``"sud"``.
    :param callback: the route's callback name, e.g. ``"order-status"``.
    :param key: the delivery's idempotency key.
    :param kind: what the platform called it (the iGV status, the SUD event).
    """

    provider: str
    callback: str
    key: str
    kind: str
    raw: dict[str, Any] = field(repr=False)


@dataclass(frozen=True)
class StandardWebhook:
    """A `Standard Webhooks <https://www.standardwebhooks.com/>`_ message
    (Svix, Resend, Clerk, Supabase and others), verified.

    :param source: the configured source it came from (the route's name, a
        key of ``ORDERHOOKS_STANDARD_WEBHOOKS``).
    :param id: the ``webhook-id``: the same on every retry of the message.
    :param timestamp: the signed ``webhook-timestamp``, aware UTC.
    :param type: the payload's ``type`` (e.g. ``"invoice.paid"``), if any.
    :param data: the payload's ``data``, if any (usually an object).
    :param raw: the whole parsed body.

    .. versionadded:: 0.3
    """

    source: str
    id: str
    timestamp: datetime
    type: str | None
    data: Any
    raw: dict[str, Any] = field(repr=False)
