"""SUD game platform: the order changed notification, single and batch.

The platform signs ``app_id\\ntimestamp\\nnonce\\nraw_body\\n`` with
HMAC-SHA1 (lower-case hex) using the app's secret, in the ``Sud-*`` headers.
The raw body bytes are signed, never a re-serialised dict. The platform reads
the JSON answer: ``ret_code`` 0 is done, anything else is a failure.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from typing import Any, ClassVar

from flask import Response, json

from .events import GameOrderChanged, UnhandledCallback
from .exc import BadSignature, MalformedPayload
from .jsonbody import parse_object
from .provider import (
    Delivery,
    Dispatch,
    Provider,
    check_age,
    header,
    header_bytes,
    millisecond_timestamp,
    opt_int,
    opt_str,
    req_object,
    req_str,
    signature_matches,
    utc_from_ms,
)
from .signals import callback_unhandled, game_order_changed

ORDER_CHANGED = "sud.mg.merchant.order.changed"
ORDER_BATCH_CHANGED = "sud.mg.merchant.order.batch.changed"


def sud_signature(app_id: str, timestamp: str, nonce: str, body: bytes, secret: bytes) -> str:
    """The ``Sud-Signature`` the platform sends: lower-case hex HMAC-SHA1."""
    message = b"%s\n%s\n%s\n%s\n" % (
        app_id.encode("latin-1"),
        timestamp.encode("latin-1"),
        nonce.encode("latin-1"),
        body,
    )
    return hmac.new(secret, message, hashlib.sha1).hexdigest()


class SUDProvider(Provider):
    name = "sud"
    routes: ClassVar[Mapping[str, str]] = {"order-changed": "/sud/order-changed"}
    signed_headers = ("Sud-AppId", "Sud-Timestamp", "Sud-Nonce", "Sud-Signature")

    def read(
        self, callback: str, body: bytes, headers: Mapping[str, str], *, now: float | None
    ) -> Delivery:
        apps = self.settings.sud_apps
        assert apps is not None, "the SUD route exists only when apps are configured"
        header_app_id: str | None = None
        if self.settings.sud_verify:
            header_app_id = self._verify(apps, body, headers, now)
        data = parse_object(body)
        app_id = req_str(data, "app_id")
        if header_app_id is not None and app_id != header_app_id:
            raise BadSignature("The body's app_id is not the Sud-AppId header's.")
        if app_id not in apps:
            raise BadSignature("The app_id is not configured.")
        notify_id = req_str(data, "notify_id")
        notify_time_text = req_str(data, "notify_time")
        notify_time = utc_from_ms(millisecond_timestamp(notify_time_text, "field 'notify_time'"))
        notify_event = req_str(data, "notify_event")
        common = {
            "notify_id": notify_id,
            "notify_time": notify_time,
            "app_id": app_id,
            "notify_event": notify_event,
        }
        if notify_event == ORDER_CHANGED:
            orders = [req_object(data, "data")]
            dispatches = tuple(
                Dispatch(game_order_changed, _order(order, common)) for order in orders
            )
        elif notify_event == ORDER_BATCH_CHANGED:
            batch = req_object(data, "data")
            entries = batch.get("orders")
            if not isinstance(entries, list) or not all(isinstance(o, dict) for o in entries):
                raise MalformedPayload("The field 'orders' must be a list of objects.")
            # Entries may leave the batch-level fields out; fill them in.
            shared: dict[str, Any] = {k: batch[k] for k in ("mg_id", "room_id") if k in batch}
            dispatches = tuple(
                Dispatch(game_order_changed, _order({**shared, **entry}, common, raw=entry))
                for entry in entries
            )
        else:
            dispatches = (
                Dispatch(
                    callback_unhandled,
                    UnhandledCallback(
                        provider=self.name,
                        callback=callback,
                        key=notify_id,
                        kind=notify_event,
                        raw=data,
                    ),
                ),
            )
        return Delivery(
            provider=self.name,
            callback=callback,
            key=notify_id,
            body=body,
            headers={name: headers[name] for name in self.signed_headers if name in headers},
            dispatches=dispatches,
            # The merchant's order id (a batch's first): what support staff
            # look up. UnhandledCallback events carry none.
            reference=next(
                (d.event.out_order_id for d in dispatches if isinstance(d.event, GameOrderChanged)),
                None,
            ),
        )

    def _verify(
        self,
        apps: Mapping[str, Any],
        body: bytes,
        headers: Mapping[str, str],
        now: float | None,
    ) -> str:
        app_id = header(headers, "Sud-AppId")
        timestamp = header(headers, "Sud-Timestamp")
        nonce = header(headers, "Sud-Nonce")
        given = header(headers, "Sud-Signature")
        for name, value in (
            ("Sud-AppId", app_id),
            ("Sud-Timestamp", timestamp),
            ("Sud-Nonce", nonce),
        ):
            header_bytes(value, name)
        secrets = apps.get(app_id)
        if secrets is None:
            raise BadSignature("The Sud-AppId is not configured.")
        if not any(
            signature_matches(sud_signature(app_id, timestamp, nonce, body, secret), given)
            for secret in secrets.newest_first
        ):
            raise BadSignature("The Sud-Signature does not match.")
        stamp = millisecond_timestamp(timestamp, "Sud-Timestamp header")
        if self.settings.sud_timestamp_unit == "s":
            stamp *= 1000
        check_age(
            stamp, now, self.settings.sud_max_age, self.settings.max_clock_skew, "Sud-Timestamp"
        )
        return app_id

    def answer(self, status: int, reason: str) -> Response:
        payload = (
            {"ret_code": 0, "ret_msg": "SUCCESS"}
            if status == 200
            else {
                "ret_code": status,
                "ret_msg": reason,
            }
        )
        return Response(json.dumps(payload), status=status, mimetype="application/json")


def _order(
    order: dict[str, Any], common: Mapping[str, Any], raw: dict[str, Any] | None = None
) -> GameOrderChanged:
    payload = order.get("payload")
    if payload is not None and not isinstance(payload, dict):
        raise MalformedPayload("The field 'payload' must be an object.")
    return GameOrderChanged(
        order_id=req_str(order, "order_id"),
        out_order_id=req_str(order, "out_order_id"),
        out_group_id=opt_str(order, "out_group_id"),
        mg_id=req_str(order, "mg_id"),
        room_id=req_str(order, "room_id"),
        # SUD's English docs say game_round_id, its Chinese docs round_id.
        game_round_id=opt_str(order, "game_round_id") or opt_str(order, "round_id"),
        cmd=req_str(order, "cmd"),
        from_uid=req_str(order, "from_uid"),
        to_uid=req_str(order, "to_uid"),
        value=opt_int(order, "value"),
        seq=opt_int(order, "seq"),
        payload=payload,
        status=req_str(order, "status"),
        raw=order if raw is None else raw,
        **common,
    )
