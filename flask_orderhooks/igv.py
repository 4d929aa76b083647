"""iGV marketplace: the order status callback.

The platform signs ``X-Timestamp + X-Request-Id + secret`` with HMAC-SHA256
and compares hex case-insensitively. **The body is not signed**: the store is
what keeps a captured request id from being replayed with another body.
Only the HTTP status of the answer is read: 200 is done, anything else retried.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping
from typing import Any, ClassVar

from flask import Response

from .config import Secrets, read_optional_seconds, read_seconds, read_secrets
from .events import OrderPendingDelivery, UnhandledCallback
from .exc import BadSignature
from .jsonbody import parse_object
from .provider import (
    Delivery,
    Dispatch,
    Provider,
    acceptance_window,
    check_age,
    header,
    header_bytes,
    millisecond_timestamp,
    opt_str,
    req_int,
    req_str,
    signature_matches,
    utc_from_ms,
)
from .signals import callback_unhandled, order_pending_delivery

#: Unix milliseconds from 2001 to 2286: always 13 digits, never a leading
#: zero. The signed text joins the timestamp and the request id with no
#: separator, so only a fixed length keeps a digit from moving between them:
#: ("1734850099000", "2002…") and ("173485009900", "02002…") sign alike, and
#: the second is a new request id that carries any body (with no
#: ``ORDERHOOKS_IGV_MAX_AGE``, its timestamp is not refused as too old).
_TIMESTAMP = re.compile(r"[1-9][0-9]{12}")

#: ``sellerOrderStatus`` of an order awaiting delivery, the one status pushed today.
PENDING_DELIVERY = 1


def igv_signature(timestamp: str, request_id: str, secret: bytes) -> str:
    """The ``X-Signature`` the platform sends: lower-case hex."""
    message = timestamp.encode("latin-1") + request_id.encode("latin-1") + secret
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


class IGVProvider(Provider):
    """The iGV marketplace: ``ORDERHOOKS_IGV_SECRET`` (a secret or a rotation
    list, oldest first) turns it on; ``ORDERHOOKS_IGV_MAX_AGE`` (seconds, or
    ``None`` for no window) bounds a signed timestamp's age."""

    name = "igv"
    routes: Mapping[str, str] = {"order-status": "/igv/order-status"}
    signed_headers = ("X-Timestamp", "X-Request-Id", "X-Signature")
    key_header = "X-Request-Id"
    signals = (order_pending_delivery, callback_unhandled)
    config_defaults: ClassVar[Mapping[str, Any]] = {
        "ORDERHOOKS_IGV_SECRET": None,
        # The platform retries for 35 minutes; an hour covers it.
        "ORDERHOOKS_IGV_MAX_AGE": 3600,
    }

    def __init__(self, secrets: Secrets, *, max_age: float | None, max_skew: float) -> None:
        self.secrets = secrets
        self.max_age = max_age
        self.max_skew = max_skew
        self.replay_window = acceptance_window(max_age, max_skew)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> IGVProvider | None:
        value = config.get("ORDERHOOKS_IGV_SECRET")
        # Zero would refuse every callback: none arrives in the instant it was signed.
        max_age = read_optional_seconds(config, "ORDERHOOKS_IGV_MAX_AGE", positive=True)
        if value is None:
            return None
        return cls(
            read_secrets("ORDERHOOKS_IGV_SECRET", value),
            max_age=max_age,
            max_skew=read_seconds(config, "ORDERHOOKS_MAX_CLOCK_SKEW"),
        )

    def read(
        self, callback: str, body: bytes, headers: Mapping[str, str], *, now: float | None
    ) -> Delivery:
        secrets = self.secrets
        timestamp = header(headers, "X-Timestamp")
        request_id = header(headers, "X-Request-Id")
        given = header(headers, "X-Signature")
        # Decoding first makes a non-latin-1 header a bad signature, not a 500.
        header_bytes(timestamp, "X-Timestamp")
        header_bytes(request_id, "X-Request-Id")
        if not any(
            signature_matches(igv_signature(timestamp, request_id, secret), given.lower())
            for secret in secrets.newest_first
        ):
            raise BadSignature("The X-Signature does not match.")
        timestamp_ms = millisecond_timestamp(timestamp, "X-Timestamp header")
        check_age(
            timestamp_ms,
            now,
            self.max_age,
            self.max_skew,
            "X-Timestamp",
        )
        if not _TIMESTAMP.fullmatch(timestamp):
            # After the window, which already refuses a digit moved either
            # way (ten times too old or too new); without one, this is what
            # does. Refused as unsigned: the signature does not say where
            # the timestamp ends and the request id begins.
            raise BadSignature(
                "The X-Timestamp header is not 13 digits of Unix milliseconds, so the "
                "signature does not bind the request id."
            )
        data = parse_object(body)
        status = req_int(data, "sellerOrderStatus")
        event: object
        if status == PENDING_DELIVERY:
            signal = order_pending_delivery
            event = OrderPendingDelivery(
                request_id=request_id,
                timestamp=utc_from_ms(timestamp_ms),
                order_id=req_int(data, "orderId"),
                order_num=req_str(data, "orderNum"),
                seller_order_status=status,
                buyer_id=req_str(data, "buyerId"),
                created_at=opt_str(data, "createdAt"),
                raw=data,
            )
        else:
            signal = callback_unhandled
            event = UnhandledCallback(
                provider=self.name,
                callback=callback,
                key=request_id,
                kind=f"sellerOrderStatus={status}",
                raw=data,
            )
        return Delivery(
            provider=self.name,
            callback=callback,
            key=request_id,
            body=body,
            headers={name: headers[name] for name in self.signed_headers},
            dispatches=(Dispatch(signal, event),),
            reference=_reference(data.get("orderId")),
        )

    def answer(self, status: int, reason: str) -> Response:
        return Response(reason, status=status, mimetype="text/plain")


def _reference(order_id: object) -> str | None:
    # Any status carries the order: support staff search by it.
    if isinstance(order_id, bool) or not isinstance(order_id, (int, str)):
        return None
    return str(order_id) or None
