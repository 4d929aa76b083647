"""SUD game platform: the order changed notification, single and batch.

The platform signs ``app_id\\ntimestamp\\nnonce\\nraw_body\\n`` with
HMAC-SHA1 (lower-case hex) using the app's secret, in the ``Sud-*`` headers.
The raw body bytes are signed, never a re-serialised dict. The platform reads
the JSON answer: ``ret_code`` 0 is done, anything else is a failure.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Mapping
from typing import Any, ClassVar

from flask import Response, json

from .config import Secrets, read_optional_seconds, read_seconds, read_secrets
from .events import GameOrderChanged, UnhandledCallback
from .exc import BadSignature, ConfigurationError, MalformedPayload
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
    opt_int,
    opt_str,
    req_object,
    req_str,
    signature_matches,
    utc_from_ms,
)
from .signals import callback_unhandled, game_order_changed

logger = logging.getLogger("flask_orderhooks")

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
    """The SUD game platform: ``ORDERHOOKS_SUD_APPS`` (``{app_id: secret or
    rotation list}``) turns it on; ``ORDERHOOKS_SUD_VERIFY`` (default True),
    ``ORDERHOOKS_SUD_MAX_AGE`` (seconds or ``None``),
    ``ORDERHOOKS_SUD_TIMESTAMP_UNIT`` (``"ms"`` or ``"s"``) and
    ``ORDERHOOKS_SUD_FAILURE_HTTP_STATUS`` (``None`` or an HTTP status)."""

    name = "sud"
    routes: Mapping[str, str] = {"order-changed": "/sud/order-changed"}
    signed_headers = ("Sud-AppId", "Sud-Timestamp", "Sud-Nonce", "Sud-Signature")
    signals = (game_order_changed, callback_unhandled)
    config_defaults: ClassVar[Mapping[str, Any]] = {
        "ORDERHOOKS_SUD_APPS": None,
        "ORDERHOOKS_SUD_VERIFY": True,
        "ORDERHOOKS_SUD_MAX_AGE": 3600,
        "ORDERHOOKS_SUD_TIMESTAMP_UNIT": "ms",
        # SUD reads ret_code; which HTTP status it expects on a failure is
        # not documented: by default the pipeline's own (400, 401, 503...).
        "ORDERHOOKS_SUD_FAILURE_HTTP_STATUS": None,
    }

    def __init__(
        self,
        apps: Mapping[str, Secrets],
        *,
        verify: bool = True,
        max_age: float | None = 3600,
        max_skew: float = 300,
        timestamp_unit: str = "ms",
        failure_http_status: int | None = None,
    ) -> None:
        self.apps = apps
        self.failure_http_status = failure_http_status
        self.verify = verify
        self.max_age = max_age
        self.max_skew = max_skew
        self.timestamp_unit = timestamp_unit
        # Unverified, anyone can post any notify_id at any time.
        self.replay_window = acceptance_window(max_age, max_skew) if verify else None

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> SUDProvider | None:
        unit = config.get("ORDERHOOKS_SUD_TIMESTAMP_UNIT")
        if unit not in ("ms", "s"):
            raise ConfigurationError(
                "ORDERHOOKS_SUD_TIMESTAMP_UNIT", f'must be "ms" or "s", not {unit!r}.'
            )
        verify = config.get("ORDERHOOKS_SUD_VERIFY")
        if not isinstance(verify, bool):
            raise ConfigurationError("ORDERHOOKS_SUD_VERIFY", "must be True or False.")
        # Zero would refuse every callback: none arrives in the instant it was signed.
        max_age = read_optional_seconds(config, "ORDERHOOKS_SUD_MAX_AGE", positive=True)
        failure_http_status = _failure_http_status(config.get("ORDERHOOKS_SUD_FAILURE_HTTP_STATUS"))
        apps = _sud_apps(config.get("ORDERHOOKS_SUD_APPS"))
        if not apps:
            return None
        if not verify:
            logger.warning(
                "OrderHooks: ORDERHOOKS_SUD_VERIFY is False: SUD callbacks are accepted "
                "WITHOUT checking their signature. Anyone can post game orders."
            )
        return cls(
            apps,
            verify=verify,
            max_age=max_age,
            max_skew=read_seconds(config, "ORDERHOOKS_MAX_CLOCK_SKEW"),
            timestamp_unit=str(unit),
            failure_http_status=failure_http_status,
        )

    def read(
        self, callback: str, body: bytes, headers: Mapping[str, str], *, now: float | None
    ) -> Delivery:
        apps = self.apps
        header_app_id: str | None = None
        if self.verify:
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
        if self.timestamp_unit == "s":
            stamp *= 1000
        check_age(stamp, now, self.max_age, self.max_skew, "Sud-Timestamp")
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
        http_status = status
        if status != 200 and self.failure_http_status is not None:
            http_status = self.failure_http_status
        return Response(json.dumps(payload), status=http_status, mimetype="application/json")


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


def _sud_apps(value: object) -> Mapping[str, Secrets] | None:
    key = "ORDERHOOKS_SUD_APPS"
    if value is None:
        return None
    if not isinstance(value, Mapping) or not value:
        raise ConfigurationError(key, "must be a non-empty mapping {app_id: secret or list}.")
    apps: dict[str, Secrets] = {}
    for app_id, secrets in value.items():
        if isinstance(app_id, bool) or not isinstance(app_id, (str, int)) or not str(app_id):
            raise ConfigurationError(key, "app ids must be non-empty strings.")
        if str(app_id) in apps:
            # 1 and "1" are one app: which secret would verify?
            raise ConfigurationError(key, f"the app id {str(app_id)!r} is given twice.")
        apps[str(app_id)] = read_secrets(f"{key}[{app_id!r}]", secrets)
    return apps


def _failure_http_status(value: object) -> int | None:
    key = "ORDERHOOKS_SUD_FAILURE_HTTP_STATUS"
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 200 <= value <= 599:
        raise ConfigurationError(
            key, f"must be None or an HTTP status from 200 to 599, not {value!r}."
        )
    return value
